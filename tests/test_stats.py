"""Per-layer statistics against hand computations."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pytest_memaudit.stats import depth_correlation, fraction_above, group_size, layer_stats, welch_ttest


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
