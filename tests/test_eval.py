"""The eval stage end to end on a tiny model and a 3-question slice of the bundled HotpotQA file: every method
(the PRM best-of-N with a stub scorer), every results key, the table and plot, resume, and the refusal to
evaluate on questions the policy was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import HOTPOT_DEV
from rag_dpo.agent.rollout import RolloutConfig
from rag_dpo.errors import InputError
from rag_dpo.eval.evaluate import METRICS, evaluate
from rag_dpo.records import read_chains


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "hotpot3.jsonl"
    path.write_text("".join(HOTPOT_DEV.read_text().splitlines(keepends=True)[:3]))
    return path


class StubPRM:
    """Prefers search steps (higher score), then shorter text: deterministic and checkable."""

    def __init__(self):
        self.calls = 0

    def score(self, question, prefix, candidates):
        self.calls += 1
        return [(1.0 if c.action == "search" else 0.0) + 1.0 / (1 + len(c.text)) for c in candidates]


def _run(data_file, out, tiny, **kw):
    cfg = RolloutConfig(max_new_tokens=4, max_steps=2, batch_size=4, progress=False)
    return evaluate(data_file, policy="tiny", split="all", limit=2, out_dir=out, rollout=cfg,
                    model_and_tokenizer=tiny, use_wandb=False, **kw)


def test_eval_all_methods_writes_every_key(data_file, tmp_path, tiny_model_and_tokenizer):
    prm = StubPRM()
    methods = ["direct", "rag", "iter-retgen", "agent", "agent-prm-bon"]
    results = _run(data_file, tmp_path, tiny_model_and_tokenizer, methods=methods, prm=prm, bon_n=3,
                   baseline_results={"rag": {"em": 0.5, "f1": 0.5}})
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results)) and list(on_disk) == methods
    for m in methods:
        assert set(on_disk[m]) == set(METRICS) and on_disk[m]["n"] == 2
    assert on_disk["agent"]["parse_error_rate"] == 1.0          # a random model never follows the protocol
    assert on_disk["rag"]["support_recall"] > 0                 # BM25 on the question finds some support
    table = (tmp_path / "results.md").read_text()
    assert "| agent-prm-bon |" in table and "Δ vs baseline" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    chains = read_chains(tmp_path / "chains.jsonl")
    assert sorted({c.method for c in chains}) == sorted(methods) and len(chains) == 10
    bon = [c for c in chains if c.method == "agent-prm-bon"]
    assert prm.calls >= 2
    for c in bon:
        first = c.children(None)
        assert len(first) == 3 and all("prm" in s.labels for s in first)
        best = max(first, key=lambda s: s.labels["prm"].value)
        assert c.path()[0].id == best.id


def test_eval_resumes_without_duplicates(data_file, tmp_path, tiny_model_and_tokenizer):
    _run(data_file, tmp_path, tiny_model_and_tokenizer, methods=["direct"])
    first = (tmp_path / "chains.jsonl").read_text()
    results = _run(data_file, tmp_path, tiny_model_and_tokenizer, methods=["direct", "rag"])
    text = (tmp_path / "chains.jsonl").read_text()
    assert text.startswith(first) and len(read_chains(tmp_path / "chains.jsonl")) == 4
    assert results["direct"]["n"] == 2 and results["rag"]["n"] == 2
    with pytest.raises(InputError, match="other settings"):
        _run(data_file, tmp_path, tiny_model_and_tokenizer, methods=["direct"], k=5)


def test_eval_records_worked_examples_and_resumes_only_with_the_same_number(data_file, tmp_path,
                                                                           tiny_model_and_tokenizer):
    """`shots` is an eval setting: another number does not resume the folder, a folder written before the setting
    existed resumes as shots=0, and more examples than there are is refused."""
    _run(data_file, tmp_path, tiny_model_and_tokenizer, methods=["rag"], shots=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["shots"] == 2 and "demonstrations" in config["fingerprint"]
    with pytest.raises(InputError, match="shots"):
        _run(data_file, tmp_path, tiny_model_and_tokenizer, methods=["rag"])
    old = tmp_path / "old"
    _run(data_file, old, tiny_model_and_tokenizer, methods=["rag"])
    config = json.loads((old / "config.json").read_text())
    assert "demonstrations" not in config["fingerprint"]
    del config["shots"]
    (old / "config.json").write_text(json.dumps(config))
    assert _run(data_file, old, tiny_model_and_tokenizer, methods=["rag"])["rag"]["n"] == 2
    with pytest.raises(InputError, match="shots must be"):
        _run(data_file, tmp_path / "new", tiny_model_and_tokenizer, methods=["rag"], shots=3)


def test_eval_resume_refuses_a_changed_prompt_or_retrained_weights(data_file, tmp_path, tiny_model_and_tokenizer,
                                                                   monkeypatch):
    from rag_dpo.agent import protocol
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights v1")
    out = tmp_path / "eval"
    run = lambda: evaluate(data_file, policy=str(policy), split="all", limit=2, out_dir=out, methods=["direct"],
                           rollout=RolloutConfig(max_new_tokens=4, max_steps=2, batch_size=4, progress=False),
                           model_and_tokenizer=tiny_model_and_tokenizer, use_wandb=False)
    run()
    run()                                              # same prompts and weights: resumes
    (policy / "model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(InputError, match="fingerprint.weights"):
        run()
    (policy / "model.safetensors").write_bytes(b"weights v1")
    monkeypatch.setattr(protocol, "SYSTEM_PROMPT", protocol.SYSTEM_PROMPT + " Be brief.")
    with pytest.raises(InputError, match="fingerprint.prompts"):
        run()
    config = json.loads((out / "config.json").read_text())
    del config["fingerprint"]                          # a folder from before the fingerprint still resumes
    (out / "config.json").write_text(json.dumps(config))
    run()


def test_eval_refuses_trained_on_questions(data_file, tmp_path, tiny_model_and_tokenizer):
    from rag_dpo.data import load_dataset, write_manifest
    ids = [q.id for q in load_dataset(data_file).questions]
    policy_dir = tmp_path / "policy"
    write_manifest(policy_dir, ids[1:2])
    cfg = RolloutConfig(max_new_tokens=4, progress=False)
    with pytest.raises(InputError, match="used to train"):
        evaluate(data_file, policy=str(policy_dir), split="all", limit=2, out_dir=tmp_path / "out", rollout=cfg,
                 model_and_tokenizer=tiny_model_and_tokenizer, use_wandb=False)
    assert not (tmp_path / "out" / "chains.jsonl").exists()
    with pytest.raises(InputError, match="unknown method"):
        _run(data_file, tmp_path / "o2", tiny_model_and_tokenizer, methods=["agnet"])


def test_eval_cli_prints_the_table(data_file, tmp_path, tiny_policy_dir):
    from typer.testing import CliRunner
    from rag_dpo.cli import app
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["eval", "--data", str(data_file), "--policy", str(tiny_policy_dir),
                                   "--methods", "direct,agent", "--split", "all", "--limit", "1", "--out", str(out),
                                   "max_new_tokens=3", "progress=false"])
    assert res.exit_code == 0, res.output
    assert "| direct |" in res.output and "| agent |" in res.output
    assert json.loads((out / "results.json").read_text())["agent"]["n"] == 1
    # the CLI evaluates in float32 unless asked: bf16 would round away a short fine-tune's change
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bf16_erases_a_small_weight_change_but_not_a_large_one(tiny_model_and_tokenizer):
    import copy

    import torch
    from rag_dpo.eval.evaluate import bf16_erased_change
    ref = tiny_model_and_tokenizer[0]
    small, large = copy.deepcopy(ref), copy.deepcopy(ref)
    with torch.no_grad():
        for p in small.parameters():
            p.mul_(1 + 1e-4)      # a fine-tune-sized step: far below bf16's ~0.4 % resolution
        for p in large.parameters():
            p.mul_(1.25)
    s, big = bf16_erased_change(small, ref), bf16_erased_change(large, ref)
    assert s["changed"] > 0 and s["erased"] > 0.9
    assert big["erased"] < 0.1 and big["rel_error"] < 0.05
    assert bf16_erased_change(ref, ref)["changed"] == 0



def test_eval_records_banned_strings_only_when_set(data_file, tmp_path, tiny_model_and_tokenizer):
    """`rollout.banned` reaches the agent's steps through eval and its config; unset, the config is as before (no
    `banned` key), so eval folders written before the setting existed still resume."""
    from rag_dpo.agent.rollout import RolloutConfig
    from rag_dpo.eval.evaluate import evaluate
    for name, banned in (("plain", ()), ("banned", ("<score",))):
        out = tmp_path / name
        evaluate(data_file, policy="tiny", methods=["agent"], split="all", limit=1, out_dir=out,
                 rollout=RolloutConfig(max_new_tokens=4, progress=False, banned=banned),
                 model_and_tokenizer=tiny_model_and_tokenizer, use_wandb=False)
        rollout = json.loads((out / "config.json").read_text())["rollout"]
        assert rollout.get("banned") == (["<score"] if banned else None)


def test_eval_cli_passes_split_fractions(monkeypatch, tmp_path):
    """`--fractions` reaches the split: a recipe-trained policy is scored on the test split its run held out
    (0.55,0.1,0.35 makes that split 161 of the bundled 500 HotpotQA questions, the default 0.15 only 65)."""
    from typer.testing import CliRunner

    import rag_dpo.eval.evaluate as evaluate_mod
    from rag_dpo.cli import app
    from rag_dpo.data import load_dataset, split_questions
    seen = {}
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **kw: seen.update(kw) or {"agent": {"n": 0}})
    res = CliRunner().invoke(app, ["eval", "--data", "x.jsonl", "--split", "test", "--fractions", "0.55,0.1,0.35",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["fractions"] == "0.55,0.1,0.35"
    qs = load_dataset(Path(__file__).parents[1] / "data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl").questions
    assert len(split_questions(qs, "test", seen["fractions"])) == 161
    assert len(split_questions(qs, "test", None)) == 65


def test_eval_cli_scores_a_run_policy_with_its_recipe_budgets(monkeypatch, tmp_path):
    """A recipe run's policy is scored with that run's budgets and split fractions, not RolloutConfig's defaults
    (the same policy scored EM 0.193 at the defaults and 0.161 at its recipe's); key=value overrides still win, a
    fraction is taken only for the run's own data file, and a policy outside a run keeps the defaults."""
    import yaml
    from typer.testing import CliRunner

    import rag_dpo.eval.evaluate as evaluate_mod
    from rag_dpo.cli import app
    run = tmp_path / "runs" / "dpo_step"
    (run / "trained").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "dpo_step", "method": "dpo", "seed": 4,
        "data": {"path": str(HOTPOT_DEV), "fractions": "0.55,0.1,0.35"},
        "retrieval": {"name": "bm25", "k": 2, "max_tokens_per_passage": 40},
        "rollout": {"max_steps": 3, "max_new_tokens": 40}}))
    seen = []
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **kw: seen.append(kw) or {"agent": {"n": 0}})

    def call(policy, data=HOTPOT_DEV, *extra):
        res = CliRunner().invoke(app, ["eval", "--data", str(data), "--policy", str(policy), "--split", "test",
                                       "--out", str(tmp_path / "ev"), *extra])
        assert res.exit_code == 0, res.output
        return seen[-1]["rollout"], seen[-1]["fractions"], res.output

    default = RolloutConfig()
    rollout, fractions, out = call(run / "trained")
    assert (rollout.max_steps, rollout.max_new_tokens, rollout.k, rollout.max_tokens_per_passage, rollout.seed) \
        == (3, 40, 2, 40, 4) != (default.max_steps, default.max_new_tokens, default.k,
                                 default.max_tokens_per_passage, default.seed)
    assert fractions == "0.55,0.1,0.35" and "recipe.yaml (the run this policy comes from)" in out
    rollout, fractions, _ = call(run / "trained", HOTPOT_DEV, "--fractions", "0.6,0.1,0.3", "max_steps=5")
    assert (rollout.max_steps, rollout.max_new_tokens, fractions) == (5, 40, "0.6,0.1,0.3")
    other = tmp_path / "other.jsonl"
    other.write_text(HOTPOT_DEV.read_text().splitlines(keepends=True)[0])
    rollout, fractions, _ = call(run / "trained", other)
    assert rollout.max_steps == 3 and fractions is None      # budgets follow the policy, fractions the data file
    (tmp_path / "loose" / "trained").mkdir(parents=True)     # a folder outside any run: the defaults
    rollout, fractions, out = call(tmp_path / "loose" / "trained")
    assert (rollout.max_steps, rollout.max_new_tokens, fractions) == (default.max_steps, default.max_new_tokens,
                                                                      None) and "recipe.yaml" not in out
