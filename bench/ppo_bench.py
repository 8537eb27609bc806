"""Multi-turn PPO throughput: generated tokens/s (rollouts), trained tokens/s (updates), and the time split between
rollout generation, retrieval and the update, plus peak memory, on the bundled HotpotQA train questions.

    .venv/bin/python bench/ppo_bench.py [--policy smollm2|ADAPTER_DIR] [--iterations 2] [--questions 4]
                                        [--group 2] [--algorithm ppo|grpo] [--reward process|outcome]

Use a warm-started adapter as --policy for realistic chain lengths (the base model rarely follows the protocol).

    .venv/bin/python bench/ppo_bench.py --head [--policy smollm2] [--chains 8] [--repeats 2]

times one PPO forward+backward on oracle chains (realistic prompt + retrieved text) with the LM head and softmax
over every position vs over the policy tokens only (`forward_logps(only=mask)`), each in its own subprocess so
peak memory is per variant.

    .venv/bin/python bench/ppo_bench.py --merge --policy ADAPTER_DIR [--questions 8] [--repeats 2]

times PPO's rollouts (same questions, same seeds) with the LoRA adapter merged into the weights (`merged_lora`,
what `train_ppo` does) vs the unmerged peft model, alternating, and checks both generated the same tokens count.

    .venv/bin/python bench/ppo_bench.py --group-batch --policy ADAPTER_DIR [--questions 8] [--group 2] [--repeats 2]

times PPO's rollouts of a round (`--questions` questions x `--group` chains each, merged LoRA) sampled as one batch
(`RolloutEngine.rollout(questions, samples=group)`, what `train_ppo` does) vs one batch per group member."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--algorithm", default="ppo")
    ap.add_argument("--reward", default="process")
    ap.add_argument("--out", default="bench/results/ppo_bench.json")
    ap.add_argument("--head", action="store_true", help="full-vocabulary head vs policy-token head, one update")
    ap.add_argument("--merge", action="store_true", help="rollouts with the LoRA merged vs unmerged")
    ap.add_argument("--group-batch", action="store_true", help="a round's group of chains in one batch vs one each")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", choices=["full", "policy"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(head_variant(a.variant, a.policy, a.chains)), flush=True)
        return
    if a.head:
        return head_bench(a)
    if a.merge or a.group_batch:
        return rollout_ab_bench(a)

    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.paths import DEFAULT_DATA
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.ppo import PPOInputs, PPOSettings, train_ppo
    ds = load_dataset(DEFAULT_DATA)
    qs = split_questions(ds.questions, "train")[: a.questions * a.iterations]
    cfg = PPOSettings(algorithm=a.algorithm, reward=a.reward, iterations=a.iterations,
                      questions_per_iteration=a.questions, group_size=a.group, ppo_epochs=1, minibatch_size=4,
                      wandb=False, max_length=768)
    inputs = PPOInputs(qs, ds.corpus, build_retriever("bm25", ds.corpus),
                       rollout={"max_steps": 3, "k": 3, "max_new_tokens": 48, "batch_size": 16,
                                "max_tokens_per_passage": 48})
    out = Path(tempfile.mkdtemp(prefix="rag_dpo_ppo_bench_"))
    t0 = time.perf_counter()
    train_ppo(cfg, inputs, out, model=a.policy)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    gen = sum(r["generated_tokens"] for r in rows)
    trained = sum(r["trained_tokens"] for r in rows)
    t_roll = sum(r["rollout_s"] for r in rows)
    t_ret = sum(r["retrieval_s"] for r in rows)
    t_upd = sum(r["update_s"] for r in rows)
    total = t_roll + t_ret + t_upd
    res = {"args": vars(a), "wall_s": wall, "generated_tokens": gen, "trained_policy_tokens": trained,
           "generated_tokens_per_s": gen / max(t_roll + t_ret, 1e-9),
           "trained_tokens_per_s": trained * cfg.ppo_epochs / max(t_upd, 1e-9),
           "split": {"rollout": t_roll / total, "retrieval": t_ret / total, "update": t_upd / total},
           "seconds": {"rollout": t_roll, "retrieval": t_ret, "update": t_upd},
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    shutil.rmtree(out, ignore_errors=True)


def head_variant(variant: str, policy: str, n: int) -> dict:
    """One PPO loss forward+backward over n oracle chains with the LM head on every position or on policy tokens."""
    import torch

    from rag_dpo.annotate import oracle_chains
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.paths import DEFAULT_DATA
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.ppo import PPOSettings, PPOTrainer, chains_to_rollouts, forward_logps
    torch.manual_seed(0)
    cfg = PPOSettings(wandb=False, max_length=768, precision="fp32")
    tr = PPOTrainer(cfg, policy)
    ds = load_dataset(DEFAULT_DATA)
    qs = split_questions(ds.questions, "train")[:n]
    chains = oracle_chains(qs, ds.corpus, build_retriever("bm25", ds.corpus), tr.tok, 3, 48)
    ro = chains_to_rollouts(tr.tok, chains, None, cfg)
    only = ro.mask if variant == "policy" else None
    t0 = time.perf_counter()
    with torch.no_grad():
        forward_logps(tr.policy, tr.value_head, ro.input_ids, ro.attention_mask, only=only)
    t1 = time.perf_counter()
    logp, v = forward_logps(tr.policy, tr.value_head, ro.input_ids, ro.attention_mask, only=only)
    ((logp * ro.mask).sum() + (v * ro.mask).sum()).backward()
    t2 = time.perf_counter()
    return {"variant": variant, "chains": n, "tokens": int(ro.attention_mask.sum()),
            "policy_tokens": int(ro.mask.sum()), "forward_s": t1 - t0, "forward_backward_s": t2 - t1,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def head_bench(a) -> None:
    import statistics
    import subprocess
    import sys
    runs: dict[str, list[dict]] = {"full": [], "policy": []}
    for _ in range(a.repeats):
        for variant in runs:
            p = subprocess.run([sys.executable, __file__, "--variant", variant, "--policy", a.policy,
                                "--chains", str(a.chains)], capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"variant {variant} failed:\n{p.stderr[-3000:]}")
            runs[variant].append(json.loads(line[7:]))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("forward_s", "forward_backward_s", "peak_rss_mb")}
           for v, rs in runs.items()}
    r0 = runs["full"][0]
    print(f"{a.chains} chains, {r0['tokens']} tokens, {r0['policy_tokens']} policy tokens")
    for v, m in med.items():
        print(f"{v:7s} forward {m['forward_s']:6.2f} s  forward+backward {m['forward_backward_s']:6.2f} s  "
              f"peak {m['peak_rss_mb']:6.0f} MB")
    print(f"policy-token head: forward {med['full']['forward_s'] / med['policy']['forward_s']:.2f}x, "
          f"forward+backward {med['full']['forward_backward_s'] / med['policy']['forward_backward_s']:.2f}x faster")
    out = Path(a.out).with_name("ppo_head_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "median": med}, indent=2))


def rollout_ab_bench(a) -> None:
    """PPO rollout speed of the warm-started policy, two ways, alternating in one process: LoRA merged vs not
    (`--merge`, same questions and seeds), or a round's group in one batch vs one batch per member (`--group-batch`,
    merged; the samples differ, so it compares tokens/s)."""
    import contextlib
    import statistics

    import torch

    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.paths import DEFAULT_DATA
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.ppo import PPOSettings, PPOTrainer, merged_lora
    torch.manual_seed(0)
    tr = PPOTrainer(PPOSettings(wandb=False, max_length=768), a.policy)
    ds = load_dataset(DEFAULT_DATA)
    qs = split_questions(ds.questions, "train")[: a.questions]
    engine = RolloutEngine(tr.unwrapped(), tr.tok, build_retriever("bm25", ds.corpus), ds.corpus,
                           RolloutConfig(max_steps=3, k=3, max_new_tokens=48, batch_size=64, do_sample=True,
                                         temperature=1.0, max_tokens_per_passage=48, progress=False))
    tr.policy.eval()
    merged = lambda: merged_lora(tr.unwrapped())   # noqa: E731
    if a.merge:
        variants = {"unmerged": (contextlib.nullcontext, 1, 1), "merged": (merged, 1, 1)}
        name, base = "merged LoRA rollouts", "unmerged"
    else:
        variants = {"batch per member": (merged, a.group, 1), "one batch": (merged, 1, a.group)}
        name, base = f"group of {a.group} in one batch", "batch per member"
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.repeats):
        for variant, (ctx, calls, samples) in variants.items():
            tok0 = engine.stats["generated_tokens"]
            t0 = time.perf_counter()
            chains = []
            with ctx():
                for c in range(calls):
                    engine.cfg.seed = r * 1009 + c
                    chains += engine.rollout(qs, samples=samples)
            dt = time.perf_counter() - t0
            gen = engine.stats["generated_tokens"] - tok0
            runs[variant].append({"seconds": dt, "generated_tokens": gen, "chains": len(chains),
                                  "steps": sum(len(c.steps) for c in chains), "tokens_per_s": gen / dt})
            print(f"repeat {r} {variant:16s} {dt:7.1f} s  {len(chains)} chains  {gen} tokens  {gen / dt:6.1f} tok/s",
                  flush=True)
    med = {v: statistics.median(x["tokens_per_s"] for x in rs) for v, rs in runs.items()}
    other = next(v for v in variants if v != base)
    print(f"{name}: {med[other]:.1f} vs {base} {med[base]:.1f} generated tok/s = {med[other] / med[base]:.2f}x")
    out = Path(a.out).with_name("ppo_merge_bench.json" if a.merge else "ppo_group_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "runs": runs, "median_tokens_per_s": med}, indent=2))


if __name__ == "__main__":
    main()
