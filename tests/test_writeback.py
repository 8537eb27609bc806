"""Verified write-back: the three checks refuse what they should, the original corpus stays byte-identical,
removal restores the index, and every written passage records its source chain."""

from __future__ import annotations

import hashlib
import json

import pytest

from rag_dpo.data import load_corpus
from rag_dpo.records import ANSWER, SEARCH, Chain, Step
from rag_dpo.retrieval.writeback import (Candidate, MinJudge, OverlapJudge, PolicyJudge, ReaderJudge, WritebackConfig,
                                         WritebackStore, candidate_from_chain, chain_hash, written_passage)

PASSAGES = [
    ("Paris", "Paris is the capital and largest city of France."),
    ("Berlin", "Berlin is the capital of Germany and its largest city."),
    ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, built by Gustave Eiffel's company."),
    ("Gustave Eiffel", "Gustave Eiffel was a French civil engineer, born in Dijon in 1832."),
    ("Dijon", "Dijon is a city in eastern France, the capital of the Burgundy region."),
    ("Rhine", "The Rhine is a river that flows through Switzerland, Germany and the Netherlands."),
]
QUERIES = ["Where was the engineer of the Eiffel Tower born?", "capital of Burgundy", "river through Germany",
           "Gustave Eiffel Dijon"]


class StubJudge:
    """Deterministic judge: the score given per answer (default 1.0); records what it was asked."""
    name = "stub"

    def __init__(self, scores=None):
        self.scores, self.calls = scores or {}, []

    def __call__(self, items):
        self.calls.extend(items)
        return [self.scores.get(answer, 1.0) for _, _, answer in items]


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in PASSAGES), encoding="utf-8")
    return path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cand(question="Where was Gustave Eiffel born?", answer="Dijon", cited=("Gustave Eiffel",),
         retrieved=("Eiffel Tower", "Gustave Eiffel"), qid="q1"):
    return Candidate(question, answer, list(cited), list(retrieved),
                     {"question_id": qid, "chain_hash": "h", "step_id": "1"})


def store_for(corpus_file, judge=None, retriever="bm25", **kw):
    return WritebackStore(load_corpus(corpus_file), retriever, judge=judge or StubJudge(),
                          cfg=WritebackConfig(**kw), show_progress=False)


def test_refuses_unattributed_passage(corpus_file):
    store = store_for(corpus_file)
    [v] = store.write([cand(retrieved=("Eiffel Tower", "Paris"))])     # cites a passage the chain never retrieved
    assert not v.accepted and v.failed() == ["attribution"] and len(store.written) == 0
    [v] = store.write([cand(cited=())])                                 # cites nothing
    assert not v.accepted and "attribution" in v.failed()
    [v] = store.write([cand()])                                         # the same claim, attributed: written
    assert v.accepted and v.passage_id in store.corpus


def test_refuses_non_entailed_passage(corpus_file):
    judge = StubJudge({"Lyon": 0.1, "Dijon": 0.9})
    store = store_for(corpus_file, judge=judge)
    wrong, right = store.write([cand(answer="Lyon"), cand(answer="Dijon")])
    assert not wrong.accepted and wrong.failed() == ["entailment"] and wrong.scores["entailment"] == 0.1
    assert right.accepted
    # the judge saw the *cited* passages with the claim
    passages, question, answer = judge.calls[0]
    assert [p.id for p in passages] == ["Gustave Eiffel"] and (question, answer) == ("Where was Gustave Eiffel born?",
                                                                                      "Lyon")
    assert [w.passage.title for w in store.written] == ["Dijon"]


def test_refuses_duplicate_passages(corpus_file):
    store = store_for(corpus_file)
    assert store.write([cand()])[0].accepted
    again = store.write([cand(), cand(question="where was GUSTAVE EIFFEL born", qid="q2")])
    assert [v.accepted for v in again] == [False, False]
    assert all(v.failed() == ["novelty"] for v in again)
    # a claim that copies an original passage is a near-duplicate of it
    [copy] = store.write([cand(question="Gustave Eiffel was a French civil engineer, born in Dijon in", answer="1832")])
    assert not copy.accepted and copy.scores["nearest"] == "Gustave Eiffel" and copy.failed() == ["novelty"]
    # two identical claims in one call: only the first is written
    store2 = store_for(corpus_file)
    assert [v.accepted for v in store2.write([cand(), cand(qid="q2")])] == [True, False]
    assert len(store2.written) == 1


def test_unenforced_checks_are_scored_but_do_not_block(corpus_file):
    store = store_for(corpus_file, judge=StubJudge({"Lyon": 0.0}), checks=[])
    [v] = store.write([cand(answer="Lyon", retrieved=("Paris",))])
    assert v.accepted and v.passed == {"attribution": False, "entailment": False, "novelty": True}


def test_original_corpus_file_stays_byte_identical(corpus_file, tmp_path):
    before = sha(corpus_file)
    overlay = tmp_path / "overlay.jsonl"
    store = WritebackStore(load_corpus(corpus_file), "bm25", judge=StubJudge(), path=overlay, show_progress=False)
    base_ids = [p.id for p in store.base]
    [v] = store.write([cand()])
    store.write([cand(question="What region is Dijon the capital of?", answer="Burgundy", cited=("Dijon",),
                      retrieved=("Dijon",), qid="q2")])
    store.remove(v.passage_id)
    assert sha(corpus_file) == before
    assert [p.id for p in store.base] == base_ids == [p.id for p in load_corpus(corpus_file)]
    assert [json.loads(line)["title"] for line in overlay.read_text().splitlines()] == ["Burgundy"]
    with pytest.raises(Exception, match="original corpus"):
        store.remove("Paris")


@pytest.mark.parametrize("retriever", ["bm25", "bm25s", "dense", "hybrid"])
def test_removal_restores_the_index(corpus_file, retriever):
    store = store_for(corpus_file, retriever=retriever)
    store.write([cand(question="What region is Dijon the capital of?", answer="Burgundy", cited=("Dijon",),
                      retrieved=("Dijon",), qid="q0")])          # an earlier write stays in place throughout
    before = store.search(QUERIES, 4)
    [v] = store.write([cand()])
    during = store.search(QUERIES, 4)
    assert during != before and any(v.passage_id in [pid for pid, _ in hits] for hits in during)
    store.remove(v.passage_id)
    after = store.search(QUERIES, 4)
    assert after == before                                          # same ids, same order, same scores
    assert [p.id for p in store.corpus] == [p.id for p in store.base] + [store.written[0].passage.id]


def test_written_passage_records_its_source_chain(corpus_file, tmp_path):
    chain = Chain("q7", "Where was the engineer of the Eiffel Tower born?", ["Dijon"])
    chain.add_step(Step("0", None, "<search>Eiffel Tower engineer</search>", SEARCH, query="Eiffel Tower engineer",
                        retrieved_ids=["Eiffel Tower", "Gustave Eiffel"]))
    chain.add_step(Step("1", "0", "<answer>Dijon</answer>", ANSWER, answer="Dijon"))
    chain.selected = "1"
    overlay = tmp_path / "overlay.jsonl"
    store = WritebackStore(load_corpus(corpus_file), "bm25", judge=StubJudge(), path=overlay, show_progress=False)
    c = candidate_from_chain(chain)
    c.cited_ids = store.cite([(c.question, c.answer)], k=1)[0]
    assert c.cited_ids == ["Gustave Eiffel"]
    [v] = store.write([c])
    assert v.accepted
    src = store.source(v.passage_id)
    assert (src["question_id"], src["chain_hash"], src["step_id"]) == ("q7", chain_hash(chain), "1")
    assert src["cited_ids"] == ["Gustave Eiffel"] and src["answer"] == "Dijon"
    # persisted with the passage, and a reloaded store serves the same overlay
    reloaded = WritebackStore(load_corpus(corpus_file), "bm25", judge=StubJudge(), path=overlay, show_progress=False)
    assert reloaded.source(v.passage_id) == src and reloaded.search(QUERIES, 3) == store.search(QUERIES, 3)
    assert [p.id for p in reloaded.remove_from("q7")] == [v.passage_id] and not reloaded.written
    # a different chain (other retrieved ids) hashes differently
    chain.steps[0].retrieved_ids = ["Paris"]
    assert chain_hash(chain) != src["chain_hash"]
    assert written_passage(c).id == v.passage_id


def test_overlap_judge():
    from rag_dpo.records import Passage
    p = [Passage("Gustave Eiffel", "Gustave Eiffel", "Gustave Eiffel was born in Dijon.")]
    q = "Where was Gustave Eiffel born?"
    assert OverlapJudge()([(p, q, "Dijon"), (p, q, "Lyon"), (p, q, "the city Dijon"), (p, q, "Gustave Eiffel"),
                           (p, q, "Eiffel in Dijon")]) == [1.0, 0.0, 0.5, 0.0, 1.0]   # question words do not count


def test_policy_judge_plumbing(tiny_model_and_tokenizer):
    import torch
    from rag_dpo.records import Passage
    model, tok = tiny_model_and_tokenizer
    judge = PolicyJudge(model, tok, batch_size=4)
    side = tok.padding_side
    p = [Passage("Gustave Eiffel", "Gustave Eiffel", "Gustave Eiffel was born in Dijon.")]
    items = [(p, "Where was Gustave Eiffel born?", "Dijon"), (p * 2, "Who built the tower in Paris?", "a company")]
    batched = judge(items)
    one = [PolicyJudge(model, tok)([it])[0] for it in items]          # fresh judges: no remembered scores
    assert batched == pytest.approx(one, abs=1e-5)          # left padding: the last position is every row's next token
    assert all(0.0 < s < 1.0 for s in batched) and tok.padding_side == side    # the tokenizer is left as it was
    # the score is P(yes) / (P(yes) + P(no)) of the token after the chat prompt
    ids = tok(judge.prompt(*items[0]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        probs = torch.softmax(model(**ids).logits[0, -1].float(), -1)
    yes, no = probs[judge.yes].sum(), probs[judge.no].sum()
    assert batched[0] == pytest.approx(float(yes / (yes + no)), abs=1e-5)
    assert "Gustave Eiffel was born in Dijon." in judge.prompt(*items[0])
    assert {tok.decode([i]).strip().lower() for i in judge.yes} == {"yes"}
    calls = []
    real = model.forward
    model.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:      # a candidate scored once is not scored again (the store re-asks the joined judge it enforces)
        assert judge(items[::-1]) == batched[::-1] and calls == []
    finally:
        del model.forward


def test_reader_judge_plumbing(tiny_model_and_tokenizer):
    from rag_dpo.agent import protocol
    from rag_dpo.eval.writeback_stream import reader_render
    from rag_dpo.records import Passage
    model, tok = tiny_model_and_tokenizer
    render = reader_render(tok)
    p = [Passage("Gustave Eiffel", "Gustave Eiffel", "Gustave Eiffel was born in Dijon.")]
    text = render(p, "Where was Gustave Eiffel born?")
    # the reader sees the question and only the cited passage, and continues inside an answer tag
    assert text.startswith(protocol.render_prompt(tok, "Where was Gustave Eiffel born?"))
    assert "[1] Gustave Eiffel: Gustave Eiffel was born in Dijon." in text and text.endswith("<answer>")
    judge = ReaderJudge(model, tok, render, max_new_tokens=6)
    items = [(p, "Where was Gustave Eiffel born?", "Dijon"), (p * 2, "Who was born in Dijon?", "Eiffel")]
    first = judge.read(items)
    assert len(first) == 2 and ReaderJudge(model, tok, render, max_new_tokens=6).read(items[1:]) == first[1:]  # greedy, batch-independent
    assert all("</answer>" not in a for a in first)
    # the score is the F1 of the reader's answer against the candidate's (a random model reads noise, so the
    # candidates are set to what it read: those that normalise to words score 1)
    from rag_dpo.metrics import f1_score, normalize_answer
    assert judge(items) == [f1_score(r, [a]) for r, (_, _, a) in zip(first, items)] and judge.answers == first
    agree = [(ps, q, read) for (ps, q, _), read in zip(items, first)]
    assert judge(agree) == [1.0 if normalize_answer(r) else 0.0 for r in first]
    # what it read is remembered: a joined judge (reader+overlap) scoring the same candidates again when the store
    # enforces it, or another claim on the same passages and question, generates nothing new
    calls = []
    real = model.generate
    model.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        MinJudge(judge, OverlapJudge())(agree)
        assert calls == [] and judge.answers == first
        judge([(p, "Where was Gustave Eiffel born?", "Paris"), (p, "Who built it?", "x")])
        assert len(calls) == 1 and judge.answers[0] == first[0]      # one batch, only the new question
    finally:
        del model.generate


def test_unknown_check_is_an_input_error():
    from rag_dpo.errors import InputError
    with pytest.raises(InputError, match="unknown write-back check"):
        WritebackConfig(checks=["attribution", "novel"])


# ---- the stream experiment (rag_dpo.eval.writeback_stream) ------------------------------------------------------
MUSIQUE = "data/musique/hipporag_musique_train_100.json"


def test_sub_questions_are_resolved_with_earlier_answers():
    from rag_dpo.eval.writeback_stream import load_stream, resolve
    assert resolve("Hello Love >> performer", []) == "What is the performer of Hello Love?"
    assert resolve("Which state borders #2 to the east?", ["Hank Snow", "Tennessee"]) == \
        "Which state borders Tennessee to the east?"
    assert resolve("#1 >> country", [None]) == "What is the country of ?"
    from tests.conftest import REPO
    corpus, items = load_stream(REPO / MUSIQUE, limit=5)
    assert len(items) == 5
    for it in items:      # each hop's supporting paragraph is one of the composed question's
        assert all(s.supporting_ids and set(s.supporting_ids) <= set(it.question.supporting_ids) for s in it.subs)


def test_stream_writes_back_and_later_questions_read_it(tmp_path, monkeypatch, tiny_model_and_tokenizer):
    from rag_dpo.eval import writeback_stream as ws
    from tests.conftest import REPO
    calls = []

    def scripted_rollout(engine, questions, stage, mode):
        """One search for the question, then the gold answer (hops) or the top passage's title (composed)."""
        calls.append((stage, mode, [q.question for q in questions]))
        hits = engine.retriever.search([q.question for q in questions], 3)
        chains = []
        for q, h in zip(questions, hits):
            c = Chain(q.id, q.question, list(q.answers), list(q.supporting_ids))
            c.add_step(Step("0", None, f"<search>{q.question}</search>", SEARCH, query=q.question,
                            retrieved_ids=[pid for pid, _ in h]))
            answer = q.answers[0] if stage.startswith("hop") else engine.corpus[h[0][0]].title
            c.add_step(Step("1", "0", f"<answer>{answer}</answer>", ANSWER, answer=answer))
            c.selected = "1"
            c.meta.update({"stage": stage, "mode": mode})
            chains.append(c)
        return chains

    monkeypatch.setattr(ws, "_rollout", scripted_rollout)
    data = REPO / MUSIQUE
    before = sha(data)
    run = lambda: ws.writeback_stream(data, policy="tiny", limit=4, out_dir=tmp_path / "out", judge="overlap",
                                      model_and_tokenizer=tiny_model_and_tokenizer, use_wandb=False)
    res = run()
    modes = res["modes"]
    assert modes["none"]["composed"]["used_written"] == 0.0 and "written" not in modes["none"]
    assert modes["unchecked"]["written"]["written"] == modes["unchecked"]["written"]["candidates"] > 0
    assert 0 < modes["checked"]["written"]["written"] <= modes["unchecked"]["written"]["written"]
    assert modes["unchecked"]["composed"]["used_written"] > 0          # a later question read an earlier answer
    # hop 2 asked with hop 1's answer in place of #1; hop 1 rolled out once for both write-back modes
    hop2 = [q for stage, mode, qs in calls if stage == "hop2" for q in qs]
    assert hop2 and not any("#1" in q for q in hop2)
    assert [(s, m) for s, m, _ in calls].count(("hop1", "shared")) == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "checked" / "overlay.jsonl").read_text().splitlines()]
    assert rows and all(r["source"]["question_id"].split("/hop")[0] == r["source"]["item"] and
                        len(r["source"]["chain_hash"]) == 16 for r in rows)
    assert sha(data) == before
    # a rerun resumes: nothing rolled out again, no record duplicated, same results
    n_calls = len(calls)
    assert run()["modes"] == modes and len(calls) == n_calls
