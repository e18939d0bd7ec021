"""Confidence intervals, shared by training, evaluation and the results page (no torch here)."""

from __future__ import annotations

# results.json and metalearn-eval's JSON say how their intervals were computed: "t" (metrics.mean_ci95).
# Files written before 2026-12-07 have no such key and used the normal quantile 1.96.
INTERVAL = "t"


def t_quantile(n: int) -> float:
    """Student's t 0.975 quantile for n - 1 degrees of freedom."""
    from scipy import stats  # imported here: a second of start-up that only evaluations pay

    return float(stats.t.ppf(0.975, n - 1))


def recorded_ci95(half: float, n: int, interval: str | None) -> float:
    """A stored 95% half-width over `n` values as mean_ci95 computes it: unchanged if it was (`interval`
    "t"), rescaled from the normal quantile 1.96 of older files (None)."""
    return half if interval == INTERVAL or n < 2 else half * t_quantile(n) / 1.96
