"""`rag-dpo push RUN_DIR --repo-id NAME [--private] [--merged]`: upload a trained policy (its LoRA adapter, or the
adapter merged into its base as a full model) or a pair / SFT dataset folder to the Hugging Face hub.

Design decisions:
- `huggingface_hub` does the work (`HfApi.create_repo` + `upload_folder`); we only pick the folder, make sure it
  carries its card (`rag_dpo.cards`, rebuilt with the run's recipe, data hashes and eval table when RUN_DIR is a run
  folder) and say in one line why a push cannot happen: no token, offline mode, a hub that does not answer, or a
  refusal (the CLI turns each into `error: ...` and exit code 2, never a traceback).
- What goes up is the folder minus what is only useful locally: trainer checkpoints (optimizer states, GBs),
  eval output folders, lock and temp files. A merged upload is built in a temporary folder, never in the run.
- This module runs after every stage (it may load a policy to merge it); no stage imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rag_dpo.errors import InputError

# `dpo/` is the first stage of a DPO run with a score stage (train_dpo + self_eval.train_score_stage): the policy
# is the folder itself, the stage before it is not shared
IGNORE = ["checkpoints/*", "checkpoints/**", "eval/*", "eval/**", "dpo/*", "dpo/**", "*.lock", ".*", "**/.*", "*.tmp",
          "*.building/**"]
# side files of a trained folder copied next to merged weights (what the card refers to)
SIDE_FILES = ("training_manifest.json", "train_log.json", "train_log.jsonl", "train_curves.png", "train_done.json",
              "budget.json", "warm_start.json")


@dataclass
class PushPlan:
    folder: Path                  # the folder whose contents are uploaded (a temp folder for --merged)
    kind: str                     # adapter | model | dataset
    repo_type: str                # model | dataset
    run_dir: Path | None = None   # the run folder RUN_DIR named, when it was one
    files: list[str] = field(default_factory=list)


def classify(path: str | Path) -> tuple[Path, str, Path | None]:
    """(folder to push, adapter|model|dataset, run folder or None) for RUN_DIR: a run folder (pushes its
    `trained/`), a trained policy folder, or a dataset folder written by rag_dpo.pairs."""
    p = Path(path)
    if not p.is_dir():
        raise InputError("no such folder", file=str(path))
    run_dir = None
    if (p / "recipe.yaml").exists() and (p / "trained").is_dir():
        run_dir, p = p, p / "trained"
    if (p / "adapter_config.json").exists():
        return p, "adapter", run_dir
    if (p / "config.json").exists() and any(p.glob("*.safetensors")):
        return p, "model", run_dir
    if (p / "dataset_info.json").exists() and (p / "state.json").exists():
        return p, "dataset", run_dir
    raise InputError("not a run folder, trained policy (adapter_config.json, or config.json + safetensors) or "
                     "saved dataset (dataset_info.json + state.json)", file=str(p))


def hub_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN or `hf auth login`), or one clear InputError."""
    from huggingface_hub import constants, get_token
    if constants.HF_HUB_OFFLINE:
        raise InputError("HF_HUB_OFFLINE is set, so the hub cannot be reached; unset it to push", field="token")
    token = get_token()
    if not token:
        raise InputError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)",
                         field="token")
    return token


def _refresh_card(folder: Path, kind: str, run_dir: Path | None) -> None:
    from rag_dpo.cards import write_dataset_card, write_model_card
    if kind == "dataset":
        if not (folder / "README.md").exists():
            write_dataset_card(folder)
    elif run_dir is not None or not (folder / "README.md").exists():
        write_model_card(folder, run_dir=run_dir, name="trained" if run_dir is not None else None)


def merged_folder(adapter_dir: Path, out: Path, run_dir: Path | None = None) -> Path:
    """The adapter merged into its base, saved as a full model + tokenizer + side files + a card saying so."""
    from rag_dpo.agent.policy import load_policy
    from rag_dpo.cards import model_card
    from rag_dpo.io import atomic_write_text
    model, tok = load_policy(str(adapter_dir), merge_adapter=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in SIDE_FILES:
        if (adapter_dir / name).exists():
            shutil.copy2(adapter_dir / name, out / name)
    atomic_write_text(out / "README.md", str(model_card(adapter_dir, run_dir=run_dir,
                                                         name="trained" if run_dir else None, merged=True)))
    return out


def upload_files(folder: Path) -> list[str]:
    """The relative paths `upload_folder` will send with IGNORE (for the summary line and the tests)."""
    from huggingface_hub.utils import filter_repo_objects
    paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=IGNORE))


def push(path: str | Path, repo_id: str, private: bool = False, merged: bool = False,
         endpoint: str | None = None, commit_message: str | None = None) -> dict:
    """Create `repo_id` (if missing) and upload the policy or dataset in `path`. Returns {"url", "repo_type",
    "kind", "files"}. Every failure is an InputError with one line."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder, kind, run_dir = classify(path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(str(e).splitlines()[0], field="repo-id") from None
    if merged and kind == "dataset":
        raise InputError("--merged is for a trained adapter, not a dataset", file=str(folder), field="merged")
    token = hub_token()
    repo_type = "dataset" if kind == "dataset" else "model"
    _refresh_card(folder, kind, run_dir)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    with tempfile.TemporaryDirectory(prefix="rag_dpo_push_") as tmp:
        if merged and kind == "adapter":
            folder, kind = merged_folder(folder, Path(tmp), run_dir), "merged"
        files = upload_files(folder)
        message = commit_message or f"rag_dpo: upload {kind} from {Path(path).name}"
        try:
            api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type,
                                     ignore_patterns=IGNORE, commit_message=message)
        except InputError:
            raise
        except Exception as e:   # connection refused, timeouts, 401/403/404 from the hub: one line, exit 2
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"push to {where} failed ({type(e).__name__}): {first}", field="repo-id") from None
    url = getattr(info, "commit_url", None) or f"{where}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    return {"url": url, "repo_type": repo_type, "kind": kind, "files": files}
