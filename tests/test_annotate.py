"""Annotators on hand-built chain trees with known right labels; resumable annotate_file; Cohen's kappa; the
annotate-report."""

from __future__ import annotations

import json
import math

import pytest

from rag_dpo.annotate.annotators import (AnnotatorConfig, EvidenceAnnotator, OutcomeAnnotator, RolloutAnnotator,
                                         annotate_file, build_annotator)
from rag_dpo.annotate.report import annotate_report, cohen_kappa
from rag_dpo.errors import InputError
from rag_dpo.records import ANSWER, INVALID, SEARCH, Chain, Step, read_chains, write_chains


def search(i, parent, ids, q="q"):
    return Step(id=i, parent=parent, text=f"<think>t</think>\n<search>{q}{i}</search>", action=SEARCH,
                query=f"{q}{i}", retrieved_ids=list(ids), observation=f"\n<information>\n{ids}\n</information>\n",
                generated_tokens=10)


def answer(i, parent, a):
    return Step(id=i, parent=parent, text=f"<think>t</think>\n<answer>{a}</answer>", action=ANSWER, answer=a,
                generated_tokens=5)


def hand_tree(qid="q1") -> Chain:
    """root -> {0: search p1,p3 | 3: search p4}; 0 -> {1: search p1 | 4: search p2}; 4 -> {2: right | 5: wrong}."""
    c = Chain(question_id=qid, question="Who directed the film?", gold_answers=["Bob Smith"],
              supporting_ids=["p1", "p2"])
    for s in [search("0", None, ["p1", "p3"]), search("3", None, ["p4"]), search("1", "0", ["p1"]),
              search("4", "0", ["p2", "p3"]), answer("2", "4", "Bob Smith"), answer("5", "4", "Alice Jones")]:
        c.add_step(s)
    c.selected = "2"
    return c


def values(chain, name):
    return {s.id: s.labels[name].value for s in chain.steps}


def test_evidence_labels_known_tree():
    c = EvidenceAnnotator().annotate([hand_tree()])[0]
    assert values(c, "evidence") == {"0": 1.0, "3": 0.0, "1": 0.0, "4": 1.0, "2": 1.0, "5": 0.0}
    assert [s.labels["evidence"].good for s in c.steps] == [True, False, False, True, True, False]
    assert c.step("4").labels["evidence"].info["new_supporting"] == ["p2"]
    assert c.step("2").labels["evidence"].annotator == "evidence"


def test_evidence_needs_supporting_ids():
    c = hand_tree()
    c.supporting_ids = []
    with pytest.raises(InputError, match="supporting"):
        EvidenceAnnotator().annotate([c])


def test_outcome_mean_over_finished_paths():
    c = OutcomeAnnotator().annotate([hand_tree()])[0]
    v = values(c, "outcome")
    assert v["2"] == 1.0 and v["5"] == 0.0
    assert v["0"] == pytest.approx(0.5) and v["4"] == pytest.approx(0.5)   # one right, one wrong leaf below
    assert v["3"] == 0.0 and v["1"] == 0.0                                 # no finished path below
    linear = Chain(question_id="q", question="?", gold_answers=["Bob Smith"], steps=[
        search("0", None, ["p1"]), answer("1", "0", "Bob Smith")])
    OutcomeAnnotator().annotate([linear])
    assert [s.labels["outcome"].value for s in linear.steps] == [1.0, 1.0]


class FakeEngine:
    """continue_from returns scripted continuations: per prefix step id, a list of (n_steps, final answer)."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def continue_from(self, items, n):
        self.calls.append([(c.question_id, sid) for c, sid in items])
        out = []
        for chain, sid in items:
            runs = []
            for n_steps, ans in self.script[sid][:n]:
                run = [search(f"c{j}", None, ["x"]) for j in range(n_steps - 1)]
                run.append(answer("cz", None, ans) if ans is not None else search("cz", None, ["x"]))
                runs.append(run)
            out.append(runs)
        return out


def test_rollout_values_discounted_and_batched():
    gamma = 0.5
    script = {"0": [(1, "Bob Smith"), (2, "nope")], "3": [(1, "nope"), (1, "nope")],
              "1": [(2, "Bob Smith"), (1, None)], "4": [(1, "Bob Smith"), (1, "Bob Smith")]}
    eng = FakeEngine(script)
    ann = RolloutAnnotator(eng, AnnotatorConfig(gamma=gamma, rollouts=2, threshold=0.2))
    c = hand_tree()
    ann.annotate([c])
    v = values(c, "rollout")
    # step "0": runs (1 step, right) and (2 steps, wrong): mean(1 * 0.5^2, 0) = 0.125
    assert v["0"] == pytest.approx(0.125)
    assert v["3"] == 0.0
    assert v["1"] == pytest.approx(0.5 ** 3 / 2)
    assert v["4"] == pytest.approx(0.25)
    assert v["2"] == pytest.approx(1.0 * gamma) and v["5"] == 0.0    # answer steps: no rollout
    assert len(eng.calls) == 1 and len(eng.calls[0]) == 4           # one batched call, terminal steps skipped
    lab = c.step("0").labels["rollout"]
    assert lab.cost["rollouts"] == 2 and lab.cost["generated_tokens"] == 5 + 10 + 5
    assert lab.good is False and c.step("4").labels["rollout"].good is True
    assert c.step("2").labels["rollout"].cost["rollouts"] == 0


def test_build_annotator_errors():
    with pytest.raises(InputError, match="unknown annotator"):
        build_annotator("nope")
    with pytest.raises(InputError, match="rollout annotator needs"):
        build_annotator("rollout")
    with pytest.raises(InputError, match="prm"):
        build_annotator("prm")


class Interrupt(Exception):
    pass


class DyingEvidence(EvidenceAnnotator):
    def __init__(self, cfg, die_after):
        super().__init__(cfg)
        self.left = die_after

    def annotate(self, chains):
        if self.left == 0:
            raise Interrupt()
        self.left -= 1
        return super().annotate(chains)


def test_annotate_file_resume_equals_uninterrupted(tmp_path):
    chains = [hand_tree(f"q{i}") for i in range(5)] + [hand_tree("q1")]   # q1 has two chains
    src = tmp_path / "chains.jsonl"
    write_chains(src, chains)
    cfg = AnnotatorConfig(batch_chains=2)
    full = annotate_file(src, EvidenceAnnotator(cfg), tmp_path / "full.jsonl", progress=False)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Interrupt):
        annotate_file(src, DyingEvidence(cfg, die_after=1), out, progress=False)
    assert 0 < len(read_chains(out)) < len(chains)
    # a kill in the middle of the next write (batch q2, q3): q2 complete, q3 torn
    extra = hand_tree("q2")
    EvidenceAnnotator(cfg).annotate([extra])
    with open(out, "a") as f:
        f.write(json.dumps(extra.to_dict()) + "\n" + '{"version": 1, "question_id": "q3", "que')
    annotate_file(src, EvidenceAnnotator(cfg), out, progress=False)
    assert out.read_text() == full.read_text()
    assert sorted(c.question_id for c in read_chains(out)) == sorted(c.question_id for c in chains)
    # rerunning a finished file changes nothing
    annotate_file(src, EvidenceAnnotator(cfg), out, progress=False)
    assert out.read_text() == full.read_text()


def test_annotate_file_refuses_other_annotator_on_same_out(tmp_path):
    src = tmp_path / "chains.jsonl"
    write_chains(src, [hand_tree()])
    annotate_file(src, EvidenceAnnotator(), tmp_path / "out.jsonl", progress=False)
    with pytest.raises(InputError, match="started with annotator"):
        annotate_file(src, OutcomeAnnotator(), tmp_path / "out.jsonl", progress=False)


def test_cohen_kappa_hand_worked():
    # 10 items: both good 4, both bad 3, A good/B bad 2, A bad/B good 1
    a = [1] * 4 + [0] * 3 + [1] * 2 + [0] * 1
    b = [1] * 4 + [0] * 3 + [0] * 2 + [1] * 1
    # po = 0.7; pA = 0.6, pB = 0.5; pe = 0.3 + 0.2 = 0.5; kappa = 0.2 / 0.5 = 0.4
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))


def test_annotate_report_tables_and_png(tmp_path):
    src = tmp_path / "chains.jsonl"
    write_chains(src, [hand_tree("a"), hand_tree("b")])
    ev = annotate_file(src, EvidenceAnnotator(), tmp_path / "ev.jsonl", progress=False)
    oc = annotate_file(src, OutcomeAnnotator(), tmp_path / "oc.jsonl", progress=False)
    rep = annotate_report([ev, oc], tmp_path / "report", wandb=False)
    bal = {b["annotator"]: b for b in rep["balance"]}
    assert bal["evidence"]["steps"] == 12 and bal["evidence"]["good"] == pytest.approx(0.5)
    # outcome good (>= 0.5): steps 0, 4, 2 -> 3 of 6
    assert bal["outcome"]["good"] == pytest.approx(0.5)
    (agr,) = rep["agreement"]
    assert agr["steps"] == 12
    # evidence good: 0,4,2; outcome good: 0,4,2 -> identical labels
    assert agr["kappa"] == pytest.approx(1.0)
    assert (tmp_path / "report" / "report.png").stat().st_size > 1000
    assert "Cohen's kappa" in (tmp_path / "report" / "report.md").read_text()


def test_invalid_step_gets_zero():
    c = Chain(question_id="q", question="?", gold_answers=["x"], supporting_ids=["p1"], steps=[
        Step(id="0", parent=None, text="prose", action=INVALID, parse_error="no tag")])
    EvidenceAnnotator().annotate([c])
    RolloutAnnotator(FakeEngine({}), AnnotatorConfig()).annotate([c])
    assert c.steps[0].labels["evidence"].value == 0.0 and c.steps[0].labels["rollout"].value == 0.0


def test_annotate_file_redoes_partly_written_question(tmp_path):
    chains = [hand_tree("q0"), hand_tree("q1"), hand_tree("q1")]
    src = tmp_path / "chains.jsonl"
    write_chains(src, chains)
    full = annotate_file(src, EvidenceAnnotator(), tmp_path / "full.jsonl", progress=False)
    out = tmp_path / "out.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    out.write_text(lines[1])                        # only one of q1's two chains made it to disk
    (tmp_path / "out.jsonl.annotate.json").write_text((tmp_path / "full.jsonl.annotate.json").read_text())
    annotate_file(src, EvidenceAnnotator(), out, progress=False)
    got = sorted(out.read_text().splitlines())
    assert got == sorted(lines_.rstrip("\n") for lines_ in lines)


# ---- PRM ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_prm_dir(tmp_path_factory):
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForTokenClassification

    from rag_dpo.annotate.prm import save_prm
    tok = AutoTokenizer.from_pretrained(str(Path(__file__).parent / "assets" / "smollm2_tokenizer"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=tok.eos_token_id)
    return save_prm(LlamaForTokenClassification(cfg), tok, tmp_path_factory.mktemp("prm"), max_length=1024)


def test_prm_scores_match_stepwise_training_positions(tiny_prm_dir):
    import torch

    from rag_dpo.annotate.prm import PRMAnnotator, PRMScorer, encode_stepwise
    from rag_dpo.pairs.builders import stepwise_rows
    scorer = PRMScorer.load(tiny_prm_dir)
    c = EvidenceAnnotator().annotate([hand_tree()])[0]
    scores = scorer.score(c.question, c.prefix("2"), [c.step("2"), c.step("5")])
    assert len(scores) == 2 and all(0.0 < x < 1.0 for x in scores) and scores[0] != scores[1]
    # the stepwise row of the path ending at step "2", encoded for training, puts its last label exactly where
    # the scorer reads the score
    row = next(r for r in stepwise_rows([c], scorer.tok, "evidence") if len(r["completions"]) == 3
               and r["completions"][-1].endswith(c.step("2").text))
    enc = encode_stepwise(scorer.tok, row["prompt"], row["completions"], row["labels"], row["completion_info_spans"])
    assert [x for x in enc["labels"] if x != -100] == [1, 1, 1]
    last = max(i for i, x in enumerate(enc["labels"]) if x != -100)
    with torch.no_grad():
        logits = scorer.model(input_ids=torch.tensor([enc["input_ids"][:last + 1]])).logits
    assert float(logits.softmax(-1)[0, last, 1]) == pytest.approx(scores[0], abs=1e-5)
    PRMAnnotator(scorer).annotate([c])
    assert c.step("2").labels["prm"].value == pytest.approx(scores[0], abs=1e-5)
    assert all("prm" in s.labels for s in c.steps)


def test_prm_load_refuses_non_prm_folder(tmp_path):
    from rag_dpo.annotate.prm import PRMScorer
    with pytest.raises(InputError, match="prm.json"):
        PRMScorer.load(tmp_path)


class SamplingEngine:
    """`rollout` stand-in: one chain per question whose length and answer depend only on (cfg.seed, question id),
    like the real engine's per-row seeds; counts calls and rows."""

    def __init__(self):
        from types import SimpleNamespace
        self.cfg = SimpleNamespace(seed=0, do_sample=False, max_steps=3)
        self.rows = 0

    def rollout(self, questions, samples=1):
        import random
        assert self.cfg.do_sample, "the outcome pool must sample"
        out = []
        for q in questions:
            rng = random.Random(f"{self.cfg.seed}|{q.id}")
            n = rng.randint(10, 40)
            ans = q.answers[0] if rng.random() < 0.4 else "wrong"
            steps = [search("0", None, ["p1"]), answer("1", "0", ans)]
            steps[0].generated_tokens, steps[1].generated_tokens = n, 5
            if rng.random() < 0.2:   # a failed chain: invalid second step
                steps[1] = Step(id="1", parent="0", text="junk", action=INVALID, parse_error="no tag",
                                generated_tokens=5)
            out.append(Chain(q.id, q.question, gold_answers=list(q.answers), steps=steps, selected="1"))
        self.rows += len(out)
        return out


def _questions(n):
    from rag_dpo.records import Question
    return [Question(f"q{i}", f"question {i}?", [f"ans {i}"], ["p1"]) for i in range(n)]


def test_iid_pool_matches_token_targets_resumes_and_reads_no_step_label(tmp_path):
    from rag_dpo.annotate.sampled_pool import chain_tokens, sample_matched_pool, tokens_by_question
    from rag_dpo.pairs.builders import PairConfig, outcome_pairs
    qs = _questions(12)
    targets = {q.id: 150.0 + 20 * i for i, q in enumerate(qs)}
    out = sample_matched_pool(qs, SamplingEngine(), tmp_path / "pool.jsonl", targets, seed=3, progress=False)
    chains = read_chains(out)
    got = tokens_by_question(chains, None)
    per_q = {q.id: [c for c in chains if c.question_id == q.id] for q in qs}
    for q in qs:
        lengths = [chain_tokens(c) for c in per_q[q.id]]
        assert abs(got[q.id] - targets[q.id]) <= max(lengths)          # within one chain of the target
        assert got[q.id] - lengths[-1] < targets[q.id]                  # never a chain after the target was reached
    assert abs(sum(got.values()) - sum(targets.values())) < 0.1 * sum(targets.values())
    # i.i.d. chains, labelled only by the outcome annotator (no annotator generated anything)
    assert all(set(s.labels) == {"outcome"} for c in chains for s in c.steps)
    assert all(len(c.leaves()) == 1 and c.method == "sampled" for c in chains)
    assert tokens_by_question(chains, "outcome") == got
    # failed chains are in the pool as wrong outcomes
    assert any(c.path()[-1].action == INVALID for c in chains)

    # outcome pairs never read step labels: scrambling every label changes nothing
    pairs = outcome_pairs(chains, None, PairConfig(rule="all-margin"))
    for c in chains:
        for s in c.steps:
            s.labels = {"evidence": s.labels["outcome"].__class__(1.0 - s.labels["outcome"].value, True, "evidence")}
    assert outcome_pairs(chains, None, PairConfig(rule="all-margin")) == pairs and pairs

    # resume: a pool cut after its first write continues to the same chains
    lines = (tmp_path / "pool.jsonl").read_text().splitlines(keepends=True)
    first = sum(1 for c in chains if c.meta["pool"]["round"] == 0)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:first]))
    eng = SamplingEngine()
    sample_matched_pool(qs, eng, tmp_path / "cut.jsonl", targets, seed=3, progress=False)
    assert eng.rows == len(chains) - first
    assert sorted(c.to_dict().__repr__() for c in read_chains(tmp_path / "cut.jsonl")) == \
        sorted(c.to_dict().__repr__() for c in read_chains(tmp_path / "pool.jsonl"))

    # another seed samples another pool
    other = read_chains(sample_matched_pool(qs, SamplingEngine(), tmp_path / "s4.jsonl", targets, seed=4,
                                            progress=False))
    assert [chain_tokens(c) for c in other] != [chain_tokens(c) for c in read_chains(tmp_path / "pool.jsonl")]


def test_iid_pool_stopping_rule_is_unbiased():
    """The randomised last chain makes a question's expected total its target, even with 1-3 chains per question
    (where stopping at "tokens + half a chain >= target" undershot by about 10 %)."""
    import numpy as np

    from rag_dpo.annotate.sampled_pool import draw, wants_more
    rng = np.random.default_rng(0)
    totals, targets = [], []
    for i in range(3000):
        target = float(rng.integers(80, 220))
        spent, n, mean = 0.0, 0, 65.0
        while wants_more(spent, n, target, 32, mean if n or i else None, draw(1, f"q{i}", n)):
            spent += float(rng.integers(40, 95))
            n += 1
        totals.append(spent)
        targets.append(target)
    assert abs(np.sum(totals) / np.sum(targets) - 1) < 0.02
    assert not wants_more(100, 1, 100, 32, 50.0, 0.0) and wants_more(0, 0, 10, 32, None, 0.99)
    assert wants_more(60, 1, 100, 32, 50.0, 0.79) and not wants_more(60, 1, 100, 32, 50.0, 0.81)   # p = 40 / 50
    assert not wants_more(0, 2, 100, 2, 50.0, 0.0)                                                     # the cap
    assert draw(1, "q", 0) == draw(1, "q", 0) != draw(2, "q", 0)


def test_sample_pool_cli_matches_a_step_pool(tmp_path, tiny_policy_dir):
    """`rag-dpo sample-pool` with the tiny model on two bundled questions: its i.i.d. chains match the hand-made
    step pool's spend per question (policy tokens + annotator tokens), within one chain."""
    from typer.testing import CliRunner

    from rag_dpo.annotate.sampled_pool import chain_tokens, tokens_by_question
    from rag_dpo.cli import app
    from rag_dpo.data import load_dataset
    from rag_dpo.records import Label
    data = __import__("pathlib").Path(__file__).parent.parent / "data" / "hotpotqa" / \
        "ircot_hotpotqa_dev_subsampled_500.jsonl"
    qs = load_dataset(data).questions[:2]
    trees = []
    for q in qs:
        c = Chain(q.id, q.question, gold_answers=list(q.answers), steps=[search("0", None, ["x"]),
                                                                           search("1", None, ["y"])])
        for s in c.steps:
            s.labels["rollout"] = Label(0.0, False, "rollout", {"generated_tokens": 15.0})
        trees.append(c)
    write_chains(tmp_path / "step.jsonl", trees)
    res = CliRunner().invoke(app, ["sample-pool", "--data", str(data), "--match", str(tmp_path / "step.jsonl"),
                                   "--out", str(tmp_path / "iid.jsonl"), "--policy", str(tiny_policy_dir),
                                   "--seed", "2", "--rollout-set", "max_steps=2", "--rollout-set",
                                   "max_new_tokens=8"])
    assert res.exit_code == 0, res.output
    iid = read_chains(tmp_path / "iid.jsonl")
    got = tokens_by_question(iid, None)
    assert set(got) == {q.id for q in qs}
    for q in qs:   # target 2 x (10 policy + 15 annotator) = 50 tokens per question
        longest = max(chain_tokens(c) for c in iid if c.question_id == q.id)
        assert abs(got[q.id] - 50) <= longest
    assert all(c.sampling["seed"] == 2 * 1009 + c.meta["pool"]["round"] and c.sampling["do_sample"] for c in iid)
