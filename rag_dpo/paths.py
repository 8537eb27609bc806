"""Where rag_dpo keeps things: the bundled data folder, the cache (converted models, indexes) and run folders.

RAG_DPO_CACHE overrides the cache location (default ~/.cache/rag_dpo)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
DEFAULT_DATA = DATA_DIR / "hotpotqa" / "ircot_hotpotqa_dev_subsampled_500.jsonl"


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("RAG_DPO_CACHE", Path.home() / ".cache" / "rag_dpo"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
