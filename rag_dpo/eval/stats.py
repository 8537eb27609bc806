"""Statistics for comparing trained policies: bootstrap confidence intervals, a paired bootstrap test, and the
budget checks that make a step-level vs outcome-level comparison fair. numpy only, no later stage.

Scores are per question. With several training seeds they form a (seeds x questions) matrix, and every arm is
evaluated on the *same* test questions. Aggregation over seeds (the choice, documented once here): a two-level
bootstrap. Each replicate resamples the questions (one shared draw for all seeds) and, independently, the seeds,
then takes the grand mean. So the interval covers both sources of noise a reader cares about — which questions
happened to be in the test split and which training run happened to come out — where averaging seeds first and
bootstrapping only questions would hide the run-to-run spread. With one seed it is the ordinary question
bootstrap. With few seeds (3) the seed part of the interval is crude; the report prints the per-seed means too.

The paired test compares two arms on the same questions (and, with seeds, the same seed indices): it resamples the
per-question differences, so question difficulty, which both arms share, cancels out. Next to each test the report
prints `min_detectable_effect` (what the test could have detected at 80 % power, from the observed discordance)
and, for every test but the one primary comparison, a Holm-corrected p (`holm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from rag_dpo.errors import InputError
from rag_dpo.io import read_json_object

BUDGET_KEYS = ("questions", "rollouts", "generated_tokens")


def _as_matrix(values) -> np.ndarray:
    """(questions,) or (seeds, questions) -> float (seeds, questions)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty (questions,) or (seeds, questions) array, got shape {arr.shape}")
    return arr


def _replicate_means(m: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Grand means of n_boot two-level resamples of a (seeds, questions) matrix (seeds resampled only if > 1)."""
    s, q = m.shape
    qi = rng.integers(0, q, size=(n_boot, q))
    si = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), dtype=int)
    # Mean over the question draw for every seed, then over the seed draw: (n_boot, s) -> (n_boot,).
    per_seed = np.stack([m[k][qi].mean(axis=1) for k in range(s)], axis=1)
    return np.take_along_axis(per_seed, si, axis=1).mean(axis=1)


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap (1 - alpha) interval of per-question scores: (mean, lo, hi).

    `values` is (questions,) or (seeds, questions); see the module docstring for how seeds are aggregated."""
    m = _as_matrix(values)
    mean = float(m.mean())
    if m.size == 1:
        return mean, mean, mean
    means = _replicate_means(m, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # Percentile intervals of a skewed statistic can miss the point estimate by rounding; keep it inside.
    return mean, float(min(lo, mean)), float(max(hi, mean))


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Paired bootstrap of mean(a) - mean(b) over the same questions (and seed indices).

    Returns {diff, lo, hi, p_value}: the observed difference, its (1 - alpha) interval, and a two-sided p-value
    (twice the share of replicates on the far side of zero, ties at zero split evenly, at least 1 / n_boot so it is
    never reported as 0)."""
    ma, mb = _as_matrix(a), _as_matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"paired test needs the same questions: {ma.shape[1]} vs {mb.shape[1]} scores")
    if ma.shape[0] == 1 or mb.shape[0] == 1:
        d = ma - mb                      # a deterministic baseline (one row) against every seed of an arm
    else:
        s = min(ma.shape[0], mb.shape[0])
        d = ma[:s] - mb[:s]              # callers align rows by seed; extra seeds of one arm are left out
    diff = float(d.mean())
    if np.all(d == d.flat[0]):
        return {"diff": diff, "lo": diff, "hi": diff, "p_value": 1.0 if diff == 0 else 1.0 / n_boot}
    means = _replicate_means(d, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    ties = 0.5 * float(np.mean(means == 0))      # replicates exactly at zero count half to each side
    p = 2 * min(float(np.mean(means < 0)) + ties, float(np.mean(means > 0)) + ties)
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_value": float(min(1.0, max(p, 1.0 / n_boot)))}


def min_detectable_effect(a, b, alpha: float = 0.05, power: float = 0.8) -> dict[str, float]:
    """The smallest true difference mean(a) - mean(b) a two-sided paired test at `alpha` detects with `power`,
    given the observed discordance between the two arms: what a "no significant difference" could have seen.

    For 0/1 scores (EM) on one seed, the paired differences are -1, 0 or +1 and their second moment is the
    discordant-question rate p (questions one arm got right and the other wrong). McNemar's power calculation
    (Connor 1987) then gives the detectable difference d on n questions from
        d * sqrt(n) = z_(1-alpha/2) * sqrt(p) + z_power * sqrt(p - d^2),
    solved here in closed form (the larger root of the squared equation). With several seeds, p is the second
    moment of each question's seed-averaged difference (averaging runs lowers it), n stays the number of
    questions. Returns {mde, discordant_rate, questions}; mde is nan when nothing was discordant (no estimate)."""
    from statistics import NormalDist
    ma, mb = _as_matrix(a), _as_matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"paired effect needs the same questions: {ma.shape[1]} vs {mb.shape[1]} scores")
    if ma.shape[0] == 1 or mb.shape[0] == 1:
        d = ma - mb
    else:
        s = min(ma.shape[0], mb.shape[0])
        d = ma[:s] - mb[:s]
    per_q = d.mean(axis=0)
    n = per_q.size
    p = float(np.mean(per_q ** 2))
    out = {"discordant_rate": p, "questions": float(n), "mde": float("nan")}
    za, zb = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    if p <= 0 or n <= za ** 2:
        return out
    # (n + zb^2) d^2 - 2 za sqrt(p n) d + (za^2 - zb^2) p = 0
    qa, qb, qc = n + zb ** 2, -2 * za * np.sqrt(p * n), (za ** 2 - zb ** 2) * p
    d_root = (-qb + np.sqrt(max(qb ** 2 - 4 * qa * qc, 0.0))) / (2 * qa)
    out["mde"] = float(min(d_root, np.sqrt(p)))
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the k-th smallest p is multiplied by (m - k + 1), then
    made monotone (never below an earlier adjusted p) and capped at 1. Controls the family-wise error rate."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = running
    return out


def seed_means(values) -> list[float]:
    """Mean score of each seed (row), printed next to the interval so a reader sees the run-to-run spread."""
    return [float(r.mean()) for r in _as_matrix(values)]


# ---- budgets ---------------------------------------------------------------------------------------------------

def read_budget(dataset_dir: str | Path) -> dict[str, float]:
    """The `budget.json` of a pair dataset folder (questions, rollouts, generated tokens), checked."""
    path = Path(dataset_dir) / "budget.json"
    data = read_json_object(path, missing="missing budget.json (every pair dataset records its budget)")
    for key in BUDGET_KEYS:
        if not isinstance(data.get(key), (int, float)) or isinstance(data.get(key), bool):
            raise InputError("missing or non-numeric budget entry", file=str(path), field=key)
    return data


def budget_mismatches(budgets: Mapping[str, Mapping[str, float]], keys: Sequence[str] = BUDGET_KEYS,
                      rel_tol: float = 0.0) -> list[str]:
    """Human-readable differences between arms' budgets; empty when every arm spent the same on every key.

    `rel_tol` allows a relative slack (e.g. 0.05 for generated tokens of an arm that samples its own rollouts,
    like PPO, which cannot stop at an exact token count)."""
    problems = []
    names = list(budgets)
    if not names:
        return problems
    for key in keys:
        vals = {n: budgets[n].get(key) for n in names}
        missing = [n for n, v in vals.items() if v is None]
        if missing:
            problems.append(f"{key}: not recorded for {', '.join(missing)}")
            continue
        ref = max(float(v) for v in vals.values())
        low = min(float(v) for v in vals.values())
        if ref - low > rel_tol * max(abs(ref), 1e-12):
            detail = ", ".join(f"{n}={vals[n]:g}" for n in names)
            problems.append(f"{key} differ: {detail}")
    return problems


def nested_subsets(ids: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[float, list[str]]:
    """Nested question subsets for a budget curve: the 1/4 subset lies inside the 1/2 subset inside all, so
    points on the curve differ only by the data added. Order is a seeded shuffle; each subset keeps >= 1 id."""
    ids = sorted(dict.fromkeys(ids))
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    out = {}
    for f in fractions:
        if not 0 < f <= 1:
            raise InputError(f"budget fraction must be in (0, 1], got {f}", field="budget_fractions")
        n = max(1, int(round(f * len(order))))
        out[float(f)] = sorted(order[:n])
    return out
