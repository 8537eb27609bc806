"""Bootstrap intervals, the paired test and the budget checks used by `rag-dpo compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag_dpo.errors import InputError
from rag_dpo.eval.stats import (bootstrap_ci, budget_mismatches, holm, min_detectable_effect, nested_subsets,
                                paired_bootstrap, read_budget, seed_means)


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
    # the constant-difference shortcut: no spread, so the interval is the point and p is 1 (no difference) or the
    # smallest p the replicates can show (every replicate on one side of zero)
    assert paired_bootstrap(a, a, n_boot=500) == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0}
    assert paired_bootstrap(a, np.zeros((3, 10)), n_boot=500) == {"diff": 1.0, "lo": 1.0, "hi": 1.0,
                                                                  "p_value": 1 / 500}
    shifted = paired_bootstrap(np.full((1, 10), 0.25), np.zeros((3, 10)), n_boot=400)   # one-row baseline
    assert shifted == {"diff": 0.25, "lo": 0.25, "hi": 0.25, "p_value": 1 / 400}
    # the shortcut agrees with what the bootstrap itself gives for a near-constant difference
    tiny = np.zeros((3, 10))
    tiny[0, 0] = 1e-9
    res = paired_bootstrap(np.ones((3, 10)) + tiny, np.zeros((3, 10)), n_boot=500)
    assert res["lo"] == pytest.approx(1.0) and res["hi"] == pytest.approx(1.0) and res["p_value"] == 1 / 500
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


def test_min_detectable_effect_matches_a_hand_computation():
    """100 questions, 10 right only for A, 5 right only for B: discordant rate p = 0.15. McNemar power (Connor):
    d * sqrt(n) = z_.975 sqrt(p) + z_.8 sqrt(p - d^2), z_.975 = 1.95996, z_.8 = 0.84162 -> d = 0.10723 (the
    cruder (z_.975 + z_.8) sqrt(p / n) = 0.10850)."""
    a = np.array([1] * 10 + [0] * 5 + [1] * 20 + [0] * 65)
    b = np.array([0] * 10 + [1] * 5 + [1] * 20 + [0] * 65)
    res = min_detectable_effect(a, b)
    assert res["discordant_rate"] == pytest.approx(0.15) and res["questions"] == 100
    assert res["mde"] == pytest.approx(0.10723, abs=5e-5)
    assert res["mde"] * 10 == pytest.approx(1.95996 * np.sqrt(0.15) + 0.84162 * np.sqrt(0.15 - res["mde"] ** 2),
                                            abs=1e-4)
    # 4x the questions at the same discordance: about half the detectable effect
    big = min_detectable_effect(np.tile(a, 4), np.tile(b, 4))["mde"]
    assert big == pytest.approx(res["mde"] / 2, rel=0.03)
    # seeds that disagree cancel per question: the seed-averaged second moment is lower, so is the MDE
    two = min_detectable_effect(np.stack([a, b]), np.stack([b, a]))
    assert two["discordant_rate"] == 0.0 and np.isnan(two["mde"])      # nothing discordant on average: no estimate
    assert np.isnan(min_detectable_effect(a, a)["mde"])


def test_holm_on_a_hand_built_list():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.02]) == [0.02] and holm([]) == []
