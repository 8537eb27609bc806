"""`rag-dpo compare RECIPE [--quick] [key=value ...]`: the step-level vs outcome-only comparison
(`pipeline.compare.run_compare` with the real pipeline backend)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("compare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def compare(ctx: typer.Context,
                recipe: Path = typer.Argument(..., help="compare recipe YAML (recipes/compare.yaml)"),
                quick: bool = typer.Option(False, "--quick", help="smoke run: the recipe's quick_* overrides"),
                report_only: bool = typer.Option(False, "--report-only",
                                                 help="rebuild the report from the finished runs; train nothing"),
                ) -> None:
        """Train the recipe's arms (SFT, outcome/step-DPO, outcome/process-PPO) from one shared warm start, each seed
        on its own step pool (tree search) and token-matched i.i.d. outcome pool, evaluate them with the baselines,
        and write results/<name>.md, results/<name>.json and plots (docs/comparison.md).
        Extra `key=value` arguments override the compare recipe (e.g. `seeds=[0]`). Rerun to resume."""
        from rag_dpo.pipeline.compare import PipelineBackend, load_compare_config, run_compare
        cfg = load_compare_config(recipe, list(ctx.args), quick=quick)
        data = run_compare(cfg, PipelineBackend(cfg), report_only=report_only)
        typer.echo(Path(data["report"]["report"]).read_text(encoding="utf-8"))
        typer.echo(f"report: {data['report']['report']}")
