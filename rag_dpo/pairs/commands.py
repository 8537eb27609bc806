"""`rag-dpo pairs`: labelled chains -> a TRL-format dataset folder (step, outcome, sft or stepwise)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("pairs")(pairs)


def pairs(labels: Path = typer.Option(..., "--labels", help="Labelled chains JSONL (from `rag-dpo annotate`)."),
          kind: str = typer.Option(..., "--kind", help="step, outcome, sft or stepwise."),
          out: Path = typer.Option(..., "--out", help="Dataset folder (datasets.save_to_disk) to write."),
          rule: str = typer.Option("best-vs-worst", "--rule", help="best-vs-worst, all-margin or same-action."),
          margin: float = typer.Option(0.1, "--margin", help="Minimum value difference chosen - rejected."),
          annotator: Optional[str] = typer.Option(None, "--annotator", help="Whose labels (default: the only one)."),
          no_dedup: bool = typer.Option(False, "--no-dedup", help="Also pair near-duplicate steps."),
          right_threshold: float = typer.Option(0.5, "--right-threshold",
                                                help="outcome/sft chain: a path is right when F1 >= this."),
          max_pairs_per_question: int = typer.Option(4, "--max-pairs-per-question", help="outcome all-margin cap."),
          level: str = typer.Option("step", "--level", help="sft: step (chosen steps) or chain (right paths)."),
          tokenizer: str = typer.Option("smollm2", "--tokenizer", help="Tokenizer whose chat template renders "
                                        "prompts (policy spec or folder).")) -> None:
    """Build preference pairs / SFT rows / stepwise rows, with budget.json and question_ids.json."""
    from rag_dpo.agent.policy import load_tokenizer
    from rag_dpo.pairs.builders import PairConfig, build_dataset
    cfg = PairConfig(annotator=annotator, rule=rule, margin=margin, dedup=not no_dedup,
                     right_threshold=right_threshold, max_pairs_per_question=max_pairs_per_question, level=level)
    path = build_dataset(labels, kind, out, load_tokenizer(tokenizer), cfg)
    print(json.dumps(json.loads((path / "budget.json").read_text()), indent=2))
    print(f"wrote {path}")
