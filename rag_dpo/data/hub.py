"""Hub sources: HotpotQA / 2WikiMultiHopQA / MuSiQue through `datasets.load_dataset`, when a hub is reachable.

The rows go through the same record converters as local files (hub rows use `{title: [...], sentences: [[...]]}`
for contexts, which the converters accept). `datasets.load_dataset("json", data_files=...)` uses the same path,
which is how this is tested offline. Nothing is downloaded at import time; the caller decides when to call this.
"""

from __future__ import annotations

from typing import Any

from rag_dpo.data.loaders import Dataset, dataset_from_rows
from rag_dpo.errors import InputError

# Known hub names -> our format name (any other name needs format= or is detected from its first row).
HUB_FORMATS = {
    "hotpotqa/hotpot_qa": "hotpotqa",
    "hotpot_qa": "hotpotqa",
    "framolfese/2WikiMultihopQA": "2wikimultihopqa",
    "xanhho/2WikiMultihopQA": "2wikimultihopqa",
    "dgslibisey/MuSiQue": "musique",
    "bdsaglam/musique": "musique",
    "RUC-NLPIR/FlashRAG_datasets": "flashrag",
}


def load_hub_dataset(name: str, config: str | None = None, split: str = "validation", format: str | None = None,
                     limit: int | None = None, **load_kwargs: Any) -> Dataset:
    """`datasets.load_dataset(name, config, split=split, **load_kwargs)` converted to a Dataset.

    For example `load_hub_dataset("hotpotqa/hotpot_qa", "distractor", "validation")`. Extra keyword arguments
    (data_files, cache_dir, revision, ...) go to `datasets.load_dataset`; remote code is never trusted."""
    import datasets

    load_kwargs.pop("trust_remote_code", None)
    try:
        rows = datasets.load_dataset(name, config, split=split, **load_kwargs)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise InputError(f"cannot load hub dataset ({type(e).__name__}: {e})", file=name, field="split") from None
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    source = f"{name}{'/' + config if config else ''}:{split}"
    return dataset_from_rows(rows, format=format or HUB_FORMATS.get(name), source=source)
