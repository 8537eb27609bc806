"""Where the cached engine's peak memory comes from: RSS around every `BatchCache.concat` (a group joining the
running decode batch) during a bf16 tree search, against the run's peak and the prefix store's bytes.

    .venv/bin/python bench/concat_peak.py --policy WARM_START [--questions 32]

Linux only (/proc). Figures in docs/throughput.md (memory, under the latest run).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rollout_bench import _vm  # noqa: E402  (this folder is on sys.path when run as a script)


def vm(key: str) -> float:
    """MiB of a /proc/self/status field (VmRSS now, VmHWM peak): the rollout bench's reader."""
    return _vm(key) / 1024


def main() -> None:
    import torch

    from rag_dpo.agent import kv_cache
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.agent.rollout import RolloutConfig, RolloutEngine
    from rag_dpo.annotate.annotators import build_annotator
    from rag_dpo.annotate.tree_search import TreeSearchConfig, tree_search
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.paths import DEFAULT_DATA
    from rag_dpo.retrieval import build_retriever

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--questions", type=int, default=32)
    args = p.parse_args()

    real, calls = kv_cache.BatchCache.concat, []

    def concat(a, b, capacity):
        before, parts = vm("VmRSS"), [t.nbytes / 2**20 for t in (a, b)]
        out = real(a, b, capacity)
        mib = [out.nbytes / 2**20, *parts]
        calls.append((before, vm("VmRSS"), *mib))
        return out

    kv_cache.BatchCache.concat = staticmethod(concat)
    ds = load_dataset(DEFAULT_DATA)
    model, tok = load_policy(args.policy, device="cpu", dtype=torch.bfloat16, merge_adapter="auto")
    cfg = RolloutConfig(max_steps=3, k=3, max_new_tokens=48, temperature=0.7, top_p=0.95, batch_size=16,
                        max_tokens_per_passage=48, cache="prefix", cache_mb=1024, progress=False)
    engine = RolloutEngine(model, tok, build_retriever("bm25", ds.corpus), ds.corpus, cfg)
    train, test = split_questions(ds.questions, "train"), split_questions(ds.questions, "test")
    engine.rollout(test[-1:])                      # warm-up, as the rollout bench does
    engine.clear_cache()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak
    print(f"RSS before {vm('VmRSS'):.0f} MiB")
    tree_search(train[: args.questions], engine, build_annotator("evidence"),
                TreeSearchConfig(k=4, max_steps=3, progress=False, batch_questions=engine.questions_per_call(4)))
    print(f"peak {vm('VmHWM'):.0f} MiB; prefix store {engine.backend.store.bytes / 2**20:.0f} MiB; "
          f"{len(calls)} concats")
    for c in sorted(calls, key=lambda c: -c[1])[:3]:
        print("RSS %.0f -> %.0f MiB at a concat: joined cache %.0f MiB, parts %.0f + %.0f MiB" % c)


if __name__ == "__main__":
    main()
