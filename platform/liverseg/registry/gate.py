"""The paired promotion gate: challenger and champion scored on the same test volumes, decided on the
per-case Dice differences (challenger - champion), not on two means.

- mean difference and its confidence interval by a seeded paired bootstrap (cases resampled with
  replacement, the same resample for both models; percentile interval);
- a two-sided Wilcoxon signed-rank p-value (scipy), for the record: it does not decide;
- rules: `superior` passes when the interval's lower bound is above `margin` (default 0: the challenger
  is better, beyond resampling noise); `non-inferior` passes when it is above `-margin` (a retrained
  refresh may be at most `margin` worse). With no champion the floor alone decides (rule `floor`).

Hand-written: neither MLflow nor scipy has a paired bootstrap decision rule; scipy.stats.bootstrap
would do the interval but draws differently per call and has no rule, so the few lines are kept here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from liverseg.core.errors import RegistryError
from liverseg.tracking import tags

RULES = ("superior", "non-inferior")


@dataclass
class GateResult:
    """The gate's decision and every number it rests on (tagged as `gate.*`)."""

    rule: str  # superior | non-inferior | floor (no champion)
    margin: float
    n_cases: int
    diff_mean: float | None  # None for the floor rule (nothing to pair with)
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    seed: int
    resamples: int
    confidence: float
    passed: bool
    why: str  # one line: the rule, the interval, the number of cases

    def tags(self) -> dict[str, str]:
        def num(x: float | None) -> str:
            return "" if x is None else f"{x:.6f}"

        return {
            tags.GATE_RULE: self.rule,
            tags.GATE_MARGIN: num(self.margin),
            tags.GATE_N_CASES: str(self.n_cases),
            tags.GATE_DIFF_MEAN: num(self.diff_mean),
            tags.GATE_DIFF_CI_LOW: num(self.ci_low),
            tags.GATE_DIFF_CI_HIGH: num(self.ci_high),
            tags.GATE_P_VALUE: num(self.p_value),
            tags.GATE_SEED: str(self.seed),
            tags.GATE_RESAMPLES: str(self.resamples),
            tags.GATE_CONFIDENCE: num(self.confidence),
        }


def paired_differences(challenger: dict[str, float | None], champion: dict[str, float | None]) -> np.ndarray:
    """Per-case Dice differences (challenger - champion), case order as the challenger's. Both must
    score the same cases; a case undefined for either (no liver in truth or prediction) is left out."""
    if set(challenger) != set(champion):
        only = sorted(set(challenger) ^ set(champion))
        raise RegistryError(f"the gate scored different cases for challenger and champion: {', '.join(only[:5])}")
    pairs = [(challenger[c], champion[c]) for c in challenger]
    return np.array([a - b for a, b in pairs if _defined(a) and _defined(b)], dtype=np.float64)


def _defined(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def bootstrap_ci(diffs: np.ndarray, seed: int, resamples: int, confidence: float) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` over `resamples` bootstrap resamples drawn with
    numpy's PCG64 seeded by `seed` (same seed, same numbers on every machine)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when no case differs (scipy's test is undefined then)."""
    from scipy.stats import wilcoxon

    if not np.any(diffs != 0):
        return 1.0
    return float(wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)


def decide(
    diffs: np.ndarray, rule: str, margin: float, seed: int = 0, resamples: int = 10_000, confidence: float = 0.95
) -> GateResult:
    """The paired decision on per-case differences (see the module docstring)."""
    if rule not in RULES:
        raise RegistryError(f"gate rule {rule!r}: unknown; valid rules: {', '.join(RULES)}")
    if rule == "non-inferior" and not margin > 0:
        raise RegistryError(f"--rule non-inferior needs --margin M > 0 (the largest acceptable loss), got {margin}")
    if len(diffs) == 0:
        raise RegistryError("the gate has no test case with a defined Dice for both models; nothing to compare")
    low, high = bootstrap_ci(diffs, seed, resamples, confidence)
    bound = margin if rule == "superior" else -margin
    passed = low > bound
    interval = f"{confidence:.0%} CI [{low:+.4f}, {high:+.4f}]"
    why = (
        f"rule {rule}: mean paired Dice difference {diffs.mean():+.4f}, {interval} over {len(diffs)} cases; "
        f"lower bound {'above' if passed else 'not above'} {bound:+.4f}"
    )
    return GateResult(
        rule,
        margin,
        len(diffs),
        float(diffs.mean()),
        low,
        high,
        wilcoxon_p(diffs),
        seed,
        resamples,
        confidence,
        passed,
        why,
    )


def floor_only(mean_dice: float, n_cases: int, min_dice: float, seed: int, resamples: int, confidence: float):
    """No champion: the floor alone decides (rule `floor`)."""
    passed = mean_dice >= min_dice
    why = (
        f"rule floor (no champion): mean Dice {mean_dice:.4f} over {n_cases} cases {'>=' if passed else '<'} {min_dice}"
    )
    return GateResult("floor", 0.0, n_cases, None, None, None, None, seed, resamples, confidence, passed, why)


def needed_cases(diffs: np.ndarray, effect: float, confidence: float = 0.95) -> int | None:
    """About how many test volumes a mean improvement of `effect` needs for the interval's lower bound
    to clear 0, from the per-case spread of `diffs` (normal approximation: n = (z * sd / effect)^2).
    None when the spread is 0 (any number of cases decides)."""
    from scipy.stats import norm

    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
    if sd == 0.0:
        return None
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    return math.ceil((z * sd / effect) ** 2)
