"""`rag-dpo writeback-stream`: the verified write-back experiment on a MuSiQue question stream (docs/variants.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("writeback-stream")(writeback_stream_cmd)


def writeback_stream_cmd(
        data: Path = typer.Option(Path("data/musique/hipporag_musique_train_100.json"), "--data",
                                  help="MuSiQue file with question_decomposition."),
        policy: str = typer.Option("smollm2", "--policy", help="smollm2 (bundled), HF name/folder or checkpoint."),
        limit: Optional[int] = typer.Option(30, "--limit", help="First N answerable composed questions."),
        out: Path = typer.Option(Path("runs/writeback"), "--out", help="Output folder (rerun to resume)."),
        retriever: str = typer.Option("bm25", "--retriever", help="bm25, bm25s, dense or hybrid."),
        judge: str = typer.Option("policy+overlap", "--judge", help="Entailment judge: policy (P(yes) of the "
                                  "policy), reader (the policy's answer from the cited passages alone agrees), "
                                  "overlap (answer words in the cited passages), or two joined by + (both)."),
        modes: str = typer.Option("none,checked,unchecked", "--modes", help="Comma-separated: none, checked, "
                                  "unchecked."),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        dtype: str = typer.Option("float32", "--dtype", help="Policy weights."),
        overrides: List[str] = typer.Argument(None, help="WritebackConfig overrides (checks=[attribution,novelty] "
                                              "entail_threshold=0.5 novelty_threshold=0.6 cite_k=1) and rollout.KEY=V "
                                              "for RolloutConfig fields.")) -> None:
    """Answer each question's sub-questions (writing verified answers back), then the question; writes
    results.json, results.md, results.png and the chains, candidates and overlay per mode into --out."""
    from rag_dpo.agent.rollout import RolloutConfig
    from rag_dpo.config import load_config
    from rag_dpo.eval.writeback_stream import writeback_stream
    from rag_dpo.retrieval.writeback import WritebackConfig

    overrides = list(overrides or [])
    rollout = load_config(RolloutConfig, None, [o[len("rollout."):] for o in overrides if o.startswith("rollout.")])
    cfg = load_config(WritebackConfig, None, [o for o in overrides if not o.startswith("rollout.")])
    writeback_stream(data, policy=policy, limit=limit, out_dir=out, retriever=retriever, judge=judge, modes=modes,
                     cfg=cfg, rollout=rollout, device=device, dtype=dtype)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
