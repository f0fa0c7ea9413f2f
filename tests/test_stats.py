"""Per-layer statistics against hand computations."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from pytest_memaudit.errors import AuditError
from pytest_memaudit.metric.stats import (
    BOOTSTRAP_FULL_MAX, depth_correlation, fraction_above, group_size, jackknife_interval, kruskal_wallis, layer_stats,
    spearman_interval,
    welch_ttest)
from pytest_memaudit.metric.unitmem import MEMBER, LayerState


def test_group_size_is_ten_percent_at_least_two():
    assert [group_size(n) for n in (3, 19, 20, 32, 160, 640)] == [2, 2, 2, 3, 16, 64]


def test_welch_hand_computed():
    # means 0.85 / 0.2, variances (ddof 1) 0.005 / 0.02: t = 0.65 / sqrt(0.0125)
    t, p = welch_ttest(np.array([0.9, 0.8]), np.array([0.1, 0.3]))
    assert t == pytest.approx(0.65 / math.sqrt(0.0125), rel=1e-12)
    df = 0.0125**2 / (0.0025**2 + 0.01**2)
    assert p == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-10)


def test_seed_conv_out_row_is_welch_with_k3():
    # The seed's conv.out row (32 units, k = 3): t 4.45, p 0.04575 implies df close to 2.03.
    assert 2 * scipy_stats.t.sf(4.45, 2.03) == pytest.approx(0.04575, abs=3e-4)


def test_layer_stats_values():
    unitmem = np.linspace(0.0, 0.95, 20)  # k = 2
    dead = np.zeros(20, bool)
    dead[0] = True
    s = layer_stats(unitmem, dead)
    assert s.group_size == 2
    assert s.top_mean == pytest.approx((0.9 + 0.95) / 2)
    assert s.bottom_mean == pytest.approx(0.05 / 2)
    assert s.gap == pytest.approx(s.top_mean - s.bottom_mean)
    assert s.mean_unitmem == pytest.approx(0.475)
    assert s.median_unitmem == pytest.approx(0.475)
    assert s.max_unitmem == pytest.approx(0.95)
    assert s.p90_unitmem == pytest.approx(np.percentile(unitmem, 90))
    assert s.dead_units == 1
    # equal spreads (0.05) in both groups: t = gap / sqrt(2 * 0.00125 / 2)
    assert s.ttest_t == pytest.approx(s.gap / math.sqrt(0.00125), rel=1e-9)


def test_constant_groups_give_nan():
    s = layer_stats(np.full(10, 0.3), np.zeros(10, bool))
    assert math.isnan(s.ttest_t) and math.isnan(s.ttest_p)
    assert s.gap == 0


def test_fraction_above_is_strict():
    assert fraction_above(np.array([0.1, 0.5, 0.9, 0.95]), 0.9) == 0.25


def test_depth_correlation():
    rho, p = depth_correlation([0.1, 0.2, 0.3, 0.5, 0.4, 0.6])
    assert rho == pytest.approx(1 - 6 * 2 / (6 * 35))  # one swapped pair: sum d^2 = 2
    assert p == pytest.approx(scipy_stats.spearmanr(range(6), [0.1, 0.2, 0.3, 0.5, 0.4, 0.6]).pvalue)
    rho, _ = depth_correlation([0.5, 0.3, 0.2, 0.1])
    assert rho == pytest.approx(-1.0)
    assert all(math.isnan(x) for x in depth_correlation([0.2, 0.2, 0.2]))


# --- per-image statistics -------------------------------------------------------------------

# fixed pairs with ties in both columns
TIED_X = np.array([1, 2, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8, 9, 10, 11, 12, 12, 13, 14, 15], dtype=float)
TIED_Y = np.array([2, 1, 3, 3, 5, 4, 6, 6, 5, 9, 7, 8, 8, 12, 10, 10, 14, 11, 13, 13], dtype=float)


def test_spearman_matches_scipy_with_ties():
    result = spearman_interval(TIED_X, TIED_Y)
    expected = scipy_stats.spearmanr(TIED_X, TIED_Y)
    assert result.rho == pytest.approx(expected.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert (result.n, result.dropped) == (20, 0)
    assert result.ci_low < result.rho < result.ci_high <= 1


def test_bootstrap_interval_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(12)
    x = rng.standard_normal(60)
    y = 0.5 * x + rng.standard_normal(60)
    resamples = 10_000
    ours = spearman_interval(x, y, resamples=resamples, seed=1, confidence=0.9)
    reference = scipy_stats.bootstrap(
        (x, y), lambda a, b, axis: _spearman_rows(a, b), paired=True, vectorized=True, n_resamples=resamples,
        confidence_level=0.9, method="percentile", rng=np.random.default_rng(99))
    # Different random streams: each end is a 5% or 95% quantile estimated from B draws, with Monte Carlo
    # standard deviation sqrt(q (1 - q) / B) / density = about 2.1 sd / sqrt(B) for a near-normal bootstrap
    # distribution (density at the 5% point: 0.103 / sd). Two independent estimates differ by sqrt(2) times
    # that; allow 5 of those.
    sd = np.std(reference.bootstrap_distribution)
    tolerance = 5 * math.sqrt(2) * 2.1 * sd / math.sqrt(resamples)
    assert tolerance < 0.02
    assert ours.ci_low == pytest.approx(reference.confidence_interval.low, abs=tolerance)
    assert ours.ci_high == pytest.approx(reference.confidence_interval.high, abs=tolerance)


def test_large_samples_get_a_subsampled_interval_as_wide_as_the_asymptotic_one():
    # n above BOOTSTRAP_FULL_MAX: m-out-of-n bootstrap. Reference: Bonett and Wright's large-sample
    # standard error of Spearman's rho for continuous data, sqrt((1 + r^2 / 2) / (n - 3)) on Fisher's
    # z scale, (1 - r^2) times that on rho's. The bootstrap sd from 2,000 resamples is within about 2%
    # of its expectation (1 / sqrt(2 B)); the formula is itself an approximation: allow 10%.
    rng = np.random.default_rng(21)
    n = 5 * BOOTSTRAP_FULL_MAX
    x = rng.standard_normal(n)
    y = 0.45 * x + math.sqrt(1 - 0.45**2) * rng.standard_normal(n)
    result = spearman_interval(x, y, seed=2)
    r = scipy_stats.spearmanr(x, y).statistic
    se = (1 - r**2) * math.sqrt((1 + r**2 / 2) / (n - 3))
    assert result.rho == pytest.approx(r, rel=1e-12)
    assert (result.ci_high - result.ci_low) / 2 == pytest.approx(1.959964 * se, rel=0.10)
    assert (result.ci_high + result.ci_low) / 2 == pytest.approx(r, abs=1e-12)


def test_large_samples_with_heavy_ties_agree_with_the_full_bootstrap():
    # Scores as an audit makes them: most images are no unit's argmax (score 0). Reference: scipy's
    # percentile bootstrap on all n pairs, 300 resamples, 90% interval. Its ends are quantiles of 300
    # draws, each uncertain by about 0.2 sd; its width by about 8%, ours by about 2%: allow 25%.
    rng = np.random.default_rng(22)
    n = 2 * BOOTSTRAP_FULL_MAX
    x = rng.uniform(size=n)
    y = np.where(rng.uniform(size=n) < 0.15, rng.gamma(1 + x, 1.0), 0.0)
    ours = spearman_interval(x, y, seed=3, confidence=0.9)
    reference = scipy_stats.bootstrap(
        (x, y), lambda a, b, axis: _spearman_rows(a, b), paired=True, vectorized=True, n_resamples=300,
        confidence_level=0.9, method="percentile", rng=np.random.default_rng(98))
    low, high = reference.confidence_interval
    assert ours.ci_high - ours.ci_low == pytest.approx(high - low, rel=0.25)
    assert (ours.ci_high + ours.ci_low) / 2 == pytest.approx((high + low) / 2, abs=0.2 * (high - low))


def _spearman_rows(a, b):
    """Spearman's rho along the last axis, one scipy call per row (the reference statistic)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return np.array([scipy_stats.spearmanr(r, s).statistic for r, s in zip(a, b)])


def test_bootstrap_is_seeded_and_a_monotone_relation_has_a_point_interval():
    first = spearman_interval(TIED_X, TIED_Y, seed=3)
    assert first == spearman_interval(TIED_X, TIED_Y, seed=3)
    assert first.ci_low != spearman_interval(TIED_X, TIED_Y, seed=4).ci_low
    x = np.arange(30.0)
    exact = spearman_interval(x, x**3)
    assert exact.rho == pytest.approx(1) and exact.ci_low == pytest.approx(1) and exact.ci_high == pytest.approx(1)


def test_spearman_drops_nan_pairs():
    x = np.concatenate([TIED_X, [np.nan, 1.0, np.nan]])
    y = np.concatenate([TIED_Y, [3.0, np.nan, np.nan]])
    result = spearman_interval(x, y, seed=5)
    assert (result.n, result.dropped) == (20, 3)
    assert {**result.as_dict(), "dropped": 0} == spearman_interval(TIED_X, TIED_Y, seed=5).as_dict()


@pytest.mark.parametrize("x, y, n, dropped", [
    ([1.0, 2.0], [2.0, 1.0], 2, 0),
    ([1.0, 2.0, np.nan, 4.0], [1.0, 2.0, 3.0, np.nan], 2, 2),
    ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], 4, 0),
    ([7.0, 7.0, 7.0], [1.0, 2.0, 3.0], 3, 0),
])
def test_spearman_undefined_cases(x, y, n, dropped):
    result = spearman_interval(np.array(x), np.array(y))
    assert (result.n, result.dropped) == (n, dropped)
    assert all(math.isnan(v) for v in (result.rho, result.ci_low, result.ci_high, result.p_value))


def test_spearman_bad_input():
    with pytest.raises(AuditError, match="same length"):
        spearman_interval(np.zeros(4), np.zeros(5))
    with pytest.raises(AuditError, match="confidence"):
        spearman_interval(np.arange(5.0), np.arange(5.0), confidence=95)


def test_kruskal_wallis_matches_scipy():
    groups = [np.array([2.9, 3.0, 2.5, 2.6, 3.2]), np.array([3.8, 2.7, 4.0, 2.4]), np.array([2.8, 3.4, 3.7, 2.2, 2.0, 3.2])]
    expected = scipy_stats.kruskal(*groups)
    h, p = kruskal_wallis(groups)
    assert h == pytest.approx(expected.statistic, rel=1e-12) and p == pytest.approx(expected.pvalue, rel=1e-12)
    # NaNs and empty groups are left out
    h2, p2 = kruskal_wallis([np.append(groups[0], np.nan), groups[1], np.array([]), groups[2]])
    assert (h2, p2) == (h, p)


@pytest.mark.parametrize("groups", [[np.array([1.0, 2.0])], [np.array([1.0, 2.0]), np.array([])],
                                    [np.array([3.0, 3.0]), np.array([3.0])], [np.array([np.nan]), np.array([1.0])]])
def test_kruskal_wallis_undefined(groups):
    assert all(math.isnan(v) for v in kruskal_wallis(groups))


def test_jackknife_interval_by_hand():
    # leave-one-out estimates 1, 2, 3 (and an empty group): mean 2, se = sqrt(2/3 * 2) = sqrt(4/3)
    interval = jackknife_interval(2.5, np.array([1.0, 2.0, 3.0, np.nan]))
    assert interval.groups == 3 and interval.se == pytest.approx(math.sqrt(4 / 3))
    half = scipy_stats.t.ppf(0.975, 2) * math.sqrt(4 / 3)
    assert (interval.low, interval.high) == pytest.approx((2.5 - half, 2.5 + half))
    assert math.isnan(jackknife_interval(1.0, np.array([1.0, np.nan])).se)


def test_jackknife_intervals_of_mean_unitmem_cover_as_often_as_they_say():
    """A small coverage study: data points drawn afresh in every replicate, units of different
    spread; the 95% interval of a layer's mean UnitMem should hold the figure's expectation (the
    mean over replicates) in about 95% of replicates, and its se should match the spread of the
    estimates. benchmarks/RESULTS.md has the study on the demo itself."""
    rng = np.random.default_rng(0)
    n, units, replicates = 150, 24, 120
    shapes = rng.uniform(0.5, 4, size=units)
    estimates, intervals = [], []
    for _ in range(replicates):
        a = torch.from_numpy(rng.gamma(shapes, 1.0, size=(n, units)).astype(np.float32))
        state = LayerState(units, groups=10, topk=1)
        state.update(a, torch.arange(n), torch.zeros(n, dtype=torch.int64), torch.from_numpy(rng.integers(0, 10, n)))
        values, leave_out = state.unitmem((MEMBER,), "mean")
        estimate = values.unitmem.mean()
        estimates.append(estimate)
        intervals.append(jackknife_interval(estimate, leave_out.mean(axis=1)))
    truth = np.mean(estimates)
    coverage = np.mean([i.low <= truth <= i.high for i in intervals])
    assert 0.88 <= coverage <= 0.995  # 95% +- about 3 binomial standard errors at 120 replicates
    assert 0.75 <= np.mean([i.se for i in intervals]) / np.std(estimates, ddof=1) <= 1.35
