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


YES_NO = frozenset({"yes", "no"})
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def answer_seen(texts: Iterable[str], golds: Sequence[str]) -> float | None:
    """1.0 when a gold answer appears (normalised, as whole tokens) in the text the agent read (its observations,
    passages as cut to the token budget), else 0.0; None when every gold answer is yes/no, which no passage states.
    Separates "retrieval never showed the answer" from "the answer was shown and not written"."""
    gold = [g for g in golds if normalize_answer(g) and normalize_answer(g) not in YES_NO]
    if not gold:
        return None
    text = " ".join(texts)
    # cover-EM of the text read: as normalised (punctuation dropped: "O'Brien" -> "obrien") and with punctuation as
    # spaces, so tags and list marks never glue a word to its neighbour ("in Paris</information>" -> "paris information")
    return max(cover_exact_match(text, gold), cover_exact_match(text.translate(_PUNCT_TO_SPACE), gold))


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


def average(rows: Sequence[dict], metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Mean of each metric over rows, plus "n". Metrics default to the float-valued fields of the first row
    (scores are floats; grouping fields such as hop counts are ints or strings)."""
    if metrics is None:
        metrics = [k for k, v in rows[0].items() if type(v) is float] if rows else []
    out: dict[str, float] = {"n": len(rows)}
    for m in metrics:
        out[m] = sum(float(r[m]) for r in rows) / len(rows) if rows else 0.0
    return out


def _group_order(value) -> tuple:
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def breakdown(rows: Sequence[dict], key: str, metrics: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """`average` per value of row[key] (e.g. "hops" or "type"), keyed by the value as a string ("unknown" for a
    missing or None value), numbers first in numeric order, then names, then "unknown"."""
    if metrics is None and rows:
        metrics = [k for k, v in rows[0].items() if type(v) is float and k != key]
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get(key), []).append(r)
    return {("unknown" if v is None else str(v)): average(groups[v], metrics)
            for v in sorted(groups, key=_group_order)}


def auroc(scores: Sequence[float], good: Sequence[bool]) -> float | None:
    """The chance that a good item scores above a bad one (ties count half): discrimination apart from
    calibration; None without both kinds. Used for the self-score against step labels and for write-back judges."""
    pos = [float(s) for s, g in zip(scores, good) if g]
    neg = [float(s) for s, g in zip(scores, good) if not g]
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def stratified_auroc(scores: Sequence[float], good: Sequence[bool], strata: Sequence) -> float | None:
    """AUROC over the (good, bad) pairs that share a stratum only: what a score ranks apart from which stratum an
    item is in (e.g. a step's position and action, whose base rates differ). None without such a pair."""
    wins = total = 0.0
    for key in set(strata):
        idx = [i for i, k in enumerate(strata) if k == key]
        within = auroc([scores[i] for i in idx], [good[i] for i in idx])   # None without both kinds
        if within is not None:
            pairs = sum(bool(good[i]) for i in idx) * sum(not good[i] for i in idx)
            wins, total = wins + within * pairs, total + pairs
    return wins / total if total else None
