"""Usefulness-scoring throughput (issue 15): candidate passages scored per second by the policy, batched.

Two ways to score the same (query, candidate) rows with the same policy, in one run, as a ratio:
- `shared`: rag_dpo.train.retriever.answer_loglik -- each query's prefix (system prompt, question, chain, search
  step) encoded once and its KV cache shared by the query's candidates; the LM head only at the answer tokens;
- `naive`: every (prefix + passage + answer) row as a full sequence, right-padded batches, full-vocabulary
  log-softmax at every position (the straightforward implementation).
Both give the same log-likelihoods (max |difference| is reported). Writes runs/bench/retriever_scoring.json.

    .venv/bin/python bench/retriever_train_bench.py [--queries 8] [--candidates 6] [--policy smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def naive_loglik(model, rows, pad_id, batch_size=16):
    import torch
    out = []
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            seqs = [p + s + a for p, s, a in chunk]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for j, x in enumerate(seqs):
                ids[j, :len(x)] = torch.tensor(x)
                att[j, :len(x)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
            for j, (p, s, a) in enumerate(chunk):
                start = len(p) + len(s) - 1
                out.append(float(sum(logp[j, start + i, t] for i, t in enumerate(a))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--passage-tokens", type=int, default=48)
    ap.add_argument("--out", default="runs/bench/retriever_scoring.json")
    args = ap.parse_args()

    import torch

    from rag_dpo.agent.policy import load_policy
    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.paths import DEFAULT_DATA
    from rag_dpo.retrieval import build_retriever
    from rag_dpo.train.retriever import answer_loglik, candidate_lists, question_queries, scoring_parts

    ds = load_dataset(DEFAULT_DATA)
    queries = question_queries(split_questions(ds.questions, "train")[:args.queries])
    cands = candidate_lists([q.query for q in queries], [build_retriever("bm25s", ds.corpus, show_progress=False)],
                            args.candidates)
    model, tok = load_policy(args.policy)
    parts = [scoring_parts(tok, q, [None] + [ds.corpus[p] for p in c], args.passage_tokens)
             for q, c in zip(queries, cands)]
    passages = sum(len(c) for c in cands)

    t0 = time.perf_counter()
    shared = [x for p, s, a in parts for x in answer_loglik(model, p, s, a, tok.pad_token_id)]
    t_shared = time.perf_counter() - t0
    rows = [(p, x, a) for p, s, a in parts for x in s]
    t0 = time.perf_counter()
    naive = naive_loglik(model, rows, tok.pad_token_id)
    t_naive = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(shared, naive))
    res = {"policy": args.policy, "queries": len(queries), "candidates": args.candidates,
           "passages": passages, "rows_with_no_passage": len(rows), "torch_threads": torch.get_num_threads(),
           "shared_seconds": t_shared, "naive_seconds": t_naive,
           "shared_passages_per_s": passages / t_shared, "naive_passages_per_s": passages / t_naive,
           "speedup": t_naive / t_shared, "max_abs_ll_difference": diff, "load_avg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
