"""Supporting-passage recall@k of a retriever on a set of questions: the number `rag-dpo retrieve` prints.

Each question's text is the query; queries go to `search` in batches (one call for all of them by default, as the
benchmark measures it; the CLI uses batches of 256 to show a progress bar), and the search time gives queries/s. Questions without supporting
passages (Bamboogle, unanswerable MuSiQue) cannot be scored and are counted, not averaged in as a perfect 1.0.
"""

from __future__ import annotations

import time
from typing import Sequence

from tqdm.auto import tqdm

from rag_dpo.errors import InputError
from rag_dpo.metrics import average, breakdown, support_precision, support_recall
from rag_dpo.records import Question
from rag_dpo.retrieval.base import Retriever


def evaluate_retrieval(questions: Sequence[Question], retriever: Retriever, k: int, batch_size: int | None = None,
                       show_progress: bool = False) -> dict:
    """recall@k and precision@k (means and by hops/type), queries/s, and the per-question rows."""
    scored = [q for q in questions if q.supporting_ids]
    if not scored:
        raise InputError("no question has supporting passages, so retrieval recall cannot be measured",
                         field="supporting_ids")
    queries = [q.question for q in scored]
    batch_size = batch_size or len(queries)
    hits, seconds = [], 0.0
    with tqdm(total=len(queries), desc=f"{retriever.name}: search", unit="q", disable=not show_progress,
              leave=False) as bar:
        for i in range(0, len(queries), batch_size):
            start = time.perf_counter()
            hits.extend(retriever.search(queries[i:i + batch_size], k))
            seconds += time.perf_counter() - start
            bar.update(min(batch_size, len(queries) - i))
    rows = []
    for q, h in zip(scored, hits):
        ids = [pid for pid, _ in h]
        rows.append({"id": q.id, "hops": q.hops, "type": q.type,
                     "recall": support_recall(ids, q.supporting_ids, k),
                     "precision": support_precision(ids, q.supporting_ids, k),
                     "all_found": float(set(q.supporting_ids) <= set(ids[:k]))})
    overall = average(rows)
    return {
        "retriever": retriever.name, "settings": retriever.settings(), "k": k,
        "questions": len(scored), "without_support": len(questions) - len(scored),
        "recall": overall["recall"], "precision": overall["precision"], "all_found": overall["all_found"],
        "search_seconds": seconds, "queries_per_s": len(scored) / seconds if seconds > 0 else float("inf"),
        "by_hops": breakdown(rows, "hops"), "by_type": breakdown(rows, "type"),
        "rows": rows,
    }
