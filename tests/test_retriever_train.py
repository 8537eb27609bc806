"""Generator feedback trains the retriever (rag_dpo.train.retriever, rag_dpo.retrieval.trained): the usefulness target,
the three trainers, the end-to-end gradient, loading a trained retriever by path, and the split guard.

Encoders are tiny randomly initialised BERTs with the bundled MiniLM's tokenizer, built in-process; one integration
test scores real passages with the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_dpo.data import assign_split
from rag_dpo.errors import InputError
from rag_dpo.records import Corpus, Passage, Question
from rag_dpo.train.retriever import (RetrieverSettings, answer_loglik, check_train_split, question_queries,
                                     read_scores, score_queries, soft_top_k, soft_top_k_answer_loss,
                                     target_distribution, train_retriever)

PASSAGES = [
    Passage("p0", "Paris", "Paris is the capital and largest city of France."),
    Passage("p1", "Berlin", "Berlin is the capital of Germany and its largest city."),
    Passage("p2", "Banana", "The banana is an elongated edible fruit produced by plants."),
    Passage("p3", "Ocean", "The ocean covers about seventy percent of the surface of the Earth."),
]
CORPUS = Corpus(PASSAGES, name="hand-built")


def _train_ids(n: int, split: str = "train") -> list[str]:
    out, i = [], 0
    while len(out) < n:
        if assign_split(f"q{i}") == split:
            out.append(f"q{i}")
        i += 1
    return out


def _records(ids: list[str], good: int = 0) -> list[dict]:
    """Hand-built usefulness records: candidate `good` (p0) helps the answer, the others do not."""
    queries = ["what is the capital of france", "capital city of france", "which city is france's capital",
               "france capital"]
    out = []
    for i, qid in enumerate(ids):
        ll = [-2.0 if j == good else -9.0 for j in range(4)]
        out.append({"key": qid, "question_id": qid, "source": "question", "query": queries[i % len(queries)],
                    "answer": "Paris", "candidates": ["p0", "p1", "p2", "p3"], "ll": ll, "ll_none": -8.0,
                    "usefulness": [x + 8.0 for x in ll]})
    return out


@pytest.fixture(scope="module")
def tiny_encoder_dirs(tmp_path_factory):
    """(hf folder, sentence-transformers folder) of a tiny random BERT with MiniLM's tokenizer."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rag_dpo.retrieval.dense import bundled_model_path
    import torch
    d = tmp_path_factory.mktemp("tiny_encoder")
    tok = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d / "hf")
    tok.save_pretrained(d / "hf")
    st = SentenceTransformer(modules=[models.Transformer(str(d / "hf"), max_seq_length=64),
                                      models.Pooling(32), models.Normalize()], device="cpu")
    st.save(str(d / "st"))
    return d / "hf", d / "st"


def _cfg(**kw) -> RetrieverSettings:
    base = dict(candidates=4, learning_rate=5e-3, rerank_learning_rate=5e-3, num_train_epochs=8,
                per_device_train_batch_size=4, student_temperature=0.05, max_seq_length=64, save_steps=1000,
                logging_steps=1, e2e_k=1, prior_weight=0.0)    # the hand-built usefulness is the whole target
    base.update(kw)
    return RetrieverSettings(**base)


def _rank_of(model_dir: Path, queries: list[str], pid: str = "p2", corpus: Corpus = CORPUS) -> float:
    from rag_dpo.retrieval import build_retriever
    r = build_retriever(f"dense:{model_dir}", corpus, cache=False, show_progress=False)
    ranks = []
    for hits in r.search(queries, len(corpus)):
        ranks.append([h for h, _ in hits].index(pid))
    return sum(ranks) / len(ranks)


# ---- the target -------------------------------------------------------------------------------------------------

def test_target_distribution_sums_to_one_and_favours_the_useful_passage():
    rec = _records(["x"])[0]
    t = target_distribution(rec["usefulness"], temperature=1.0)
    assert abs(sum(t) - 1.0) < 1e-9
    assert max(range(4), key=lambda i: t[i]) == 0 and t[0] > 0.99
    flat = target_distribution(rec["usefulness"], temperature=100.0)
    assert abs(sum(flat) - 1.0) < 1e-9 and flat[0] < t[0] and flat[0] == max(flat)


def test_scores_are_the_policy_answer_loglik_and_resume_without_duplicates(tmp_path, tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    qs = [Question(id=i, question="What is the capital of France?", answers=["Paris"]) for i in _train_ids(3)]
    queries = question_queries(qs)
    cands = [["p0", "p1", "p2"]] * len(queries)
    out = tmp_path / "scores.jsonl"
    score_queries(queries[:2], cands[:2], CORPUS, model, tok, out, batch_size=3, progress=False)
    score_queries(queries, cands, CORPUS, model, tok, out, batch_size=2, progress=False)   # resumes
    recs = read_scores(out)
    assert [r["question_id"] for r in recs] == [q.question_id for q in queries]
    cost = json.loads(out.with_suffix(".cost.json").read_text())
    assert cost["passages_scored"] == 9 and cost["queries"] == 3 and cost["passages_per_s"] > 0
    # the shared-prefix, padded batch gives what one plain forward over the whole sequence gives
    import torch
    from rag_dpo.train.retriever import scoring_parts
    prefix, suffixes, answer = scoring_parts(tok, queries[0], [None, CORPUS["p0"], CORPUS["p1"]], 64)
    full = prefix + suffixes[2] + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    start = len(prefix) + len(suffixes[2]) - 1
    plain = float(sum(logp[start + i, t] for i, t in enumerate(answer)))
    assert abs(plain - recs[0]["ll"][1]) < 1e-3
    assert answer_loglik(model, prefix, suffixes[2:], answer, tok.pad_token_id)[0] == pytest.approx(plain, abs=1e-3)
    assert recs[0]["usefulness"][1] == pytest.approx(recs[0]["ll"][1] - recs[0]["ll_none"])


@pytest.mark.integration
def test_real_policy_prefers_the_passage_holding_the_answer(tmp_path):
    from rag_dpo.agent.policy import load_policy
    model, tok = load_policy("smollm2")
    q = Question(id=_train_ids(1)[0], question="What is the capital of France?", answers=["Paris"])
    out = tmp_path / "scores.jsonl"
    score_queries(question_queries([q]), [["p0", "p2", "p3"]], CORPUS, model, tok, out, progress=False)
    rec = read_scores(out)[0]
    t = target_distribution(rec["usefulness"])
    assert abs(sum(t) - 1) < 1e-9 and t[0] == max(t)
    assert rec["usefulness"][0] > 0          # the answer passage helps against no passage


# ---- training ---------------------------------------------------------------------------------------------------

def test_distillation_raises_the_useful_passage_rank(tmp_path, tiny_encoder_dirs):
    _, st = tiny_encoder_dirs
    # the useful passage (by the hand-built scores) is p2, which shares no word with the queries
    records = _records(_train_ids(8), good=2)
    queries = sorted({r["query"] for r in records})
    before = _rank_of(st, queries)
    out = train_retriever("dense", records, CORPUS, _cfg(), tmp_path / "dense", base_model=str(st))
    after = _rank_of(out, queries)
    assert before > 0 and after < before
    assert (out / "training_manifest.json").exists() and (out / "train_done.json").exists()
    # the document side is frozen: passage embeddings are the base model's (so the index can be shared)
    from rag_dpo.retrieval.dense import load_encoder
    import numpy as np
    docs = [p.text for p in PASSAGES]
    a = load_encoder(str(out)).encode_document(docs, convert_to_numpy=True)
    b = load_encoder(str(st)).encode_document(docs, convert_to_numpy=True)
    assert np.allclose(a, b, atol=1e-5)
    # ... and the trained retriever is handed the base model's corpus index instead of re-encoding the corpus
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.retrieval.trained import share_document_index
    assert not share_document_index(out, st, CORPUS)            # nothing to share before the base is indexed
    base = build_retriever(f"dense:{st}", CORPUS, show_progress=False)
    assert share_document_index(out, st, CORPUS)
    trained = build_retriever(f"dense:{out}", CORPUS, show_progress=False)
    assert trained.from_cache and np.array_equal(trained.embeddings, base.embeddings)


def test_corpus_target_is_the_candidate_posterior_on_candidates_and_the_prior_elsewhere():
    import torch

    from rag_dpo.train.retriever import corpus_target
    torch.manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    q0 = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    cands, u = torch.tensor([[4, 1, 6]]), torch.tensor([[0.5, 6.0, -0.2]])
    t = corpus_target(q0, cands, u, corpus, temperature=1.0, prior_weight=1.0, student_temperature=0.05)[0]
    assert abs(float(t.sum()) - 1.0) < 1e-6
    prior = (q0 @ corpus.T)[0] / 0.05
    post = torch.softmax(prior[cands[0]] + u[0], -1)          # the candidate-only posterior target
    assert torch.allclose(t[cands[0]] / t[cands[0]].sum(), post, atol=1e-6)
    rest = [i for i in range(7) if i not in cands[0].tolist()]
    assert torch.allclose(t[rest] / t[rest].sum(), torch.softmax(prior[rest], -1), atol=1e-6)
    with pytest.raises(InputError, match="prior_weight"):
        RetrieverSettings(corpus_softmax=True, prior_weight=0.0)


def test_corpus_softmax_distillation_raises_the_useful_passage_over_the_whole_corpus(tmp_path, tiny_encoder_dirs):
    """The candidates are 4 of a 6-passage corpus: the loss sees all 6 (the 2 unscored ones at their prior)."""
    _, st = tiny_encoder_dirs
    corpus = Corpus(PASSAGES + [Passage("p4", "Rome", "Rome is the capital city of Italy."),
                                Passage("p5", "Moon", "The Moon is the natural satellite of the Earth.")],
                    name="hand-built-6")
    records = _records(_train_ids(8), good=2)
    queries = sorted({r["query"] for r in records})
    before = _rank_of(st, queries, corpus=corpus)
    out = train_retriever("dense", records, corpus, _cfg(prior_weight=1.0, corpus_softmax=True), tmp_path / "dense",
                          base_model=str(st))
    after = _rank_of(out, queries, corpus=corpus)
    assert before > 0 and after < before
    assert json.loads((out / "train_done.json").read_text())["rows"] == 8


def test_frozen_passage_table_reads_the_index_only_when_it_is_the_document_side(tiny_encoder_dirs):
    import numpy as np

    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.retriever import frozen_passage_table, query_tuned_encoder
    hf, st = tiny_encoder_dirs
    model = query_tuned_encoder(str(st), 64)
    records = _records(_train_ids(2))
    encoded = frozen_passage_table(records, CORPUS, 4, model, whole_corpus=True)
    index = build_retriever(f"dense:{st}", CORPUS, cache=False, show_progress=False)
    looked_up = frozen_passage_table(records, CORPUS, 4, model, index=index)
    assert np.allclose(looked_up["passages"].numpy(), encoded["passages"].numpy(), atol=1e-5)
    assert np.allclose(looked_up["query0"].numpy(), encoded["query0"].numpy(), atol=1e-5)
    index.embeddings = np.asarray(index.embeddings)[::-1].copy()   # not this model's document side: not used
    assert np.allclose(frozen_passage_table(records, CORPUS, 4, model, index=index)["passages"].numpy(),
                       encoded["passages"].numpy(), atol=1e-5)


def test_end_to_end_gradient_reaches_the_retriever_with_the_right_sign(tiny_encoder_dirs):
    import torch
    # on the scores: raising the score of the passage that makes the answer likely lowers the loss
    scores = torch.zeros(1, 4, requires_grad=True)
    ll = torch.tensor([[-1.0, -9.0, -9.0, -9.0]])
    loss = soft_top_k_answer_loss(scores, ll, k=2)
    loss.backward()
    assert scores.grad[0, 0] < 0 and (scores.grad[0, 1:] > 0).all()
    w = soft_top_k(torch.tensor([[3.0, 1.0, 0.0, -1.0]]), 2)
    assert abs(float(w.sum()) - 2) < 1e-5 and float(w.max()) <= 1.0

    # through the encoder: the query side gets a non-zero gradient, the frozen document side none
    # (the passages' embeddings are read from the frozen document side, as training does)
    from rag_dpo.retrieval.base import index_text
    from rag_dpo.train.retriever import _frozen_side_loss, frozen_passage_table, query_tuned_encoder
    _, st = tiny_encoder_dirs
    model = query_tuned_encoder(str(st), 64)
    rec = {"query": "capital of france", "candidates": [p.id for p in PASSAGES], "usefulness": [7.0, 0, 0, 0],
           "ll": ll[0].tolist()}
    table = frozen_passage_table([rec], CORPUS, 4, model)
    loss_fn = _frozen_side_loss(model, table, _cfg(e2e_k=2), "e2e")
    texts = ["capital of france"] + [index_text(p) for p in PASSAGES]
    f = model.preprocess([texts[0]])
    f["task"] = "query"
    loss = loss_fn([f], torch.tensor([0]))
    loss.backward()
    q_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert q_grads and any(g is not None and float(g.abs().sum()) > 0 for g in q_grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)     # the document side: none
    # one small step against the gradient raises the useful passage's score
    with torch.no_grad():
        before = _e2e_scores(model, texts)
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 1e-2 * p.grad
        after = _e2e_scores(model, texts)
    assert (after[0] - after[1:].max()) > (before[0] - before[1:].max())


def _e2e_scores(model, texts):
    import torch
    q = torch.tensor(model.encode_query([texts[0]]))[0]
    d = torch.tensor(model.encode_document(texts[1:]))
    return d @ q


def test_e2e_and_reranker_train_and_load_by_path(tmp_path, tiny_encoder_dirs):
    hf, st = tiny_encoder_dirs
    records = _records(_train_ids(8), good=2)
    queries = sorted({r["query"] for r in records})
    e2e = train_retriever("e2e", records, CORPUS, _cfg(), tmp_path / "e2e", base_model=str(st))
    assert _rank_of(e2e, queries) < _rank_of(st, queries)

    from rag_dpo.retrieval import build_retriever
    from sentence_transformers import CrossEncoder
    ce = tmp_path / "ce_base"
    CrossEncoder(str(hf), num_labels=1, device="cpu").save(str(ce))
    rerank = train_retriever("rerank", records, CORPUS, _cfg(), tmp_path / "rerank", base_model=str(ce))
    r = build_retriever(f"rerank:{rerank}", CORPUS, depth=4, cache=False, show_progress=False)
    # BM25 proposes the 4 passages sharing a word with the query; the trained cross-encoder puts p2 first
    hits = r.search(["the capital of the fruit", "capital city or plants"], 2)
    assert len(hits) == 2 and all(len(h) <= 2 for h in hits)
    assert [h[0][0] for h in hits] == ["p2", "p2"]
    with pytest.raises(InputError):
        build_retriever(f"dense:{tmp_path / 'missing'}", CORPUS)
    with pytest.raises(InputError):
        build_retriever("bm25:x", CORPUS)


def test_training_refuses_questions_outside_the_train_split(tmp_path, tiny_encoder_dirs):
    _, st = tiny_encoder_dirs
    records = _records(_train_ids(3) + _train_ids(1, "test"))
    with pytest.raises(InputError) as e:
        train_retriever("dense", records, CORPUS, _cfg(), tmp_path / "dense", base_model=str(st))
    assert "train split" in str(e.value)
    assert not (tmp_path / "dense").exists()
    check_train_split(_train_ids(3))


def test_eval_refuses_a_retrievers_training_questions(tmp_path):
    from rag_dpo.data import check_not_trained_on, write_manifest
    from rag_dpo.retrieval import retriever_manifest
    d = tmp_path / "ret"
    d.mkdir()
    write_manifest(d, ["a", "b"])
    with pytest.raises(InputError):
        check_not_trained_on(retriever_manifest(f"dense:{d}"), ["b", "c"])
    check_not_trained_on(retriever_manifest(f"dense:{d}"), ["c"])
    assert retriever_manifest("bm25") is None


def test_eval_cli_refuses_test_questions_a_trained_retriever_was_trained_on(tmp_path, tiny_encoder_dirs,
                                                                           tiny_policy_dir,
                                                                           tiny_model_and_tokenizer):
    """`rag-dpo eval --retriever dense:PATH` (rerank:PATH, hybrid:PATH) checks the retriever folder's training
    manifest as it checks the policy's: a leaked eval question stops the run before anything is written."""
    import shutil

    from typer.testing import CliRunner

    from rag_dpo.cli import app
    from rag_dpo.data import load_dataset, split_questions, write_manifest
    from rag_dpo.eval.evaluate import evaluate
    hotpot = Path(__file__).parent.parent / "data" / "hotpotqa" / "ircot_hotpotqa_dev_subsampled_500.jsonl"
    data = tmp_path / "questions.jsonl"
    data.write_text("\n".join(hotpot.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    test_ids = [q.id for q in split_questions(load_dataset(data).questions, "test")]
    assert len(test_ids) >= 2
    _, st = tiny_encoder_dirs
    leaky, clean = tmp_path / "leaky", tmp_path / "clean"
    for d, ids in ((leaky, [test_ids[1]] + _train_ids(2)), (clean, _train_ids(2))):
        shutil.copytree(st, d)
        write_manifest(d, ids)
    for kind in ("dense", "rerank", "hybrid"):
        res = CliRunner().invoke(app, ["eval", "--data", str(data), "--split", "test", "--limit", "2",
                                       "--retriever", f"{kind}:{leaky}", "--policy", str(tiny_policy_dir),
                                       "--methods", "direct", "--out", str(tmp_path / "eval")])
        assert isinstance(res.exception, InputError), (kind, res.output)
        assert "used to train" in str(res.exception) and test_ids[1] in str(res.exception)
    assert not (tmp_path / "eval").exists()
    # a retriever trained on other questions passes the guard and serves the eval
    res = evaluate(data, methods=["direct"], split="test", limit=2, out_dir=tmp_path / "ok",
                   retriever=f"dense:{clean}", model_and_tokenizer=tiny_model_and_tokenizer, use_wandb=False,
                   answer_tokens=2)
    assert res["direct"]["n"] == 2


def _recipe_settings(**kw) -> RetrieverSettings:
    """The trainer settings `make train-retriever` ships (recipes/retriever.yaml), with `kw` changed."""
    import dataclasses

    from rag_dpo.pipeline.recipe import load_recipe, trainer_settings
    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "retriever.yaml")
    return dataclasses.replace(trainer_settings(recipe), **kw)


@pytest.mark.integration
def test_reranker_at_the_recipe_settings_beats_its_input_order(tmp_path):
    """The shipped reranker (bundled MiniLM + a new 1-logit head, the recipe's learning rates and step count) must
    learn a trivially separable signal: the useful passage (p2) shares only one word with the test queries, so BM25
    ranks it below the Paris passage, and after training the reranker ranks it first. (The first run's [CLS]-head
    reranker passes this toy too; what it lacked is checked by test_an_untrained_reranker_returns_its_input_order and
    by the run's fit check on its own training questions.)"""
    from rag_dpo.retrieval import build_retriever
    records = _records(_train_ids(16), good=2)       # 16 rows, batch 8: 2 steps an epoch, x 8 ~ the recipe's 15 steps
    cfg = _recipe_settings(candidates=4, rerank_epochs=8, save_steps=1000, logging_steps=1, prior_weight=0.0,
                           corpus_softmax=False)
    assert cfg.rerank_epochs * 2 == 16 and cfg.per_device_train_batch_size == 8
    out = train_retriever("rerank", records, CORPUS, cfg, tmp_path / "rerank")
    queries = ["the capital of france or a fruit", "capital city of france, fruit", "france capital ocean fruit"]
    bm25 = build_retriever("bm25s", CORPUS, cache=False, show_progress=False).search(queries, 4)
    reranked = build_retriever(f"rerank:{out}", CORPUS, depth=4, cache=False, show_progress=False).search(queries, 4)
    assert all("p2" in [p for p, _ in h] and h[0][0] == "p0" for h in bm25)    # the input order: Paris first
    assert [h[0][0] for h in reranked] == ["p2"] * len(queries), reranked


def test_posterior_target_keeps_the_retrievers_order_among_passages_without_the_answer():
    """Usefulness alone (one passage at a time) rates a multi-hop question's bridge passage -- supporting, but
    without the answer -- as useless as a distractor, so distilling it demotes passages recall counts (first run:
    when both supporting passages were candidates, the weaker had target mass 0.0008 at the median). The posterior
    target (untuned retriever's prior x usefulness) keeps the prior's order among equally (un)useful passages."""
    from rag_dpo.train.retriever import training_rows
    rec = {"key": "k", "question_id": "q", "query": "capital of france", "candidates": ["p0", "p1", "p2", "p3"],
           "usefulness": [0.1, 6.0, -0.1, 0.0], "ll": [-8.0, -2.0, -8.2, -8.1], "prior": [0.6, 0.4, 0.3, 0.2]}
    alone = target_distribution(training_rows([rec], CORPUS, 4, 1.0, "target")["label"][0])
    post = target_distribution(training_rows([rec], CORPUS, 4, 1.0, "target", prior_weight=1.0,
                                             student_temperature=0.05)["label"][0])
    assert alone[0] < 0.01                                                  # the bridge passage p0: demoted
    assert max(range(4), key=post.__getitem__) == 1                         # the answer passage is still the mode
    assert post[0] > 0.05 and post[0] > 20 * max(post[2], post[3])          # p0 keeps its lead over the distractors
    assert training_rows([rec], CORPUS, 4, 1.0, "ll", prior_weight=1.0)["label"][0] == rec["ll"]   # e2e: raw ll


def test_prior_similarities_are_the_untuned_cosines(tiny_encoder_dirs):
    import numpy as np

    from rag_dpo.retrieval import build_retriever
    from rag_dpo.retrieval.dense import load_encoder
    from rag_dpo.train.retriever import prior_similarities
    _, st = tiny_encoder_dirs
    records = _records(_train_ids(2))
    by_encoder = prior_similarities(records, CORPUS, encoder=load_encoder(str(st)))
    by_index = prior_similarities(records, CORPUS, retriever=build_retriever(f"dense:{st}", CORPUS, cache=False,
                                                                             show_progress=False))
    assert np.allclose(by_encoder, by_index, atol=1e-5)
    hits = build_retriever(f"dense:{st}", CORPUS, cache=False, show_progress=False).search([records[0]["query"]], 4)[0]
    assert np.allclose(sorted(by_index[0], reverse=True), [s for _, s in hits], atol=1e-5)


def test_fit_check_table():
    from rag_dpo.pipeline.retriever_run import fit_markdown
    m = {"recall@1": 0.3, "recall@3": 0.5, "recall@5": 0.7, "questions": 96}
    lines = fit_markdown({"fit": {"dense": m, "dense-trained": {**m, "recall@5": 0.52}}})
    assert "96 train questions" in lines[0] and any("usefulness-trained" in x and "0.520" in x for x in lines)
    assert fit_markdown({"metrics": {}}) == []


def test_targets_are_stated_on_each_held_out_split_and_not_on_the_transfer_set(tmp_path):
    from rag_dpo.pipeline.retriever_run import retriever_specs, targets_markdown
    specs = retriever_specs(tmp_path, ["dense", "e2e"])
    assert specs["hybrid-trained"] == f"hybrid:{tmp_path / 'retrievers' / 'dense'}" and "rerank" not in specs

    def row(r5):
        return {"recall@1": 0.3, "recall@3": 0.5, "recall@5": r5, "questions": 65}
    table = {"dense": row(0.74), "hybrid": row(0.78), "dense-trained": row(0.775)}
    lines = targets_markdown({"metrics": {"f (test)": table, "f (dev, held out too)": {**table, "dense-trained":
                                                                                          row(0.70)},
                                          "m (transfer, all)": table}}, {})
    assert "met by 0.5 points" in lines[2] and "missed by 0.5 points" in lines[3]    # test: the target's split
    assert "missed by 7.0 points (f (dev, held out too), not the target's split)" in lines[4]
    assert not any("transfer" in x for x in lines)


def test_report_tests_each_retriever_against_its_baseline_per_split_and_pooled(tmp_path):
    """Paired recall@5 differences per held-out split and pooled over them (not over the transfer set)."""
    from rag_dpo.pipeline.retriever_run import _retrieval_eval, results_markdown
    from rag_dpo.pipeline.recipe import load_recipe
    qs = [Question(id=f"t{i}", question=q, answers=["x"], supporting_ids=[pid]) for i, (q, pid) in enumerate(
        [("capital of france", "p0"), ("edible fruit", "p2"), ("seventy percent surface", "p3")])]
    specs = {"dense": "bm25", "dense-trained": "bm25s", "hybrid": "bm25", "bm25": "bm25"}
    data = {"f (test)": (qs, CORPUS), "f (dev, held out too)": (qs[:2], CORPUS), "m (transfer, all)": (qs, CORPUS)}
    out = _retrieval_eval(specs, data, tmp_path, RetrieverSettings())
    paired = out["paired"]
    assert set(paired) == {*data, "held-out splits pooled"}
    assert set(paired["f (test)"]) == {"dense-trained - dense", "dense-trained - hybrid"}
    assert paired["f (test)"]["dense-trained - dense"]["diff"] == 0.0          # the same ranking on these queries
    assert len(json.loads((tmp_path / "retrieval.json").read_text())["paired"]) == 4
    md = results_markdown(load_recipe(Path(__file__).parent.parent / "recipes" / "retriever.yaml"), out, {},
                          {}, {})
    assert "| dense-trained - dense | +0.0 [+0.0, +0.0] p 1.00 |" in md and "held-out splits pooled" in md


def test_an_untrained_reranker_returns_its_input_order(tmp_path, tiny_encoder_dirs):
    """The reranker built from a bi-encoder mean-pools the pair under a zero head: before training every score ties
    and BM25's order comes back unchanged, so a reranker that learns nothing cannot fall below its first stage (the
    first run's random [CLS] head shuffled BM25's top 20: recall@5 0.246 against 0.731)."""
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.retriever import reranker_from_encoder
    _, st = tiny_encoder_dirs
    model = reranker_from_encoder(str(st), 64)
    model.save(str(tmp_path / "untrained"))
    queries = ["the capital of france or a fruit", "france capital ocean fruit", "capital city of germany"]
    bm25 = build_retriever("bm25s", CORPUS, cache=False, show_progress=False).search(queries, 4)
    reranked = build_retriever(f"rerank:{tmp_path / 'untrained'}", CORPUS, depth=4, cache=False,
                               show_progress=False).search(queries, 4)
    assert [[p for p, _ in h] for h in reranked] == [[p for p, _ in h] for h in bm25]
    assert len({s for h in reranked for _, s in h}) == 1                 # all ties
    with pytest.raises(InputError):
        reranker_from_encoder(str(tmp_path / "missing"), 64)


def test_reranker_trains_on_the_passages_it_will_reorder():
    """The reranker's training lists are the scored candidates plus the rest of the first stage's top depth, unscored
    (usefulness 0): trained on the scored 6 alone, it lifted BM25's ranks 7-20 -- passages unlike any it had seen --
    over the rest (recall@5 on its own training questions 0.432 reordering the top 20, 0.682 the top 6)."""
    from rag_dpo.train.retriever import first_stage_lists, target_logits

    class FirstStage:
        def search(self, queries, k):
            return [[(pid, 1.0) for pid in ["p1", "p3", "p0", "p2"][:k]] for _ in queries]

    rec = {**_records(["q"])[0], "candidates": ["p0", "p2"], "usefulness": [6.0, -1.0], "ll": [-2.0, -9.0],
           "prior": [0.5, 0.1]}
    out = first_stage_lists([rec], FirstStage(), 4)[0]
    assert out["candidates"] == ["p0", "p2", "p1", "p3"] and out["usefulness"] == [6.0, -1.0, 0.0, 0.0]
    assert out["ll"] == [-2.0, -9.0, -8.0, -8.0] and out["unscored"] == 2 and "prior" not in out
    assert first_stage_lists([rec], FirstStage(), 1)[0]["candidates"] == ["p0", "p2", "p1"]
    logits = target_logits({**out, "prior": [0.5, 0.1, 0.3, 0.2]}, 1.0, 1.0, 0.05)
    assert logits == pytest.approx([16.0, 1.0, 6.0, 4.0])


def test_residual_reranker_starts_from_its_prior_and_learns_the_usefulness(tmp_path, tiny_encoder_dirs):
    """With the posterior target the reranker is residual: score = weight * cos0 (a frozen bi-encoder) + the
    cross-encoder's logit. Untrained (zero head) it orders BM25's candidates by the bi-encoder; trained, the
    cross-encoder adds what the prior misses (here: p2 helps though it looks unlike the queries)."""
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.retrieval.dense import DenseRetriever
    from rag_dpo.retrieval.trained import read_prior, write_prior
    from rag_dpo.train.retriever import reranker_from_encoder
    _, st = tiny_encoder_dirs
    queries = ["the capital of france or a fruit", "france capital ocean fruit", "capital city of germany"]
    untrained = tmp_path / "untrained"
    reranker_from_encoder(str(st), 64).save(str(untrained))
    write_prior(untrained, str(st), 20.0)
    assert read_prior(untrained) == {"encoder": str(st), "weight": 20.0}   # stored relative, resolved back
    r = build_retriever(f"rerank:{untrained}", CORPUS, depth=4, cache=False, show_progress=False)
    prior = DenseRetriever(CORPUS, model=str(st), cache=False, show_progress=False)
    bm25 = build_retriever("bm25s", CORPUS, cache=False, show_progress=False).search(queries, 4)
    cos = {pid: s for pid, s in zip(prior.ids, (prior.encode_queries(queries) @ prior.embeddings.T).T)}
    for i, (hits, first) in enumerate(zip(r.search(queries, 4), bm25)):
        assert [p for p, _ in hits] == sorted([p for p, _ in first], key=lambda p: -cos[p][i])
        assert [s for _, s in hits] == pytest.approx([20.0 * cos[p][i] for p, _ in hits], abs=1e-4)

    records = _records(_train_ids(8), good=2)
    cfg = _cfg(prior_weight=1.0, rerank_head_learning_rate=5e-2, rerank_epochs=8)
    out = train_retriever("rerank", records, CORPUS, cfg,
                          tmp_path / "rerank",
                          base_model=str(st), prior_retriever=prior)
    assert read_prior(out)["weight"] == pytest.approx(1.0 / 0.05)
    hits = build_retriever(f"rerank:{out}", CORPUS, depth=4, cache=False, show_progress=False).search(
        ["the capital of the fruit", "capital city or plants"], 2)
    assert [h[0][0] for h in hits] == ["p2", "p2"]
