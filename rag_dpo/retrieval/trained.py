"""Trained retrievers plug in by path: `dense:PATH` (a fine-tuned sentence-transformers bi-encoder folder),
`rerank:PATH` (a sentence-transformers CrossEncoder folder reranking the BM25 top `depth`) and `hybrid:PATH`
(reciprocal-rank fusion of bm25s and that bi-encoder).

Both are written by `rag_dpo.train.retriever` (generator-feedback training, issue 15), but loading them belongs
here, in the retrieval stage, so the agent, annotators, trainers and eval reach them through `build_retriever`
without importing a later stage. A trained folder carries a `training_manifest.json` (the questions it was trained
on); `retriever_manifest(spec)` finds it so eval can refuse those questions, as it does for policies.

The reranker is a two-stage retriever: bm25s proposes `depth` passages per query, the cross-encoder scores every
(query, "title text") pair and the top k by that score are returned. Its cost per query is `depth` cross-encoder
forwards, so `depth` trades recall headroom for speed. A folder with `rerank_prior.json` (what
`rag_dpo.train.retriever` writes) is a residual reranker: its score is `weight * cos0(query, passage)` of a frozen
bi-encoder (the untuned MiniLM, its corpus index cached) plus the cross-encoder's logit, so the cross-encoder only
learns the correction (how much a passage helps beyond looking similar) and, untrained, the reranker orders BM25's
candidates by the bi-encoder. Why: a cross-encoder trained on a hundred queries is a weak ranker on its own, and a
plain reranker throws the first stage's ranking away (the first runs' rerankers scored recall@5 0.25-0.36 against
BM25's 0.73).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rag_dpo.errors import InputError
from rag_dpo.records import Corpus
from rag_dpo.retrieval.base import Hits, Retriever, index_text
from rag_dpo.retrieval.bm25 import BM25sRetriever

SPEC_KINDS = ("dense", "rerank", "hybrid")
PRIOR = "rerank_prior.json"     # {"encoder": bi-encoder folder (relative to the reranker folder) or name, "weight"}


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
        self.prior, self.prior_weight = None, 0.0
        prior = read_prior(model)
        if prior is not None:
            from rag_dpo.retrieval.dense import DenseRetriever
            self.prior = DenseRetriever(corpus, model=prior["encoder"], device=device, cache=cache,
                                        show_progress=show_progress)
            self.prior_weight = float(prior["weight"])
            self._row = {pid: i for i, pid in enumerate(self.prior.ids)}

    def settings(self) -> dict:
        from rag_dpo.retrieval.dense import model_identity
        return {**model_identity(self.model_name), "depth": self.depth}

    def prior_scores(self, queries: list[str], ids: list[list[str]]) -> list[list[float]]:
        """weight * cos0(query, passage) for each query's passages (zeros without a prior)."""
        if self.prior is None:
            return [[0.0] * len(row) for row in ids]
        q = self.prior.encode_queries(queries)
        emb = self.prior.embeddings
        return [[self.prior_weight * float(q[i] @ emb[self._row[pid]]) for pid in row] for i, row in enumerate(ids)]

    def _search(self, queries: list[str], k: int) -> list[Hits]:
        first = self.first_stage.search(queries, max(k, self.depth))
        import torch
        pairs = [(q, index_text(self.corpus[pid])) for q, hits in zip(queries, first) for pid, _ in hits]
        scores = self.encoder.predict(pairs, batch_size=self.batch_size, show_progress_bar=False,
                                      convert_to_numpy=True, activation_fn=torch.nn.Identity()) if pairs else []
        prior = self.prior_scores(queries, [[pid for pid, _ in hits] for hits in first])
        out, i = [], 0
        for hits, base in zip(first, prior):
            row = [(pid, base[j] + float(scores[i + j])) for j, (pid, _) in enumerate(hits)]
            i += len(hits)
            row.sort(key=lambda t: -t[1])      # stable: ties keep the BM25 order
            out.append(row[:k])
        return out


def read_prior(model_dir: str | Path) -> dict | None:
    """A residual reranker's prior ({"encoder", "weight"}, the encoder resolved against the folder), else None."""
    path = Path(model_dir) / PRIOR
    if not path.is_file():
        return None
    try:
        prior = json.loads(path.read_text(encoding="utf-8"))
        encoder, weight = prior["encoder"], float(prior["weight"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"bad reranker prior: {e}", file=str(path), field="encoder") from None
    if not Path(encoder).is_absolute() and (Path(model_dir) / encoder).is_dir():
        encoder = os.path.normpath(Path(model_dir) / encoder)
    return {"encoder": encoder, "weight": weight}


def write_prior(model_dir: str | Path, encoder: str, weight: float) -> None:
    """Record the bi-encoder a residual reranker adds to its logits (a folder is stored relative to model_dir, so
    a run folder can move as a whole)."""
    from rag_dpo.io import atomic_write_json
    enc = Path(encoder)
    stored = os.path.relpath(enc.resolve(), Path(model_dir).resolve()) if enc.is_dir() else encoder
    atomic_write_json(Path(model_dir) / PRIOR, {"encoder": stored, "weight": weight})


def document_side_reproduces(encoder, passages, embeddings, atol: float = 1e-4) -> bool:
    """Whether `encoder`'s document side gives `embeddings` (normalised) for `passages`: the check that lets a
    query-tuned bi-encoder use its base model's corpus embeddings instead of encoding the corpus again."""
    import numpy as np
    mine = np.asarray(encoder.encode_document([index_text(p) for p in passages], normalize_embeddings=True,
                                              convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return mine.shape == embeddings.shape and bool(np.allclose(mine, embeddings, atol=atol))


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
    passages = list(corpus)[:check]
    if not document_side_reproduces(load_encoder(str(model_dir)), passages, emb[:len(passages)], atol):
        return False
    write_index(target, lambda d: np.save(d / EMBEDDINGS, emb, allow_pickle=False),
                meta={"retriever": DenseRetriever.name, "settings": key(model_dir), "passages": len(corpus),
                      "corpus": corpus.fingerprint(), "dim": int(emb.shape[1]), "shared_from": str(ref)})
    return True
