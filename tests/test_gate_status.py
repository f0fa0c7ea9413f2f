"""A layer whose outcome holds no check is "not gated" everywhere, never "within thresholds"."""

from pytest_memaudit.gates import Check, GateOutcome
from pytest_memaudit.report.context import gate_table, verdict
from pytest_memaudit.terminal import render_summary
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
