import math

from pytest_memaudit.gates import evaluate


def test_max_and_min_limits():
    figures = {"mean_unitmem": 0.61, "gap": 0.2, "ttest_p": 0.01, "fraction_above": 0.0}
    outcome = evaluate("conv.in", figures, {"mean_unitmem_max": 0.6, "gap_min": 0.25, "ttest_p_max": 0.05,
                                             "fraction_above_max": None})
    assert not outcome.passed
    assert [c.key for c in outcome.failures] == ["mean_unitmem_max", "gap_min"]
    message = outcome.failure_message()
    assert "layer conv.in" in message
    assert "mean_unitmem = 0.61 exceeds mean_unitmem_max = 0.6" in message
    assert "gap = 0.2 is below gap_min = 0.25" in message
    assert "ttest_p" not in message


def test_limit_is_inclusive_and_none_is_off():
    outcome = evaluate("x", {"mean_unitmem": 0.6, "gap": 0.0}, {"mean_unitmem_max": 0.6, "gap_min": None})
    assert outcome.passed and [c.key for c in outcome.checks] == ["mean_unitmem_max"]


def test_nan_figure_fails_with_clear_message():
    outcome = evaluate("x", {"ttest_p": math.nan}, {"ttest_p_max": 0.05})
    assert not outcome.passed
    assert "ttest_p is undefined (NaN)" in outcome.failure_message()


def test_control_excess_only_with_control():
    assert evaluate("x", {"mean_unitmem": 0.5}, {"excess_over_control_max": 0.1}).checks == ()
    outcome = evaluate("x", {"excess_over_control": 0.2}, {"excess_over_control_max": 0.1})
    assert not outcome.passed
