"""The recipe pipeline on the tiny model: `rag-dpo train` makes a run folder with the resolved recipe, data hashes,
the adapter and its training manifest; a rerun resumes (skips finished stages); a different recipe in the same
folder is refused; the results table states how the trained policy compares with its warm start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag_dpo.errors import InputError
from rag_dpo.pipeline.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _overrides(tiny_policy_dir):
    return [f"model={tiny_policy_dir}", "warm_start.questions=4", "warm_start.trainer.max_steps=1",
            "warm_start.trainer.precision=fp32", "warm_start.trainer.max_length=512", "eval.limit=0"]


def test_train_sft_recipe_end_to_end_and_resume(tmp_path, tiny_policy_dir, monkeypatch):
    from typer.testing import CliRunner

    from rag_dpo.cli import app
    from rag_dpo.data import check_not_trained_on
    run_dir = tmp_path / "run"
    args = ["train", str(RECIPES / "sft.yaml"), "--run-dir", str(run_dir), *_overrides(tiny_policy_dir)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ws = run_dir / "warm_start"
    for f in ("recipe.yaml", "data_hashes.json", "summary.json", "warm_start/config.json",   # a full fine-tune
              "warm_start/training_manifest.json", "warm_start_data/oracle.jsonl"):
        assert (run_dir / f).exists(), f
    manifest = json.loads((ws / "training_manifest.json").read_text())
    assert len(manifest["question_ids"]) == 4
    health = json.loads((run_dir / "summary.json").read_text())["training"]["trained"]["health"]
    assert health["flags"] == [] or all(isinstance(f, str) for f in health["flags"])
    assert "entropy" in health                                   # TRL logs it; the collapse check reads it
    with pytest.raises(InputError):      # the split guard refuses the questions it was trained on
        check_not_trained_on(ws, manifest["question_ids"][:1])
    from rag_dpo.agent.policy import load_policy
    model, _ = load_policy(str(ws))
    assert not type(model).__name__.startswith("PeftModel") and not (ws / "adapter_config.json").exists()
    # rerun: every stage is found finished, nothing is retrained
    import rag_dpo.train.sft as sft
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: pytest.fail("retrained a finished warm start"))
    assert CliRunner().invoke(app, args).exit_code == 0
    # the eval step really evaluates the saved adapter (on dev questions, which it was not trained on)
    from rag_dpo.pipeline.run import evaluate_policies
    r = load_recipe(RECIPES / "sft.yaml", _overrides(tiny_policy_dir)[:-1] + ["eval.limit=1", "rollout.max_steps=1",
                                                                             "rollout.max_new_tokens=4"])
    table = evaluate_policies(r, run_dir, {"warm_start": str(ws)})
    assert set(table["warm_start"]["agent"]) >= {"em", "f1", "support_recall", "parse_error_rate"}
    assert (run_dir / "eval" / "warm_start" / "chains.jsonl").exists()
    assert "| warm_start | agent |" in (run_dir / "results.md").read_text()
    # the same folder with another recipe is refused (exit code 2, one line)
    from rag_dpo.pipeline.run import prepare_run_dir
    other = load_recipe(RECIPES / "sft.yaml", _overrides(tiny_policy_dir) + ["seed=7"])
    with pytest.raises(InputError):
        prepare_run_dir(other, run_dir)


def test_results_table_states_trained_vs_warm_start():
    from rag_dpo.pipeline.run import results_markdown
    r = load_recipe(RECIPES / "dpo_step.yaml")
    table = {"base": {"agent": {"em": 0.0, "f1": 0.0}}, "warm_start": {"agent": {"em": 0.2, "f1": 0.3}},
             "trained": {"agent": {"em": 0.15, "f1": 0.35}}}
    md = results_markdown(r, table)
    assert "| trained | agent | 0.150 | 0.350 |" in md
    # without per-question scores there is no paired test, so no "better"/"worse"
    assert "EM 0.150 vs 0.200 (-0.050)" in md and "better" not in md and "worse" not in md
    assert "Training health" not in md                       # no training log given: no line


def test_results_say_how_far_training_moved_the_policy(tmp_path):
    """The trained policy's train_done.json (steps, DPO's preference fit, collapse flags) becomes one line of
    results.md, read through training_summary; a policy without one (a hub name) adds nothing."""
    from rag_dpo.pipeline.run import results_markdown, training_summary
    from rag_dpo.train.common import health
    log = [{"rewards/accuracies": a, "rewards/margins": m, "rewards/chosen": -0.01 * i, "rewards/rejected": -0.02 * i}
           for i, (a, m) in enumerate([(0.0, 0.0), (0.5, 0.01), (0.5, 0.02), (0.75, 0.05), (0.25, 0.03),
                                       (0.5, 0.01), (0.75, 0.04), (0.5, 0.02)])]
    (tmp_path / "train_done.json").write_text(json.dumps({"global_step": 33, "health": health(log)}))
    summary = training_summary({"trained": str(tmp_path), "base": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    assert list(summary) == ["trained"]
    md = results_markdown(load_recipe(RECIPES / "dpo_step.yaml"), {"trained": {"agent": {"em": 0.2}}}, None, summary)
    line = md.strip().splitlines()[-1]
    assert line.startswith("Training health (trained): 33 optimizer steps; preference fit")
    assert "reward accuracy 0.62, margin +0.030" in line       # the last quarter of 8 logs: (0.75, 0.04), (0.5, 0.02)
    assert "collapse signs: likelihood displacement" in line


def test_paired_verdict_says_better_only_when_the_interval_excludes_zero(tmp_path):
    """trained vs warm start on the same questions: 40 of 150 more right answers is "EM better" with an interval
    above 0; one more right answer is "no difference detectable" with the detectable size, never "better"."""
    from rag_dpo.pipeline.run import paired_comparison, results_markdown
    from rag_dpo.records import Chain, Step, write_chains
    r = load_recipe(RECIPES / "dpo_step.yaml")

    def chains(right: int, n: int = 150):
        out = []
        for i in range(n):
            ans = "Paris" if i < right else "Lyon"
            c = Chain(f"q{i}", "Q?", ["Paris"], [], [Step("0", None, "t", "answer", answer=ans)], selected="0")
            c.method = "agent"
            out.append(c)
        return out

    for trained_right, expect in ((60, "better than the warm start on EM, F1 (95 % interval excludes 0)"), (21, "no difference detectable")):
        d = tmp_path / str(trained_right)
        write_chains(d / "eval" / "warm_start" / "chains.jsonl", chains(20))
        write_chains(d / "eval" / "trained" / "chains.jsonl", chains(trained_right))
        paired = paired_comparison(d, {"warm_start": "w", "trained": "t"}, ["agent"], n_boot=500)
        em = paired["agent"]["em"]
        assert paired["agent"]["questions"] == 150 and em["diff"] == pytest.approx((trained_right - 20) / 150)
        md = results_markdown(r, {"warm_start": {"agent": {"em": 0.1}}, "trained": {"agent": {"em": 0.2}}}, paired)
        assert expect in md and "95 %" in md
        if trained_right == 21:
            assert "better" not in md and em["lo"] <= 0 <= em["hi"] and em["mde"] > 0
        else:
            assert em["lo"] > 0
    # the answer-seen diagnostic: paired over the questions a passage can answer, a line of its own, never a verdict
    def read(i, seen, gold="Paris"):
        c = Chain(f"q{i}", "Q?", [gold], [], [Step("0", None, "s", "search", query="q",
                                                   observation="[1] T: in Paris" if seen else "[1] T: in Rome"),
                                              Step("1", "0", "a", "answer", answer="Lyon")], selected="1")
        c.method = "agent"
        return c
    d = tmp_path / "seen"
    write_chains(d / "eval" / "warm_start" / "chains.jsonl", [read(i, i < 10) for i in range(40)] + [read(40, 0, "no")])
    write_chains(d / "eval" / "trained" / "chains.jsonl", [read(i, i < 30) for i in range(40)] + [read(40, 1, "no")])
    paired = paired_comparison(d, {"warm_start": "w", "trained": "t"}, ["agent"], n_boot=500)
    seen = paired["agent"]["answer_seen"]
    assert seen["questions"] == 40 and seen["diff"] == pytest.approx(0.5) and seen["lo"] > 0
    md = results_markdown(r, {"warm_start": {"agent": {"em": 0.0}}, "trained": {"agent": {"em": 0.0}}}, paired)
    assert "Diagnostic: the gold answer was in the passages read on Δ +0.500" in md and "better" not in md


def test_missing_recipe_is_one_line_error(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "rag_dpo.cli", "train", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "nope.yaml" in p.stderr and "Traceback" not in p.stderr


def test_warm_start_is_built_once_per_key_and_shared_between_recipes(tmp_path, tiny_policy_dir, monkeypatch):
    """Two recipes with the same model, oracle chains and SFT settings (sft.yaml and dpo_step.yaml here) share one
    cached warm start: the second run links the entry without training. Another SFT setting is another entry, and a
    half-built entry (killed before the rename) is never taken for a finished one."""
    import rag_dpo.train.sft as sft
    from rag_dpo.paths import cache_dir
    from rag_dpo.pipeline.run import warm_start
    monkeypatch.setenv("RAG_DPO_CACHE", str(tmp_path / "cache"))
    same = _overrides(tiny_policy_dir) + ["warm_start.questions=3", "data.fractions=0.6,0.1,0.3",
                                          "warm_start.trainer.lora.r=8", "warm_start.trainer.lora.alpha=16",
                                          "warm_start.trainer.learning_rate=1e-4", "warm_start.trainer.num_train_epochs=1",
                                          "warm_start.trainer.full_finetune=false",
                                          "warm_start.trainer.gradient_accumulation_steps=1",
                                          "warm_start.trainer.per_device_train_batch_size=1"]
    a = load_recipe(RECIPES / "sft.yaml", same)
    b = load_recipe(RECIPES / "dpo_step.yaml", same)
    calls = []
    real = sft.train_sft

    def counting(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(sft, "train_sft", counting)
    wa = warm_start(a, tmp_path / "run_a")
    assert len(calls) == 1 and wa.is_symlink() and (wa / "adapter_config.json").exists()
    entry = wa.resolve()
    assert entry.parent == cache_dir("warm_starts") and not (entry / "checkpoints").exists()
    assert json.loads((entry / "warm_start.json").read_text())["questions"] == 3
    wb = warm_start(b, tmp_path / "run_b")
    assert len(calls) == 1 and wb.resolve() == entry                # shared, not retrained
    # killed mid-build: a .building folder is not an entry; the next run builds (and finishes) it
    c = load_recipe(RECIPES / "sft.yaml", same + ["warm_start.trainer.learning_rate=2e-4"])

    class Killed(Exception):
        pass

    def die(*args, **kw):
        Path(args[2]).mkdir(parents=True)
        raise Killed

    monkeypatch.setattr(sft, "train_sft", die)
    with pytest.raises(Killed):
        warm_start(c, tmp_path / "run_c")
    assert [p.name.endswith(".building") for p in cache_dir("warm_starts").iterdir() if p.is_dir()].count(True) == 1
    monkeypatch.setattr(sft, "train_sft", counting)
    wc = warm_start(c, tmp_path / "run_c")
    assert len(calls) == 2 and wc.resolve() != entry and not list(cache_dir("warm_starts").glob("*.building"))


def test_baselines_run_the_method_with_the_warm_start_and_the_base_model_plainly():
    from rag_dpo.pipeline.run import baseline_eval
    r = load_recipe(RECIPES / "dpo_step.yaml")
    assert baseline_eval(r, "iter-retgen", "/ws") == ("/ws", "iter-retgen", 0)
    assert baseline_eval(r, "rag", "/ws") == ("/ws", "rag", 0)
    assert baseline_eval(r, "base", "/ws") == ("smollm2", "rag", 2)      # plain prompt and two worked examples
    assert baseline_eval(r, "iter-retgen", None) == ("smollm2", "iter-retgen", 2)
    with pytest.raises(InputError):
        baseline_eval(r, "agent", "/ws")


def test_a_cached_warm_start_is_evaluated_once_per_eval_setting(tmp_path, tiny_policy_dir, monkeypatch):
    """Two run folders evaluating the same cached warm start with the same eval settings: the second links the
    first's eval (no generation); another eval setting or an edited prompt is a separate eval."""
    import rag_dpo.eval.evaluate as ev
    from rag_dpo.pipeline.run import evaluate_policies, warm_start
    monkeypatch.setenv("RAG_DPO_CACHE", str(tmp_path / "cache"))
    over = _overrides(tiny_policy_dir)[:-1] + ["warm_start.questions=2", "eval.limit=1", "rollout.max_steps=1",
                                                "rollout.max_new_tokens=4"]
    r = load_recipe(RECIPES / "dpo_step.yaml", over)
    calls = []
    real = ev.evaluate

    def counting(*a, **k):
        calls.append(k["out_dir"])
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate", counting)
    for run in ("a", "b"):
        ws = warm_start(r, tmp_path / run)
        table = evaluate_policies(r, tmp_path / run, {"warm_start": str(ws)})
        assert "em" in table["warm_start"]["agent"] and (tmp_path / run / "eval" / "warm_start").is_symlink()
    assert len(calls) == 1
    assert (tmp_path / "a" / "eval" / "warm_start").resolve() == (tmp_path / "b" / "eval" / "warm_start").resolve()
    r2 = load_recipe(RECIPES / "dpo_step.yaml", over[:-1] + ["rollout.max_new_tokens=5"])
    evaluate_policies(r2, tmp_path / "c", {"warm_start": str(warm_start(r2, tmp_path / "c"))})
    assert len(calls) == 2
    # an edited prompt is another eval, not the finished one reused (it would never reach evaluate's own check)
    from rag_dpo.agent import protocol
    monkeypatch.setattr(protocol, "SYSTEM_PROMPT", protocol.SYSTEM_PROMPT + " Be brief.")
    evaluate_policies(r, tmp_path / "a", {"warm_start": str(warm_start(r, tmp_path / "a"))})
    assert len(calls) == 3
    assert (tmp_path / "a" / "eval" / "warm_start").resolve() != (tmp_path / "b" / "eval" / "warm_start").resolve()


def test_cached_eval_key_is_pinned_and_follows_rollout_settings(monkeypatch):
    """The key of a cached warm start's eval is pinned (prompts fixed here; a prompt edit changes it on purpose): a
    new RolloutConfig field would otherwise re-run every cached eval (~5 min each on the CPU) without a word. Add
    such a field to `recipe.LATER_SETTINGS` (hashed only when set away from its default)."""
    import dataclasses

    from rag_dpo.eval import evaluate as ev
    from rag_dpo.pipeline import recipe as rec
    from rag_dpo.pipeline.run import cached_eval_key, eval_rollout_config
    monkeypatch.setattr(ev, "prompts_fingerprint", lambda: "fixed")
    r = load_recipe(RECIPES / "dpo_step.yaml")
    rcfg = eval_rollout_config(r)
    assert cached_eval_key(r, ["agent"], "test", rcfg) == "453af72cb7f2bd1c"
    assert cached_eval_key(r, ["agent"], "test", dataclasses.replace(rcfg, k=rcfg.k + 1)) != "453af72cb7f2bd1c"
    # a field listed as added later leaves the hash at its default and enters it when set (max_steps stands in)
    default = dataclasses.replace(rcfg, max_steps=type(rcfg)().max_steps)
    changed = dataclasses.replace(default, max_steps=default.max_steps + 1)
    before = [cached_eval_key(r, ["agent"], "test", c) for c in (default, changed)]
    monkeypatch.setattr(rec, "LATER_SETTINGS", rec.LATER_SETTINGS + ("max_steps",))
    after = [cached_eval_key(r, ["agent"], "test", c) for c in (default, changed)]
    assert after[0] != before[0] and after[1] == before[1]


def test_warm_start_key_is_pinned_and_follows_settings(tmp_path):
    """The shipped recipe's warm-start key is pinned: a new trainer setting (or any change to the key's recipe)
    would silently invalidate every cached warm start (a 75-min CPU rebuild). Add such a setting to
    `recipe.LATER_SETTINGS` (hashed only away from its default), or bump WARM_START_FORMAT on purpose and
    update the pinned key. Changing a setting still changes the key."""
    from rag_dpo.pipeline.run import warm_start_key
    chains = tmp_path / "oracle.jsonl"
    chains.write_text('{"fixed": "content"}\n')
    r = load_recipe(RECIPES / "dpo_step.yaml")
    assert warm_start_key(r, chains) == "23aaed360aa34917"
    for override in ("warm_start.trainer.self_eval=true", "warm_start.trainer.learning_rate=1e-4", "seed=1",
                     "warm_start.seed=1"):
        assert warm_start_key(load_recipe(RECIPES / "dpo_step.yaml", [override]), chains) != "23aaed360aa34917", override
    # a recipe seed with the warm start's own seed fixed shares the seed-0 warm start (seeds of one recipe)
    assert warm_start_key(load_recipe(RECIPES / "dpo_step.yaml", ["seed=1", "warm_start.seed=0"]),
                          chains) == "23aaed360aa34917"


def test_later_settings_are_recorded_only_when_set():
    """A run folder's recipe.yaml leaves out trainer settings added later (recipe.LATER_SETTINGS) while they are at
    their default, so folders written before they existed still resume; set, they are recorded."""
    from rag_dpo.pipeline.recipe import LATER_SETTINGS, resolved_dict
    plain = resolved_dict(load_recipe(RECIPES / "dpo_step.yaml"))
    assert not set(LATER_SETTINGS) & (set(plain["trainer"]) | set(plain["warm_start"]["trainer"]))
    assert "learning_rate" in plain["trainer"] and "learning_rate" in plain["warm_start"]["trainer"]
    on = resolved_dict(load_recipe(RECIPES / "dpo_step.yaml", ["trainer.self_eval=true"]))
    assert on["trainer"]["self_eval"] is True and "self_eval_weight" not in on["trainer"]
    assert "seed" not in plain["warm_start"]          # warm_start.seed, added later, likewise
    assert "final_k" not in resolved_dict(load_recipe(RECIPES / "dpo_step.yaml", ["rollout.final_k=null"]))["rollout"]
    assert resolved_dict(load_recipe(RECIPES / "dpo_step.yaml", ["rollout.final_k=8"]))["rollout"]["final_k"] == 8
    assert resolved_dict(load_recipe(RECIPES / "dpo_step.yaml", ["warm_start.seed=0"]))["warm_start"]["seed"] == 0


def test_cached_warm_start_trained_with_other_autocast_is_said(tmp_path, capsys):
    """`precision: auto` resolves per machine and the cache key hashes the setting, so a warm start built under bf16
    autocast elsewhere is used here with one line saying so; same autocast or an entry from before the field: silent."""
    from rag_dpo.pipeline.run import _warn_other_autocast
    from rag_dpo.train.sft import SFTSettings
    entry = tmp_path / "abc"
    entry.mkdir()
    (entry / "warm_start.json").write_text(json.dumps({"key": "abc", "autocast": "bf16"}))
    _warn_other_autocast(entry, SFTSettings(precision="fp32"))
    said = capsys.readouterr()
    assert "trained with bf16 autocast, this machine would train it in fp32" in said.out + said.err
    _warn_other_autocast(entry, SFTSettings(precision="bf16"))
    (entry / "warm_start.json").write_text(json.dumps({"key": "abc"}))
    _warn_other_autocast(entry, SFTSettings(precision="fp32"))
    said = capsys.readouterr()
    assert "autocast" not in said.out + said.err

