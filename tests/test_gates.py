"""Gates: limits, intervals, severities and the multiple-testing correction."""

import math

import numpy as np
import pytest

from pytest_memaudit.results.outcomes import Figure, Gate
from pytest_memaudit.gates.thresholds import adjusted_p_values, evaluate, layer_figures
from pytest_memaudit.metric.membership import Membership
from pytest_memaudit.results.result import AuditResult, LayerResult
from pytest_memaudit.metric.stats import Interval, layer_stats
from pytest_memaudit.metric.unitmem import UnitMemValues


def figures(**values):
    return {name: value if isinstance(value, Figure) else Figure(value) for name, value in values.items()}


def test_max_and_min_limits():
    outcome = evaluate("conv.in", figures(mean_unitmem=0.61, gap=0.2, ttest_p=0.01, fraction_above=0.0),
                       {"mean_unitmem_max": Gate(0.6), "gap_min": Gate(0.25), "ttest_p_max": Gate(0.05),
                        "fraction_above_max": Gate(None)})
    assert not outcome.passed and outcome.status == "failed"
    assert [c.key for c in outcome.failures] == ["mean_unitmem_max", "gap_min"]
    message = outcome.failure_message()
    assert "layer conv.in" in message
    assert "mean_unitmem = 0.61 exceeds mean_unitmem_max = 0.6" in message
    assert "gap = 0.2 is below gap_min = 0.25" in message
    assert "ttest_p" not in message


def test_limit_is_inclusive_and_none_is_off():
    outcome = evaluate("x", figures(mean_unitmem=0.6, gap=0.0), {"mean_unitmem_max": Gate(0.6), "gap_min": Gate(None)})
    assert outcome.passed and [c.key for c in outcome.checks] == ["mean_unitmem_max"]


def test_nan_figure_fails_with_clear_message():
    outcome = evaluate("x", figures(ttest_p=math.nan), {"ttest_p_max": Gate(0.05)})
    assert not outcome.passed
    assert "ttest_p is undefined (NaN)" in outcome.failure_message()


def test_gate_without_its_figure_is_not_checked():
    assert evaluate("x", figures(mean_unitmem=0.5), {"excess_over_control_max": Gate(0.1)}).checks == ()
    assert evaluate("x", figures(mean_unitmem=0.5), {}).status == "not gated"
    outcome = evaluate("x", figures(excess_over_control=0.2), {"excess_over_control_max": Gate(0.1)})
    assert not outcome.passed


@pytest.mark.parametrize("low, high, passed", [(0.25, 0.35, True), (0.31, 0.5, False), (0.3, 0.4, True)])
def test_significant_max_gate_fails_only_when_the_whole_interval_is_above(low, high, passed):
    gate = {"excess_over_control_max": Gate(0.3, when="significant")}
    outcome = evaluate("x", figures(excess_over_control=Figure(0.33, low, high)), gate)
    assert outcome.passed is passed
    if not passed:
        assert "whole 95% interval [0.31, 0.5] lies above the limit" in outcome.failure_message()


def test_significant_min_gate_fails_only_when_the_whole_interval_is_below():
    gate = {"gap_min": Gate(0.3, when="significant")}
    assert evaluate("x", figures(gap=Figure(0.2, 0.1, 0.35)), gate).passed
    assert not evaluate("x", figures(gap=Figure(0.2, 0.1, 0.29)), gate).passed


def test_warn_severity_does_not_fail():
    outcome = evaluate("x", figures(mean_unitmem=0.9, gap=0.5),
                       {"mean_unitmem_max": Gate(0.5, severity="warn"), "gap_min": Gate(0.1)})
    assert outcome.passed and outcome.status == "warned"
    assert [c.key for c in outcome.warnings] == ["mean_unitmem_max"]
    assert "mean_unitmem = 0.9 exceeds mean_unitmem_max = 0.5" in outcome.warning_message()


def layer(name, p, unitmem=(0.1, 0.5, 0.9)):
    values = np.array(unitmem)
    stats = layer_stats(values, np.zeros(values.size, dtype=bool))
    membership = Membership(10, 10, 0.7, 0.5, 0.6, 3, p, 1000, Interval(0.2, 0.05, 0.1, 0.3, 10))
    uv = UnitMemValues(values, values, values, np.zeros(values.size, dtype=np.int64), np.zeros(values.size, dtype=bool),
                       values[None], np.zeros((1, values.size), dtype=np.int64))
    return LayerResult(name, name, uv, stats, {"mean_unitmem": Interval(0.5, 0.1, 0.3, 0.7, 10)}, membership,
                       control_mean=0.4, control_excess=Interval(0.1, 0.02, 0.06, 0.14, 10))


def test_layer_figures_carry_intervals_and_membership():
    found = layer_figures(layer("a", 0.04), 0.8)
    assert found["mean_unitmem"] == Figure(0.5, 0.3, 0.7)
    assert found["excess_over_control"] == Figure(0.1, 0.06, 0.14)
    assert found["membership_excess"].value == pytest.approx(0.2) and found["membership_excess"].low == 0.1
    assert found["membership_p"].value == 0.04 and math.isnan(found["membership_p"].low)
    assert found["fraction_above"].value == pytest.approx(1 / 3)
    assert layer_figures(layer("a", 0.04), 0.8, {"membership_p": 0.12})["membership_p"].value == 0.12


def test_holm_adjusts_p_values_across_layers():
    result = AuditResult("m", {}, "src", ["a"], [layer("a", 0.01), layer("b", 0.04), layer("c", 0.03)])
    adjusted = adjusted_p_values(result, "holm")
    # Holm by hand: sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert adjusted["a"]["membership_p"] == pytest.approx(0.03)
    assert adjusted["c"]["membership_p"] == pytest.approx(0.06)
    assert adjusted["b"]["membership_p"] == pytest.approx(0.06)
    assert adjusted_p_values(result, "none")["b"]["membership_p"] == 0.04
