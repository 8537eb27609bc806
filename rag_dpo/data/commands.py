"""`rag-dpo data`: load a question file (and optionally a corpus) and print what is in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("data")(data)


def data(path: Path = typer.Argument(..., help="Question file (.json, .jsonl or .csv) in any supported format."),
         corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus file to use instead of the union of "
                                               "the file's context paragraphs ({id,title,text} jsonl/json, "
                                               "FlashRAG {id,contents}, or HippoRAG title -> sentences)."),
         format: Optional[str] = typer.Option(None, "--format", help="Override format detection: hotpotqa, "
                                              "2wikimultihopqa, musique, ircot, flashrag, bamboogle, bamboogle_csv."),
         fractions: str = typer.Option("0.7,0.15,0.15", "--fractions", help="train,dev,test split fractions."),
         allow_unresolved: bool = typer.Option(False, "--allow-unresolved", help="Count supporting ids missing "
                                               "from --corpus instead of failing on the first one."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """Counts, answerable questions, hop/type distribution, corpus size, split sizes and how many supporting
    passage ids resolve in the corpus."""
    from rag_dpo.data.summary import describe_dataset

    info = describe_dataset(path, corpus=corpus, format=format, fractions=fractions, strict=not allow_unresolved)
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info['path']} ({info['format']})", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("questions", str(info["questions"]))
    table.add_row("answerable", f"{info['answerable']} ({info['unanswerable']} unanswerable)")
    table.add_row("hops", ", ".join(f"{k}: {v}" for k, v in info["hops"].items()))
    table.add_row("types", ", ".join(f"{k}: {v}" for k, v in info["types"].items()))
    table.add_row("corpus", f"{info['corpus']['passages']} passages"
                  + (f" ({info['corpus']['source']})" if info["corpus"]["source"] else " (none)"))
    fr = info["fractions"]
    table.add_row("splits", ", ".join(f"{k} {v} ({fr[k]:g})" for k, v in info["splits"].items()))
    sup = info["supporting_ids"]
    table.add_row("supporting ids resolved", f"{sup['resolved']} / {sup['total']} "
                  f"({info['with_supporting']} questions have supporting passages)")
    Console().print(table)
