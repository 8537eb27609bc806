"""Retrieval stage: one batched interface (`Retriever.search(queries, k)`) over BM25 (rank-bm25 and bm25s), dense
(sentence-transformers, bundled MiniLM) and hybrid (reciprocal-rank fusion), with indexes cached on disk.

`build_retriever(name, corpus, **opts)` is the entry point; `evaluate_retrieval` measures supporting-passage
recall@k on a set of questions (`rag-dpo retrieve`). Library imports (rank-bm25, bm25s, sentence-transformers)
happen when a retriever is built, not when this package is imported.
"""

from __future__ import annotations

import inspect

from rag_dpo.errors import InputError
from rag_dpo.records import Corpus
from rag_dpo.retrieval.base import Hits, Retriever
from rag_dpo.retrieval.bm25 import BM25Retriever, BM25sRetriever, tokenize
from rag_dpo.retrieval.dense import DenseRetriever
from rag_dpo.retrieval.evaluation import evaluate_retrieval
from rag_dpo.retrieval.hybrid import HybridRetriever
from rag_dpo.retrieval.trained import RerankRetriever, parse_spec, retriever_manifest

RETRIEVERS: dict[str, type[Retriever]] = {
    "bm25": BM25Retriever,
    "bm25s": BM25sRetriever,
    "dense": DenseRetriever,
    "hybrid": HybridRetriever,
}


def build_retriever(name: str, corpus: Corpus, **opts) -> Retriever:
    """The retriever `name` over `corpus`; opts are that retriever's keyword settings (see its class).
    `dense:PATH` and `rerank:PATH` load a trained model folder (rag_dpo.train.retriever writes them)."""
    name, path = parse_spec(name)
    if path is not None:
        opts = {**opts, "model": path}
    cls = RETRIEVERS.get(name, RerankRetriever if name == "rerank" else None)
    if cls is None:
        raise InputError(f"unknown retriever {name!r}; choose from {', '.join(RETRIEVERS)}", field="retriever")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "corpus"}
    for key in opts:
        if key not in accepted:
            raise InputError(f"retriever {name!r} has no option {key!r}; it takes {', '.join(sorted(accepted))}",
                             field=key)
    return cls(corpus, **opts)


__all__ = ["Retriever", "Hits", "RETRIEVERS", "build_retriever", "evaluate_retrieval", "tokenize",
           "BM25Retriever", "BM25sRetriever", "DenseRetriever", "HybridRetriever", "RerankRetriever",
           "parse_spec", "retriever_manifest"]
