"""Eval precision: how much of a fine-tune survives bf16, and what bf16 buys in eval speed.

    .venv/bin/python bench/precision_bench.py --policy ADAPTER_DIR --reference START_DIR_OR_smollm2

prints the share of the policy's weight changes (LoRA merged, vs the reference policy) that casting to bf16 erases,
and the relative error of the change (`rag_dpo.eval.evaluate.bf16_erased_change`).

    .venv/bin/python bench/precision_bench.py --policy ADAPTER_DIR --reference START --logprobs [--limit 24]

compares the per-chain log-prob change policy - reference on held-out oracle chains (test split) in bfloat16
against float32, with adapters unmerged (as bf16 rollouts run them) and merged
(`rag_dpo.agent.precision.learned_change_kept`).

    .venv/bin/python bench/precision_bench.py --policy ADAPTER_DIR --speed [--limit 40] [--batch 16]

also evaluates the policy (agent, greedy, bundled HotpotQA test split) with float32 and with bfloat16 weights,
each in its own subprocess, and prints seconds, EM and F1 of each."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the CLI and the Makefile run


def erased(policy: str, reference: str) -> dict:
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.eval.evaluate import bf16_erased_change
    model, _ = load_policy(policy, merge_adapter=True)
    ref, _ = load_policy(reference, merge_adapter=True)
    return bf16_erased_change(model, ref)


def eval_once(policy: str, dtype: str, limit: int, batch: int) -> dict:
    import torch

    from rag_dpo.agent.policy import load_policy
    from rag_dpo.eval.evaluate import evaluate
    from rag_dpo.pipeline.recipe import load_recipe
    from rag_dpo.pipeline.run import eval_rollout_config, world
    recipe = load_recipe("recipes/dpo_step.yaml")
    w, rcfg = world(recipe), eval_rollout_config(recipe, batch_size=batch)
    rcfg.progress = False
    model = load_policy(policy, merge_adapter=True, dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        res = evaluate(str(w.data_path), recipe.data.corpus, policy=policy, methods=["agent"], split="test",
                       limit=limit, out_dir=out, retriever=recipe.retrieval.name, rollout=rcfg,
                       fractions=recipe.data.fractions, use_wandb=False, model_and_tokenizer=model, dtype=dtype)
        seconds = time.perf_counter() - t
    a = res["agent"]
    return {"dtype": dtype, "seconds": round(seconds, 1), "em": a["em"], "f1": round(a["f1"], 4)}


def logprob_check(policy: str, reference: str, limit: int) -> dict:
    from rag_dpo.agent.policy import load_tokenizer
    from rag_dpo.agent.precision import learned_change_kept
    from rag_dpo.annotate.oracle import oracle_chains
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.retrieval import build_retriever
    ds = load_dataset("data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl")
    chains = oracle_chains(split_questions(ds.questions, "test")[:limit], ds.corpus,
                           build_retriever("bm25", ds.corpus), load_tokenizer(reference), k=3,
                           max_tokens_per_passage=48)
    return learned_change_kept(policy, reference, chains, "bfloat16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reference", default=None, help="the policy's starting point (adapter folder or smollm2)")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--logprobs", action="store_true", help="log-prob change kept in bf16 (needs --reference)")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--_eval", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._eval:
        print(json.dumps(eval_once(args.policy, args._eval, args.limit, args.batch)))
        return
    if args.logprobs:
        print(json.dumps(logprob_check(args.policy, args.reference or "smollm2", args.limit)))
    elif args.reference:
        r = erased(args.policy, args.reference)
        print(f"{args.policy} vs {args.reference}: {int(r['changed'])} weights changed, "
              f"{r['erased']:.1%} of them equal in bf16, relative error of the change in bf16 {r['rel_error']:.2f}")
    if args.speed:
        for dtype in ("float32", "bfloat16"):
            out = subprocess.run([sys.executable, __file__, "--policy", args.policy, "--limit", str(args.limit),
                                  "--batch", str(args.batch), "--_eval", dtype],
                                 capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
