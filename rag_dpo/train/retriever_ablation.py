"""Fast ablation of the bi-encoder objective on a finished retriever run's cached usefulness scores.

Why it exists: the first `make train-retriever` run's usefulness-trained bi-encoder lost 17 points of test recall@5
and the question was whether the code or the objective was at fault. A full retrain goes through
sentence-transformers' trainer and re-encodes the frozen passage side at every step; here the passage side is the
untuned corpus index itself (the bi-encoders tune the query side only, so that is exact), a plain AdamW loop with the
trainer's schedule (linear, 10 % warmup) trains the query side, and each variant reports full-corpus recall@5 on the
train questions it trained on (the fit check) and on the test split. Variants are keyword settings:

    lr, epochs, batch_size, student_temperature, target_temperature   as in RetrieverSettings
    prior_weight      target softmax(u/T + prior_weight * cos0 / student_temperature): 1 = posterior, 0 = usefulness
    neighbours        add the untuned top passages outside the candidates as extra candidates with u = 0
    anchor            + anchor * (1 - cos(q, q_untuned)): keep the query embedding near the untuned one
    corpus_softmax    the KL over the whole corpus (unscored passages at their prior), as `corpus_softmax` trains
    m                 use only each record's first m candidates (default: all of them)
    clip              clip the gradient norm to this (0: no clipping; the trainers clip at 1.0)
    seed

Recall@5 is reported on the fit (train) questions, the test split and the dev split (held out from training too:
two held-out sets, because one test passage is 0.8 points). ABLATION_THREADS=1 when another job shares the CPU.

    nice -n 19 .venv/bin/python -m rag_dpo.train.retriever_ablation runs/retriever "prior_weight=0, lr=5e-5" \
        "prior_weight=1, lr=1e-5"

`... retriever_ablation RUN --ceiling` prints what a perfect learner of the target would score instead (the
candidates reordered by usefulness / posterior / gold support; see docs/retriever.md).

It is a diagnostic, not a trainer: the shipped retrievers come from `train_retriever`.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> dict:
    """'prior_weight=1, lr=1e-5' -> {'prior_weight': 1, 'lr': 1e-05} (literals only)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


class Ablation:
    """The cached records of `run_dir` (scores/scores.jsonl), its untuned bi-encoder and corpus index, and the
    train (fit) and test questions."""

    def __init__(self, run_dir: str | Path, data: str = "data/hotpotqa/ircot_hotpotqa_dev_subsampled_500.jsonl",
                 m: int | None = None, max_seq_length: int = 128):
        import torch

        from rag_dpo.data import load_dataset, split_questions
        from rag_dpo.retrieval import build_retriever
        run_dir = Path(run_dir)
        ds = load_dataset(data)
        by_id = {q.id: q for q in ds.questions}
        records = [json.loads(line) for line in (run_dir / "scores" / "scores.jsonl").open(encoding="utf-8")]
        m = m or min(len(r["candidates"]) for r in records)      # default: as many as every record has
        self.rows = [r for r in records if len(r["candidates"]) >= m]
        self.fit_questions = [by_id[r["question_id"]] for r in records if r["source"] == "question"]
        self.test_questions = [q for q in split_questions(ds.questions, "test") if q.supporting_ids]
        self.dev_questions = [q for q in split_questions(ds.questions, "dev") if q.supporting_ids]   # held out too
        self.untuned = str(run_dir / "retrievers" / "untuned")
        self.max_seq_length, self.m = max_seq_length, m
        self.base = build_retriever(f"dense:{self.untuned}", ds.corpus, show_progress=False)
        self.emb = torch.tensor(self.base.embeddings)
        row = {pid: i for i, pid in enumerate(self.base.ids)}
        self.cand = torch.tensor([[row[p] for p in r["candidates"][:m]] for r in self.rows])
        self.useful = torch.tensor([r["usefulness"][:m] for r in self.rows])

    def model(self):
        from rag_dpo.train.retriever import query_tuned_encoder
        return query_tuned_encoder(self.untuned, self.max_seq_length)

    @staticmethod
    def encode(model, texts, batch: int = 32):
        import torch
        out = []
        for i in range(0, len(texts), batch):
            f = model.preprocess(texts[i:i + batch])
            f["task"] = "query"
            out.append(model(f)["sentence_embedding"])
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    def recall(self, model, questions, k: int = 5) -> float:
        import torch

        from rag_dpo.metrics import support_recall
        model.eval()
        with torch.no_grad():
            top = (self.encode(model, [q.question for q in questions]) @ self.emb.T).topk(k, dim=-1).indices
        return sum(support_recall([self.base.ids[j] for j in t], q.supporting_ids, k)
                   for q, t in zip(questions, top.tolist())) / len(questions)

    def run(self, lr: float = 5e-5, epochs: int = 3, batch_size: int = 8, student_temperature: float = 0.05,
            target_temperature: float = 1.0, prior_weight: float = 0.0, neighbours: int = 0, anchor: float = 0.0,
            corpus_softmax: bool = False, m: int | None = None, clip: float = 0.0, seed: int = 0) -> dict:
        import torch
        torch.manual_seed(seed)
        rng = random.Random(seed)
        model = self.model()
        with torch.no_grad():
            model.eval()
            q0 = self.encode(model, [r["query"] for r in self.rows])
        cand, useful = self.cand[:, :m], self.useful[:, :m]      # m: the first m candidates only
        if neighbours:
            top = (q0 @ self.emb.T).topk(cand.shape[1] + neighbours, dim=-1).indices.tolist()
            extra = [[j for j in t if j not in set(c)][:neighbours] for t, c in zip(top, cand.tolist())]
            cand = torch.cat([cand, torch.tensor(extra)], 1)
            useful = torch.cat([useful, torch.zeros(len(self.rows), neighbours)], 1)
        prior = torch.einsum("bd,bmd->bm", q0, self.emb[cand])
        target = torch.softmax(useful / target_temperature + prior_weight * prior / student_temperature, -1)
        if corpus_softmax:   # over the whole corpus: unscored passages keep their prior (u = 0), as trained
            from rag_dpo.train.retriever import corpus_target
            target = corpus_target(q0, cand, useful, self.emb, target_temperature, prior_weight, student_temperature)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        steps = math.ceil(len(self.rows) / batch_size) * epochs
        warm = max(1, math.ceil(0.1 * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
        t0 = time.perf_counter()
        order = list(range(len(self.rows)))
        for _ in range(epochs):
            rng.shuffle(order)
            for b in range(0, len(order), batch_size):
                model.train()
                ib = order[b:b + batch_size]
                q = self.encode(model, [self.rows[i]["query"] for i in ib])
                logits = (q @ self.emb.T if corpus_softmax
                          else torch.einsum("bd,bmd->bm", q, self.emb[cand[ib]])) / student_temperature
                loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), target[ib], reduction="batchmean")
                if anchor:
                    loss = loss + anchor * (1 - (q * q0[ib]).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                if clip:       # as the trainers do (transformers' max_grad_norm, default 1.0)
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
        return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                "fit_recall@5": self.recall(model, self.fit_questions),
                "test_recall@5": self.recall(model, self.test_questions),
                "dev_recall@5": self.recall(model, self.dev_questions)}

    def ceiling(self, student_temperature: float = 0.05) -> dict:
        """What a retriever that learnt its target perfectly would score on the fit questions: each question-query's
        scored candidates reordered by usefulness alone / by the posterior target / by gold support, the rest of the
        untuned ranking after them (recall@5), and the share of supporting passages among the candidates."""
        import torch

        from rag_dpo.metrics import support_recall
        rows = [r for r in self.rows if r["source"] == "question"]
        by_id = {q.id: q for q in self.fit_questions}
        qs = [by_id[r["question_id"]] for r in rows]
        model = self.model()
        model.eval()
        with torch.no_grad():
            q0 = self.encode(model, [r["query"] for r in rows])
        untuned = (q0 @ self.emb.T).topk(50, dim=-1).indices.tolist()
        row = {pid: i for i, pid in enumerate(self.base.ids)}
        out = {"candidates": len(rows[0]["candidates"]), "questions": len(rows)}
        inside = sum(s in r["candidates"] for r, q in zip(rows, qs) for s in q.supporting_ids)
        out["supporting_among_candidates"] = inside / sum(len(q.supporting_ids) for q in qs)
        keys = {"usefulness": [r["usefulness"] for r in rows],      # per row, one sort key per candidate
                "posterior": [[u + float(q0[i] @ self.emb[row[pid]]) / student_temperature
                               for u, pid in zip(r["usefulness"], r["candidates"])] for i, r in enumerate(rows)],
                "gold": [[float(pid in q.supporting_ids) for pid in r["candidates"]] for r, q in zip(rows, qs)]}
        for name, key in keys.items():
            total = 0.0
            for r, q, top, k in zip(rows, qs, untuned, key):
                cands = [pid for _, pid in sorted(zip(k, r["candidates"]), key=lambda x: -x[0])]
                rest = [self.base.ids[j] for j in top if self.base.ids[j] not in cands]
                total += support_recall(cands + rest, q.supporting_ids, 5)
            out[f"recall@5_by_{name}"] = total / len(rows)
        out["recall@5_untuned"] = sum(support_recall([self.base.ids[j] for j in t], q.supporting_ids, 5)
                                      for t, q in zip(untuned, qs)) / len(rows)
        return out


def main(argv: list[str]) -> None:
    import torch
    torch.set_num_threads(int(os.environ.get("ABLATION_THREADS", "2")))   # 1 beside another job
    ab = Ablation(argv[0])
    if argv[1:] == ["--ceiling"]:
        print(json.dumps(ab.ceiling(), indent=1))
        return
    untuned = ab.model()
    print(f"{'untuned':44s} fit R@5 {ab.recall(untuned, ab.fit_questions):.3f}  "
          f"test R@5 {ab.recall(untuned, ab.test_questions):.3f}  dev R@5 {ab.recall(untuned, ab.dev_questions):.3f}",
          flush=True)
    for text in argv[1:]:
        r = ab.run(**parse_variant(text))
        print(f"{text:44s} fit R@5 {r['fit_recall@5']:.3f}  test R@5 {r['test_recall@5']:.3f}  "
              f"dev R@5 {r['dev_recall@5']:.3f}  ({r['steps']} steps, {r['seconds']} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
