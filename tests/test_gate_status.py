"""A layer whose outcome holds no check is "not gated" everywhere, never "within thresholds"."""

import json
import re

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
from pytest_memaudit.results.outcomes import Check, GateOutcome
from pytest_memaudit.results.result import AuditResult
from pytest_memaudit.report.context import check_cell, gate_table, verdict
from pytest_memaudit.plugin.terminal import render_summary
from test_report import Page, synthetic_result

pytest_plugins = ["pytester"]

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


FLAT = """
import torch


class SeeingAndFlat(torch.nn.Module):
    ''''seeing' is a convolution of the image; every unit of 'flat' gives one value, whatever the image.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.seeing = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.flat = torch.nn.Conv2d(3, 4, 1)
        torch.nn.init.zeros_(self.flat.weight)

    def forward(self, x):
        return self.seeing(x).mean() + self.flat(x)


def build(checkpoint):
    return SeeingAndFlat()
"""


def test_a_layer_of_constant_units_is_not_testable_on_its_membership_gates(pytester):
    """Every unit of 'flat' is constant over the pooled images: no unit picks a data point, so there is no
    membership test. Its membership gates used to be dropped and the layer read "passed"; it is now skipped
    with the reason, and reads "not testable" in the terminal, the JSON and the report. 'seeing' is gated."""
    pytester.makepyfile(flatmodel=FLAT)
    pytester.syspathinsert()
    (pytester.path / "audits").mkdir()
    (pytester.path / "audits" / "memaudit.yaml").write_text(
        "thresholds: {mean_unitmem_max: 1.0, membership_p_min: 0.05}\n"
        "models:\n  flat: {factory: 'flatmodel:build', audited_layers: [seeing, flat], image_size: 16}\n")
    result = pytester.runpytest("audits", "--memaudit-model", "flat", "--memaudit-data", "builtin",
                                "--memaudit-samples", "12", "--memaudit-holdout", "builtin", "--memaudit-augmentations",
                                "0", "--memaudit-control", "none", "--memaudit-permutations", "200", "-rs",
                                "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=1, skipped=1)
    reason = ("membership_p_min not testable: every unit of the layer (4) is dead or constant over the pooled data "
              "points, so no unit picks a data point and there is no membership test")
    result.stdout.fnmatch_lines([r"flat *│ *4 │*│ n/a/50% │*│ not testable: membership_p_min", f"layer flat: {reason}",
                                 f"SKIPPED*memaudit: layer flat: {reason}"])
    data = json.loads((pytester.path / "memaudit-report" / "results.json").read_text())
    seeing, flat = data["layers"]
    assert (seeing["outcome"], seeing["untestable"]) == ("passed", [])
    assert {check["key"] for check in seeing["checks"]} == {"mean_unitmem_max", "membership_p_min"}
    assert flat["outcome"] == "not testable" and flat["membership"]["units"] == 0
    assert flat["untestable"] == [{"key": "membership_p_min", "reason": reason.split(" not testable: ")[1]}]
    assert [check["key"] for check in flat["checks"]] == ["mean_unitmem_max"]
    assert data["summary"]["layers_not_testable"] == 1 and data["summary"]["layers_passed"] == 1
    page = Page((pytester.path / "memaudit-report" / "report.html").read_text())
    assert "NOT TESTABLE" in page.text.upper() and "no unit picks a data point" in page.text
    stored = AuditResult.from_json(data)  # re-read (--memaudit-from): the same status
    assert stored.layer("flat").outcome.status == "not testable"
