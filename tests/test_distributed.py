"""Multi-process stages on CPU: two gloo ranks (tests/distributed_worker.py) shard the questions of rollouts, tree
search, annotation and eval, rank 0 alone appends, and each file equals a one-process run's line for line; a killed rank
fails the run with one clear line and a rerun resumes. Also the one-process contract of rag_dpo.distributed (every helper a no-op)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rag_dpo import distributed

TESTS = Path(__file__).parent
WORKER = TESTS / "distributed_worker.py"


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
        return dist.is_available() and dist.is_gloo_available()
    except ImportError:
        return False


needs_gloo = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", RAG_DPO_DIST_TIMEOUT_S="60", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)


def _ranks(*args: str) -> list[subprocess.CompletedProcess]:
    """Two ranks as plain processes (no torchrun agent that would tear the survivor down first), so the test sees
    what a rank reports when its peer dies."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def _rank_files(out: Path) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{k}.json").read_text()) for k in (0, 1)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_policy_dir):
    """The multi-process runs the tests below check. A launch costs ~15 s of imports on 2 cores (most of what these
    tests take), so three launches serve them all, each job into its own folder:
    1. torchrun: eval, SFT, one PPO round, compare (fake backend);
    2. the stages as two plain ranks, rank 1 SIGKILLed at its second generate call;
    3. torchrun: the stages rerun on 2's files (resume), and compare rerun after one arm's done.json was deleted."""
    from conftest import HOTPOT_DEV
    d = tmp_path_factory.mktemp("launches")
    data = d / "hotpot5.jsonl"
    data.write_text("".join(HOTPOT_DEV.read_text().splitlines(keepends=True)[:5]))
    run = SimpleNamespace(dir=d, data=data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_DPO_CACHE", str(tmp_path_factory.getbasetemp() / "rag_dpo_cache"))
        run.first = _torchrun("--eval", str(data), str(d / "eval"), "--sft", str(tiny_policy_dir), str(d / "sft"),
                              "--ppo", str(tiny_policy_dir), str(d / "ppo"), "--compare", str(d / "compare"))
        run.compare_ranks = _rank_files(d / "compare") if run.first.returncode == 0 else None
        run.compare_report = (d / "compare" / "results" / "t.md").read_text() if run.first.returncode == 0 else ""

        partial = d / "partial.jsonl"
        run.killed = _ranks("--stages", str(partial), "--die-after", "2")
        run.partial_lines = partial.read_text().splitlines() if partial.exists() else []

        arms = d / "compare" / "runs" / "t" / "arms"
        run.lost = sorted(arms.iterdir())[3] if arms.is_dir() else None
        if run.lost is not None:
            (run.lost / "done.json").unlink()
        run.resumed = _torchrun("--stages", str(partial), "--compare", str(d / "compare"))
    return run


def test_one_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.init_from_env() is False
    assert distributed.shard(["a", "b", "c"]) == ["a", "b", "c"]
    assert distributed.gather_objects(["x", "y"]) == ["x", "y"]
    distributed.barrier("test")
    written = []
    distributed.run_sharded([1, 2, 3], lambda items: iter([[i * 10 for i in items[:2]], [i * 10 for i in items[2:]]]),
                            written.append, stage="test")
    assert written == [[10, 20], [30]]      # one write per chunk, as the stage produced them


@needs_gloo
def test_two_ranks_write_the_one_process_files_and_resume_after_a_killed_rank(tmp_path, launches):
    """Batches of 2 go round the ranks; rank 1 is SIGKILLed at its second generate call (its second rollout batch,
    q6-q7): rank 0 has appended q0-q3 and stops with one line naming the stage. The rerun under torchrun skips what
    was written, tree searches and annotates from scratch, and every file equals a one-process run's, rank 0 alone
    appending."""
    from distributed_worker import build, run_stages
    single = tmp_path / "single.jsonl"
    run_stages(*build(), single)          # the one-process reference, in this process
    outputs = ("", ".tree.jsonl", ".labels.jsonl")   # rollouts, tree search, annotated rollouts
    reference = {suffix: Path(f"{single}{suffix}").read_text() for suffix in outputs}
    assert all(len(text.splitlines()) == 8 for text in reference.values())
    qids = [f"q{i}" for i in range(8)]

    r0, r1 = launches.killed
    assert r1.returncode != 0 and r0.returncode == 1
    err = r0.stderr.strip().splitlines()[-1]
    assert err.startswith("error: rollout: rank 0 of 2:") and "peer rank died" in err, r0.stderr[-2000:]
    lines = launches.partial_lines
    assert 0 < len(lines) < 8 and lines == reference[""].splitlines()[:len(lines)]   # a prefix, whole lines

    r = launches.resumed
    assert r.returncode == 0, r.stderr[-3000:]
    partial = launches.dir / "partial.jsonl"
    for suffix in outputs:                # same chains, same order, each question once
        assert Path(f"{partial}{suffix}").read_text() == reference[suffix], suffix
    ranks = _rank_files(partial)
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["appended"] == {"partial.jsonl": qids[len(lines):], "partial.jsonl.tree.jsonl": qids,
                                    "partial.jsonl.labels.jsonl": qids}   # rank 0 writes, the rest of the rollouts
    assert ranks[1]["appended"] == {}


def _without_timing(text: str) -> list[dict]:
    """Chains of a jsonl file with each chain's wall time (meta.seconds) dropped: it differs run to run."""
    rows = [json.loads(line) for line in text.splitlines()]
    for row in rows:
        row.get("meta", {}).pop("seconds", None)
    return rows


@needs_gloo
def test_two_rank_eval_writes_the_one_process_eval(tmp_path, launches):
    from distributed_worker import run_eval
    single = run_eval(launches.data, tmp_path / "single")
    reference = _without_timing((tmp_path / "single" / "chains.jsonl").read_text())
    assert len(reference) == 10 and [r["method"] for r in reference] == ["direct"] * 5 + ["agent"] * 5

    r, pooled = launches.first, launches.dir / "eval"
    assert r.returncode == 0, r.stderr[-3000:]
    assert _without_timing((pooled / "chains.jsonl").read_text()) == reference   # each question once
    ranks = _rank_files(pooled)
    qids = [row["question_id"] for row in reference[:5]]
    assert ranks[0]["appended"] == {"chains.jsonl": qids * 2} and ranks[1]["appended"] == {}   # rank 0 writes
    on_disk = json.loads((pooled / "results.json").read_text())
    for results in (on_disk, ranks[0]["results"], ranks[1]["results"]):   # every rank returns the same scores
        for method in ("direct", "agent"):
            assert {k: v for k, v in results[method].items() if k != "seconds"} == \
                {k: v for k, v in single[method].items() if k != "seconds"}


@needs_gloo
def test_two_rank_ppo_round_matches_the_one_process_update(tmp_path, tiny_policy_dir, launches):
    """Rollouts sharded and gathered into the one-process round, gradients all-reduced by DDP (each rank's loss
    weighted by its share of the minibatch's policy tokens): both ranks end with the same weights, and those match
    a one-process round on the same global batch; rank 0 alone writes the log and the trained folder."""
    from safetensors.torch import load_file

    from distributed_worker import run_ppo
    single = run_ppo(tiny_policy_dir, tmp_path / "single")
    r, pooled = launches.first, launches.dir / "ppo"
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [load_file(f"{pooled}.rank{k}.safetensors") for k in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    assert torch.equal(ranks[0]["input_ids"], single["input_ids"])     # the gathered round is the one-process one
    assert torch.equal(ranks[1]["input_ids"], single["input_ids"])
    lora_b = [k for k in single if "lora_B" in k]
    assert lora_b and all(single[k].abs().max() > 0 for k in lora_b)   # the round moved the (zero-initialised) B
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name         # DDP kept the ranks in step
        # one Adam step: an element whose gradient is near Adam's eps moves by an amount that rounding decides, so
        # the tolerance scales with the tensor (seen on an AVX-512/AMX CPU: 1.4e-6 on a LoRA B of scale 2e-3)
        scale = single[name].float().abs().max().item()
        assert torch.allclose(ranks[0][name].float(), single[name].float(), rtol=1e-3,
                              atol=max(1e-6, 2e-3 * scale)), name
    log = (pooled / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["generated_tokens"] == json.loads(
        (tmp_path / "single" / "train_log.jsonl").read_text())["generated_tokens"]   # both ranks' tokens, once
    assert (pooled / "train_done.json").exists() and (pooled / "adapter_config.json").exists()


@needs_gloo
def test_two_rank_sft_keeps_the_recipes_global_batch(tmp_path, tiny_policy_dir, launches):
    """TRL's SFT as DDP over 2 gloo ranks with the accumulation halved (train.common.global_batch_accumulation):
    the same optimizer steps on the same rows as one process, so the same losses and (within float) weights."""
    from safetensors.torch import load_file

    from distributed_worker import run_sft
    single = run_sft(tiny_policy_dir, tmp_path / "single")
    r, pooled = launches.first, launches.dir / "sft"
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [load_file(f"{pooled}.rank{k}.safetensors") for k in (0, 1)]
    assert any("lora_B" in k and single[k].abs().max() > 0 for k in single)      # training moved the weights
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], single[name], rtol=1e-3, atol=1e-6), name
    losses = [[row["loss"] for row in json.loads((d / "train_log.json").read_text()) if "loss" in row]
              for d in (tmp_path / "single", pooled)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)   # a global batch of 8 differs


@needs_gloo
def test_two_rank_compare_runs_every_arm_on_every_rank_and_writes_once(tmp_path, launches):
    """`compare` under 2 gloo ranks (fake backend whose every train/evaluate checks through a collective that both
    ranks are on the same arm): each rank runs the one-process sequence of arms, rank 0 alone writes done.json
    files and the report, and a rerun after a lost done.json redoes that arm alone, on both ranks."""
    from distributed_worker import run_compare_lockstep
    single = run_compare_lockstep(tmp_path / "single")
    assert len(single["trained"]) == 5 and single["written"][-2:] == ["report", "runs/t/compare_results.json"]

    assert launches.first.returncode == 0, launches.first.stderr[-3000:]
    for got in (rank["results"] for rank in launches.compare_ranks):
        assert (got["trained"], got["evaluated"]) == (single["trained"], single["evaluated"])
    assert launches.compare_ranks[0]["results"]["written"] == single["written"]
    assert launches.compare_ranks[1]["results"]["written"] == []
    section = (lambda text: text.split("## What was run")[1].split("- machine")[0])
    assert section(launches.compare_report) == section((tmp_path / "single" / "results" / "t.md").read_text())

    assert launches.resumed.returncode == 0, launches.resumed.stderr[-3000:]
    for rank in _rank_files(launches.dir / "compare"):
        got = rank["results"]
        assert got["trained"] == [launches.lost.name] and got["evaluated"] == [launches.lost.name]


def test_zero3_saving_writes_the_gathered_weights_not_the_ranks_shards(tmp_path, tiny_model_and_tokenizer):
    """Under ZeRO-3 a rank's own parameters are shards: finish_training gathers the whole state dict through
    accelerate's get_state_dict (on the DeepSpeed engine, every rank) and rank 0 saves that. A stand-in accelerator
    plays DeepSpeed here (deepspeed does not run on this CPU machine); with DDP nothing is gathered."""
    import copy
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    from rag_dpo.train import common
    model, tok = tiny_model_and_tokenizer
    model = copy.deepcopy(model)
    whole = {k: v.detach().clone() + 1.0 for k, v in model.state_dict().items()}   # differs from the "shards"
    gathered_from = []

    class ZeRO3Accelerator:
        distributed_type = DistributedType.DEEPSPEED
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))

        def get_state_dict(self, engine):
            gathered_from.append(engine)
            return dict(whole)      # (save_pretrained drops tied keys from the dict it is given)

    trainer = SimpleNamespace(accelerator=ZeRO3Accelerator(), model=model, model_wrapped="deepspeed engine",
                              state=SimpleNamespace(log_history=[{"loss": 1.0, "step": 1}], global_step=1))
    common.finish_training(trainer, tok, tmp_path / "out", "tiny", ["loss"], "SFT")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert gathered_from == ["deepspeed engine"] and saved
    assert all(torch.equal(saved[k], whole[k]) for k in saved)

    trainer.accelerator.distributed_type = DistributedType.MULTI_CPU      # DDP: whole weights on every rank
    assert common.gathered_state_dict(trainer) is None and len(gathered_from) == 1


def test_sharding_interleaves_back_to_list_order(monkeypatch):
    """The shard/gather arithmetic for 3 ranks, without processes: rank r holds items r, r+3, ...."""
    items = list(range(8))
    shards = [items[r::3] for r in range(3)]
    out = []
    for i in range(max(len(p) for p in shards)):
        out.extend(p[i] for p in shards if i < len(p))
    assert out == items
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert distributed.shard(items) == [1, 4, 7]


def test_accelerate_launch_configs_load():
    """Every config in recipes/accelerate is one accelerate itself accepts (unknown keys are an error there)."""
    from accelerate.commands.config.config_args import load_config_from_file
    folder = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
    configs = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert {"cpu_2proc", "zero2", "zero3"} <= set(configs)
    assert configs["cpu_2proc"].num_processes == 2 and configs["cpu_2proc"].use_cpu is False   # torchrun path
    assert configs["zero3"].deepspeed_config["zero_stage"] == 3


def test_only_rank_0_starts_a_wandb_run(monkeypatch, tmp_path):
    from rag_dpo import tracking
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert tracking.init_run("probe", dir=tmp_path) is None
    assert not any(tmp_path.iterdir())          # no wandb folder either


def test_deepspeed_launch_on_cpu_is_not_declared_a_cpu_run(monkeypatch):
    """Under `accelerate launch` with a DeepSpeed config and no CUDA, the arguments must not say use_cpu (transformers
    would then wrap a ZeRO-3-partitioned model in plain DDP) and must name gloo (accelerate finds no backend for
    DeepSpeed on CPU and counts one process); without DeepSpeed a CPU run stays a CPU run."""
    from trl import SFTConfig

    from rag_dpo.train.common import hf_args
    from rag_dpo.train.sft import SFTSettings
    monkeypatch.setattr("rag_dpo.train.common._cuda", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    plain = hf_args(SFTSettings(wandb=False, precision="fp32"), "/tmp/unused", SFTConfig)
    assert plain.use_cpu and plain.ddp_backend is None
    assert not distributed.deepspeed_launch()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.deepspeed_launch()
    # the arguments themselves would now start DeepSpeed's CPU accelerator; check the fields hf_args chooses
    seen = {}

    class Recorder(SFTConfig):   # SFTConfig's fields, no DeepSpeed start-up
        def __init__(self, **kw):
            seen.update(kw)
    hf_args(SFTSettings(wandb=False, precision="fp32"), "/tmp/unused", Recorder)
    assert seen["use_cpu"] is False and seen["ddp_backend"] == "gloo"


def test_init_from_env_leaves_the_cpu_flag_to_deepspeed(monkeypatch):
    """init_from_env sets ACCELERATE_USE_CPU for a CPU torchrun (so TRL sees MULTI_CPU, not one process), but not
    under a DeepSpeed launch, where that flag would turn the run into DDP over partitioned weights."""
    calls = []
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: False)
    monkeypatch.setattr("torch.distributed.init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for ds, expect in (("true", None), ("false", "true")):
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", ds)
        assert distributed.init_from_env()
        assert os.environ.get("ACCELERATE_USE_CPU") == expect, ds
    assert [c["backend"] for c in calls] == ["gloo", "gloo"]


def test_trainers_build_their_arguments_before_loading_the_model(monkeypatch, tmp_path):
    """ZeRO-3 partitions a model only if it is loaded after the TrainingArguments exist (they switch on zero.Init):
    SFT and DPO create their arguments first."""
    from datasets import Dataset

    import rag_dpo.train.dpo as dpo
    import rag_dpo.train.sft as sft
    order = []

    class Stop(Exception):
        pass

    def fake_args(*a, **kw):
        order.append("args")
        return None

    def fake_load(*a, **kw):
        order.append("model")
        raise Stop

    for mod in (sft, dpo):
        monkeypatch.setattr(mod, "load_trainable", fake_load)
    monkeypatch.setattr(sft, "hf_args", fake_args)
    monkeypatch.setattr(dpo, "dpo_config", fake_args)
    with pytest.raises(Stop):
        sft.train_sft(sft.SFTSettings(wandb=False), Dataset.from_list([{"prompt": "p", "completion": "c"}]),
                      tmp_path / "sft")
    with pytest.raises(Stop):
        dpo.build_dpo_trainer(dpo.DPOSettings(wandb=False),
                              Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]), tmp_path / "dpo")
    assert order == ["args", "model", "args", "model"]


@needs_gloo
@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
def test_two_rank_zero3_sft_on_cpu_equals_one_process(tmp_path, tiny_policy_dir):
    """`accelerate launch` with recipes/accelerate/zero3.yaml on 2 CPU ranks: DeepSpeed ZeRO-3 trains the same LoRA
    weights as one process (the shards are gathered for the save) and both ranks end equal."""
    from safetensors.torch import load_file

    from distributed_worker import run_sft
    single = run_sft(tiny_policy_dir, tmp_path / "single")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(TESTS.parent / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", "2", "--main_process_port",
           str(_free_port()), "--mixed_precision", "no", str(WORKER), "--sft", str(tiny_policy_dir),
           str(tmp_path / "pooled")]
    r = subprocess.run(cmd, env=_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"pooled.rank{k}.safetensors")) for k in (0, 1)]
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], single[name], rtol=1e-3, atol=1e-6), name


def test_eval_prints_its_table_on_rank_0_only(monkeypatch, tmp_path):
    """`rag-dpo eval` under a multi-process launch: every rank returns the results, only rank 0 prints them."""
    from typer.testing import CliRunner

    import rag_dpo.eval.commands as commands
    import rag_dpo.eval.evaluate as evaluate
    from rag_dpo.cli import app
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: {"agent": {"em": 0.5, "f1": 0.5, "n": 2}})
    outs = {}
    for main in (True, False):
        monkeypatch.setattr(commands, "is_main", lambda main=main: main)
        res = CliRunner().invoke(app, ["eval", "--data", "x.jsonl", "--out", str(tmp_path)])
        assert res.exit_code == 0, res.output
        outs[main] = res.output
    assert "results.json" in outs[True] and "0.5" in outs[True]
    assert "results.json" not in outs[False] and "0.5" not in outs[False]


@needs_gloo
def test_the_group_is_torn_down_before_exit(monkeypatch):
    """init_from_env registers _destroy_group at exit: a gloo group left to static destructors aborted an exiting rank
    in CI ("terminate called without an active exception")."""
    import torch.distributed as dist
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    assert dist.is_initialized()
    distributed._destroy_group()
    assert not dist.is_initialized()
    distributed._destroy_group()            # and again: nothing to do, no error
