"""Retrieval benchmark: batched queries/s and recall@k of every retriever on the bundled HotpotQA corpus, one run.

All 500 questions of the IRCoT HotpotQA sample are the queries; the corpus is the union of their context
paragraphs (4,858 passages). Per retriever it times, separately:
- build: a fresh index (a new empty cache folder, so nothing is reused), and load: the same index again from the
  on-disk cache (rank-bm25 has no cache and is simply rebuilt);
- search: one batched `search(all 500 questions, k)`, repeated; the median time gives queries/s.
The issue-2 target is bm25s >= 5x the queries/s of rank-bm25 at equal recall (within 1 point); the ratio and
whether it is met are printed and stored. Speed is a ratio within this run, never an absolute promise.

    .venv/bin/python bench/retrieval_bench.py [--retrievers bm25,bm25s,dense,hybrid] [--k 5] [--repeats 3]
                                              [--out runs/bench/retrieval.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_one(name: str, dataset, k: int, repeats: int) -> dict:
    from rag_dpo.retrieval import build_retriever, evaluate_retrieval

    start = time.perf_counter()
    fresh = build_retriever(name, dataset.corpus)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    retriever = build_retriever(name, dataset.corpus, show_progress=False)
    load_s = time.perf_counter() - start
    runs = [evaluate_retrieval(dataset.questions, retriever, k) for _ in range(repeats)]
    seconds = statistics.median(r["search_seconds"] for r in runs)
    result = runs[0]
    return {
        "retriever": name, "settings": result["settings"], "k": k, "queries": result["questions"],
        "build_seconds": build_s, "build_was_fresh": not fresh.from_cache,
        "load_seconds": load_s, "load_from_cache": retriever.from_cache,
        "search_seconds_median": seconds, "search_seconds_all": [r["search_seconds"] for r in runs],
        "queries_per_s": result["questions"] / seconds,
        f"recall@{k}": result["recall"], f"precision@{k}": result["precision"],
        f"all_found@{k}": result["all_found"],
    }


def markdown(results: list[dict], k: int, ratio: dict | None) -> str:
    lines = [f"| retriever | index build (s) | load from cache (s) | queries/s (batched, {results[0]['queries']} q) "
             f"| recall@{k} | all supporting found@{k} |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        load = f"{r['load_seconds']:.2f}" if r["load_from_cache"] else f"{r['load_seconds']:.2f} (rebuilt)"
        build = f"{r['build_seconds']:.2f}" + ("" if r["build_was_fresh"] else " (cached)")
        lines.append(f"| {r['retriever']} | {build} | {load} | {r['queries_per_s']:.1f} "
                     f"| {r[f'recall@{k}']:.4f} | {r[f'all_found@{k}']:.4f} |")
    if ratio:
        lines.append("")
        lines.append(f"bm25s / rank-bm25 queries/s: **{ratio['speedup']:.1f}x** (target >= 5x), recall@{k} "
                     f"difference {ratio['recall_diff_points']:+.2f} points (target within 1): "
                     f"{'met' if ratio['target_met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="question file (default: the bundled HotpotQA sample)")
    parser.add_argument("--retrievers", default="bm25,bm25s,dense,hybrid")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="batched search runs per retriever (median)")
    parser.add_argument("--out", default="runs/bench/retrieval.json")
    parser.add_argument("--cache", default=None, help="index cache folder (default: a fresh temporary one, so "
                                                      "build times are real builds)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="rag_dpo_bench_") as tmp:
        os.environ["RAG_DPO_CACHE"] = args.cache or tmp
        from rag_dpo.data import load_dataset
        from rag_dpo.io import atomic_write_json
        from rag_dpo.paths import DEFAULT_DATA

        dataset = load_dataset(args.data or DEFAULT_DATA)
        names = [n.strip() for n in args.retrievers.split(",") if n.strip()]
        results = []
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results.append(bench_one(name, dataset, args.k, args.repeats))

    by_name = {r["retriever"]: r for r in results}
    ratio = None
    if "bm25" in by_name and "bm25s" in by_name:
        a, b = by_name["bm25"], by_name["bm25s"]
        diff = 100 * (b[f"recall@{args.k}"] - a[f"recall@{args.k}"])
        speedup = b["queries_per_s"] / a["queries_per_s"]
        ratio = {"speedup": speedup, "recall_diff_points": diff, "target_met": speedup >= 5 and abs(diff) <= 1}

    import torch
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    table = markdown(results, args.k, ratio)
    print(table)
    atomic_write_json(args.out, {"data": str(args.data or DEFAULT_DATA), "passages": len(dataset.corpus),
                                 "k": args.k, "repeats": args.repeats, "machine": machine,
                                 "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
                                 "results": results, "bm25s_vs_rank_bm25": ratio, "table": table})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
