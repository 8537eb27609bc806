"""Deterministic train/dev/test splits by a hash of the question id.

A question's split depends only on its id: the first 16 hex digits of sha256(id, UTF-8) read as a number in
[0, 1) are compared with the cumulative fractions (train first, then dev, then test). So the assignment is the
same on every machine and run, does not depend on file order or on which other questions are loaded, and a
question never moves between splits when a file grows. Default fractions: train 0.7, dev 0.15, test 0.15.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

from rag_dpo.errors import InputError
from rag_dpo.records import Question

SPLITS = ("train", "dev", "test")
DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.7, "dev": 0.15, "test": 0.15}


def parse_fractions(fractions: Mapping[str, float] | Sequence[float] | str | None) -> dict[str, float]:
    """Accept {'train': .7, 'dev': .15, 'test': .15}, (0.7, 0.15, 0.15) or "0.7,0.15,0.15"; they must be
    non-negative and sum to 1."""
    if fractions is None:
        return dict(DEFAULT_FRACTIONS)
    if isinstance(fractions, str):
        try:
            fractions = [float(x) for x in fractions.split(",")]
        except ValueError:
            raise InputError(f"expected three numbers like 0.7,0.15,0.15, got '{fractions}'",
                             field="fractions") from None
    if isinstance(fractions, Mapping):
        unknown = set(fractions) - set(SPLITS)
        if unknown:
            raise InputError(f"unknown split '{sorted(unknown)[0]}' (expected {', '.join(SPLITS)})",
                             field="fractions")
        out = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    else:
        values = list(fractions)
        if len(values) != 3:
            raise InputError(f"expected three fractions (train, dev, test), got {len(values)}", field="fractions")
        out = dict(zip(SPLITS, (float(v) for v in values)))
    if any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise InputError(f"fractions must be non-negative and sum to 1, got {out}", field="fractions")
    return out


def split_point(question_id: str) -> float:
    """The id's position in [0, 1): the first 64 bits of sha256(id)."""
    return int(hashlib.sha256(str(question_id).encode("utf-8")).hexdigest()[:16], 16) / 2.0 ** 64


def assign_split(question_id: str, fractions: Mapping[str, float] | Sequence[float] | None = None) -> str:
    """'train', 'dev' or 'test' for this id (see the module docstring)."""
    fr = parse_fractions(fractions)
    x, edge = split_point(question_id), 0.0
    for name in SPLITS:
        edge += fr[name]
        if x < edge:
            return name
    return next(name for name in reversed(SPLITS) if fr[name] > 0)


def split_questions(questions: list[Question], split: str,
                    fractions: Mapping[str, float] | Sequence[float] | None = None) -> list[Question]:
    """The questions of one split ('train', 'dev', 'test'), or all of them for 'all'; order kept."""
    if split == "all":
        return list(questions)
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}' (expected train, dev, test or all)", field="split")
    fr = parse_fractions(fractions)
    return [q for q in questions if assign_split(q.id, fr) == split]


def split_sizes(questions: list[Question], fractions=None) -> dict[str, int]:
    fr = parse_fractions(fractions)
    sizes = dict.fromkeys(SPLITS, 0)
    for q in questions:
        sizes[assign_split(q.id, fr)] += 1
    return sizes
