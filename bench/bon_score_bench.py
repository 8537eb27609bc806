"""Best-of-N scoring with the candidates' shared context encoded once (`kv_cache.shared_prefix_logits`) against
encoding every candidate whole, same process, alternating per sibling group, on real sibling groups (a tree-search
pool's or a best-of-N eval's chains.jsonl). Reports candidates scored per second for each and the ratio, and the
largest score difference between the two (float rounding only).

    .venv/bin/python bench/bon_score_bench.py --policy runs/RUN/trained --chains runs/RUN/rollouts/labels.jsonl
    .venv/bin/python bench/bon_score_bench.py --prm runs/self_eval/prm --chains CHAINS --groups 40
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the CLI and the Makefile run (before torch loads)

from rag_dpo.annotate.annotators import sibling_groups
from rag_dpo.records import read_chains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chains", required=True, help="chains.jsonl with sibling groups (tree pool, best-of-N eval)")
    ap.add_argument("--policy", help="self-score with this policy (its `Score:` target)")
    ap.add_argument("--prm", help="score with this saved PRM instead")
    ap.add_argument("--groups", type=int, default=30, help="sibling groups of >= 2 candidates to score")
    ap.add_argument("--method", default=None, help="only chains of this method (eval files hold several)")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args()
    if bool(args.policy) == bool(args.prm):
        ap.error("give --policy or --prm")
    if args.prm:
        from rag_dpo.annotate.prm import PRMScorer
        scorer = PRMScorer.load(args.prm)
    else:
        from rag_dpo.agent.policy import load_policy
        from rag_dpo.train.self_eval import SelfScorer
        scorer = SelfScorer(*load_policy(args.policy, device="cpu"))
    groups = []
    for c in read_chains(args.chains):
        if args.method and c.method != args.method:
            continue
        for parent, kids in sibling_groups(c):
            if len(kids) >= 2:
                groups.append((c.question, c.path(parent) if parent is not None else [], kids))
        if len(groups) >= args.groups:
            break
    groups = groups[:args.groups]
    secs = {True: 0.0, False: 0.0}
    diff, n = 0.0, 0
    scorer.score(*groups[0])                                   # warm-up (allocations, first-call paths)
    for i, g in enumerate(groups):
        got = {}
        for share in ((True, False) if i % 2 else (False, True)):   # alternate which goes first
            scorer.share_prefix = share
            t = time.perf_counter()
            got[share] = scorer.score(*g)
            secs[share] += time.perf_counter() - t
        diff = max(diff, max(abs(a - b) for a, b in zip(got[True], got[False])))
        n += len(g[2])
    res = {"groups": len(groups), "candidates": n, "scorer": "prm" if args.prm else "self",
           "whole_s": secs[False], "shared_s": secs[True], "whole_cand_per_s": n / secs[False],
           "shared_cand_per_s": n / secs[True], "speedup": secs[False] / secs[True], "max_abs_score_diff": diff}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
