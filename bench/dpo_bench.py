"""DPO throughput through rag_dpo (`train.dpo`: pre-tokenised rows, per-token masks, MaskedDPOTrainer) vs plain
TRL DPOTrainer on the same step-level pairs, model, LoRA and DPOConfig; and rag_dpo with its shared-prompt
forward (`share_prompt`, the default) vs without it (`rag_dpo_unshared`). Each arm runs in its own subprocess so
peak memory (ru_maxrss) is per arm; the arms alternate `--repeats` times and the medians are compared.

    .venv/bin/python bench/dpo_bench.py [--model smollm2] [--pairs 16] [--batch 4] [--repeats 1]
    .venv/bin/python bench/dpo_bench.py --arms rag_dpo_unshared,rag_dpo --batch 1 --precompute   # as the recipes

Pairs: oracle chains of bundled HotpotQA train questions; at each search step, chosen = the oracle step, rejected
= the same step with a query about another question (realistic prompt lengths: prefix with retrieved text)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


ARMS = ("trl", "rag_dpo", "rag_dpo_unshared")


def make_pairs(n: int, tok, k: int = 3, max_tokens_per_passage: int = 48) -> list[dict]:
    from rag_dpo.agent.protocol import render_context
    from rag_dpo.annotate import oracle_chains
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.paths import DEFAULT_DATA
    from rag_dpo.retrieval import build_retriever
    ds = load_dataset(DEFAULT_DATA)
    qs = split_questions(ds.questions, "train")[: n + 4]
    chains = oracle_chains(qs, ds.corpus, build_retriever("bm25", ds.corpus), tok, k, max_tokens_per_passage)
    rows = []
    for i, c in enumerate(chains):
        other = chains[(i + 1) % len(chains)]
        for j, s in enumerate(c.steps[:-1]):
            wrong = other.steps[0].text
            rows.append({"prompt": render_context(tok, c.question, c.steps[:j]), "chosen": s.text, "rejected": wrong})
            if len(rows) == n:
                return rows
    return rows


def run_arm(arm: str, model: str, n: int, batch: int, precompute: bool = False) -> dict:
    import torch
    from datasets import Dataset

    from rag_dpo.agent.policy import load_tokenizer
    from rag_dpo.train.common import load_trainable
    from rag_dpo.train.dpo import DPOSettings, build_dpo_trainer, dpo_config
    torch.manual_seed(0)
    tok = load_tokenizer(model)
    rows = make_pairs(n, tok)
    cfg = DPOSettings(max_steps=len(rows) // batch, per_device_train_batch_size=batch, learning_rate=5e-5,
                      precompute_ref_log_probs=precompute, wandb=False, logging_steps=1000, save_steps=10_000,
                      max_length=1024, share_prompt=arm == "rag_dpo")
    out = Path(f"/tmp/rag_dpo_dpo_bench_{arm}_{os.getpid()}")
    t0 = time.perf_counter()
    if arm.startswith("rag_dpo"):
        trainer, _ = build_dpo_trainer(cfg, Dataset.from_list(rows), out, model=model)
    else:
        from trl import DPOTrainer
        policy, tok, peft_cfg = load_trainable(model, cfg)
        trainer = DPOTrainer(model=policy, args=dpo_config(cfg, out / "checkpoints"),
                             train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_cfg)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    pairs = cfg.max_steps * batch
    tokens = trainer._total_train_tokens
    return {"arm": arm, "pairs": pairs, "setup_s": round(setup, 2), "train_s": round(train_s, 2),
            "total_s": round(setup + train_s, 2),
            "pairs_per_s": pairs / train_s, "tokens_per_s": tokens / train_s, "tokens": tokens,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--arms", default="trl,rag_dpo", help="comma list of trl, rag_dpo, rag_dpo_unshared")
    ap.add_argument("--precompute", action="store_true",
                    help="precompute the reference log-probs (as the recipes do; inside setup_s)")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results/dpo_bench.json")
    a = ap.parse_args()
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a.arm, a.model, a.pairs, a.batch, a.precompute)), flush=True)
        return
    arms = a.arms.split(",")
    if set(arms) - set(ARMS):
        sys.exit(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; choose from {ARMS}")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _ in range(a.repeats):
        for arm in arms:
            p = subprocess.run([sys.executable, __file__, "--arm", arm, "--model", a.model, "--pairs", str(a.pairs),
                                "--batch", str(a.batch)] + (["--precompute"] if a.precompute else []),
                               capture_output=True, text=True)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"arm {arm} failed:\n{p.stderr[-3000:]}")
            results[arm].append(json.loads(line[7:]))
    med = {arm: {k: statistics.median(r[k] for r in rs) for k in ("pairs_per_s", "tokens_per_s", "train_s",
                                                                   "setup_s", "total_s", "peak_rss_mb")}
           for arm, rs in results.items()}
    print(f"{'arm':16s} {'pairs/s':>8s} {'tokens/s':>9s} {'train s':>8s} {'setup s':>8s} {'total s':>8s} {'peak MB':>8s}")
    for arm, m in med.items():
        print(f"{arm:16s} {m['pairs_per_s']:8.3f} {m['tokens_per_s']:9.1f} {m['train_s']:8.1f} {m['setup_s']:8.1f} "
              f"{m['total_s']:8.1f} {m['peak_rss_mb']:8.0f}")
    summary = {}
    if {"trl", "rag_dpo"} <= set(med):
        summary["overhead"] = med["trl"]["pairs_per_s"] / med["rag_dpo"]["pairs_per_s"] - 1
        print(f"rag_dpo overhead vs plain TRL (pairs/s): {summary['overhead'] * 100:+.1f}%  (target <= +10%)")
    if {"rag_dpo_unshared", "rag_dpo"} <= set(med):
        summary["share_speedup_train"] = med["rag_dpo"]["pairs_per_s"] / med["rag_dpo_unshared"]["pairs_per_s"]
        summary["share_speedup_total"] = med["rag_dpo_unshared"]["total_s"] / med["rag_dpo"]["total_s"]
        print(f"shared prompt vs unshared: training {summary['share_speedup_train']:.2f}x pairs/s, "
              f"setup (incl. any reference pass) + training {summary['share_speedup_total']:.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    import platform
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"
    Path(a.out).write_text(json.dumps({"machine": machine, "commit": commit, "command": " ".join(sys.argv),
                                       "args": vars(a), "runs": results, "median": med, **summary}, indent=2))


if __name__ == "__main__":
    main()
