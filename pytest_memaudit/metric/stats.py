"""Per-layer statistics of UnitMem values (the seed's Table 2 and more), over scipy."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import AuditError


def scipy_stats():
    """scipy.stats, imported when a statistic is first computed, not with this module: its import
    takes 0.5-1 s, which an audit would otherwise spend before its first batch (the gates import
    this module when the options are read)."""
    from scipy import stats

    return stats


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
    spread = spread_figures(values)
    return LayerStats(
        mean_unitmem=spread["mean_unitmem"],
        median_unitmem=spread["median_unitmem"],
        max_unitmem=float(values[-1]),
        p90_unitmem=spread["p90_unitmem"],
        group_size=k,
        top_mean=float(top.mean()),
        bottom_mean=float(bottom.mean()),
        gap=spread["gap"],
        ttest_t=t,
        ttest_p=p,
        dead_units=int(np.count_nonzero(dead)),
    )


def spread_figures(unitmem: np.ndarray) -> dict[str, float]:
    """A layer's figures that get error bars: mean, median and 90th percentile UnitMem, and the
    gap between the mean of its top and bottom 10% of units."""
    values = np.sort(np.asarray(unitmem, dtype=np.float64))
    k = group_size(values.size)
    return {
        "mean_unitmem": float(values.mean()),
        "median_unitmem": float(np.median(values)),
        "p90_unitmem": float(np.percentile(values, 90)),
        "gap": float(values[-k:].mean() - values[:k].mean()),
    }


def welch_ttest(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided Welch t-test; (nan, nan) when both samples have zero variance."""
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = scipy_stats().ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def fraction_above(unitmem: np.ndarray, level: float) -> float:
    """Share of units whose UnitMem is strictly above ``level``."""
    return float(np.mean(np.asarray(unitmem) > level))


@dataclass(frozen=True)
class Interval:
    """A figure with its delete-one-group jackknife standard error and confidence interval."""

    estimate: float
    se: float
    low: float
    high: float
    groups: int  # groups that contributed a leave-one-out estimate

    def as_dict(self) -> dict:
        return asdict(self)


def jackknife_interval(estimate: float, leave_one_out: np.ndarray, confidence: float = 0.95) -> Interval:
    """Delete-one-group jackknife: ``leave_one_out[g]`` is the figure computed without group g
    (NaN: group g was empty and is not counted). With G' usable groups,
    se = sqrt((G' - 1) / G' * sum_g (theta_g - mean theta)^2), and the interval is
    estimate +- t(G' - 1) * se. Fewer than 2 usable groups give NaN."""
    theta = np.asarray(leave_one_out, dtype=np.float64)
    theta = theta[np.isfinite(theta)]
    g = theta.size
    if g < 2 or not math.isfinite(estimate):
        return Interval(float(estimate), math.nan, math.nan, math.nan, g)
    se = math.sqrt((g - 1) / g * float(np.sum((theta - theta.mean()) ** 2)))
    half = float(scipy_stats().t.ppf(0.5 + confidence / 2, g - 1)) * se
    return Interval(float(estimate), se, float(estimate) - half, float(estimate) + half, g)


def difference_interval(current: Interval, baseline: Interval, confidence: float = 0.95) -> Interval:
    """``current - baseline`` of a figure from two independent runs, each with its jackknife interval:
    se = sqrt(se1^2 + se2^2), and the interval uses t with Welch-Satterthwaite degrees of freedom,
    (se1^2 + se2^2)^2 / (se1^4 / (G1 - 1) + se2^4 / (G2 - 1)). Two exact figures (se 0) give the
    difference as its own interval; an undefined se gives NaN bounds."""
    difference = current.estimate - baseline.estimate
    groups = min(current.groups, baseline.groups)
    if not all(math.isfinite(v) for v in (current.se, baseline.se)) or min(current.groups, baseline.groups) < 2:
        return Interval(difference, math.nan, math.nan, math.nan, groups)
    v1, v2 = current.se**2, baseline.se**2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Interval(difference, 0.0, difference, difference, groups)
    df = (v1 + v2) ** 2 / (v1**2 / (current.groups - 1) + v2**2 / (baseline.groups - 1))
    half = float(scipy_stats().t.ppf(0.5 + confidence / 2, df)) * se
    return Interval(difference, se, difference - half, difference + half, groups)


def distribution_shift_p(current: np.ndarray, baseline: np.ndarray) -> float:
    """Two-sided Mann-Whitney U p-value that two runs' unit UnitMem values come from one distribution
    (1 when every value is the same; NaN with an empty side)."""
    current, baseline = np.asarray(current, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if current.size == 0 or baseline.size == 0:
        return math.nan
    if np.ptp(np.concatenate([current, baseline])) == 0:
        return 1.0
    return float(scipy_stats().mannwhitneyu(current, baseline, alternative="two-sided").pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error across the given tests); NaN
    p-values stay NaN and are not counted in the family."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(p.shape, np.nan)
    m = finite.size
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def depth_correlation(layer_means: list[float]) -> tuple[float, float]:
    """Spearman rank correlation of a layer's mean UnitMem with its depth, and its p-value."""
    if len(layer_means) < 3 or np.ptp(layer_means) == 0:
        return math.nan, math.nan
    result = scipy_stats().spearmanr(np.arange(len(layer_means)), layer_means)
    return float(result.statistic), float(result.pvalue)


# --- per-image statistics: what gets memorized ------------------------------------------------


@dataclass(frozen=True)
class CorrelationResult:
    rho: float  # Spearman's rank correlation; NaN when undefined
    ci_low: float  # bootstrap interval over pairs (see spearman_interval)
    ci_high: float
    p_value: float  # two-sided, as scipy.stats.spearmanr
    n: int  # pairs used
    dropped: int  # pairs left out for a NaN in either value

    def as_dict(self) -> dict:
        return asdict(self)


# Resampled values per column ranked at once. The ranking's temporaries take about 65 bytes per
# value, so this bounds the bootstrap's memory at about 16 MB whatever the number of pairs; at 4M
# values it took 260 MB once an audit had 2,000 images or more, and an audit's peak memory grew
# with N (benchmarks/RESULTS.md, "Memory"). Smaller chunks cost no measurable time.
_BOOTSTRAP_CELLS = 250_000
# Above this many pairs the bootstrap draws subsamples of this size (m out of n), so that the cost
# stays that of 20,000 pairs however many images the audit saw (a full-training-set audit has 1.28M).
BOOTSTRAP_FULL_MAX = 20_000


def spearman_interval(x: np.ndarray, y: np.ndarray, *, resamples: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> CorrelationResult:
    """Spearman's rho of paired values with a bootstrap interval and scipy's p-value.

    Pairs with a NaN in either value are dropped. The bootstrap draws ``resamples`` sets of pairs
    with replacement from a private ``numpy`` generator seeded with ``seed`` and ranks them (average
    ranks for ties) all at once; a resample with a constant column has no rho and is left out.

    - Up to ``BOOTSTRAP_FULL_MAX`` pairs: sets of n pairs, and the percentile interval (the
      (1 - confidence)/2 and (1 + confidence)/2 quantiles of their rho, linear interpolation).
    - Above: sets of m = ``BOOTSTRAP_FULL_MAX`` pairs (the m-out-of-n bootstrap). Their rho spread
      like the rho of m pairs, so their standard deviation times sqrt(m / n) estimates the standard
      error at n, and the interval is rho -/+ z * se: normal, which rho is at that size.

    Fewer than 3 pairs or a constant column: everything NaN but n and dropped.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise AuditError(f"spearman_interval needs two 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    if resamples < 1 or not 0 < confidence < 1:
        raise AuditError(f"spearman_interval needs resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    kept = ~(np.isnan(x) | np.isnan(y))
    x, y = x[kept], y[kept]
    n, dropped = int(x.size), int(np.count_nonzero(~kept))
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return CorrelationResult(math.nan, math.nan, math.nan, math.nan, n, dropped)
    result = scipy_stats().spearmanr(x, y)
    rho = float(result.statistic)
    rng = np.random.default_rng(seed)
    size = min(n, BOOTSTRAP_FULL_MAX)
    per_step = max(1, _BOOTSTRAP_CELLS // size)
    rhos = np.concatenate([
        _rank_correlations(x, y, rng.integers(0, n, size=(min(per_step, resamples - start), size)))
        for start in range(0, resamples, per_step)
    ])
    rhos = rhos[np.isfinite(rhos)]
    tail = (1 - confidence) / 2
    if size == n:
        low, high = np.quantile(rhos, [tail, 1 - tail]) if rhos.size else (math.nan, math.nan)
    elif rhos.size < 2:  # no spread to scale
        low, high = math.nan, math.nan
    else:
        half = scipy_stats().norm.ppf(1 - tail) * float(np.std(rhos, ddof=1)) * math.sqrt(size / n)
        low, high = max(-1.0, rho - half), min(1.0, rho + half)
    return CorrelationResult(rho, float(low), float(high), float(result.pvalue), n, dropped)


def _rank_correlations(x: np.ndarray, y: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of resampled pair indices; NaN for a row with a constant column."""
    rx = scipy_stats().rankdata(x[draws], axis=1)
    ry = scipy_stats().rankdata(y[draws], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("ij,ij->i", rx, ry) / np.sqrt(np.einsum("ij,ij->i", rx, rx) * np.einsum("ij,ij->i", ry, ry))


def kruskal_wallis(groups: list[np.ndarray]) -> tuple[float, float]:
    """Kruskal-Wallis H and its p-value (scipy.stats.kruskal) for values in groups, NaNs dropped.

    (nan, nan) with fewer than 2 non-empty groups or when all values are equal.
    """
    groups = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    groups = [g[~np.isnan(g)] for g in groups]
    groups = [g for g in groups if g.size]
    if len(groups) < 2 or np.ptp(np.concatenate(groups)) == 0:
        return math.nan, math.nan
    result = scipy_stats().kruskal(*groups)
    return float(result.statistic), float(result.pvalue)
