"""Multi-turn PPO throughput: generated tokens/s (rollouts), trained tokens/s (updates), and the time split between
rollout generation, retrieval and the update, plus peak memory, on the bundled HotpotQA train questions.

    .venv/bin/python bench/ppo_bench.py [--policy smollm2|ADAPTER_DIR] [--iterations 2] [--questions 4]
                                        [--group 2] [--algorithm ppo|grpo] [--reward process|outcome]

Use a warm-started adapter as --policy for realistic chain lengths (the base model rarely follows the protocol)."""

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
    a = ap.parse_args()

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


if __name__ == "__main__":
    main()
