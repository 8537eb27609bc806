"""Answer and retrieval metrics (SQuAD/HotpotQA normalisation, max over aliases).

A shared helper rather than part of `eval`, because earlier stages need it too (annotators score answers by F1,
PPO rewards are F1/EM), and a stage may not import a later one."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (the SQuAD / HotpotQA evaluation rule)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _em(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    # HotpotQA rule: yes/no/noanswer must match exactly.
    if p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer"):
        if p != g:
            return 0.0
    pt, gt = p.split(), g.split()
    common = Counter(pt) & Counter(gt)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pt), same / len(gt)
    return 2 * precision * recall / (precision + recall)


def _cover(pred: str, gold: str) -> float:
    g = normalize_answer(gold)
    return float(bool(g) and f" {g} " in f" {normalize_answer(pred)} ")


def exact_match(pred: str | None, golds: Sequence[str]) -> float:
    return max((_em(pred, g) for g in golds), default=0.0) if pred is not None else 0.0


def f1_score(pred: str | None, golds: Sequence[str]) -> float:
    return max((_f1(pred, g) for g in golds), default=0.0) if pred is not None else 0.0


def cover_exact_match(pred: str | None, golds: Sequence[str]) -> float:
    """1 when a normalised gold answer appears as a whole-token span inside the normalised prediction."""
    return max((_cover(pred, g) for g in golds), default=0.0) if pred is not None else 0.0


def answer_scores(pred: str | None, golds: Sequence[str]) -> dict[str, float]:
    return {"em": exact_match(pred, golds), "f1": f1_score(pred, golds), "cover_em": cover_exact_match(pred, golds)}


def support_recall(retrieved: Iterable[str], supporting: Sequence[str], k: int | None = None) -> float:
    """Fraction of supporting passages among the (first k) retrieved ids; 1.0 when there is nothing to find."""
    retrieved = list(retrieved)[:k] if k is not None else list(retrieved)
    if not supporting:
        return 1.0
    got = set(retrieved)
    return sum(1 for s in set(supporting) if s in got) / len(set(supporting))


def support_precision(retrieved: Iterable[str], supporting: Sequence[str], k: int | None = None) -> float:
    retrieved = list(dict.fromkeys(list(retrieved)[:k] if k is not None else list(retrieved)))
    if not retrieved:
        return 0.0
    sup = set(supporting)
    return sum(1 for r in retrieved if r in sup) / len(retrieved)
