"""Lexical retrieval: BM25 with rank-bm25 (`bm25`, the reference implementation) and with bm25s (`bm25s`, sparse
precomputed scores, much faster per query). Both use the one `tokenize` below and the same k1/b, so they rank
alike and differ in speed only (bench/retrieval_bench.py measures both in one run).

rank-bm25 keeps its index as Python dicts and is rebuilt on each construction (well under a second for the
5k-passage HotpotQA corpus). bm25s indexes are cached on disk with bm25s' own `save`/`load` (JSON vocabulary and
parameters, `.npy` score arrays written and read with `allow_pickle=False`).
"""

from __future__ import annotations

import os
import re

from tqdm.auto import tqdm

from rag_dpo.errors import InputError
from rag_dpo.records import Corpus
from rag_dpo.retrieval.base import Hits, Retriever, index_text, top_k
from rag_dpo.retrieval.cache import index_dir, is_built, write_index

_WORD = re.compile(r"\w+")
STOPWORD_LISTS = ("en",)


def _import_bm25s():
    # bm25s imports JAX when it is installed, and JAX would otherwise claim most of the GPU's memory.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s
    return bm25s


def stopword_set(stopwords: str | None) -> frozenset[str]:
    """The stopword list by name: None for none, "en" for bm25s' English list."""
    if stopwords is None:
        return frozenset()
    if stopwords != "en":
        raise InputError(f"unknown stopword list {stopwords!r}; choose from {list(STOPWORD_LISTS)} or none",
                         field="stopwords")
    return frozenset(_import_bm25s().stopwords.STOPWORDS_EN)


def tokenize(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Lower-cased word tokens (regex \\w+, Unicode-aware), minus the given stopwords."""
    return [t for t in _WORD.findall(text.lower()) if t not in stopwords]


class BM25Retriever(Retriever):
    """rank-bm25's BM25Okapi.

    k1, b: the BM25 term-frequency saturation and length normalisation (same defaults as bm25s).
    stopwords: "en" to drop English stopwords, None to keep every token.
    show_progress: progress bar while tokenizing the corpus.
    cache: accepted for a uniform interface; this index is always rebuilt (it is cheap).
    """

    name = "bm25"

    def __init__(self, corpus: Corpus, k1: float = 1.5, b: float = 0.75, stopwords: str | None = "en",
                 show_progress: bool = True, cache: bool = True):
        super().__init__(corpus)
        from rank_bm25 import BM25Okapi

        self.k1, self.b, self.stopwords = k1, b, stopwords
        self._stop = stopword_set(stopwords)
        tokens = [tokenize(index_text(p), self._stop)
                  for p in tqdm(corpus, desc="bm25: tokenize corpus", disable=not show_progress, leave=False)]
        # BM25Okapi divides by the average document length: an all-stopword corpus would make it 0.
        if not any(tokens):
            raise InputError("no passage has any indexable word", file=corpus.name or None)
        self.bm25 = BM25Okapi(tokens, k1=k1, b=b)

    def settings(self) -> dict:
        return {"k1": self.k1, "b": self.b, "stopwords": self.stopwords}

    def _search(self, queries: list[str], k: int) -> list[Hits]:
        out = []
        for q in queries:
            scores = self.bm25.get_scores(tokenize(q, self._stop))
            out.append([(self.ids[i], float(scores[i])) for i in top_k(scores, k) if scores[i] > 0])
        return out


class BM25sRetriever(Retriever):
    """bm25s' BM25 with precomputed sparse scores.

    k1, b: as for `bm25`.
    method: bm25s' scoring variant ("lucene", "robertson", "atire", "bm25l", "bm25+").
    stopwords: "en" or None, as for `bm25`.
    cache: load the index from / save it to the on-disk cache.
    show_progress: progress bars while building the index.
    """

    name = "bm25s"

    def __init__(self, corpus: Corpus, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: str | None = "en", cache: bool = True, show_progress: bool = True):
        super().__init__(corpus)
        bm25s = _import_bm25s()
        self.k1, self.b, self.method, self.stopwords = k1, b, method, stopwords
        self._stop = stopword_set(stopwords)
        path = index_dir(corpus, self.name, self.settings())
        if cache and is_built(path):
            self.model = bm25s.BM25.load(path, load_corpus=False, allow_pickle=False)
            if self.model.scores["num_docs"] == len(corpus):
                self.from_cache = True
                return
        self.model = bm25s.BM25(k1=k1, b=b, method=method)
        tokens = [tokenize(index_text(p), self._stop)
                  for p in tqdm(corpus, desc="bm25s: tokenize corpus", disable=not show_progress, leave=False)]
        self.model.index(tokens, show_progress=show_progress)
        if cache:
            write_index(path, lambda d: self.model.save(d, allow_pickle=False, show_progress=False),
                        meta={"retriever": self.name, "settings": self.settings(), "passages": len(corpus),
                              "corpus": corpus.fingerprint()})

    def settings(self) -> dict:
        return {"k1": self.k1, "b": self.b, "method": self.method, "stopwords": self.stopwords}

    def _search(self, queries: list[str], k: int) -> list[Hits]:
        tokens = [tokenize(q, self._stop) for q in queries]
        docs, scores = self.model.retrieve(tokens, k=k, show_progress=False, n_threads=0, return_as="tuple")
        return [[(self.ids[int(i)], float(s)) for i, s in zip(row_docs, row_scores) if s > 0]
                for row_docs, row_scores in zip(docs, scores)]
