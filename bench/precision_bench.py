"""Eval precision: how much of a fine-tune survives bf16, and what bf16 buys in eval speed.

    .venv/bin/python bench/precision_bench.py --policy ADAPTER_DIR --reference START_DIR_OR_smollm2

prints the share of the policy's weight changes (LoRA merged, vs the reference policy) that casting to bf16 erases,
and the relative error of the change (`rag_dpo.eval.evaluate.bf16_erased_change`).

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reference", default=None, help="the policy's starting point (adapter folder or smollm2)")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--_eval", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._eval:
        print(json.dumps(eval_once(args.policy, args._eval, args.limit, args.batch)))
        return
    if args.reference:
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
