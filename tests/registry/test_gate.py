"""The paired gate's statistics against known values: seeded bootstrap interval, Wilcoxon p, the rules."""

import numpy as np
import pytest

from liverseg.core.errors import RegistryError
from liverseg.registry.gate import bootstrap_ci, decide, floor_only, needed_cases, paired_differences, wilcoxon_p

DIFFS = np.array([0.01, 0.02, -0.005, 0.03, 0.0, 0.015])  # per-case Dice, challenger - champion


def test_bootstrap_interval_is_seeded_and_exact():
    """PCG64 seeded 0, 10,000 resamples: the 2.5% and 97.5% quantiles of the resampled means are
    means of six of these values (multiples of 0.0025/3), the same on every machine."""
    low, high = bootstrap_ci(DIFFS, seed=0, resamples=10_000, confidence=0.95)
    assert low == pytest.approx(0.015 / 6, abs=1e-15) and high == pytest.approx(0.125 / 6, abs=1e-15)
    assert bootstrap_ci(DIFFS, 0, 10_000, 0.95) == (low, high)  # same seed, same numbers
    rng = np.random.default_rng(0)  # the definition, written out: resample cases, mean, percentiles
    means = DIFFS[rng.integers(0, 6, size=(10_000, 6))].mean(axis=1)
    assert (low, high) == tuple(np.quantile(means, [0.025, 0.975]))
    assert bootstrap_ci(np.full(13, 0.02), 7, 1000, 0.95) == pytest.approx((0.02, 0.02))  # no spread, no width
    low90, high90 = bootstrap_ci(np.array([0.01, -0.01, 0.02, -0.02, 0.005]), 0, 2000, 0.90)
    assert (low90, high90) == pytest.approx((-0.01, 0.011), abs=1e-15)


def test_wilcoxon_signed_rank_exact_p():
    """Zero differences are dropped (n=5); one negative of rank 1: W- = 1, exact two-sided p = 2 * 2/32."""
    assert wilcoxon_p(DIFFS) == pytest.approx(0.125)
    assert wilcoxon_p(np.full(13, 0.1)) == pytest.approx(2 / 2**13)
    assert wilcoxon_p(np.zeros(6)) == 1.0  # nothing differs: no evidence either way


def test_rules_decide_on_the_lower_bound():
    better = decide(DIFFS, "superior", 0.0)
    assert better.passed and better.n_cases == 6 and better.diff_mean == pytest.approx(0.07 / 6)
    assert better.why == (
        "rule superior: mean paired Dice difference +0.0117, 95% CI [+0.0025, +0.0208] over 6 cases; "
        "lower bound above +0.0000"
    )
    assert not decide(DIFFS, "superior", 0.005).passed  # better, but not by 0.005 beyond noise
    assert decide(DIFFS, "non-inferior", 0.01).passed
    assert not decide(DIFFS - 0.02, "non-inferior", 0.01).passed  # up to 0.0225 worse: more than 0.01
    tags = better.tags()
    assert tags["gate.rule"] == "superior" and tags["gate.n_cases"] == "6" and tags["gate.seed"] == "0"
    assert tags["gate.diff_ci_low"] == "0.002500" and tags["gate.p_value"] == "0.125000"


def test_the_same_model_is_never_better_than_itself():
    same = decide(np.zeros(13), "superior", 0.0)
    assert not same.passed and (same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 1.0)
    assert "95% CI [+0.0000, +0.0000] over 13 cases" in same.why and "\n" not in same.why


def test_bad_rules_and_cases_are_one_line_errors():
    with pytest.raises(RegistryError, match="rule 'best': unknown; valid rules: superior, non-inferior"):
        decide(DIFFS, "best", 0.0)
    with pytest.raises(RegistryError, match="non-inferior needs --margin M > 0"):
        decide(DIFFS, "non-inferior", 0.0)
    with pytest.raises(RegistryError, match="no test case with a defined Dice"):
        decide(np.array([]), "superior", 0.0)
    with pytest.raises(RegistryError, match="different cases"):
        paired_differences({"1": 0.9, "2": 0.8}, {"1": 0.9, "3": 0.7})


def test_pairs_leave_out_undefined_cases():
    diffs = paired_differences({"1": 0.9, "2": None, "3": 0.7}, {"1": 0.8, "2": 0.5, "3": float("nan")})
    assert diffs.tolist() == pytest.approx([0.1])


def test_floor_alone_without_a_champion():
    first = floor_only(0.93, 13, 0.9, 0, 10_000, 0.95)
    assert first.passed and first.rule == "floor" and first.tags()["gate.diff_mean"] == ""
    assert not floor_only(0.85, 13, 0.9, 0, 10_000, 0.95).passed


def test_cases_needed_for_an_improvement():
    """sd of DIFFS is 0.01254: a mean improvement of 0.01 needs (1.96 * 0.01254 / 0.01)^2 = 6.04 -> 7 cases."""
    assert needed_cases(DIFFS, 0.01) == 7
    assert needed_cases(np.full(5, 0.01), 0.01) is None
