"""Paired statistics for the quality benchmarks: the same seed (same data order, same initial weights) trained
with two methods gives one paired difference; seeds are the independent units. Pure Python (no torch)."""

from __future__ import annotations

import math
import statistics

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard tables); beyond 30 the
# normal quantile 1.96 is within 2 %.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    """t_{0.975, df}: half the width of a 95 % interval is this times the standard error."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df}: need at least two paired values")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def gain_percent(base: float, other: float) -> float:
    """How much lower ``other``'s bits/byte is than ``base``'s, in percent of ``base`` (positive: better)."""
    return 100.0 * (base - other) / base


def paired(base: dict[int, float], other: dict[int, float]) -> dict:
    """Per-seed gains of ``other`` over ``base`` ({seed: bits/byte} each; only seeds in both count): the mean,
    the sample standard deviation, the standard error and the 95 % t interval of the mean, in percent."""
    seeds = sorted(set(base) & set(other))
    gains = [gain_percent(base[s], other[s]) for s in seeds]
    stats = mean_interval(gains)
    return {"seeds": seeds, "gain_percent_per_seed": gains, "n": len(gains),
            **{k: stats[k] for k in ("mean", "std", "se", "ci95")}}


def mean_interval(values: list[float]) -> dict:
    """Mean, sample standard deviation, standard error and 95 % t interval of independent ``values`` (e.g. one
    step-time ratio per alternating pair of runs); fewer than two values: the mean alone."""
    out = {"n": len(values), "values": list(values)}
    if len(values) < 2:
        return {**out, "mean": values[0] if values else None, "std": None, "se": None, "ci95": None}
    mean, std = statistics.fmean(values), statistics.stdev(values)
    se = std / math.sqrt(len(values))
    half = t975(len(values) - 1) * se
    return {**out, "mean": mean, "std": std, "se": se, "ci95": [mean - half, mean + half]}


def seeds_needed(std: float, target_se: float, minimum: int = 3) -> int:
    """Seeds for a paired standard error <= ``target_se`` when the per-seed paired differences spread by
    ``std`` (both in percent): ceil((std / target_se)^2), at least ``minimum``."""
    return max(minimum, math.ceil((std / target_se) ** 2))
