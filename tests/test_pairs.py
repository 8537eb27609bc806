"""Pair builders: counts and fields for each rule, outcome/SFT/stepwise rows, budget and question ids, the CLI,
and the datasets loading in TRL's DPOTrainer and SFTTrainer unchanged (tiny model, one step on CPU)."""

from __future__ import annotations

import json
import math

import pytest

from rag_dpo.errors import InputError
from rag_dpo.pairs.builders import PairConfig, build_dataset, build_rows, chain_text
from rag_dpo.records import ANSWER, SEARCH, Chain, Label, Step, write_chains


def step(i, parent, action, value, ids=(), ans=None, obs=True, cost=None):
    text = f"<think>{i}</think>\n" + (f"<search>query {i}</search>" if action == SEARCH else f"<answer>{ans}</answer>")
    s = Step(id=i, parent=parent, text=text, action=action, query=f"query {i}" if action == SEARCH else None,
             answer=ans, retrieved_ids=list(ids), generated_tokens=7,
             observation=f"\n<information>\n[1] passage {i}\n</information>\n" if action == SEARCH and obs else "")
    s.labels["manual"] = Label(value, value >= 0.5, "manual", cost or {"rollouts": 2.0, "generated_tokens": 11.0})
    return s


def labelled_tree(qid="q1") -> Chain:
    """root: A search [p1] .9, B search [p1] .1 (same passages as A), C search [p2] .5, D answer 0;
    A -> E answer right 1.0, F answer wrong 0.0."""
    c = Chain(question_id=qid, question="Who wrote it?", gold_answers=["Ann Lee"], supporting_ids=["p1"])
    for s in [step("A", None, SEARCH, 0.9, ["p1"]), step("B", None, SEARCH, 0.1, ["p1"]),
              step("C", None, SEARCH, 0.5, ["p2"]), step("D", None, ANSWER, 0.0, ans="Bo"),
              step("E", "A", ANSWER, 1.0, ans="Ann Lee"), step("F", "A", ANSWER, 0.0, ans="Zed")]:
        c.add_step(s)
    c.selected = "E"
    return c


def pairs_of(rows):
    return [(r["chosen_id"], r["rejected_id"]) for r in rows]


@pytest.mark.parametrize("rule,margin,dedup,expected", [
    ("best-vs-worst", 0.1, True, [("A", "D"), ("E", "F")]),
    ("all-margin", 0.1, True, [("A", "D"), ("A", "C"), ("C", "D"), ("C", "B"), ("B", "D"), ("E", "F")]),
    ("all-margin", 0.1, False, [("A", "D"), ("A", "B"), ("A", "C"), ("C", "D"), ("C", "B"), ("B", "D"),
                                ("E", "F")]),
    ("all-margin", 0.45, True, [("A", "D"), ("C", "D"), ("E", "F")]),
    ("same-action", 0.1, True, [("A", "C"), ("E", "F")]),
])
def test_step_pair_rules(tokenizer, rule, margin, dedup, expected):
    rows, name = build_rows([labelled_tree()], "step", tokenizer, PairConfig(rule=rule, margin=margin, dedup=dedup))
    assert name == "manual"
    assert pairs_of(rows) == expected


def test_step_pair_fields(tokenizer):
    from rag_dpo.agent.protocol import render_context
    c = labelled_tree()
    rows, _ = build_rows([c], "step", tokenizer, PairConfig())
    ef = rows[-1]
    assert ef["prompt"] == render_context(tokenizer, c.question, [c.step("A")])
    assert "[1] passage A" in ef["prompt"]                     # retrieved text is in the prompt (context)
    assert ef["chosen"] == c.step("E").text and ef["rejected"] == c.step("F").text
    assert ef["chosen_info_spans"] == [] and ef["rejected_info_spans"] == []
    assert (ef["chosen_value"], ef["rejected_value"], ef["prefix_id"]) == (1.0, 0.0, "A")


def outcome_chains():
    right = Chain(question_id="q", question="Who?", gold_answers=["Ann Lee"], steps=[
        step("0", None, SEARCH, 1, ["p1"]), step("1", "0", ANSWER, 1, ans="Ann Lee")], selected="1")
    wrong = Chain(question_id="q", question="Who?", gold_answers=["Ann Lee"], steps=[
        step("0", None, SEARCH, 0, ["p9"]), step("1", "0", ANSWER, 0, ans="Bob")], selected="1")
    unfinished = Chain(question_id="q", question="Who?", gold_answers=["Ann Lee"], steps=[
        step("0", None, SEARCH, 0, ["p8"]), step("1", "0", SEARCH, 0, ["p7"])], selected="1")
    other = Chain(question_id="r", question="What?", gold_answers=["x"], steps=[
        step("0", None, ANSWER, 1, ans="x")], selected="0")
    return [right, wrong, unfinished, other]


def test_outcome_pairs_and_info_spans(tokenizer):
    from rag_dpo.agent.protocol import render_prompt
    chains = outcome_chains()
    rows, _ = build_rows(chains, "outcome", tokenizer, PairConfig(rule="best-vs-worst"))
    assert len(rows) == 1
    r = rows[0]
    assert r["prompt"] == render_prompt(tokenizer, "Who?")
    assert r["chosen"].endswith("<answer>Ann Lee</answer>") and "<answer>Bob</answer>" in r["rejected"]
    (s, e), = r["chosen_info_spans"]
    assert r["chosen"][s:e] == chains[0].steps[0].observation
    all_rows, _ = build_rows(chains, "outcome", tokenizer, PairConfig(rule="all-margin"))
    assert len(all_rows) == 2                 # right vs wrong and right vs the step-limit chain; "r" has no wrong
    with pytest.raises(InputError, match="does not apply"):
        build_rows(chains, "outcome", tokenizer, PairConfig(rule="same-action"))


def test_sft_and_stepwise_rows(tokenizer):
    chains = outcome_chains()
    rows, _ = build_rows(chains, "sft", tokenizer, PairConfig(level="chain"))
    assert [r["question_id"] for r in rows] == ["q", "r"]
    text, spans = chain_text(chains[0].path())
    assert rows[0]["completion"] == text and rows[0]["completion_info_spans"] == spans
    step_rows, _ = build_rows([labelled_tree()], "sft", tokenizer, PairConfig())
    assert [r["completion"] for r in step_rows] == [labelled_tree().step(i).text for i in ("A", "E")]
    sw, _ = build_rows([labelled_tree()], "stepwise", tokenizer, PairConfig())
    assert len(sw) == 5                       # leaves B, C, D, E, F
    e = next(r for r in sw if r["completions"][-1].endswith("<answer>Ann Lee</answer>"))
    assert e["labels"] == [True, True] and e["values"] == [0.9, 1.0]
    (s, t), = e["completion_info_spans"][1]
    assert e["prompt"] + "".join(e["completions"]) == e["prompt"] + chain_text(labelled_tree().path("E"))[0]
    assert e["completions"][1][s:t] == labelled_tree().step("A").observation


def test_build_dataset_side_files_and_errors(tmp_path, tokenizer):
    from datasets import load_from_disk
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [labelled_tree("q1"), labelled_tree("q2")])
    out = build_dataset(labels, "step", tmp_path / "step", tokenizer, PairConfig())
    ds = load_from_disk(str(out))
    assert len(ds) == 4 and {"prompt", "chosen", "rejected", "chosen_info_spans"} <= set(ds.column_names)
    budget = json.loads((out / "budget.json").read_text())
    assert budget["questions"] == 2 and budget["chains"] == 2 and budget["policy_steps"] == 12
    assert budget["annotation_rollouts"] == 24 and budget["rollouts"] == 26
    assert budget["generated_tokens"] == 12 * 7 + 12 * 11 and budget["rows"] == 4
    assert json.loads((out / "question_ids.json").read_text()) == ["q1", "q2"]
    assert json.loads((out / "config.json").read_text())["rule"] == "best-vs-worst"
    # an empty result is still a loadable dataset with the right columns
    empty = build_dataset(labels, "step", tmp_path / "empty", tokenizer, PairConfig(margin=5.0))
    assert len(load_from_disk(str(empty))) == 0
    with pytest.raises(InputError, match="no step carries 'judge'"):
        build_dataset(labels, "step", tmp_path / "x", tokenizer, PairConfig(annotator="judge"))
    with pytest.raises(InputError, match="unknown kind"):
        build_dataset(labels, "nope", tmp_path / "x", tokenizer, PairConfig())


def test_pairs_cli(tmp_path):
    from typer.testing import CliRunner

    from rag_dpo.cli import app
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [labelled_tree()])
    tok_dir = str(__import__("pathlib").Path(__file__).parent / "assets" / "smollm2_tokenizer")
    res = CliRunner().invoke(app, ["pairs", "--labels", str(labels), "--kind", "stepwise", "--out",
                                   str(tmp_path / "sw"), "--tokenizer", tok_dir])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sw" / "budget.json").exists() and '"rows": 5' in res.output


def test_datasets_load_in_trl_trainers(tmp_path, tiny_model_and_tokenizer, tiny_policy_dir):
    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    _, tok = tiny_model_and_tokenizer
    model = str(tiny_policy_dir)
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [labelled_tree("q1"), labelled_tree("q2")] + outcome_chains())
    cfg = PairConfig(annotator="manual")
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                  logging_steps=1, max_length=512)
    for kind in ("step", "outcome"):
        ds = load_from_disk(str(build_dataset(labels, kind, tmp_path / kind, tok, cfg)))
        trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / f"dpo_{kind}"),
                                                                      **common),
                             train_dataset=ds, processing_class=tok)
        out = trainer.train()
        assert math.isfinite(out.training_loss)
    ds = load_from_disk(str(build_dataset(labels, "sft", tmp_path / "sft", tok, PairConfig(level="chain"))))
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft_out"), **common),
                         train_dataset=ds, processing_class=tok)
    assert math.isfinite(trainer.train().training_loss)
