"""Per-layer statistics of UnitMem values (the seed's Table 2 and more), over scipy."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class LayerStats:
    mean_unitmem: float
    median_unitmem: float
    max_unitmem: float
    p90_unitmem: float
    group_size: int  # k: units in each of the top and bottom groups
    top_mean: float
    bottom_mean: float
    gap: float  # top_mean - bottom_mean
    ttest_t: float  # Welch t of top against bottom; NaN when both groups are constant
    ttest_p: float  # two-sided
    dead_units: int

    def as_dict(self) -> dict:
        return asdict(self)


def group_size(units: int) -> int:
    """k = floor(10% of the layer's units), at least 2 (the spec's top/bottom group size)."""
    return max(2, units // 10)


def layer_stats(unitmem: np.ndarray, dead: np.ndarray) -> LayerStats:
    values = np.sort(np.asarray(unitmem, dtype=np.float64))
    k = group_size(values.size)
    bottom, top = values[:k], values[-k:]
    t, p = welch_ttest(top, bottom)
    return LayerStats(
        mean_unitmem=float(values.mean()),
        median_unitmem=float(np.median(values)),
        max_unitmem=float(values[-1]),
        p90_unitmem=float(np.percentile(values, 90)),
        group_size=k,
        top_mean=float(top.mean()),
        bottom_mean=float(bottom.mean()),
        gap=float(top.mean() - bottom.mean()),
        ttest_t=t,
        ttest_p=p,
        dead_units=int(np.count_nonzero(dead)),
    )


def welch_ttest(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided Welch t-test; (nan, nan) when both samples have zero variance."""
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = scipy_stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def fraction_above(unitmem: np.ndarray, level: float) -> float:
    """Share of units whose UnitMem is strictly above ``level``."""
    return float(np.mean(np.asarray(unitmem) > level))


def depth_correlation(layer_means: list[float]) -> tuple[float, float]:
    """Spearman rank correlation of a layer's mean UnitMem with its depth, and its p-value."""
    if len(layer_means) < 3 or np.ptp(layer_means) == 0:
        return math.nan, math.nan
    result = scipy_stats.spearmanr(np.arange(len(layer_means)), layer_means)
    return float(result.statistic), float(result.pvalue)
