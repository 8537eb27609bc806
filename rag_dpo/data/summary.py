"""What `rag-dpo data` reports about a question file: counts, hop/type distribution, corpus size, split sizes,
and how many supporting passage ids resolve in the corpus."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rag_dpo.data.corpus import align_to_corpus, load_corpus
from rag_dpo.data.loaders import load_dataset
from rag_dpo.data.splits import parse_fractions, split_sizes


def describe_dataset(path: str | Path, corpus: str | Path | None = None, format: str | None = None,
                     fractions=None, strict: bool = True) -> dict:
    """Summary of a question file (and optionally a separate corpus) as a JSON-able dict. With `strict`, a
    supporting id that does not resolve in the corpus is an InputError; otherwise it is counted."""
    dataset = load_dataset(path, format=format)
    fr = parse_fractions(fractions)
    corpus_source = "union of the file's context paragraphs" if dataset.corpus is not None else None
    questions = dataset.questions
    if corpus is not None:
        other = load_corpus(corpus)
        questions, resolved, total = align_to_corpus(questions, other, own=dataset.corpus, strict=strict,
                                                     file=dataset.path, locations=dataset.locations)
        dataset.corpus, corpus_source = other, str(corpus)
    else:
        total = sum(len(q.supporting_ids) for q in questions)
        resolved = sum(1 for q in questions for s in q.supporting_ids
                       if dataset.corpus is not None and s in dataset.corpus)

    def dist(values) -> dict[str, int]:
        counts = Counter("unknown" if v is None else str(v) for v in values)
        return dict(sorted(counts.items(), key=lambda kv: (len(kv[0]), kv[0])))

    return {
        "path": dataset.path,
        "format": dataset.format,
        "questions": len(questions),
        "answerable": sum(q.answerable for q in questions),
        "unanswerable": sum(not q.answerable for q in questions),
        "with_supporting": sum(bool(q.supporting_ids) for q in questions),
        "hops": dist(q.hops for q in questions),
        "types": dist(q.type for q in questions),
        "corpus": {"source": corpus_source, "passages": len(dataset.corpus) if dataset.corpus is not None else 0},
        "fractions": fr,
        "splits": split_sizes(questions, fr),
        "supporting_ids": {"total": total, "resolved": resolved},
    }
