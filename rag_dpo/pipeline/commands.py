"""`rag-dpo train RECIPE [key=value ...]`: run a recipe end to end (pipeline.run.run_recipe). `rag-dpo compare`
lives in pipeline/compare_commands.py (cli.STAGE_COMMANDS registers it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train(ctx: typer.Context,
              recipe: Path = typer.Argument(..., help="recipe YAML (recipes/*.yaml)"),
              run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder (default runs/<recipe name>); "
                                                     "rerunning with the same folder resumes"),
              restart: bool = typer.Option(False, "--restart", help="delete the run folder's outputs and start over"),
              ) -> None:
        """Warm start -> rollouts -> step annotation -> pairs -> SFT/DPO/PPO/PRM -> eval, as the recipe says.
        Extra `key=value` arguments override recipe fields (e.g. trainer.learning_rate=5e-6)."""
        from rag_dpo.pipeline.recipe import load_recipe
        from rag_dpo.pipeline.run import run_recipe
        r = load_recipe(recipe, list(ctx.args))
        if r.method == "retriever":   # generator feedback trains the retriever (pipeline/retriever_run.py)
            from rag_dpo.pipeline.retriever_run import run_retriever_recipe
            run_retriever_recipe(r, run_dir or Path("runs") / r.name, restart=restart)
            return
        run_recipe(r, run_dir or Path("runs") / r.name, restart=restart)
