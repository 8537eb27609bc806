"""On-disk index cache: one folder per (corpus fingerprint, retriever, settings), written atomically.

Indexes live under `cache_dir("indexes")/<retriever>-<key>/`, where key hashes the corpus content and every setting
the index depends on, so a changed corpus or setting builds a new index instead of reusing a stale one. Only safe
formats are written: JSON and `.npy` arrays loaded with `allow_pickle=False` — a cache folder can be shared or
copied without the risk of executing code on load. A folder is built under a temporary name and renamed into place,
so a killed build leaves no half-written index; two processes racing keep whichever finished first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from rag_dpo.io import atomic_write_json, stable_hash
from rag_dpo.paths import cache_dir
from rag_dpo.records import Corpus

META = "meta.json"


def index_dir(corpus: Corpus, retriever: str, settings: dict) -> Path:
    """The cache folder for this corpus + retriever + settings (it may not exist yet)."""
    key = stable_hash({"corpus": corpus.fingerprint(), "retriever": retriever, "settings": settings})
    return cache_dir("indexes") / f"{retriever}-{key}"


def is_built(path: Path) -> bool:
    return (path / META).is_file()


def write_index(path: Path, write: Callable[[Path], None], meta: dict) -> None:
    """Call write(tmp_folder) and move the folder to `path` in one rename; META is written last inside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        atomic_write_json(tmp / META, meta)
        try:
            os.replace(tmp, path)
        except OSError:
            if not is_built(path):       # the target exists but is not a finished index: replace it
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text(encoding="utf-8"))
