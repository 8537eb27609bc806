"""Training manifests: which questions a model was trained on, so evaluation can refuse them.

Every trainer writes `training_manifest.json` into its output folder (`write_manifest(out_dir, ids, ...)`). It
lists the question ids the model saw (including those of the model it started from, via `inherit_from`), the
data file(s) and their sha256, and the split fractions used. `check_not_trained_on(model_dir_or_manifest, ids)`
raises an InputError naming the overlap; a model folder with no manifest (a base model) passes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from rag_dpo.errors import InputError
from rag_dpo.io import atomic_write_json, file_sha256, read_json_object

MANIFEST_NAME = "training_manifest.json"
MANIFEST_VERSION = 1


@dataclass
class TrainingManifest:
    question_ids: list[str]                                   # every question the model was trained on
    data_files: list[dict] = field(default_factory=list)      # [{path, sha256}] of the data the ids come from
    fractions: dict[str, float] | None = None                 # split fractions used to pick the training ids
    inherited_from: list[str] = field(default_factory=list)   # manifests whose ids were merged in
    created: str = ""
    info: dict = field(default_factory=dict)                  # free-form: method, recipe, ...
    version: int = MANIFEST_VERSION


def manifest_path(path: str | Path) -> Path:
    """A manifest file, or the manifest inside a model folder."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() or path.suffix != ".json" else path


def read_manifest(path: str | Path) -> TrainingManifest:
    path = manifest_path(path)
    obj = read_json_object(path, missing="training manifest not found")
    if not isinstance(obj.get("question_ids"), list):
        raise InputError("expected an object with a list 'question_ids'", file=str(path), field="question_ids")
    if obj.get("version", MANIFEST_VERSION) != MANIFEST_VERSION:
        raise InputError(f"manifest version {obj.get('version')!r} is not supported", file=str(path),
                         field="version")
    known = set(TrainingManifest.__dataclass_fields__)
    unknown = set(obj) - known
    if unknown:
        raise InputError("unknown field", file=str(path), field=sorted(unknown)[0])
    obj["question_ids"] = [str(q) for q in obj["question_ids"]]
    return TrainingManifest(**obj)


def write_manifest(path: str | Path, question_ids: Iterable[str], data_files: Iterable[str | Path] = (),
                   fractions: dict[str, float] | None = None, inherit_from: Iterable[str | Path] = (),
                   info: dict | None = None) -> Path:
    """Write the manifest (atomically) to `path` (a .json file, or a model folder). Ids of the manifests in
    `inherit_from` (files or model folders; folders without one are skipped) are merged in, so a DPO model
    started from an SFT model also refuses the SFT model's questions."""
    ids = list(dict.fromkeys(str(q) for q in question_ids))
    inherited = []
    for base in inherit_from:
        mp = manifest_path(base)
        if mp.exists():
            ids.extend(read_manifest(mp).question_ids)
            inherited.append(str(mp))
    files = [{"path": str(p), "sha256": file_sha256(p)} for p in data_files]
    manifest = TrainingManifest(question_ids=list(dict.fromkeys(ids)), data_files=files, fractions=fractions,
                                inherited_from=inherited, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                info=dict(info or {}))
    out = manifest_path(path)
    atomic_write_json(out, asdict(manifest))
    return out


def check_not_trained_on(manifest: str | Path | Iterable[str] | TrainingManifest | None,
                         question_ids: Iterable[str]) -> None:
    """Raise InputError if any of `question_ids` is in the training manifest. `manifest` is a manifest file, a
    model folder (no manifest there = nothing to check), a TrainingManifest, or an iterable of trained ids."""
    file = None
    if manifest is None:
        return
    if isinstance(manifest, TrainingManifest):
        trained = set(manifest.question_ids)
    elif isinstance(manifest, (str, Path)):
        mp = manifest_path(manifest)
        if not mp.exists() and Path(manifest).is_dir():
            return
        trained, file = set(read_manifest(mp).question_ids), str(mp)
    else:
        trained = {str(q) for q in manifest}
    ids = [str(q) for q in question_ids]
    overlap = [q for q in ids if q in trained]
    if overlap:
        shown = ", ".join(overlap[:5]) + (", ..." if len(overlap) > 5 else "")
        raise InputError(f"{len(overlap)} of the {len(ids)} evaluation questions were used to train this model "
                         f"(first: {shown}); evaluate on another split", file=file, field="question_ids")
