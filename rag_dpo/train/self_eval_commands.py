"""`rag-dpo self-eval-data` and `rag-dpo self-eval-calibration`: the dataset for SFT with self-evaluation, and the
calibration of a policy's self-scores against an annotator's labels (train/self_eval.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("self-eval-data")(self_eval_data_cmd)
    app.command("self-eval-calibration")(self_eval_calibration_cmd)


def self_eval_data_cmd(labels: Path = typer.Option(..., "--labels", help="Labelled chains (annotate output)."),
                       out: Path = typer.Option(..., "--out", help="Dataset folder to write."),
                       model: str = typer.Option("smollm2", "--model", help="Policy spec whose tokenizer renders "
                                                 "the prompts."),
                       annotator: Optional[str] = typer.Option(None, "--annotator", help="Whose labels (default: "
                                                               "the only one present)."),
                       margin: float = typer.Option(0.1, "--margin", help="Step pairs' minimum value gap (the "
                                                    "chosen steps are the answer targets)."),
                       score_only: Optional[int] = typer.Option(None, "--score-only-per-question",
                                                                help="At most this many self-evaluation-only "
                                                                "rows per question (default all)."),
                       seed: int = typer.Option(0, "--seed", help="Seed of that sample.")) -> None:
    """SFT rows with a `value` per completion: the chosen steps (answer targets) plus the other labelled steps as
    self-evaluation-only rows. Train with `trainer.self_eval: true`."""
    from rag_dpo.agent.policy import load_tokenizer
    from rag_dpo.pairs.builders import PairConfig
    from rag_dpo.train.self_eval import build_self_eval_sft
    path = build_self_eval_sft(labels, out, load_tokenizer(model), PairConfig(annotator=annotator, margin=margin),
                               annotator, score_only, seed)
    print(f"written: {path}")


def self_eval_calibration_cmd(policy: str = typer.Option(..., "--policy", help="Policy trained with "
                                                         "self-evaluation."),
                              labels: Path = typer.Option(..., "--labels", help="Labelled chains (held out from "
                                                          "its training)."),
                              out: Path = typer.Option(Path("runs/self_eval_calibration"), "--out"),
                              annotator: Optional[str] = typer.Option(None, "--annotator"),
                              limit: Optional[int] = typer.Option(None, "--limit", help="First N chains."),
                              prm: Optional[str] = typer.Option(None, "--prm", help="Also score the sibling "
                                                                "groups with this trained PRM folder."),
                              device: str = typer.Option("auto", "--device")) -> None:
    """Writes calibration.json (ECE, per-bin table, AUROC overall, by action and within slots of step position x
    action, best-of-group choice against random and the PRM) and reliability.png into --out."""
    from rag_dpo.train.self_eval import self_eval_calibration
    cal = self_eval_calibration(policy, labels, out, annotator=annotator, limit=limit, device=device, prm=prm)

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"
    print(f"ECE {cal['ece']:.3f}  MAE {cal['mae']:.3f}  AUROC {fmt(cal['auroc'])}  n {cal['n']}  (mean self-score "
          f"{cal['mean_score']:.3f}, mean label {cal['mean_label']:.3f})")
    slots = ", ".join(f"{k} {fmt(v['auroc'])} (n {v['n']}, label {v['mean_label']:.2f}, score {v['mean_score']:.2f})"
                      for k, v in cal["by_slot"].items())
    print(f"AUROC within slots (step position x action) {fmt(cal['auroc_within_slot'])}: {slots}")
    for name, g in cal["choice"].items():
        print(f"best-of-group by {name}: mean label of the pick {g['picked']:.3f} (random {g['random']:.3f}, best "
              f"{g['best']:.3f}) over {g['groups']} groups; AUROC within groups {fmt(g['auroc_within_group'])}")
    print(f"written: {out / 'calibration.json'}, {out / 'reliability.png'}")
