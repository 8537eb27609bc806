"""Loaders: every bundled file loads with the manifest's counts, supporting ids resolve, corpora and hub rows go
through the same converters, and each kind of bad input is one InputError naming file, line/record and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_dpo.data import align_to_corpus, load_corpus, load_dataset, load_hub_dataset, passage_id
from rag_dpo.data.corpus import CorpusBuilder
from rag_dpo.errors import InputError
from rag_dpo.io import file_sha256
from rag_dpo.paths import DATA_DIR, DEFAULT_DATA

MANIFEST = json.loads((DATA_DIR / "MANIFEST.json").read_text())
QUESTION_FILES = {
    "hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl": "ircot",
    "hotpotqa/hipporag_hotpotqa_train_100.json": "hotpotqa",
    "musique/hipporag_musique_train_100.json": "musique",
    "musique/cas_musique_full_20.json": "musique",
    "2wikimultihopqa/2wiki_dev_sample_64.jsonl": "2wikimultihopqa",
    "bamboogle/searcho1_bamboogle_125.json": "bamboogle",
    "bamboogle/compgap_bamboogle_125.csv": "bamboogle_csv",
}
CORPUS_FILES = ["hotpotqa/hipporag_hotpotqa_train_100_corpus.json", "musique/hipporag_musique_train_100_corpus.json"]


def n_records(name: str) -> int:
    return next(e["n_records"] for e in MANIFEST if e["file"] == name)


def test_every_manifest_file_is_covered_and_unchanged():
    assert {e["file"] for e in MANIFEST} == set(QUESTION_FILES) | set(CORPUS_FILES)
    for e in MANIFEST:
        if "sha256" in e:
            assert file_sha256(DATA_DIR / e["file"]) == e["sha256"], e["file"]


@pytest.mark.parametrize("name", sorted(QUESTION_FILES))
def test_bundled_file_loads(name):
    ds = load_dataset(DATA_DIR / name)
    assert ds.format == QUESTION_FILES[name]
    assert len(ds.questions) == n_records(name)
    assert len({q.id for q in ds.questions}) == len(ds.questions)
    for q in ds.questions:
        assert q.id and q.question and q.hops and q.hops >= 2
        assert q.answers if q.answerable else q.answers == []
        for sid in q.supporting_ids:
            assert sid in ds.corpus, (q.id, sid)
    if ds.format.startswith("bamboogle"):
        assert ds.corpus is None
    else:
        assert len(ds.corpus) > 0
        assert sum(bool(q.supporting_ids) for q in ds.questions) >= sum(q.answerable for q in ds.questions)


def test_default_benchmark_corpus_is_the_union_of_contexts():
    ds = load_dataset(DEFAULT_DATA)
    assert len(ds.corpus) == 4858                  # 4,931 context paragraphs, 73 repeated across questions
    q = ds.questions[0]
    assert q.answers == ["Chief of Protocol"]
    assert q.supporting_ids == ["Shirley Temple", "Kiss and Tell (1945 film)"]
    assert ds.corpus["Shirley Temple"].text.startswith("Shirley Temple Black")
    assert all(len(q.supporting_ids) == 2 and q.hops == 2 for q in ds.questions)


def test_hotpotqa_original_fields():
    ds = load_dataset(DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100.json")
    q = ds.questions[0]
    assert (q.id, q.answers, q.type) == ("5a77ec115542992a6e59dff7", ["a spirit"], "bridge")
    assert q.supporting_ids == ["Alû", "Lilu (mythology)"]
    assert {q.type for q in ds.questions} == {"bridge", "comparison"}
    # HotpotQA sentences keep their leading space; joining must not double or drop it.
    assert "  " not in ds.corpus["Alû"].text and ds.corpus["Alû"].text[0] != " "


def test_musique_aliases_hops_and_unanswerable():
    ds = load_dataset(DATA_DIR / "musique/hipporag_musique_train_100.json")
    q = ds.questions[0]
    assert q.answers == ["G. Stanley Hall", "Stanley Hall"] and q.hops == 2 and q.type == "2hop"
    assert {q.hops for q in ds.questions} == {2, 3, 4}
    full = load_dataset(DATA_DIR / "musique/cas_musique_full_20.json")
    unanswerable = [q for q in full.questions if not q.answerable]
    assert len(unanswerable) == 9 and all(q.answers == [] for q in unanswerable)
    assert sum(q.answerable for q in full.questions) == 11


def test_same_title_with_different_texts_gets_hash_suffix():
    ds = load_dataset(DATA_DIR / "musique/hipporag_musique_train_100.json")
    suffixed = [p for p in ds.corpus if "#" in p.id]
    assert suffixed and all(p.id.startswith(p.title + "#") for p in suffixed)
    assert len({p.id for p in ds.corpus}) == len(ds.corpus) == 1890
    # ids do not depend on the order paragraphs were seen in
    a, b = CorpusBuilder(), CorpusBuilder()
    pairs = [("T", "one"), ("T", "two"), ("U", "three"), ("T", "one ")]
    for t, x in pairs:
        a.add(t, x)
    for t, x in reversed(pairs):
        b.add(t, x)
    assert a.ids() == b.ids() and len(a) == 3
    assert passage_id("U", "three") == "U" and passage_id("T", "one", shared_title=True).startswith("T#")


def test_2wiki_types_and_hops():
    ds = load_dataset(DATA_DIR / "2wikimultihopqa/2wiki_dev_sample_64.jsonl")
    assert {q.type for q in ds.questions} == {"compositional", "bridge_comparison", "comparison", "inference"}
    q = ds.questions[0]
    assert q.answers == ["Free Guy"] and q.hops == 4 and len(q.supporting_ids) == 4


def test_bamboogle_csv_ids_match_the_json_file():
    js = {q.id: q for q in load_dataset(DATA_DIR / "bamboogle/searcho1_bamboogle_125.json").questions}
    csv_qs = load_dataset(DATA_DIR / "bamboogle/compgap_bamboogle_125.csv").questions
    assert all(js[q.id].question.strip() == q.question for q in csv_qs)
    alias_row = next(q for q in csv_qs if q.question.startswith("Who is the mother of the father of George"))
    assert alias_row.answers == ["Mildred Warner", "Mildred Gale"]


def test_format_override_and_headered_csv(tmp_path):
    ds = load_dataset(DATA_DIR / "2wikimultihopqa/2wiki_dev_sample_64.jsonl", format="hotpotqa")
    assert ds.format == "hotpotqa" and len(ds.questions) == 64
    f = tmp_path / "b.csv"
    f.write_text("Question,Answer\nWho?,Me\n\nWhen?,Now\n")
    qs = load_dataset(f).questions
    assert [(q.question, q.answers) for q in qs] == [("Who?", ["Me"]), ("When?", ["Now"])]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_flashrag_jsonl(tmp_path):
    rows = [{"id": "a", "question": "Q1?", "golden_answers": ["x", "X1"],
             "metadata": {"type": "bridge", "supporting_facts": {"title": ["P", "R"], "sent_id": [0, 0]},
                          "context": {"title": ["P", "R"], "sentences": [["p1.", "p2."], ["r1."]]}}},
            {"id": "b", "question": "Q2?", "golden_answers": ["y"]}]
    ds = load_dataset(_write_jsonl(tmp_path / "f.jsonl", rows))
    assert ds.format == "flashrag" and ds.questions[0].answers == ["x", "X1"]
    assert ds.questions[0].supporting_ids == ["P", "R"] and ds.corpus["P"].text == "p1. p2."
    assert ds.questions[0].type == "bridge" and ds.questions[1].supporting_ids == []
    plain = load_dataset(_write_jsonl(tmp_path / "g.jsonl", rows[1:]))
    assert plain.corpus is None and plain.questions[0].answers == ["y"]


def test_corpus_files(tmp_path):
    for name in CORPUS_FILES:
        assert len(load_corpus(DATA_DIR / name)) == n_records(name)
    # The HippoRAG corpus gets the same title-derived ids as the union of the question file's contexts.
    ds = load_dataset(DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100.json")
    corpus = load_corpus(DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100_corpus.json")
    assert {p.id for p in corpus} == {p.id for p in ds.corpus}
    mu = load_dataset(DATA_DIR / "musique/hipporag_musique_train_100.json",
                      corpus=DATA_DIR / "musique/hipporag_musique_train_100_corpus.json")
    assert len(mu.corpus) == 1890 and all(s in mu.corpus for q in mu.questions for s in q.supporting_ids)
    own = _write_jsonl(tmp_path / "c.jsonl", [{"id": "7", "title": "A", "text": "a text"},
                                              {"id": "8", "contents": "\"B\"\nb text"}])
    c = load_corpus(own)
    assert [(p.id, p.title, p.text) for p in c] == [("7", "A", "a text"), ("8", "B", "b text")]


def test_external_corpus_ids_are_matched_by_content(tmp_path):
    ds = load_dataset(DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100.json")
    rows = [{"id": f"w{i}", "title": p.title, "text": p.text} for i, p in enumerate(ds.corpus)]
    corpus = load_corpus(_write_jsonl(tmp_path / "wiki.jsonl", rows))
    questions, resolved, total = align_to_corpus(ds.questions, corpus, own=ds.corpus)
    assert resolved == total == 200
    assert questions[0].supporting_ids == [corpus.passages[i].id for i in
                                           [ds.corpus.index[s] for s in ds.questions[0].supporting_ids]]


def test_hub_source_through_datasets_json(tmp_path):
    """The hub path (datasets.load_dataset + the same converters), pointed at local files in the hub layout."""
    originals = json.loads((DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100.json").read_text())[:5]
    hub_rows = [{"id": r["_id"], "question": r["question"], "answer": r["answer"], "type": r["type"],
                 "level": r["level"],
                 "supporting_facts": {"title": [t for t, _ in r["supporting_facts"]],
                                      "sent_id": [s for _, s in r["supporting_facts"]]},
                 "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]}}
                for r in originals]
    f = _write_jsonl(tmp_path / "hotpot_hub.jsonl", hub_rows)
    ds = load_hub_dataset("json", data_files=str(f), split="train", cache_dir=str(tmp_path / "hf"))
    local = load_dataset(DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100.json")
    assert ds.format == "hotpotqa"
    for a, b in zip(ds.questions, local.questions[:5]):
        assert (a.id, a.answers, a.supporting_ids, a.hops, a.type) == (b.id, b.answers, b.supporting_ids, b.hops,
                                                                        b.type)
        assert all(ds.corpus[s].text == local.corpus[s].text for s in a.supporting_ids)
    mu = _write_jsonl(tmp_path / "musique_hub.jsonl",
                      json.loads((DATA_DIR / "musique/cas_musique_full_20.json").read_text())[:4])
    ds = load_hub_dataset("json", data_files=str(mu), split="train", cache_dir=str(tmp_path / "hf"), limit=3)
    assert ds.format == "musique" and len(ds.questions) == 3 and not ds.questions[0].answerable


# ---- bad input ---------------------------------------------------------------------------------------------

def _err(fn, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as e:
        fn(*args, **kwargs)
    return e.value


def _hotpot(**over):
    r = {"_id": "q1", "question": "Q?", "answer": "A", "type": "bridge",
         "supporting_facts": [["P", 0], ["R", 0]], "context": [["P", ["p."]], ["R", ["r."]]]}
    r.update(over)
    return r


def test_malformed_jsonl_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(_hotpot()) + "\n{not json\n")
    e = _err(load_dataset, f)
    assert e.file == str(f) and e.line == 2 and "malformed JSON" in str(e)


def test_malformed_json_names_the_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"_id": "q1",\n  "question": }\n]')
    e = _err(load_dataset, f)
    assert e.line == 3 and "malformed JSON" in e.message


@pytest.mark.parametrize("field", ["question", "answer"])
def test_record_missing_question_or_answer(tmp_path, field):
    rows = [_hotpot(), _hotpot(_id="q2")]
    del rows[1][field]
    f = tmp_path / "x.json"
    f.write_text(json.dumps(rows))
    e = _err(load_dataset, f)
    assert (e.file, e.record, e.field) == (str(f), 1, field) and "record 1" in str(e)


def test_empty_answer_is_an_error(tmp_path):
    e = _err(load_dataset, _write_jsonl(tmp_path / "x.jsonl", [_hotpot(answer=" ")]))
    assert (e.line, e.field) == (1, "answer")


def test_supporting_title_not_in_context(tmp_path):
    f = _write_jsonl(tmp_path / "x.jsonl", [_hotpot(), _hotpot(_id="q2", supporting_facts=[["Nope", 0]])])
    e = _err(load_dataset, f)
    assert (e.line, e.field) == (2, "supporting_facts") and "Nope" in e.message


def test_supporting_id_not_in_external_corpus(tmp_path):
    corpus = _write_jsonl(tmp_path / "c.jsonl", [{"id": "P", "title": "P", "text": "p."}])
    f = _write_jsonl(tmp_path / "x.jsonl", [_hotpot()])
    e = _err(load_dataset, f, corpus=corpus)
    assert (e.file, e.line, e.field) == (str(f), 1, "supporting_ids") and "'R'" in e.message
    assert load_dataset(f, corpus=corpus, strict=False).questions[0].supporting_ids == ["P", "R"]


def test_empty_corpus(tmp_path):
    (tmp_path / "c.jsonl").write_text("")
    assert "empty" in _err(load_corpus, tmp_path / "c.jsonl").message
    f = _write_jsonl(tmp_path / "x.jsonl", [_hotpot(context=[], supporting_facts=[])])
    assert "corpus is empty" in _err(load_dataset, f).message


def test_unknown_or_undetectable_format_and_missing_file(tmp_path):
    f = _write_jsonl(tmp_path / "x.jsonl", [_hotpot()])
    e = _err(load_dataset, f, format="squad")
    assert (e.file, e.field) == (str(f), "format") and "unknown format" in e.message
    g = _write_jsonl(tmp_path / "y.jsonl", [{"foo": 1}])
    e = _err(load_dataset, g)
    assert (e.line, e.field) == (1, "format") and "cannot detect" in e.message
    e = _err(load_dataset, tmp_path / "missing.json")
    assert e.file.endswith("missing.json") and "not found" in e.message
    e = _err(load_dataset, DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100_corpus.json")
    assert "corpus" in e.message


def test_wrong_format_forced(tmp_path):
    e = _err(load_dataset, DATA_DIR / "hotpotqa/hipporag_hotpotqa_train_100.json", format="musique")
    assert (e.record, e.field) == (0, "id")


def test_duplicate_question_ids(tmp_path):
    e = _err(load_dataset, _write_jsonl(tmp_path / "x.jsonl", [_hotpot(), _hotpot()]))
    assert e.line == 2 and "duplicate" in e.message


def test_ircot_number_and_date_answers_and_musique_ids(tmp_path):
    ctx = [{"id": "0", "title": "P", "paragraph_text": "p.", "is_supporting": True},
           {"id": "1", "title": "R", "paragraph_text": "r.", "is_supporting": False}]
    rows = [{"question_id": "3hop1__1_2_3", "question_text": "How many?", "contexts": ctx,
             "answers_objects": [{"number": "5", "date": {"day": "", "month": "", "year": ""}, "spans": []}]},
            {"question_id": "x", "question_text": "When?", "contexts": ctx,
             "answers_objects": [{"number": "", "date": {"day": "4", "month": "July", "year": "1776"}, "spans": []}]}]
    ds = load_dataset(_write_jsonl(tmp_path / "ircot.jsonl", rows))
    a, b = ds.questions
    assert (a.answers, a.hops, a.type, a.supporting_ids) == (["5"], 3, "3hop1", ["P"])
    assert (b.answers, b.hops, b.type) == (["4 July 1776"], 1, None)
