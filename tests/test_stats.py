"""Bootstrap intervals, the paired test and the budget checks used by `rag-dpo compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag_dpo.errors import InputError
from rag_dpo.eval.stats import (bootstrap_ci, budget_mismatches, nested_subsets, paired_bootstrap, read_budget,
                                seed_means)


def test_ci_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = rng.binomial(1, 0.4, size=30)
    big = rng.binomial(1, 0.4, size=600)
    m, lo, hi = bootstrap_ci(small, n_boot=1000, seed=0)
    assert lo <= m <= hi and lo < hi
    assert m == pytest.approx(small.mean())
    mb, lob, hib = bootstrap_ci(big, n_boot=1000, seed=0)
    assert lob <= mb <= hib
    assert (hib - lob) < (hi - lo) / 2          # ~sqrt(20) narrower
    assert lob < 0.4 < hib


def test_ci_is_deterministic_with_a_seed():
    x = np.random.default_rng(2).random(50)
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(x, seed=7)
    assert bootstrap_ci(x, seed=7) != bootstrap_ci(x, seed=8)


def test_seed_level_spread_widens_the_interval():
    rng = np.random.default_rng(3)
    q = rng.random(80)
    same = np.stack([q, q, q])                         # three identical training runs
    spread = np.stack([q - 0.2, q, q + 0.2])           # three runs that disagree a lot
    _, lo1, hi1 = bootstrap_ci(same, seed=0)
    m2, lo2, hi2 = bootstrap_ci(spread, seed=0)
    assert m2 == pytest.approx(q.mean())
    assert (hi2 - lo2) > 1.5 * (hi1 - lo1)
    assert seed_means(spread) == pytest.approx([q.mean() - 0.2, q.mean(), q.mean() + 0.2])


def test_paired_test_detects_a_real_shift_but_not_a_null_one():
    rng = np.random.default_rng(4)
    base = rng.random(200)
    shifted = base + 0.05 + rng.normal(0, 0.05, size=200)
    res = paired_bootstrap(shifted, base, n_boot=2000, seed=0)
    assert res["diff"] == pytest.approx(np.mean(shifted - base))
    assert res["lo"] > 0 and res["p_value"] < 0.01
    null = base + rng.normal(0, 0.05, size=200)
    res0 = paired_bootstrap(null, base, n_boot=2000, seed=0)
    assert res0["lo"] < 0 < res0["hi"] and res0["p_value"] > 0.05
    assert paired_bootstrap(null, base, seed=3) == paired_bootstrap(null, base, seed=3)


def test_paired_test_with_seeds_and_degenerate_inputs():
    a = np.ones((3, 10))
    assert paired_bootstrap(a, a)["p_value"] == 1.0
    assert paired_bootstrap(a, np.zeros((3, 10)))["diff"] == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(5), np.ones(6))


def test_budget_checks(tmp_path):
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "budget.json").write_text(json.dumps({"questions": 10, "rollouts": 40,
                                                               "generated_tokens": 5000}))
    assert read_budget(tmp_path / "step")["rollouts"] == 40
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "budget.json").write_text(json.dumps({"questions": 10, "rollouts": "x"}))
    with pytest.raises(InputError, match="rollouts"):
        read_budget(tmp_path / "bad")
    with pytest.raises(InputError, match="budget.json"):
        read_budget(tmp_path / "missing")

    same = {"step": {"questions": 10, "rollouts": 40, "generated_tokens": 5000},
            "outcome": {"questions": 10, "rollouts": 40, "generated_tokens": 5000}}
    assert budget_mismatches(same) == []
    off = dict(same, ppo={"questions": 10, "rollouts": 40, "generated_tokens": 5200})
    assert any("generated_tokens" in p for p in budget_mismatches(off))
    assert budget_mismatches(off, rel_tol=0.05) == []
    assert "not recorded" in budget_mismatches({"a": {"questions": 1}}, keys=["rollouts"])[0]


def test_nested_subsets_for_the_budget_curve():
    ids = [f"q{i}" for i in range(20)]
    subs = nested_subsets(ids, [0.25, 0.5, 1.0], seed=0)
    assert [len(subs[f]) for f in (0.25, 0.5, 1.0)] == [5, 10, 20]
    assert set(subs[0.25]) <= set(subs[0.5]) <= set(subs[1.0])
    assert nested_subsets(ids, [0.25], seed=0) == {0.25: subs[0.25]}
    with pytest.raises(InputError):
        nested_subsets(ids, [0.0])
