"""`rag-dpo rollout`: run the search agent over one split of a question file and append chains (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout)


def rollout(data: Path = typer.Option(..., "--data", help="Question file (any format `rag-dpo data` reads)."),
            out: Path = typer.Option(..., "--out", help="Chains JSONL (appended; rerun the command to resume)."),
            corpus: Optional[Path] = typer.Option(None, "--corpus", help="Corpus file (default: the union of the "
                                                  "file's own context paragraphs)."),
            policy: str = typer.Option("smollm2", "--policy", help="smollm2 (bundled), HF name/folder or adapter."),
            split: str = typer.Option("train", "--split", help="train, dev, test or all."),
            limit: Optional[int] = typer.Option(None, "--limit", help="First N questions of the split."),
            retriever: str = typer.Option("bm25", "--retriever", help="bm25, bm25s, dense or hybrid."),
            device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
            dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or auto (bf16 "
                                      "where the hardware has fast bf16)."),
            config: Optional[Path] = typer.Option(None, "--config", help="YAML with RolloutConfig fields."),
            overrides: List[str] = typer.Argument(None, help="RolloutConfig overrides key=value, e.g. "
                                                  "max_steps=4 do_sample=true temperature=0.8 batch_size=32.")
            ) -> None:
    """Roll the agent out on every question of the split (batched; progress bar with steps/s)."""
    from rag_dpo.agent.rollout import RolloutConfig, rollout_dataset
    from rag_dpo.config import load_config

    cfg = load_config(RolloutConfig, config, list(overrides or []))
    path = rollout_dataset(data, out, corpus_path=corpus, policy=policy, split=split, limit=limit,
                           retriever=retriever, cfg=cfg, device=device, dtype=dtype)
    print(f"chains: {path}")
