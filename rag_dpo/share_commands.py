"""`rag-dpo push` (rag_dpo.hub) and `rag-dpo dashboard` (rag_dpo.dashboard): sharing what the pipeline made.
Neither is a stage: they read run folders and wandb runs after every stage has written them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("push")(push_cmd)
    app.command("dashboard")(dashboard_cmd)


def push_cmd(run_dir: Path = typer.Argument(..., help="A run folder (pushes its trained/ policy), a trained policy "
                                            "folder, or a pairs / SFT dataset folder."),
             repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, e.g. your-name/smollm2-step-dpo."),
             private: bool = typer.Option(False, "--private", help="Create the repository private."),
             merged: bool = typer.Option(False, "--merged", help="Upload the LoRA adapter merged into its base as "
                                         "a full model (default: the adapter alone)."),
             message: Optional[str] = typer.Option(None, "--message", help="Commit message.")) -> None:
    """Upload a trained policy (adapter or merged) or a dataset folder with its card to the Hugging Face hub.
    Needs a token (`hf auth login` or HF_TOKEN); HF_ENDPOINT selects another hub."""
    from rag_dpo.hub import push
    res = push(run_dir, repo_id, private=private, merged=merged, commit_message=message)
    print(f"pushed {res['kind']} ({len(res['files'])} files) to {res['repo_type']} repo {repo_id}: {res['url']}")


def dashboard_cmd(project: str = typer.Option(..., "--project", help="wandb project the runs log to (rag_dpo "
                                              "by default, WANDB_PROJECT)."),
                  entity: Optional[str] = typer.Option(None, "--entity", help="wandb user or team."),
                  group: Optional[str] = typer.Option(None, "--group", help="Only runs of this wandb group (a "
                                                      "compare's name, a recipe's group)."),
                  out: Optional[Path] = typer.Option(None, "--out", help="Spec file (default "
                                                     "runs/dashboard/<project>.json)."),
                  save: bool = typer.Option(False, "--save", help="Also save the workspace to wandb (online, "
                                            "logged in, runs synced)."),
                  name: str = typer.Option("rag_dpo comparison", "--name", help="Workspace name.")) -> None:
    """Build the wandb workspace for the comparison: scores by arm with the warm start alongside, training loss and
    chosen/rejected log-probs, PPO reward and KL, the chains tables. Offline it writes the spec and says how to
    apply it after `wandb sync`."""
    from rag_dpo.dashboard import apply_instructions, dashboard
    res = dashboard(project, entity=entity, out=out, save=save, group=group, name=name)
    if res["url"]:
        print(f"workspace saved ({res['panels']} panels): {res['url']}\nspec: {res['spec']}")
    else:
        print(apply_instructions(project, entity, res["spec"], group))
