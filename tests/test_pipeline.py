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
    for f in ("recipe.yaml", "data_hashes.json", "summary.json", "warm_start/adapter_config.json",
              "warm_start/training_manifest.json", "warm_start_data/oracle.jsonl"):
        assert (run_dir / f).exists(), f
    manifest = json.loads((ws / "training_manifest.json").read_text())
    assert len(manifest["question_ids"]) == 4
    with pytest.raises(InputError):      # the split guard refuses the questions it was trained on
        check_not_trained_on(ws, manifest["question_ids"][:1])
    from rag_dpo.agent.policy import load_policy
    model, _ = load_policy(str(ws))
    assert type(model).__name__.startswith("PeftModel")
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
    assert "EM 0.150 vs 0.200 (-0.050, worse than the warm start)" in md
    assert "F1 0.350 vs 0.300 (+0.050, better than the warm start)" in md


def test_missing_recipe_is_one_line_error(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "rag_dpo.cli", "train", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "nope.yaml" in p.stderr and "Traceback" not in p.stderr
