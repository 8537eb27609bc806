"""wandb in one place: offline by default (WANDB_MODE=offline unless the user set it), one project, runs grouped
by experiment so a dashboard compares trainers and reward types side by side. Every call degrades to a no-op if
wandb cannot start, because tracking must never stop a training run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "rag_dpo"


def init_run(name: str, config: dict | None = None, group: str | None = None, job_type: str | None = None,
             dir: str | Path | None = None, project: str | None = None, tags: list[str] | None = None):
    """Start a wandb run (offline unless WANDB_MODE says otherwise); returns the run or None. Under a multi-process
    launch only rank 0 starts one (the others get None, which every helper here ignores)."""
    from rag_dpo.distributed import is_main
    if not is_main():
        return None
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        return wandb.init(project=project or os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=name,
                          group=group, job_type=job_type, config=config or {}, dir=str(dir) if dir else None,
                          tags=tags, reinit="finish_previous")
    except Exception as e:  # tracking is best effort
        print(f"[rag_dpo] wandb disabled: {e}")
        return None


def log(run, data: dict[str, Any], step: int | None = None) -> None:
    if run is not None:
        try:
            run.log(data, step=step)
        except Exception as e:
            print(f"[rag_dpo] wandb log failed: {e}")


def log_table(run, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    if run is None:
        return
    try:
        import wandb
        run.log({key: wandb.Table(columns=columns, data=rows)})
    except Exception as e:
        print(f"[rag_dpo] wandb table failed: {e}")


def log_image(run, key: str, path: str | Path) -> None:
    if run is None:
        return
    try:
        import wandb
        run.log({key: wandb.Image(str(path))})
    except Exception as e:
        print(f"[rag_dpo] wandb image failed: {e}")


def finish(run) -> None:
    if run is not None:
        try:
            run.finish()
        except Exception:
            pass
