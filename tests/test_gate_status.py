"""A layer whose outcome holds no check is "not gated" everywhere, never "within thresholds"."""

from pytest_memaudit.results.outcomes import Check, GateOutcome
from pytest_memaudit.report.context import check_cell, gate_table, verdict
from pytest_memaudit.plugin.terminal import render_summary
from test_report import synthetic_result

SAMPLES = [f"img_{i}.png" for i in range(12)]


def gated(result, outcomes):
    for layer, checks in zip(result.layers, outcomes):
        layer.outcome = None if checks is None else GateOutcome(layer.name, tuple(checks))
    return result


def passing():
    return Check("mean_unitmem_max", "mean_unitmem", 0.3, 0.5, True)


def test_outcomes_without_checks_are_not_gated():
    result = gated(synthetic_result(SAMPLES, ["a", "b"], [8, 8]), [(), ()])
    assert verdict(result.layers) == {"status": "not gated",
                                      "text": "No threshold applied to any layer: nothing was gated."}
    assert [row["status"] for row in gate_table(result.layers)["rows"]] == ["not gated", "not gated"]
    rows = [line for line in render_summary(result).splitlines() if line.startswith(("a ", "b "))]
    assert [row.split()[-2:] for row in rows] == [["not", "gated"], ["not", "gated"]]


def test_mixed_outcomes_count_only_layers_with_checks():
    result = gated(synthetic_result(SAMPLES, ["a", "b", "c"], [8, 8, 8]), [[passing()], (), None])
    assert verdict(result.layers) == {"status": "passed",
                                      "text": "All 1 gated layers are within their thresholds. "
                                              "2 layer(s) had no threshold and were not gated."}
    assert [(row["name"], row["status"]) for row in gate_table(result.layers)["rows"]] == [
        ("a", "passed"), ("b", "not gated"), ("c", "not gated")]


def test_a_gate_cell_states_the_rule_that_decided():
    """A when: significant gate passes an estimate past its limit when the interval reaches back: the cell
    says so, instead of "0.3067 <= 0.25", which reads false."""
    def cell(value, passed, low=0.089, high=0.524, key="mean_unitmem_max"):
        check = Check(key, key.rsplit("_", 1)[0], value, 0.25, passed, "significant", low=low, high=high)
        found = check_cell(check, None)
        return f"{found['value']} {found['relation']} {found['limit']} ({found['note']})"

    assert cell(0.3067, True) == "0.3067 interval not wholly above 0.25 (95% [0.089, 0.524])"
    assert cell(0.41, False, 0.3, 0.52) == "0.41 interval wholly above 0.25 (95% [0.3, 0.52])"
    assert cell(0.2, True) == "0.2 ≤ 0.25 (95% [0.089, 0.524])"  # the estimate itself is within the limit
    assert cell(0.2, True, key="gap_min") == "0.2 interval not wholly below 0.25 (95% [0.089, 0.524])"
    no_interval = Check("max_unitmem_rise_max", "max_unitmem_rise", 0.3, 0.25, True, "significant")
    assert check_cell(no_interval, None)["relation"] == "not beyond noise above"
    estimate = check_cell(Check("mean_unitmem_max", "mean_unitmem", 0.3, 0.25, False), None)
    assert (estimate["relation"], estimate["mark"]) == (">", "FAIL")
