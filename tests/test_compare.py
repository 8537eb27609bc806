"""`rag-dpo compare`: the orchestration (arms x seeds x budgets, resume, matched budgets, report) with a fake
backend, and the CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rag_dpo.errors import InputError
from rag_dpo.pipeline.compare import (CompareConfig, TrainResult, load_compare_config, plan_arms, plan_runs,
                                      question_scores, run_compare)

REPO = Path(__file__).resolve().parent.parent
TEST_QIDS = [f"t{i}" for i in range(12)]


class FakeBackend:
    """Deterministic stand-in: each arm's per-question EM is a fixed draw shifted by a per-family offset. Budgets are
    computed, not copied: seed s's step pool spends a seeded number of tokens per question; step-DPO reads that
    pool; the outcome arms sample i.i.d. chains of seeded random length per question with the real stopping rule
    (`annotate.sampled_pool.wants_more`), scaled by `outcome_factor` (1.5 = a broken matcher); PPO spends
    `ppo_tokens_factor` times the pool."""

    OFFSET = {"sft": 0.0, "outcome-dpo": 0.05, "step-dpo": 0.1, "outcome-ppo": -0.3, "process-ppo": 0.0}

    def __init__(self, train_qids=20, ppo_tokens_factor=1.02, outcome_factor=1.0):
        self.qids = [f"q{i}" for i in range(train_qids)]
        self.trained: list[str] = []
        self.evaluated: list[str] = []
        self.ppo_tokens_factor = ppo_tokens_factor
        self.outcome_factor = outcome_factor

    def prepare(self):
        return self.qids

    def step_tokens(self, seed, q):
        return 200 + np.random.default_rng([seed, int(q[1:])]).integers(0, 150)

    def pool_budget(self, seed, question_ids):
        return {"questions": len(question_ids), "rollouts": len(question_ids),
                "generated_tokens": float(sum(self.step_tokens(seed, q) for q in question_ids))}

    def outcome_spend(self, seed, question_ids):
        from rag_dpo.annotate.sampled_pool import draw, wants_more
        total, chains = 0.0, 0
        for q in question_ids:
            rng = np.random.default_rng([seed, int(q[1:]), 7])
            spent, n = 0, 0
            while wants_more(spent, n, self.step_tokens(seed, q), 32, 50.0, draw(seed, q, n)):
                spent += int(rng.integers(30, 71))
                n += 1
            total += spent * self.outcome_factor
            chains += n
        return {"questions": len(question_ids), "rollouts": chains, "generated_tokens": total, "rows": chains // 3}

    def train(self, run, question_ids, budget, out_dir):
        self.trained.append(run.slug)
        out_dir.mkdir(parents=True, exist_ok=True)
        fam = run.arm.family
        if fam.endswith("ppo"):
            spent = dict(budget, generated_tokens=int(budget["generated_tokens"] * self.ppo_tokens_factor), rows=40)
        elif fam == "step-dpo":
            spent = dict(self.pool_budget(run.seed, question_ids), rows=2 * len(question_ids),
                         rows_by_action={"search>invalid": len(question_ids), "search>search": len(question_ids)})
        else:
            spent = self.outcome_spend(run.seed, question_ids)
        curve = [{"step": i, "loss": 1.0 / (i + 1) + 0.01 * run.seed} for i in range(5)]
        if fam.endswith("dpo"):      # what train.common.health reads from a DPO log; seed 1's step-DPO displaced
            displaced = fam == "step-dpo" and run.seed == 1
            health = {"global_step": 5, "reward_accuracy": 0.75, "reward_margin": 0.12,
                      "chosen_vs_reference": -0.01 if displaced else 0.01, "rejected_vs_reference": -0.1,
                      "flags": ["likelihood displacement: both fell"] if displaced else []}
        elif fam.endswith("ppo"):
            health = {"global_step": 3, "kl": [0.01, 0.05, 0.02], "flags": []}
        else:
            health = {}              # SFT here: nothing recorded
        return TrainResult(policy=str(out_dir / "policy"), budget=spent, curve=curve, health=health)

    def evaluate(self, name, policy, out_dir):
        self.evaluated.append(name)
        fam = next((f for f in self.OFFSET if name.startswith(f.replace("-", "_"))), None)
        p = 0.4 + (self.OFFSET[fam] if fam else 0.0)
        seed = int(name.split("__s")[1].split("__")[0]) if "__s" in name else 0
        em = (np.random.default_rng(seed + 17).random(len(TEST_QIDS)) < p).astype(float)
        found = 0.3 if fam == "step-dpo" else 0.0      # step labels raise recall, not EM
        shown = np.random.default_rng(seed + 29).random(len(TEST_QIDS)) < 0.2 + 2 * found   # and answers seen
        return [{"question_id": q, "em": e, "f1": min(1.0, e + 0.1), "recall": min(1.0, 0.4 + 0.2 * e + found),
                 "steps": 2.0 + e, "parse_error": 0.0,
                 "answer_seen": None if q == "t0" else float(bool(e) or bool(s))}    # t0: a yes/no gold
                for q, e, s in zip(TEST_QIDS, em, shown)]

    def describe(self):
        return {"model": "fake", "data": "fake"}


def _cfg(tmp_path, **kw) -> CompareConfig:
    base = dict(name="t", run_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"), n_boot=200,
                seeds=[0, 1], ablation_seeds=[0], curve_seeds=[0])
    base.update(kw)
    cfg = CompareConfig(**base)
    cfg.validate()
    return cfg


def test_plan_covers_every_arm_seed_and_budget_point():
    cfg = CompareConfig(seeds=[0, 1, 2], ablation_seeds=[0], curve_seeds=[0])
    arms = plan_arms(cfg)
    names = [a.name for a in arms]
    # 1 SFT + 2 outcome-DPO (NLL on/off) + 3 rules x 2 NLL step-DPO + 2 PPO
    assert len(arms) == 11 and len(set(names)) == 11
    assert "step-dpo[same-action]-nll" in names and "outcome-dpo+nll" in names
    mains = [a for a in arms if a.main]
    assert sorted(a.family for a in mains) == sorted(["sft", "outcome-dpo", "step-dpo", "outcome-ppo",
                                                      "process-ppo"])
    runs = plan_runs(cfg)
    full = [r for r in runs if r.fraction == 1.0]
    assert len(full) == 5 * 3 + 6 * 1
    curve = [r for r in runs if r.fraction < 1.0]
    assert sorted((r.arm.family, r.fraction) for r in curve) == [
        ("outcome-dpo", 0.25), ("outcome-dpo", 0.5), ("step-dpo", 0.25), ("step-dpo", 0.5)]
    assert len({r.slug for r in runs}) == len(runs)
    # an interrupted compare has the main comparison of the first seed before any ablation or curve run
    assert [(r.arm.main, r.seed, r.fraction) for r in runs[:5]] == [(True, 0, 1.0)] * 5


def test_compare_writes_every_file_row_and_plot_and_resumes(tmp_path):
    cfg = _cfg(tmp_path)
    backend = FakeBackend()
    data = run_compare(cfg, backend, progress=False)
    runs = plan_runs(cfg)
    assert sorted(backend.trained) == sorted(r.slug for r in runs)
    assert backend.evaluated[:3] == ["warm-start", "base", "iter-retgen"]

    report = (tmp_path / "results" / "t.md").read_text()
    for png in ("t_metrics.png", "t_training_curves.png", "t_budget_curve.png"):
        p = tmp_path / "results" / png
        assert p.exists() and p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000
        assert f"]({png})" in report
    # every method has a table row, every arm is compared with the warm start
    for name in ["base", "iter-retgen", "warm-start"] + [a.name for a in plan_arms(cfg)]:
        assert f"| {name} |" in report, name
    assert "step-DPO vs outcome-DPO (NLL weight 0)" in report and "PRIMARY: step-dpo vs outcome-dpo" in report
    assert "step-dpo vs process-ppo" in report and "outcome-dpo vs outcome-ppo" in report
    assert "below warm start" in report              # outcome-PPO was made much worse in the fake
    assert "outcome-ppo" in report.split("Arms below the warm start")[1].split("\n")[0]
    assert "Budgets match" in report
    assert "| 0.25 | 5 |" in report and "| 0.5 | 10 |" in report and "| 1 | 20 |" in report
    assert "Only 2 seed(s)" in report
    done = json.loads((tmp_path / "runs" / "t" / "arms" / runs[0].slug / "done.json").read_text())
    assert {"rows", "budget", "curve", "target_budget", "health"} <= set(done)
    assert data["report"]["report"].endswith("t.md")
    # training health: a row per run, the flag named in its row and in the verdict, PPO's KL, SFT not recorded
    health = report.split("## Training health")[1].split("\n## ")[0]
    main_step = "step-dpo[best-vs-worst]+nll"
    assert f"| {main_step} | 1 | 1 | 5 | 0.750 | +0.120 | -0.010 / -0.100 | — | likelihood displacement: both fell |" \
        in health
    assert f"| {main_step} | 0 | 1 | 5 | 0.750 | +0.120 | +0.010 / -0.100 | — | none |" in health
    assert "| outcome-ppo | 0 | 1 | 3 | — | — | — | 0.010 / 0.050 / 0.020 | none |" in health
    assert "| sft | 0 | 1 | — | — | — | — | — | not recorded |" in health
    verdict = report.split("## Verdict")[1].split("## What was run")[0]
    assert f"Collapse signs in training logs: {main_step} s1: likelihood displacement: both fell." in verdict
    rows = json.loads((tmp_path / "results" / "t.json").read_text())["training_rows"]
    assert [r["health"]["flags"] for r in rows if r["family"] == "step-dpo" and r["seed"] == 1] == \
        [["likelihood displacement: both fell"]]

    # resume: a second invocation retrains and re-evaluates nothing, and reports the same numbers
    again = FakeBackend()
    run_compare(cfg, again, progress=False)
    assert again.trained == [] and again.evaluated == []
    assert (tmp_path / "results" / "t.md").read_text().split("## What was run")[1].split("- machine")[0] == \
        report.split("## What was run")[1].split("- machine")[0]

    # an interrupted compare (one arm's done file missing) retrains only that arm
    (tmp_path / "runs" / "t" / "arms" / runs[3].slug / "done.json").unlink()
    third = FakeBackend()
    run_compare(cfg, third, progress=False)
    assert third.trained == [runs[3].slug]

    # runs recorded before done.json kept their health: read from the policy folder when it is still there
    for i, policy_health in ((0, {"global_step": 7, "health": {"flags": ["entropy collapse: entropy 2 -> 0.1"]}}),
                             (1, None)):
        f = tmp_path / "runs" / "t" / "arms" / runs[i].slug / "done.json"
        d = json.loads(f.read_text())
        d.pop("health")
        f.write_text(json.dumps(d))
        if policy_health:
            Path(d["policy"]).mkdir(parents=True)
            (Path(d["policy"]) / "train_done.json").write_text(json.dumps(policy_health))
    run_compare(cfg, FakeBackend(), progress=False, report_only=True)
    report = (tmp_path / "results" / "t.md").read_text()
    assert f"| {runs[0].arm.name} | 0 | 1 | 7 | — | — | — | — | entropy collapse: entropy 2 -> 0.1 |" in report
    assert f"| {runs[1].arm.name} | 0 | 1 | — | — | — | — | — | not recorded |" in report
    rows = json.loads((tmp_path / "results" / "t.json").read_text())["training_rows"]
    assert rows[0]["health"] == {"flags": ["entropy collapse: entropy 2 -> 0.1"], "global_step": 7}

    # finished runs made with another base recipe are never mixed into the report
    cfg.recipe_overrides = ["trainer.learning_rate=1"]
    with pytest.raises(InputError, match="another base recipe"):
        run_compare(cfg, FakeBackend(), progress=False)


def test_budgets_are_checked_against_each_seeds_step_pool_and_the_check_can_fail(tmp_path):
    cfg = _cfg(tmp_path, arms=["sft", "outcome-dpo", "step-dpo", "process-ppo"], pairing_rules=["best-vs-worst"],
               nll_weights=[1.0], seeds=[0, 1], budget_fractions=[0.5, 1.0])
    data = run_compare(cfg, FakeBackend(), progress=False)
    report = (tmp_path / "results" / "t.md").read_text()
    assert "Budgets match" in report and "Budgets were NOT matched" not in report
    # each seed has its own pool, so its own target; the outcome arms' spend is sampled, not copied
    targets = {(r["seed"], r["fraction"]): r["target_budget"]["generated_tokens"] for r in data["runs"]}
    assert targets[(0, 1.0)] != targets[(1, 1.0)]
    out = next(r for r in data["runs"] if r["name"] == "outcome-dpo+nll" and r["seed"] == 0)
    assert out["budget"]["generated_tokens"] != out["target_budget"]["generated_tokens"]
    assert abs(out["budget"]["generated_tokens"] / out["target_budget"]["generated_tokens"] - 1) < 0.1
    # training rows are reported next to the budgets, with the step pairs' action mix
    assert "search>invalid 20, search>search 20" in report
    res = json.loads((tmp_path / "results" / "t.json").read_text())
    assert res["budget_check"]["ok"] is True
    step_row = next(r for r in res["training_rows"] if r["family"] == "step-dpo" and r["fraction"] == 1.0)
    assert step_row["rows"] == 40 and step_row["rows_by_action"]["search>search"] == 20

    # a matcher that overshoots (or PPO that overspends) fails the check, and the verdict says so
    cfg2 = _cfg(tmp_path, name="t2", arms=["sft", "step-dpo", "process-ppo"], pairing_rules=["best-vs-worst"],
                nll_weights=[1.0], seeds=[0], budget_fractions=[1.0])
    run_compare(cfg2, FakeBackend(outcome_factor=1.5, ppo_tokens_factor=1.3), progress=False)
    report = (tmp_path / "results" / "t2.md").read_text()
    problems = report.split("**Budgets do not match**")[1].split("##")[0]
    assert "sft s0" in problems and "process-ppo s0" in problems and "step-dpo" not in problems
    assert "Budgets were NOT matched" in report
    assert json.loads((tmp_path / "results" / "t2.json").read_text())["budget_check"]["ok"] is False


def test_primary_comparison_holm_and_mde_in_report_and_json(tmp_path):
    cfg = _cfg(tmp_path, seeds=[0, 1, 2], budget_fractions=[1.0], n_boot=2000)   # p down to 5e-4 before Holm
    run_compare(cfg, FakeBackend(), progress=False)
    report = (tmp_path / "results" / "t.md").read_text()
    verdict = report.split("## Verdict")[1].split("## What was run")[0]
    assert verdict.split("\n- ")[1].startswith("PRIMARY step-dpo vs outcome-dpo")
    res = json.loads((tmp_path / "results" / "t.json").read_text())
    tests = res["tests"]
    prim = [t for t in tests if t["primary"]]
    assert len(prim) == 1 and prim[0]["metric"] == "em" and prim[0]["p_holm"] is None
    assert (prim[0]["a"], prim[0]["b"]) == ("step-dpo[best-vs-worst]+nll", "outcome-dpo+nll")
    secondary = [t for t in tests if not t["primary"]]
    from rag_dpo.eval.stats import holm
    assert [t["p_holm"] for t in secondary] == pytest.approx(holm([t["p"] for t in secondary]))
    assert any(t["kind"] == "vs-warm-start" for t in secondary) and any(t["metric"] == "f1" for t in secondary)
    assert all(t["p_holm"] >= t["p"] for t in secondary)
    recall = {(t["a"], t["b"]): t for t in secondary if t["metric"] == "recall"}
    assert ("step-dpo[best-vs-worst]+nll", "outcome-dpo+nll") in recall
    step_recall = recall[("step-dpo[best-vs-worst]+nll", "warm-start")]
    assert step_recall["kind"] == "vs-warm-start" and step_recall["lo"] > 0 and step_recall["p_holm"] < 0.05
    assert "Secondary, support recall (significant after Holm): step-dpo[best-vs-worst]+nll above" in verdict
    assert "sft above" not in verdict                 # sft's recall equals the warm start's in the fake
    for t in tests:   # the MDE next to every test is the stats function's on the same matrices
        assert t["mde"] != t["mde"] or 0 < t["mde"] <= 1
    assert f"| {prim[0]['label']} |" in report and "| primary |" in report
    # per method: mean + interval + per-seed values of every metric; ΔEM vs warm start; test question count
    assert res["test_questions"] == len(TEST_QIDS) and res["warm_start_shared_by_all_seeds"] is True
    sd = res["methods"]["step-dpo[best-vs-worst]+nll"]
    assert len(sd["metrics"]["em"]["per_seed"]) == 3 and sd["metrics"]["em"]["lo"] <= sd["metrics"]["em"]["mean"]
    assert set(sd["metrics"]) == {"em", "f1", "recall", "steps", "parse_error"}
    assert {"diff", "lo", "hi", "p", "p_holm", "mde"} <= set(sd["delta_em_vs_warm_start"])
    assert "delta_em_vs_warm_start" not in res["methods"]["warm-start"]


class NoPairsBackend(FakeBackend):
    """The pool gives the SFT arm no right chains: it must be recorded as the warm start, not crash the compare."""

    def train(self, run, question_ids, budget, out_dir):
        if run.arm.family in ("sft", "outcome-dpo"):
            self.trained.append(run.slug)
            return TrainResult(policy="", budget=dict(budget, rows=0), no_data="0 rows from the pool")
        return super().train(run, question_ids, budget, out_dir)


def test_arm_without_training_data_is_scored_as_warm_start_and_flagged(tmp_path):
    cfg = _cfg(tmp_path, arms=["sft", "outcome-dpo", "step-dpo"], pairing_rules=["best-vs-worst"],
               nll_weights=[1.0], seeds=[0], budget_fractions=[1.0])
    backend = NoPairsBackend()
    data = run_compare(cfg, backend, progress=False)
    sft = next(r for r in data["runs"] if r["arm"]["family"] == "sft")
    assert sft["no_data"] and sft["rows"] == data["baselines"]["warm-start"]["rows"]
    assert "sft__s0__q100" not in backend.evaluated          # not evaluated again: it is the warm start
    report = (tmp_path / "results" / "t.md").read_text()
    sft_row = next(line for line in report.splitlines() if line.startswith("| sft |"))
    assert "no training data in 1 of 1 runs" in sft_row
    assert "no training data" in report.split("## Verdict")[1].split("##")[0] and \
        "sft" in report.split("gave no training data")[1].split("\n")[0]
    # a paired test against an arm that trained on nothing is not reported as a result
    assert "PRIMARY comparison step-dpo vs outcome-dpo: not a comparison — outcome-dpo+nll had no training data" \
        in report
    assert "did not demonstrably beat" not in report
    assert "| PRIMARY: step-dpo vs outcome-dpo (main variants) (⚠ no training data: outcome-dpo+nll) |" in report
    # the families `arms=` left out are named, and no PPO budget claim is made without PPO runs
    assert "**not in this compare** (`arms=` leaves them out): outcome-ppo, process-ppo" in report
    assert "PPO arms stayed within" not in report


class InterruptedBackend(FakeBackend):
    def train(self, run, question_ids, budget, out_dir):
        if len(self.trained) == 2:
            raise KeyboardInterrupt
        return super().train(run, question_ids, budget, out_dir)


def test_report_is_current_while_a_compare_runs_and_final_after_resume(tmp_path):
    cfg = _cfg(tmp_path, seeds=[0], budget_fractions=[1.0])
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg, InterruptedBackend(), progress=False)
    report = (tmp_path / "results" / "t.md").read_text()
    assert f"**Partial report**: 2 of {len(plan_runs(cfg))} training runs finished" in report
    assert "main-arm seeds [0] (finished so far: seeds [0])" in report
    assert any(line.startswith("| sft | 1 |") for line in report.splitlines())   # finished arms are in the table
    idle = FakeBackend()                           # --report-only: the same partial report, no work at all
    run_compare(cfg, idle, progress=False, report_only=True)
    assert idle.trained == [] and idle.evaluated == []
    assert "**Partial report**: 2 of" in (tmp_path / "results" / "t.md").read_text()
    resumed = FakeBackend()
    run_compare(cfg, resumed, progress=False)
    assert len(resumed.trained) == len(plan_runs(cfg)) - 2
    assert "Partial report" not in (tmp_path / "results" / "t.md").read_text()
    assert "finished so far" not in (tmp_path / "results" / "t.md").read_text()


def test_question_scores_from_chains():
    from rag_dpo.records import ANSWER, INVALID, SEARCH, Chain, Step
    c = Chain("q1", "who?", gold_answers=["Paris"], supporting_ids=["a", "b"],
              steps=[Step("0", None, "s", SEARCH, query="x", retrieved_ids=["a", "z"]),
                     Step("1", "0", "s", ANSWER, answer="paris")], selected="1")
    bad = Chain("q2", "who?", gold_answers=["Rome"], supporting_ids=["c"],
                steps=[Step("0", None, "junk", INVALID, parse_error="no tag")], selected="0")
    rows = question_scores([c, bad])
    assert rows[0] == {"question_id": "q1", "em": 1.0, "f1": 1.0, "recall": 0.5, "steps": 2.0, "parse_error": 0.0,
                       "answer_seen": 0.0}
    assert rows[1]["em"] == 0.0 and rows[1]["parse_error"] == 1.0
    c.steps[0].observation = "<information>Paris is the capital of France.</information>"
    yes_no = Chain("q3", "is it?", gold_answers=["yes"], steps=[Step("0", None, "s", ANSWER, answer="yes")],
                   selected="0")
    assert [r["answer_seen"] for r in question_scores([c, bad, yes_no])] == [1.0, 0.0, None]


def test_answer_seen_is_reported_as_a_diagnostic_and_backfilled_from_eval_chains(tmp_path):
    """Answer seen: per method and vs the warm start in its own section, in the JSON and the metrics plot, one
    verdict line that is not a test; runs scored before it existed get it from their eval chains on disk."""
    from rag_dpo.pipeline.compare import eval_chains_path
    from rag_dpo.records import ANSWER, SEARCH, Chain, Step, write_chains
    cfg = _cfg(tmp_path, arms=["outcome-dpo", "step-dpo"], seeds=[0, 1, 2], ablation_seeds=[], curve_seeds=[],
               budget_fractions=[1.0], nll_weights=[0.5], main_nll_weight=0.5, pairing_rules=["best-vs-worst"])
    run_compare(cfg, FakeBackend(), progress=False)
    report = (tmp_path / "results" / "t.md").read_text()
    section = report.split("## Did the answer reach the reader?")[1].split("\n## ")[0]
    assert "11 test questions with a non-yes/no gold" in section          # t0 (yes/no) left out
    for name in ("base", "iter-retgen", "warm-start", "outcome-dpo+nll", "step-dpo[best-vs-worst]+nll"):
        assert f"| {name} |" in section, name
    res = json.loads((tmp_path / "results" / "t.json").read_text())["answer_seen"]
    assert res["recorded"] and res["questions"] == 11 and not res["not_recorded"]
    assert res["primary"]["diff"] > 0.2            # the fake's step arm sees far more answers
    step = res["methods"]["step-dpo[best-vs-worst]+nll"]
    assert step["delta_vs_warm_start"]["lo"] > 0 and 0 < step["em_when_seen"] <= 1
    verdict = report.split("## Verdict")[1].split("## What was run")[0].strip().splitlines()
    assert verdict[-1].startswith("- Diagnostic, not a test — answer seen: step-dpo[best-vs-worst]+nll − "
                                  "outcome-dpo+nll +")
    assert not any("answer" in t["metric"] for t in json.loads((tmp_path / "results" / "t.json").read_text())["tests"])
    png = (tmp_path / "results" / "t_metrics.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") > 1900          # four panels (three without answer seen)

    # runs scored before answer_seen: backfilled from their chains when still there, "not recorded" when not
    arm_dirs = sorted((tmp_path / "runs" / "t" / "arms").iterdir())
    for d in [tmp_path / "runs" / "t" / "baselines" / "warm-start", *arm_dirs]:
        done = json.loads((d / "done.json").read_text())
        for r in done["rows"]:
            r.pop("answer_seen")
        (d / "done.json").write_text(json.dumps(done))
    ws = tmp_path / "runs" / "t" / "baselines" / "warm-start"
    chains = [Chain(q, "?", gold_answers=["yes" if q == "t0" else "Paris"],
                    steps=[Step("0", None, "s", SEARCH, query="x",
                                observation="Paris" if q in ("t1", "t2") else "Rome"),
                           Step("1", "0", "s", ANSWER, answer="x")], selected="1") for q in TEST_QIDS]
    write_chains(eval_chains_path(ws, "warm-start"), chains)
    run_compare(cfg, FakeBackend(), progress=False, report_only=True)
    res = json.loads((tmp_path / "results" / "t.json").read_text())["answer_seen"]
    assert res["methods"]["warm-start"]["mean"] == pytest.approx(2 / 11)
    assert sorted(res["not_recorded"]) == ["outcome-dpo+nll", "step-dpo[best-vs-worst]+nll"]   # no chains on disk
    report = (tmp_path / "results" / "t.md").read_text()
    assert "Not recorded for: " in report and "Δ answer seen" in report


def test_config_loading_quick_and_bad_input(tmp_path):
    cfg = load_compare_config(REPO / "recipes" / "compare.yaml")
    assert len(cfg.seeds) >= 3 and not cfg.quick
    assert cfg.primary == ["step-dpo", "outcome-dpo"] and cfg.pools == "separate"
    # the CPU default: the primary comparison's two arms, main variants only (2 h); the rest is compare_full.yaml
    assert cfg.arms == ["outcome-dpo", "step-dpo"] and len(plan_arms(cfg)) == 2
    assert load_compare_config(REPO / "recipes" / "compare.yaml", ["arms=[sft,outcome-dpo,step-dpo]"]).arms[0] == "sft"
    full = load_compare_config(REPO / "recipes" / "compare_full.yaml")
    assert set(full.arms) == {"sft", "outcome-dpo", "step-dpo", "outcome-ppo", "process-ppo"}
    assert len(plan_arms(full)) == 11 and len(full.budget_fractions) == 3
    quick = load_compare_config(REPO / "recipes" / "compare.yaml", quick=True)
    assert quick.quick and quick.name == cfg.name + "-quick" and quick.seeds == [0]
    assert quick.recipe_overrides == cfg.recipe_overrides + cfg.quick_recipe_overrides
    over = load_compare_config(REPO / "recipes" / "compare.yaml", ["seeds=[4]"], quick=True)
    assert over.seeds == [4]
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: [step-dpo, magic]\n")
    with pytest.raises(InputError, match="magic"):
        load_compare_config(bad)
    bad.write_text("seedz: [1]\n")
    with pytest.raises(InputError, match="seedz"):
        load_compare_config(bad)
    for text, key in (("pools: mixed\n", "pools"), ("primary: [step-dpo, step-dpo]\n", "primary")):
        bad.write_text(text)
        with pytest.raises(InputError, match=key):
            load_compare_config(bad)


def test_cli_registers_compare():
    from typer.testing import CliRunner

    from rag_dpo.cli import app
    res = CliRunner().invoke(app, ["compare", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output


def test_read_curve_and_arm_overrides(tmp_path):
    from rag_dpo.pipeline.compare import Arm, ArmRun, arm_overrides, read_curve
    (tmp_path / "train_log.json").write_text(json.dumps(
        [{"step": 5, "loss": 0.7, "learning_rate": 1e-4}, {"step": 10, "loss": 0.5}, {"train_runtime": 3.0}]))
    assert read_curve(tmp_path) == [{"step": 5.0, "loss": 0.7}, {"step": 10.0, "loss": 0.5}]
    assert read_curve(tmp_path / "none") == []
    from rag_dpo.pipeline.compare import read_health
    (tmp_path / "train_done.json").write_text(json.dumps({"global_step": 12, "loss": 0.6,
                                                          "health": {"flags": [], "reward_accuracy": 0.8}}))
    assert read_health(tmp_path) == {"flags": [], "reward_accuracy": 0.8, "global_step": 12}
    assert read_health(tmp_path / "none") == {}
    ov = arm_overrides(ArmRun(Arm("step-dpo", "same-action", 1.0), seed=2))
    assert "trainer.seed=2" in ov and "pairs.settings.rule=same-action" in ov and "trainer.nll_weight=1.0" in ov
    assert "trainer.reward=process" in arm_overrides(ArmRun(Arm("process-ppo"), seed=0))


def test_recipe_fields_of_every_arm_exist():
    """compare.yaml (default and --quick) turns into a valid pipeline Recipe for every arm; the overrides land on
    the real recipe fields (a misspelt field would be an InputError at load time)."""
    from rag_dpo.pipeline.compare import Arm, ArmRun, arm_recipe
    for path, quick in [(p, q) for p in ("compare.yaml", "compare_full.yaml") for q in (False, True)]:
        cfg = load_compare_config(REPO / "recipes" / path, quick=quick)
        step = arm_recipe(cfg, ArmRun(Arm("step-dpo", "same-action", 0.0), seed=3))
        assert (step.method, step.pairs.kind, step.pairs.settings.rule) == ("dpo", "step", "same-action")
        assert step.trainer["nll_weight"] == 0.0 and step.trainer["seed"] == 3 and "beta" in step.trainer
        assert step.pairs.settings.annotator == step.annotate.name
        ppo = arm_recipe(cfg, ArmRun(Arm("process-ppo"), seed=1), ["trainer.max_generated_tokens=500"])
        assert ppo.trainer["reward"] == "process" and ppo.trainer["max_generated_tokens"] == 500
        assert "beta" not in ppo.trainer and "nll_weight" not in ppo.trainer
        sft = arm_recipe(cfg, ArmRun(Arm("sft"), seed=0))
        assert sft.method == "sft" and sft.pairs.kind == "sft" and sft.pairs.settings.level == "chain"
        # outcome arms read the i.i.d. pool's outcome labels; with the shared-pool ablation, the step annotator's
        assert sft.pairs.settings.annotator == "outcome" and ppo.seed == 1
        cfg.pools = "shared"
        assert arm_recipe(cfg, ArmRun(Arm("outcome-dpo", None, 0.5), seed=0)).pairs.settings.annotator == \
            step.annotate.name
    # each seed's pools: rollout seed = the seed; losing steps finished only in the shared-pool ablation
    from rag_dpo.pipeline.compare import PipelineBackend
    for mode, finish in (("separate", False), ("shared", True)):
        backend = PipelineBackend(load_compare_config(REPO / "recipes" / "compare.yaml", [f"pools={mode}"]))
        pool = backend.pool_recipe(3)
        assert pool.seed == 3 and pool.rollout.finish is finish and pool.rollout.questions == 150
        assert backend.pool_recipe(4).seed == 4 and backend.recipe.seed == 0   # the warm start's recipe is seedless
    path = REPO / "recipes" / "compare.yaml"
    with pytest.raises(InputError, match="nll_wieght"):
        load_compare_config(path, ["trainers.dpo.nll_wieght=1"])
    with pytest.raises(InputError, match="trainers.rl"):
        load_compare_config(path, ["trainers.rl.x=1"])


def _labelled_pools(recipe, tokenizer, path):
    """Seed 0's two pools, as `PipelineBackend` would leave them (a random tiny model cannot produce chains with any
    right answer, so no pair could be built from its own rollouts). Step pool: per question a good and a bad first
    search (evidence 1 / 0), then a right and a wrong answer after the good search (33 generated tokens).
    Outcome pool: three i.i.d. whole chains per question, one right, one wrong, one failed (invalid), 31 tokens."""
    from rag_dpo.agent.protocol import format_observation, format_step
    from rag_dpo.annotate.annotators import OutcomeAnnotator
    from rag_dpo.io import atomic_write_json
    from rag_dpo.pairs.builders import budget
    from rag_dpo.pipeline import run as steps
    from rag_dpo.records import ANSWER, INVALID, SEARCH, Chain, Label, Step, write_chains
    w = steps.world(recipe)
    chains, iid = [], []
    for q in steps.pool_questions(recipe):
        good = [w.corpus[p] for p in q.supporting_ids[:2]]
        other = [p for p in w.corpus if p.id not in q.supporting_ids][:2]

        def lab(v):
            return {"evidence": Label(v, v > 0.5, "evidence", {"rollouts": 0.0, "generated_tokens": 0.0})}

        def search(sid, parent, passages, query, tokens, value=None):
            return Step(sid, parent, format_step("look", SEARCH, query), SEARCH, query=query,
                        retrieved_ids=[p.id for p in passages], observation=format_observation(passages, tokenizer, 16),
                        generated_tokens=tokens, labels=lab(value) if value is not None else {})

        def answer(sid, parent, ans, tokens, value=None):
            return Step(sid, parent, format_step("so", ANSWER, ans), ANSWER, answer=ans, generated_tokens=tokens,
                        labels=lab(value) if value is not None else {})

        s = [search("0", None, good, q.question, 12, 1.0), search("1", None, other, "weather today", 9, 0.0),
             answer("2", "0", q.answers[0], 7, 1.0), answer("3", "0", "nobody", 5, 0.0)]
        chains.append(Chain(q.id, q.question, gold_answers=list(q.answers), supporting_ids=list(q.supporting_ids),
                            steps=s, selected="2", method="tree-search"))
        for steps_ in ([search("0", None, good, q.question, 6), answer("1", "0", q.answers[0], 5)],
                       [search("0", None, other, "weather", 6), answer("1", "0", "nobody", 5)],
                       [search("0", None, other, "weather", 6),
                        Step("1", "0", "<answer></answer>", INVALID, parse_error="empty <answer>", generated_tokens=3)]):
            iid.append(Chain(q.id, q.question, gold_answers=list(q.answers), supporting_ids=list(q.supporting_ids),
                             steps=steps_, selected="1", method="sampled"))
    OutcomeAnnotator().annotate(iid)
    write_chains(path / "step" / "labels.jsonl", chains)
    atomic_write_json(path / "step" / "done.json", budget(chains, "evidence"))
    write_chains(path / "outcome" / "labels.jsonl", iid)
    atomic_write_json(path / "outcome" / "done.json", budget(iid, "outcome"))
    return chains


def test_compare_end_to_end_with_the_real_pipeline(tmp_path, tiny_policy_dir, tokenizer):
    """`run_compare` with `PipelineBackend` on the tiny random model: real warm start, pools, pair datasets, SFT /
    DPO training, evaluations of baselines and arms, report. Seed 0's pools are labelled files placed where the
    backend resumes from; seeds 1 and 2 sample their own pools with the tiny model (tree search, then i.i.d. chains
    matched on its tokens)."""
    from rag_dpo.annotate.sampled_pool import chain_tokens, tokens_by_question
    from rag_dpo.config import apply_overrides
    from rag_dpo.eval.latest import policy_run
    from rag_dpo.pipeline.compare import PipelineBackend, base_recipe
    from rag_dpo.records import read_chains
    fast = ["precision=fp32", "max_length=384", "max_steps=1", "logging_steps=1", "per_device_train_batch_size=2",
            "gradient_accumulation_steps=1", "save_steps=1000", "wandb=false"]
    cfg = CompareConfig(
        name="e2e", recipe=str(REPO / "recipes" / "dpo_step.yaml"),
        recipe_overrides=[f"model={tiny_policy_dir}", "data.eval_split=test", "warm_start.questions=2",
                          "rollout.questions=3", "rollout.max_steps=2", "rollout.max_new_tokens=6", "rollout.k=2",
                          "retrieval.max_tokens_per_passage=16", "eval.limit=2", "eval.batch_size=4"]
        + [f"warm_start.trainer.{o}" for o in fast] + [f"trainer.{o}" for o in fast],
        trainers={"sft": apply_overrides({}, fast)},
        arms=["sft", "outcome-dpo", "step-dpo"], pairing_rules=["best-vs-worst"], nll_weights=[1.0],
        seeds=[0, 1, 2], ablation_seeds=[0], curve_seeds=[0], budget_fractions=[1.0],
        baselines=["base", "iter-retgen"], n_boot=100, run_dir=str(tmp_path / "runs"),
        out_dir=str(tmp_path / "results"))
    cfg.validate()
    shared = tmp_path / "runs" / "e2e" / "shared"
    pool = _labelled_pools(base_recipe(cfg), tokenizer, shared / "pools" / "s0")
    data = run_compare(cfg, PipelineBackend(cfg), progress=False)

    assert (shared / "warm_start" / "training_manifest.json").exists()
    report = (tmp_path / "results" / "e2e.md").read_text()
    for name in ("base", "iter-retgen", "warm-start", "sft", "outcome-dpo+nll", "step-dpo[best-vs-worst]+nll"):
        assert f"| {name} |" in report, name
    for png in ("e2e_metrics.png", "e2e_training_curves.png", "e2e_budget_curve.png"):
        p = tmp_path / "results" / png
        assert p.read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report
    runs = {(r["name"], r["seed"]): r for r in data["runs"]}
    s0 = {name: r for (name, seed), r in runs.items() if seed == 0}
    assert set(s0) == {"sft", "outcome-dpo+nll", "step-dpo[best-vs-worst]+nll"}
    for r in s0.values():
        assert len(r["rows"]) == 2 and r["questions"] == len(pool) and not r["no_data"]
        assert r["curve"] and "loss" in r["curve"][0]        # the trainer's log_history was read
        assert r["health"]["global_step"] >= 1 and isinstance(r["health"]["flags"], list)   # and its health
        assert ("reward_accuracy" in r["health"]) == r["name"].startswith(("outcome-dpo", "step-dpo"))
        assert (Path(r["policy"]) / "adapter_config.json").exists()
        _, arm_recipe = policy_run(r["policy"])     # `rag-dpo eval --policy` finds the arm's budgets
        assert arm_recipe["rollout"]["max_new_tokens"] == 6 and arm_recipe["retrieval"]["max_tokens_per_passage"] == 16
        assert r["budget"]["questions"] == r["target_budget"]["questions"] == len(pool)
        assert r["target_budget"]["generated_tokens"] == 33 * len(pool)   # the step pool's spend
    # step-DPO read the step pool, the outcome arms the i.i.d. pool (their own files, their own costs)
    assert s0["step-dpo[best-vs-worst]+nll"]["budget"]["generated_tokens"] == 33 * len(pool)
    assert s0["step-dpo[best-vs-worst]+nll"]["budget"]["rows_by_action"] == {"answer>answer": 3, "search>search": 3}
    for name in ("sft", "outcome-dpo+nll"):
        assert s0[name]["budget"]["generated_tokens"] == 31 * len(pool)
        assert s0[name]["budget"]["annotator"] == "outcome" and s0[name]["budget"]["annotation_generated_tokens"] == 0
    assert s0["outcome-dpo+nll"]["budget"]["rows"] == 3              # right vs wrong per question (best-vs-worst)
    assert "Budgets match" in report                                  # 31 vs 33 tokens: within 10 %
    assert "| step-dpo[best-vs-worst]+nll | 0 | 1 |" in report.split("## Training health")[1]
    assert {len(b["rows"]) for b in data["baselines"].values()} == {2}

    # seeds 1 and 2 sampled their own pools from the (shared) warm start: different trees, different chains
    trees = {s: read_chains(shared / "pools" / f"s{s}" / "step" / "labels.jsonl") for s in (1, 2)}
    iid = {s: read_chains(shared / "pools" / f"s{s}" / "outcome" / "labels.jsonl") for s in (1, 2)}
    assert [c.question_id for c in trees[1]] == [c.question_id for c in trees[2]]
    assert [s.text for c in trees[1] for s in c.steps] != [s.text for c in trees[2] for s in c.steps]
    for s in (1, 2):
        assert all(c.sampling["seed"] == s for c in trees[s])
        target = tokens_by_question(trees[s], "evidence")
        got = tokens_by_question(iid[s], None)
        assert set(got) == set(target)
        for qid, t in target.items():   # i.i.d. chains matched per question, within one chain of the target
            assert abs(got[qid] - t) <= max(chain_tokens(c) for c in iid[s] if c.question_id == qid)
        assert all(set(st.labels) == {"outcome"} and len(c.leaves()) == 1 for c in iid[s] for st in c.steps)
    # the tiny model answers nothing right: seeds 1-2 have no outcome data and are scored as the warm start
    assert all(runs[("sft", s)]["no_data"] for s in (1, 2))


def test_an_arm_above_the_warm_start_but_not_after_holm_is_a_lead_not_a_finding():
    from rag_dpo.pipeline.compare_report import above_warm_start_verdict
    strong = {"a": "step-dpo", "diff": 0.04, "lo": 0.01, "hi": 0.07, "p_holm": 0.01}
    weak = {"a": "sft", "diff": 0.03, "lo": 0.006, "hi": 0.056, "p_holm": 0.066}
    lines = above_warm_start_verdict([strong, weak])
    assert lines[0].startswith("Arms above the warm start") and "step-dpo" in lines[0] and "sft" in lines[0]
    assert len(lines) == 2 and "sft is not significant after the Holm correction" in lines[1]
    assert "step-dpo" not in lines[1]
    assert len(above_warm_start_verdict([strong])) == 1


def test_a_comment_in_the_base_recipe_keeps_finished_runs_a_changed_setting_does_not(tmp_path):
    """The settings hash reads the recipe's settings, not its text; done files hashed from the text (runs finished
    before that) are still accepted while the text is unchanged."""
    from rag_dpo.pipeline.compare import settings_hashes
    recipe = tmp_path / "base.yaml"
    text = (REPO / "recipes" / "dpo_step.yaml").read_text()
    assert "\nseed: 0\n" in text
    recipe.write_text(text)
    cfg = _cfg(tmp_path, recipe=str(recipe), arms=["outcome-dpo", "step-dpo"], seeds=[0], ablation_seeds=[],
               curve_seeds=[], budget_fractions=[1.0], nll_weights=[0.5], main_nll_weight=0.5,
               pairing_rules=["best-vs-worst"])
    run_compare(cfg, FakeBackend(), progress=False)
    new, legacy = settings_hashes(cfg)
    assert new != legacy
    done = tmp_path / "runs" / "t" / "baselines" / "base" / "done.json"
    assert json.loads(done.read_text())["settings_hash"] == new

    recipe.write_text("# a note on the recipe\n" + text.replace("\n", "   # trailing comment\n", 1))
    again = FakeBackend()
    run_compare(cfg, again, progress=False)          # same settings: nothing is redone
    assert again.trained == [] and again.evaluated == [] and settings_hashes(cfg)[0] == new

    d = json.loads(done.read_text())
    d["settings_hash"] = legacy                      # a run finished under the text hash ...
    done.write_text(json.dumps(d))
    with pytest.raises(InputError, match="another base recipe"):
        run_compare(cfg, FakeBackend(), progress=False)   # ... is not accepted once the text has changed
    recipe.write_text(text)
    again = FakeBackend()
    run_compare(cfg, again, progress=False)          # ... and is with the text it was made with
    assert again.evaluated == []

    recipe.write_text(text.replace("\nseed: 0\n", "\nseed: 1\n", 1))
    with pytest.raises(InputError, match="another base recipe"):
        run_compare(cfg, FakeBackend(), progress=False)


def test_report_setup_names_how_the_warm_start_was_trained_and_the_base_rows_examples(tmp_path):
    """The same warm-start key trains in bf16 autocast on one machine and float32 on another, so the report's setup
    says which one this run's was (from the cache entry's warm_start.json); the base row says it had examples."""
    from rag_dpo.pipeline.compare import PipelineBackend
    backend = PipelineBackend(load_compare_config(REPO / "recipes" / "compare.yaml", []))
    backend.start = str(tmp_path)
    assert "autocast" not in backend.describe()["warm start"]          # an entry from before it was recorded
    (tmp_path / "warm_start.json").write_text(json.dumps({"key": "k", "autocast": "bf16"}))
    setup = backend.describe()
    assert "(trained in bf16 autocast)" in setup["warm start"]
    assert "base = the base model running rag after 2 worked examples" in setup["baselines"]
    assert "iter-retgen = the warm start running iter-retgen" in setup["baselines"]
