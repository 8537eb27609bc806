"""Retrievers on a 30-question slice of the bundled HotpotQA sample (its own ~300-passage corpus): recall well above
chance, the batched interface's edge cases, the on-disk index cache, RRF, and `rag-dpo retrieve`."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from rag_dpo.errors import InputError
from rag_dpo.paths import DEFAULT_DATA as HOTPOT_DEV
from rag_dpo.records import Corpus, Passage, Question
from rag_dpo.retrieval import RETRIEVERS, Retriever, build_retriever, evaluate_retrieval, tokenize
from rag_dpo.retrieval.cache import index_dir, is_built, write_index
from rag_dpo.retrieval.hybrid import reciprocal_rank_fusion


def _slice(n: int):
    from rag_dpo.data import dataset_from_rows
    with open(HOTPOT_DEV, encoding="utf-8") as f:
        rows = [json.loads(line) for line in islice(f, n)]
    return dataset_from_rows(rows, format="ircot", source="hotpot-slice")


@pytest.fixture(scope="module")
def hotpot30():
    return _slice(30)


TINY = Corpus([Passage("a", "Paris", "Paris is the capital of France."),
               Passage("b", "Berlin", "Berlin is the capital of Germany."),
               Passage("c", "Rome", "Rome is the capital of Italy and has the Colosseum.")], name="tiny")


@pytest.mark.parametrize("name", ["bm25", "bm25s"])
def test_bm25_recall_well_above_chance(hotpot30, name):
    corpus = hotpot30.corpus
    r = build_retriever(name, corpus, show_progress=False)
    result = evaluate_retrieval(hotpot30.questions, r, k=5)
    chance = 5 / len(corpus)                       # ~0.017 for ~300 passages
    assert result["questions"] == 30
    assert result["recall"] > 0.6 > 20 * chance
    assert set(result["by_hops"]) == {"2"} and result["by_hops"]["2"]["n"] == 30
    hits = r.search([q.question for q in hotpot30.questions[:5]], 5)
    for row in hits:
        assert 0 < len(row) <= 5 and all(pid in corpus for pid, _ in row)
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True)


def test_bm25_and_bm25s_rank_alike(hotpot30):
    """Same tokenizer and k1/b: the two implementations agree on the top passage for nearly every question."""
    queries = [q.question for q in hotpot30.questions]
    a = build_retriever("bm25", hotpot30.corpus, show_progress=False).search(queries, 1)
    b = build_retriever("bm25s", hotpot30.corpus, show_progress=False).search(queries, 1)
    agree = sum(x[0][0] == y[0][0] for x, y in zip(a, b))
    assert agree >= 0.9 * len(queries)


def test_tokenizer_is_shared_and_drops_stopwords():
    assert tokenize("The Eiffel-Tower, in PARIS!") == ["the", "eiffel", "tower", "in", "paris"]
    from rag_dpo.retrieval.bm25 import stopword_set
    assert tokenize("The Eiffel-Tower, in PARIS!", stopword_set("en")) == ["eiffel", "tower", "paris"]
    with pytest.raises(InputError):
        stopword_set("klingon")


@pytest.mark.parametrize("name", ["bm25", "bm25s"])
def test_edge_cases(name):
    r = build_retriever(name, TINY, show_progress=False, cache=False)
    assert r.search([], 5) == []
    hits = r.search(["capital of Italy", "Germany", "zzz unknown words", ""], 10)   # k > corpus size
    assert len(hits) == 4
    assert hits[0][0][0] == "c" and len(hits[0]) == 3        # every passage shares "capital"
    assert [pid for pid, _ in hits[1]] == ["b"]               # only passages sharing a term are returned
    assert hits[2] == [] and hits[3] == []
    with pytest.raises(InputError):
        r.search(["x"], 0)
    with pytest.raises(TypeError):
        r.search("a single string", 3)


def test_unknown_retriever_option_and_empty_corpus():
    with pytest.raises(InputError, match="unknown retriever 'bm26'"):
        build_retriever("bm26", TINY)
    with pytest.raises(InputError, match="no option 'k2'"):
        build_retriever("bm25s", TINY, k2=3)
    with pytest.raises(InputError, match="empty"):
        build_retriever("bm25s", Corpus([]))
    assert set(RETRIEVERS) == {"bm25", "bm25s", "dense", "hybrid"}
    assert all(issubclass(c, Retriever) for c in RETRIEVERS.values())


def test_bm25s_index_cache_hit_and_safe_format(hotpot30):
    corpus = hotpot30.corpus
    first = build_retriever("bm25s", corpus, k1=1.2, show_progress=False)
    second = build_retriever("bm25s", corpus, k1=1.2, show_progress=False)
    assert not first.from_cache and second.from_cache
    queries = [q.question for q in hotpot30.questions[:10]]
    assert first.search(queries, 5) == second.search(queries, 5)
    path = index_dir(corpus, "bm25s", second.settings())
    files = {p.suffix for p in path.iterdir()}
    assert files <= {".json", ".npy"}
    for npy in path.glob("*.npy"):
        np.load(npy, allow_pickle=False)
    # A different setting is a different index, and an edited corpus too.
    assert not build_retriever("bm25s", corpus, k1=0.9, show_progress=False).from_cache
    edited = Corpus([Passage(p.id, p.title, p.text + " extra") for p in corpus])
    assert index_dir(edited, "bm25s", second.settings()) != path


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_DPO_CACHE", str(tmp_path))
    path = index_dir(TINY, "bm25s", {"x": 1})

    def broken(folder):
        (folder / "half.npy").write_bytes(b"xx")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_index(path, broken, meta={})
    assert not path.exists() and list(path.parent.iterdir()) == []
    write_index(path, lambda folder: (folder / "a.json").write_text("{}"), meta={"ok": 1})
    assert is_built(path) and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_reciprocal_rank_fusion_hand_worked():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], rrf_k=60)
    assert [pid for pid, _ in fused] == ["a", "c", "b", "d"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[3][1] == pytest.approx(1 / 63)


def test_evaluate_counts_questions_without_support():
    class Oracle(Retriever):
        name = "oracle"

        def _search(self, queries, k):
            return [[("b", 1.0), ("a", 0.5)] for _ in queries]

    qs = [Question("1", "q1", ["x"], ["b"], hops=1, type="bridge"),
          Question("2", "q2", ["x"], ["a", "c"], hops=2, type="comparison"),
          Question("3", "q3", ["x"], [], hops=None)]
    res = evaluate_retrieval(qs, Oracle(TINY), k=1)
    assert res["questions"] == 2 and res["without_support"] == 1
    assert res["recall"] == pytest.approx((1.0 + 0.0) / 2)
    assert res["by_hops"]["1"]["recall"] == 1.0 and res["by_hops"]["2"]["recall"] == 0.0
    assert res["by_type"]["comparison"]["precision"] == 0.0
    with pytest.raises(InputError, match="no question has supporting passages"):
        evaluate_retrieval(qs[2:], Oracle(TINY), k=1)


def test_retrieve_command_json(tmp_path):
    from typer.testing import CliRunner
    import typer
    from rag_dpo.retrieval.commands import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)     # a second command keeps typer's subcommand form
    data = tmp_path / "slice.jsonl"
    with open(HOTPOT_DEV, encoding="utf-8") as f:
        data.write_text("".join(islice(f, 20)), encoding="utf-8")
    result = CliRunner().invoke(app, ["retrieve", str(data), "--retriever", "bm25s", "--k", "5", "--limit", "12",
                                      "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["questions"] == 12 and out["k"] == 5 and out["retriever"] == "bm25s"
    assert 0.5 < out["recall"] <= 1.0 and out["queries_per_s"] > 0 and "2" in out["by_hops"]
    bad = CliRunner().invoke(app, ["retrieve", str(data), "--retriever", "tfidf"])
    assert isinstance(bad.exception, InputError) and "tfidf" in str(bad.exception)


@pytest.mark.integration
def test_dense_and_hybrid_with_bundled_minilm():
    data = _slice(8)
    corpus, questions = data.corpus, data.questions
    dense = build_retriever("dense", corpus, show_progress=False)
    res = evaluate_retrieval(questions, dense, k=5)
    assert res["recall"] > 0.5 > 5 * (5 / len(corpus))            # chance is 5 / 80
    again = build_retriever("dense", corpus, show_progress=False)
    assert not dense.from_cache and again.from_cache
    np.testing.assert_allclose(np.linalg.norm(again.embeddings, axis=1), 1.0, atol=1e-4)
    assert len(dense.search(["capital"], 10 * len(corpus))[0]) == len(corpus)     # k > corpus size
    hybrid = build_retriever("hybrid", corpus, show_progress=False)
    assert hybrid.dense.from_cache                 # reuses the cached embeddings
    assert evaluate_retrieval(questions, hybrid, k=5)["recall"] > 0.5
