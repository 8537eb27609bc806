"""Hybrid retrieval: reciprocal-rank fusion (RRF) of bm25s and dense.

RRF scores a passage by sum over the two rankings of 1 / (rrf_k + rank), rank starting at 1 (Cormack et al.,
2009). It needs no score calibration between the lexical and the dense scores, which live on unrelated scales;
rrf_k = 60 is the constant of the original paper. Each side contributes its top `depth` passages.
"""

from __future__ import annotations

from rag_dpo.records import Corpus
from rag_dpo.retrieval.base import Hits, Retriever
from rag_dpo.retrieval.bm25 import BM25sRetriever
from rag_dpo.retrieval.dense import BUNDLED, DenseRetriever


def reciprocal_rank_fusion(rankings: list[list[str]], rrf_k: float = 60.0) -> list[tuple[str, float]]:
    """Fuse ranked id lists; ties are broken by first appearance (the first ranking's order first)."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, 1):
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (rrf_k + rank)
    order = {pid: i for i, pid in enumerate(fused)}
    return sorted(fused.items(), key=lambda kv: (-kv[1], order[kv[0]]))


class HybridRetriever(Retriever):
    """bm25s + dense, fused by reciprocal rank.

    rrf_k: the RRF constant.
    depth: how many passages each side contributes (at least the k searched for).
    model, batch_size, device, max_seq_length: passed to the dense retriever.
    k1, b, method, stopwords: passed to the bm25s retriever.
    cache, show_progress: passed to both.
    """

    name = "hybrid"

    def __init__(self, corpus: Corpus, rrf_k: float = 60.0, depth: int = 100, model: str = BUNDLED,
                 batch_size: int = 64, device: str | None = None, max_seq_length: int | None = None,
                 k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str | None = "en",
                 cache: bool = True, show_progress: bool = True):
        super().__init__(corpus)
        self.rrf_k, self.depth = rrf_k, depth
        self.lexical = BM25sRetriever(corpus, k1=k1, b=b, method=method, stopwords=stopwords, cache=cache,
                                      show_progress=show_progress)
        self.dense = DenseRetriever(corpus, model=model, batch_size=batch_size, device=device,
                                    max_seq_length=max_seq_length, cache=cache, show_progress=show_progress)
        self.from_cache = self.lexical.from_cache and self.dense.from_cache

    def settings(self) -> dict:
        return {"rrf_k": self.rrf_k, "depth": self.depth, "bm25s": self.lexical.settings(),
                "dense": self.dense.settings()}

    def _search(self, queries: list[str], k: int) -> list[Hits]:
        depth = max(k, self.depth)
        lexical = self.lexical.search(queries, depth)
        dense = self.dense.search(queries, depth)
        return [reciprocal_rank_fusion([[pid for pid, _ in lex], [pid for pid, _ in den]], self.rrf_k)[:k]
                for lex, den in zip(lexical, dense)]
