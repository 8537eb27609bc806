"""`rag-dpo retrieve`: supporting-passage recall@k of a retriever on a question file (and its corpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

RETRIEVER_NAMES = "bm25, bm25s, dense, hybrid, dense:PATH, rerank:PATH"


def register(app: typer.Typer) -> None:
    app.command("retrieve")(retrieve)


def retrieve(path: Path = typer.Argument(..., help="Question file in any format `rag-dpo data` reads."),
             retriever: str = typer.Option("bm25s", "--retriever", "-r", help=f"One of {RETRIEVER_NAMES}."),
             k: int = typer.Option(5, "--k", "-k", help="Passages retrieved per question."),
             corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus file to search instead of the "
                                                   "union of the file's context paragraphs."),
             format: Optional[str] = typer.Option(None, "--format", help="Override format detection."),
             split: str = typer.Option("all", "--split", help="train, dev, test or all."),
             fractions: str = typer.Option("0.7,0.15,0.15", "--fractions", help="train,dev,test split fractions."),
             limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions of the split."),
             model: Optional[str] = typer.Option(None, "--model", help="Dense/hybrid encoder: a sentence-"
                                                 "transformers name or folder (default: bundled all-MiniLM-L6-v2)."),
             no_cache: bool = typer.Option(False, "--no-cache", help="Rebuild the index; do not read or write "
                                           "the index cache."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.")) -> None:
    """Print supporting-passage recall@k and precision@k (overall and by hop count and type) and queries/s."""
    import time

    from rag_dpo.data import load_dataset, split_questions
    from rag_dpo.errors import InputError
    from rag_dpo.retrieval import RETRIEVERS, build_retriever, evaluate_retrieval

    if ":" not in retriever and retriever not in RETRIEVERS:
        raise InputError(f"unknown retriever {retriever!r}; choose from {RETRIEVER_NAMES}", field="retriever")
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}", field="k")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}", field="limit")
    dataset = load_dataset(path, format=format, corpus=corpus)
    if dataset.corpus is None:
        raise InputError("this file has no passages to search; pass --corpus", file=str(path), field="corpus")
    questions = split_questions(dataset.questions, split, fractions)[:limit]
    if not questions:
        raise InputError(f"no questions in split '{split}'", file=str(path), field="split")
    from rag_dpo.data import check_not_trained_on
    from rag_dpo.retrieval import retriever_manifest
    check_not_trained_on(retriever_manifest(retriever), [q.id for q in questions])   # dense:PATH / rerank:PATH
    opts = {"cache": not no_cache}
    if model is not None:
        if retriever not in ("dense", "hybrid"):
            raise InputError(f"--model applies to dense and hybrid, not {retriever!r}", field="model")
        opts["model"] = model
    start = time.perf_counter()
    index = build_retriever(retriever, dataset.corpus, **opts)
    build_seconds = time.perf_counter() - start
    result = evaluate_retrieval(questions, index, k, batch_size=256, show_progress=not as_json)
    result.pop("rows")
    result.update({"path": str(path), "split": split, "corpus_passages": len(dataset.corpus),
                   "build_seconds": build_seconds, "index_from_cache": index.from_cache})
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    _print_tables(result)


def _print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    k = r["k"]
    console = Console()
    head = Table(title=f"{r['retriever']} on {r['path']} ({r['split']})", show_header=False)
    head.add_column("what", style="bold")
    head.add_column("value")
    head.add_row("questions", f"{r['questions']}" + (f" ({r['without_support']} without supporting passages, "
                                                      "not scored)" if r["without_support"] else ""))
    head.add_row("corpus", f"{r['corpus_passages']} passages")
    head.add_row(f"recall@{k}", f"{r['recall']:.4f}")
    head.add_row(f"precision@{k}", f"{r['precision']:.4f}")
    head.add_row(f"all supporting found@{k}", f"{r['all_found']:.4f}")
    head.add_row("queries/s", f"{r['queries_per_s']:.1f}")
    head.add_row("index build", f"{r['build_seconds']:.2f} s" + (" (from cache)" if r["index_from_cache"] else ""))
    console.print(head)
    for key in ("hops", "type"):
        groups = r[f"by_{key}"]
        table = Table(title=f"by {key}")
        for col in (key, "questions", f"recall@{k}", f"precision@{k}", "all found"):
            table.add_column(col)
        for value, m in groups.items():
            table.add_row(value, str(m["n"]), f"{m['recall']:.4f}", f"{m['precision']:.4f}", f"{m['all_found']:.4f}")
        console.print(table)
