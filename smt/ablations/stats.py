"""Seed statistics, noise-aware comparisons and Pareto fronts for the ablation notebooks.

A difference between two variants is called *within noise* when it is smaller than twice its standard error
(Welch: sqrt(s_a^2/n_a + s_b^2/n_b), from the seed-to-seed spread). Conclusions are worded from that test, so a
notebook never states more than its seeds support.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["seed_summary", "Comparison", "compare", "pareto_front", "conclusion"]


def seed_summary(df: pd.DataFrame, by: str | list[str], value: str) -> pd.DataFrame:
    """Mean, sample standard deviation, count, min and max of ``value`` per group (one row per seed in ``df``)."""
    g = df.groupby(by, sort=False)[value]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count(), "min": g.min(), "max": g.max()})
    out["std"] = out["std"].fillna(0.0)
    return out


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    diff: float  # mean(a) - mean(b)
    stderr: float
    within_noise: bool

    def describe(self, unit: str = "dB") -> str:
        verdict = "within noise" if self.within_noise else "beyond noise"
        return (f"{self.a} - {self.b} = {self.diff:+.3f} {unit} (± {self.stderr:.3f} standard error over seeds, "
                f"{verdict})")


def compare(summary: pd.DataFrame, a: str, b: str, k: float = 2.0) -> Comparison:
    """``a`` vs ``b`` from :func:`seed_summary` rows. With one seed per side the spread is unknown: never beyond
    noise."""
    ra, rb = summary.loc[a], summary.loc[b]
    diff = float(ra["mean"] - rb["mean"])
    if ra["n"] < 2 or rb["n"] < 2:
        return Comparison(a, b, diff, math.nan, True)
    se = math.sqrt(ra["std"] ** 2 / ra["n"] + rb["std"] ** 2 / rb["n"])
    return Comparison(a, b, diff, se, abs(diff) <= k * se)


def conclusion(c: Comparison, claim: str, unit: str = "dB") -> str:
    """One sentence about ``claim`` ("a helps over b"), only as strong as the comparison supports."""
    if c.within_noise:
        return (f"Not shown: {claim} — the difference ({c.diff:+.3f} {unit}) is within the seed-to-seed noise "
                f"(standard error {c.stderr:.3f} {unit}) on this profile.")
    if c.diff > 0:
        return f"Supported on this profile: {claim} ({c.diff:+.3f} {unit}, about {abs(c.diff) / c.stderr:.1f} " \
               f"standard errors)."
    return f"Contradicted on this profile: {claim} — {c.a} is worse by {-c.diff:.3f} {unit} (about " \
           f"{abs(c.diff) / c.stderr:.1f} standard errors)."


def pareto_front(cost: np.ndarray | pd.Series, value: np.ndarray | pd.Series) -> np.ndarray:
    """Boolean mask of the points no other point dominates (lower-or-equal cost and higher-or-equal value,
    strictly better in one). Ties keep both."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    keep = np.ones(len(cost), bool)
    for i in range(len(cost)):
        dominated = (cost <= cost[i]) & (value >= value[i]) & ((cost < cost[i]) | (value > value[i]))
        keep[i] = not dominated.any()
    return keep
