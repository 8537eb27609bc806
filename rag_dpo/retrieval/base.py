"""The one retriever interface every later stage uses: `search(queries, k)`, batched.

A retriever is built once over a `Corpus` and answers a batch of queries with, per query, up to k
`(passage_id, score)` pairs, best first. It may return fewer than k: never more than the corpus holds, and the
BM25 retrievers leave out passages that share no term with the query (their score is 0, so their order would be
arbitrary). Passages are indexed as "title text", so a query naming an entity finds the paragraph about it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from rag_dpo.errors import InputError
from rag_dpo.records import Corpus, Passage

Hits = list[tuple[str, float]]


def index_text(passage: Passage) -> str:
    """What gets indexed for a passage: its title followed by its text."""
    return f"{passage.title} {passage.text}".strip()


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (ties broken by corpus order, so results are deterministic)."""
    k = min(k, scores.shape[-1])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < scores.shape[-1]:
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(scores.shape[-1])
    return part[np.lexsort((part, -scores[part]))]


class Retriever(ABC):
    """Base class: holds the corpus and its passage ids; subclasses implement `_search` on a non-empty batch."""

    name: str = ""

    def __init__(self, corpus: Corpus):
        if len(corpus) == 0:
            raise InputError("the corpus is empty: nothing to index", file=corpus.name or None)
        self.corpus = corpus
        self.ids = [p.id for p in corpus]
        self.from_cache = False      # True when the index was loaded from the on-disk cache

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """Up to k (passage id, score) pairs per query, best first; one list per query, in query order."""
        if isinstance(queries, str):
            raise TypeError("search takes a list of queries, not one string")
        queries = list(queries)
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise InputError(f"query {i} is {type(q).__name__}, expected a string", field="queries")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}", field="k")
        if not queries:
            return []
        return self._search(queries, min(k, len(self.ids)))

    @abstractmethod
    def _search(self, queries: list[str], k: int) -> list[Hits]:
        ...

    def settings(self) -> dict:
        """What the index depends on besides the corpus (part of its cache key and of reports)."""
        return {}
