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


def test_failed_chains_are_wrong_outcomes(tokenizer):
    """A chain that ended in an invalid step or at the step limit is a wrong answer (F1 0) for outcome pairs and
    the outcome annotator; only a losing tree-search step below the limit (never continued) is unfinished."""
    from rag_dpo.annotate.annotators import OutcomeAnnotator, finished_leaves
    from rag_dpo.records import INVALID
    c = Chain(question_id="q", question="Who?", gold_answers=["Ann Lee"], meta={"tree_search": {"max_steps": 2}})
    for s in [step("0", None, SEARCH, 1, ["p1"]), step("1", "0", ANSWER, 1, ans="Ann Lee"),
              step("2", None, SEARCH, 0, ["p9"]), step("3", "2", SEARCH, 0, ["p8"]),   # step limit (depth 2)
              step("4", None, SEARCH, 0, ["p7"])]:                                     # unfinished loser
        c.add_step(s)
    bad = Step("5", "0", "<think>x</think>\n<answer></answer>", INVALID, parse_error="empty <answer>")
    bad.labels["manual"] = Label(0.0, False, "manual", {})
    c.add_step(bad)
    c.selected = "1"
    assert sorted(s.id for s in finished_leaves(c)) == ["1", "3", "5"]
    rows, _ = build_rows([c], "outcome", tokenizer, PairConfig(rule="all-margin"))
    assert sorted(r["rejected"].endswith("<answer></answer>") for r in rows) == [False, True]
    assert {r["rejected_value"] for r in rows} == {0.0} and len(rows) == 2
    # the invalid step never ended the policy's turn: no EOS may be trained after it
    assert [(r["chosen_ends_turn"], r["rejected_ends_turn"]) for r in rows] == [(True, False), (True, False)]
    OutcomeAnnotator().annotate([c])
    assert c.step("0").labels["outcome"].value == pytest.approx(0.5)   # right answer + invalid step below it
    assert c.step("2").labels["outcome"].value == 0.0 and c.step("2").labels["outcome"].info["paths"] == 1
    assert c.step("4").labels["outcome"].info["paths"] == 0
    # without a recorded step limit, a search leaf is only finished when it is the selected one
    c.meta = {}
    assert sorted(s.id for s in finished_leaves(c)) == ["1", "5"]


def test_ends_turn_and_rows_by_action(tmp_path, tokenizer):
    from rag_dpo.records import INVALID
    c = labelled_tree()
    bad = Step("G", "A", "<think>x</think>\n<answer></answer>", INVALID, parse_error="empty <answer>")
    bad.labels["manual"] = Label(0.0, False, "manual", {})
    c.add_step(bad)
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [c])
    rows, _ = build_rows([c], "step", tokenizer, PairConfig(rule="all-margin"))
    ends = {(r["chosen_id"], r["rejected_id"]): (r["chosen_ends_turn"], r["rejected_ends_turn"]) for r in rows}
    assert ends[("E", "G")] == (True, False) and ends[("A", "D")] == (False, True)
    out = build_dataset(labels, "step", tmp_path / "step", tokenizer, PairConfig(rule="all-margin"))
    # what the DPO trainer trains on: EOS after the chosen answer, none after the rejected invalid step
    from datasets import load_from_disk

    from rag_dpo.train.dpo import tokenize_pairs
    ds = load_from_disk(str(out))
    enc = tokenize_pairs(ds, tokenizer)
    i = next(j for j, r in enumerate(ds) if (r["chosen_id"], r["rejected_id"]) == ("E", "G"))
    assert enc[i]["chosen_ids"][-1] == tokenizer.eos_token_id and enc[i]["chosen_mask"][-1] == 1
    assert tokenizer.eos_token_id not in enc[i]["rejected_ids"]
    budget = json.loads((out / "budget.json").read_text())
    assert budget["rows_by_action"] == {"answer>answer": 1, "answer>invalid": 1, "search>answer": 3,
                                        "search>search": 2}
    assert sum(budget["rows_by_action"].values()) == budget["rows"] == len(rows)


def test_pair_text_tokenises_to_exactly_the_policy_tokens(tmp_path, tokenizer):
    """What the DPO/SFT trainers train on (their tokenisation of our rows, info spans masked) is exactly the policy's
    own tokens of those steps as the rollout engine rendered them: `tokenize_path`'s policy mask, EOS only after an
    answer. Replaces a raw TRL DPOTrainer run that scored retrieved text and only checked the loss was finite."""
    from datasets import load_from_disk

    from rag_dpo.agent.protocol import tokenize_path
    from rag_dpo.train.dpo import tokenize_pairs
    from rag_dpo.train.sft import tokenize_sft
    tree, chains = labelled_tree("q1"), outcome_chains()
    labels = tmp_path / "labels.jsonl"
    write_chains(labels, [tree] + chains)
    cfg = PairConfig(annotator="manual", rule="all-margin")

    def policy_tokens(question, path):
        tp = tokenize_path(tokenizer, question, path)
        return sum(tp.policy_mask)

    step_ds = load_from_disk(str(build_dataset(labels, "step", tmp_path / "step", tokenizer, cfg)))
    enc = tokenize_pairs(step_ds, tokenizer)
    for row, e in zip(step_ds, enc):
        if row["question_id"] != "q1":
            continue
        for side in ("chosen", "rejected"):
            st = tree.step(row[f"{side}_id"])
            a, b = tokenize_path(tokenizer, tree.question, tree.path(st.id)).step_spans[-1]
            assert sum(e[f"{side}_mask"]) == b - a, (row[f"{side}_id"], side)
            assert (e[f"{side}_ids"][-1] == tokenizer.eos_token_id) == row[f"{side}_ends_turn"]
    out_ds = load_from_disk(str(build_dataset(labels, "outcome", tmp_path / "outcome", tokenizer, cfg)))
    enc = tokenize_pairs(out_ds, tokenizer)
    right, wrong = chains[0], chains[1]
    row = next(i for i, r in enumerate(out_ds) if r["rejected"].endswith("<answer>Bob</answer>"))
    assert sum(enc[row]["chosen_mask"]) == policy_tokens("Who?", right.path())
    assert sum(enc[row]["rejected_mask"]) == policy_tokens("Who?", wrong.path())
    assert sum(enc[row]["chosen_mask"]) < len(enc[row]["chosen_ids"])      # retrieved tokens are in, not targets
    sft_ds = load_from_disk(str(build_dataset(labels, "sft", tmp_path / "sft", tokenizer, PairConfig(level="chain"))))
    sft = tokenize_sft(sft_ds, tokenizer)
    first = next(i for i, r in enumerate(sft_ds) if r["question_id"] == "q")
    n_target = sum(1 for x in sft[first]["labels"] if x != -100)
    assert n_target == policy_tokens("Who?", right.path())
