"""Rollout throughput: the engine with key/value reuse against today's engine (full re-encoding), same run.

Three workloads, each run once per mode in its own subprocess (so each peak memory is its own), baseline first:
- `tree_search`: tree search with the evidence annotator (k siblings per prefix, `--tree-steps` deep) on
  `--tree-questions` train questions, sampled (T=0.7, top-p 0.95) — the pool of step-level pairs;
- `eval`: greedy agent rollouts of `--eval-questions` test questions — every evaluation;
- `continue_from`: N=4 Monte-Carlo continuations from each of 4 sampled first steps of `--cont-questions` train
  questions — the rollout annotator (the first steps are sampled untimed, as tree search would have).

Modes: `baseline` = `cache: none` in float32 with the LoRA merged (today's engine: transformers `generate` over
the whole context at every step); `cached-float32`, `cached-bfloat16`, ... = `cache: prefix` in each of `--dtypes`
(LoRA merged in float32, unmerged in bf16: `load_policy(merge_adapter="auto")`). Reported per workload and cached
mode: generated tokens/s before and after and their ratio (`speedup`), the time split (prefill, decode, retrieval,
rest), peak RSS during the workload and its ratio to the baseline's, and the share of generated steps with
identical text (cached attention can round differently, bf16 more so, and a sampled chain that differs once
differs from there on).

    .venv/bin/python bench/rollout_bench.py --policy runs/dpo_step/warm_start     # a warm-started policy
    .venv/bin/python bench/rollout_bench.py --policy P --tree-questions 8 --eval-questions 16 --cont-questions 2
    .venv/bin/python bench/rollout_bench.py --policy P --device cuda --dtypes bfloat16

Use a warm-started policy: the zero-shot model's chains are one invalid step, which measures nothing of reuse.
Results go to bench/results/rollout.json (with machine and commit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WORKLOADS = ("tree_search", "eval", "continue_from")


def _vm(key: str) -> float:
    """KiB of /proc/self/status field `key` (VmRSS now, VmHWM peak); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_child(args) -> dict:
    """One (workload, mode) in this process; returns its measurements and its step texts."""
    import torch

    from rag_dpo.agent.policy import load_policy
    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine, resolve_device, resolve_dtype
    from rag_dpo.annotate.annotators import build_annotator
    from rag_dpo.annotate.tree_search import TreeSearchConfig, tree_search
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.retrieval import build_retriever

    torch.manual_seed(0)
    ds = load_dataset(args.data)
    retriever = build_retriever("bm25", ds.corpus)
    device = resolve_device(args.device)
    dtype = resolve_dtype("float32" if args.mode == "baseline" else args.mode.split("-", 1)[1], device)
    model, tok = load_policy(args.policy, device=device, dtype=dtype, merge_adapter="auto")
    cfg = RolloutConfig(max_steps=args.max_steps, k=3, max_new_tokens=args.max_new_tokens, temperature=0.7,
                        top_p=0.95, do_sample=False, batch_size=args.batch_size, max_tokens_per_passage=48,
                        cache="none" if args.mode == "baseline" else "prefix", cache_mb=args.cache_mb,
                        decode_rows=args.decode_rows,
                        progress=False)
    engine = RolloutEngine(model, tok, retriever, ds.corpus, cfg, model_name=args.policy, retriever_name="bm25")
    if args.sdpa and hasattr(engine.backend, "cpu_attention"):     # A/B: the cached engine without cpu_attention
        engine.backend.cpu_attention = False
    train, test = split_questions(ds.questions, "train"), split_questions(ds.questions, "test")
    engine.rollout(test[-1:])                     # warm-up (first-call allocations), then a clean slate
    engine.clear_cache()

    setup = None
    if args.workload == "continue_from":        # the candidates tree search would have produced (untimed)
        setup = [engine.new_chain(q) for q in train[: args.cont_questions]]
        for c, steps in zip(setup, engine.sample_next_steps([(c, None) for c in setup], 4)):
            for s in steps:
                c.add_step(s)
    engine.reset_stats()
    rss_before = _vm("VmRSS")
    try:  # reset the peak (VmHWM) so it measures the workload, not the model load
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    if args.workload == "tree_search":
        chains = tree_search(train[: args.tree_questions], engine, build_annotator("evidence"),
                             TreeSearchConfig(k=4, max_steps=args.max_steps, progress=False,
                                              batch_questions=engine.questions_per_call(4)))  # as the pipeline
        texts = [s.text for c in chains for s in c.steps]
    elif args.workload == "eval":
        engine.cfg.max_steps = args.max_steps + 1
        chains = engine.rollout(test[: args.eval_questions])
        texts = [s.text for c in chains for s in c.steps]
    else:
        conts = engine.continue_from([(c, s.id) for c in setup for s in c.steps], 4)
        texts = [s.text for per_step in conts for cont in per_step for s in cont]
    wall = time.perf_counter() - t0
    split = engine.time_split()
    return {"workload": args.workload, "mode": args.mode, "dtype": str(dtype).replace("torch.", ""),
            "steps": engine.stats["steps"], "generated_tokens": engine.stats["generated_tokens"],
            "seconds": wall, "tokens_per_s": engine.stats["generated_tokens"] / wall,
            "split_seconds": {k: split[k] for k in ("prefill", "decode", "retrieval", "rest")},
            "prefill_tokens": split["prefill_tokens"], "cached_tokens": split["cached_tokens"],
            "peak_rss_mib": _vm("VmHWM") / 1024, "rss_before_mib": rss_before / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
            "threads": torch.get_num_threads(), "texts": texts}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def identical_share(a: list[str], b: list[str]) -> float:
    """Share of steps, position by position, with the same text (a missing step counts as different)."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def main() -> None:
    from rag_dpo.paths import DEFAULT_DATA

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a warm-started policy (adapter folder) or model")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--tree-questions", type=int, default=32)
    p.add_argument("--eval-questions", type=int, default=64)
    p.add_argument("--cont-questions", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--decode-rows", type=int, default=None, help="cached modes: rows decoding together "
                   "(default: the engine's, 64 in bf16, 32 in float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sdpa", action="store_true", help="cached modes: transformers' SDPA attention even in bf16 on "
                   "a CPU (the engine's own `cpu_attention` is the default there), for an A/B")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the cached modes (baseline: float32)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout.json"))
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.mode:  # child process: one workload in one mode, JSON on the last stdout line
        print(json.dumps(run_child(args)))
        return

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.system()}", "device": args.device, "commit": _commit(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args), "workloads": {}}
    for w in args.workloads.split(","):
        runs = {}
        for mode in ["baseline"] + [f"cached-{d}" for d in args.dtypes.split(",")]:
            cmd = [sys.executable, __file__, "--mode", mode, "--workload", w] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{w}/{mode} failed:\n{proc.stderr[-3000:]}")
            runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode]["load_average_after"] = list(os.getloadavg())   # the machine is shared: say how busy
        base = runs.pop("baseline")
        texts = base.pop("texts")
        entry = report["workloads"][w] = {"baseline": base}
        print(f"{w}: baseline {base['generated_tokens']} tokens, {base['tokens_per_s']:.1f} tok/s, peak RSS "
              f"{base['peak_rss_mib']:.0f} MiB", flush=True)
        for mode, new in runs.items():
            entry[mode] = {"speedup": new["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None,
                           "identical_steps": identical_share(texts, new.pop("texts")),
                           "peak_rss_ratio": new["peak_rss_mib"] / base["peak_rss_mib"], **new}
            print(f"  {mode}: {new['generated_tokens']} tokens, {new['tokens_per_s']:.1f} tok/s = "
                  f"{entry[mode]['speedup'] or 0:.2f}x, identical steps {entry[mode]['identical_steps']:.1%}, "
                  f"peak RSS {new['peak_rss_mib']:.0f} MiB ({entry[mode]['peak_rss_ratio']:.2f}x)", flush=True)
        for mode, r in [("baseline", base), *runs.items()]:
            sp = r["split_seconds"]
            print(f"  {mode:16s} {r['seconds']:7.1f} s: prefill {sp['prefill']:.1f}, decode {sp['decode']:.1f}, "
                  f"retrieval {sp['retrieval']:.1f}, rest {sp['rest']:.1f}; prefilled {r['prefill_tokens']} "
                  f"tokens, {r['cached_tokens']} from cache", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
