"""Trained retrievers plug in by path: `dense:PATH` (a fine-tuned sentence-transformers bi-encoder folder),
`rerank:PATH` (a sentence-transformers CrossEncoder folder reranking the BM25 top `depth`) and `hybrid:PATH`
(reciprocal-rank fusion of bm25s and that bi-encoder).

Both are written by `rag_dpo.train.retriever` (generator-feedback training, issue 15), but loading them belongs
here, in the retrieval stage, so the agent, annotators, trainers and eval reach them through `build_retriever`
without importing a later stage. A trained folder carries a `training_manifest.json` (the questions it was trained
on); `retriever_manifest(spec)` finds it so eval can refuse those questions, as it does for policies.

The reranker is a two-stage retriever: bm25s proposes `depth` passages per query, the cross-encoder scores every
(query, "title text") pair and the top k by that score are returned. Its cost per query is `depth` cross-encoder
forwards, so `depth` trades recall headroom for speed.
"""

from __future__ import annotations

import os
from pathlib import Path

from rag_dpo.errors import InputError
from rag_dpo.records import Corpus
from rag_dpo.retrieval.base import Hits, Retriever, index_text
from rag_dpo.retrieval.bm25 import BM25sRetriever

SPEC_KINDS = ("dense", "rerank", "hybrid")


def parse_spec(name: str) -> tuple[str, str | None]:
    """'dense:PATH' -> ('dense', PATH); 'bm25' -> ('bm25', None). dense, rerank and hybrid (its dense side) take
    a model folder."""
    if ":" not in name:
        return name, None
    kind, path = name.split(":", 1)
    if kind not in SPEC_KINDS or not path:
        raise InputError(f"retriever {name!r}: only dense:PATH, rerank:PATH and hybrid:PATH take a model folder",
                         field="retriever")
    if not Path(path).is_dir():
        raise InputError(f"retriever {name!r}: {path} is not a folder (a saved sentence-transformers model)",
                         field="retriever")
    return kind, path


def retriever_manifest(name: str) -> Path | None:
    """The model folder of a `dense:PATH`/`rerank:PATH` spec (its training manifest), else None."""
    _, path = parse_spec(str(name))
    return Path(path) if path else None


def load_cross_encoder(model: str, device: str | None = None, max_length: int | None = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import CrossEncoder
    try:
        return CrossEncoder(model, device=device, max_length=max_length, trust_remote_code=False)
    except OSError as e:
        raise InputError(f"cannot load cross-encoder {model!r}: {e}", field="model") from None


class RerankRetriever(Retriever):
    """bm25s top `depth`, reranked by a cross-encoder.

    model: CrossEncoder folder (required).
    depth: passages bm25s proposes per query (the reranker only reorders these).
    batch_size: (query, passage) pairs per cross-encoder batch.
    max_length: token limit of a (query, passage) pair (default: the model's).
    device, cache, show_progress: as for the other retrievers (cache/progress apply to the BM25 index).
    """

    name = "rerank"

    def __init__(self, corpus: Corpus, model: str | None = None, depth: int = 20, batch_size: int = 64,
                 max_length: int | None = None, device: str | None = None, cache: bool = True,
                 show_progress: bool = True):
        super().__init__(corpus)
        if model is None:
            raise InputError("the reranker needs a trained model folder: rerank:PATH", field="model")
        self.model_name, self.depth, self.batch_size = str(model), depth, batch_size
        self.first_stage = BM25sRetriever(corpus, cache=cache, show_progress=show_progress)
        self.encoder = load_cross_encoder(str(model), device, max_length)
        self.from_cache = self.first_stage.from_cache

    def settings(self) -> dict:
        from rag_dpo.retrieval.dense import model_identity
        return {**model_identity(self.model_name), "depth": self.depth}

    def _search(self, queries: list[str], k: int) -> list[Hits]:
        first = self.first_stage.search(queries, max(k, self.depth))
        pairs = [(q, index_text(self.corpus[pid])) for q, hits in zip(queries, first) for pid, _ in hits]
        scores = self.encoder.predict(pairs, batch_size=self.batch_size, show_progress_bar=False,
                                      convert_to_numpy=True) if pairs else []
        out, i = [], 0
        for hits in first:
            row = [(pid, float(scores[i + j])) for j, (pid, _) in enumerate(hits)]
            i += len(hits)
            row.sort(key=lambda t: -t[1])      # stable: ties keep the BM25 order
            out.append(row[:k])
        return out


def share_document_index(model_dir: str | Path, reference: str | Path, corpus: Corpus, check: int = 16,
                         atol: float = 1e-4) -> bool:
    """Give a query-tuned bi-encoder (document side frozen) the corpus embeddings of `reference` (the model its
    document side was copied from), which must already be indexed for `corpus`: no re-encoding. Checked, not
    assumed: the first `check` passages are encoded with model_dir's document side and must match within `atol`.
    Returns False (and leaves the cache alone) when there is nothing to share or the check fails."""
    import numpy as np

    from rag_dpo.retrieval.cache import index_dir, is_built, write_index
    from rag_dpo.retrieval.dense import EMBEDDINGS, DenseRetriever, load_encoder, model_identity

    def key(model):
        return {**model_identity(str(model)), "max_seq_length": None}

    ref = index_dir(corpus, DenseRetriever.name, key(reference))
    target = index_dir(corpus, DenseRetriever.name, key(model_dir))
    if is_built(target):
        return True
    if not is_built(ref):
        return False
    emb = np.load(ref / EMBEDDINGS, allow_pickle=False)
    encoder = load_encoder(str(model_dir))
    sample = [index_text(p) for p in list(corpus)[:check]]
    mine = np.asarray(encoder.encode_document(sample, normalize_embeddings=True, convert_to_numpy=True,
                                              show_progress_bar=False), dtype=np.float32)
    if mine.shape != emb[:len(sample)].shape or not np.allclose(mine, emb[:len(sample)], atol=atol):
        return False
    write_index(target, lambda d: np.save(d / EMBEDDINGS, emb, allow_pickle=False),
                meta={"retriever": DenseRetriever.name, "settings": key(model_dir), "passages": len(corpus),
                      "corpus": corpus.fingerprint(), "dim": int(emb.shape[1]), "shared_from": str(ref)})
    return True
