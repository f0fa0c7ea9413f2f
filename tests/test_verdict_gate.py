"""The verdict gate (verdictgate.py): the model's verdict fails the run through its own test item,
at the level the audit file sets, which every verdict and answer then uses; a run without held-out
images skips it, saying why; a stored audit is re-gated at the level asked for."""

import json
import math
import textwrap
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import pytest_memaudit.pipeline.audit  # noqa: F401  (pytester runs: see test_user_models.py)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
import pytest_memaudit.report  # noqa: F401
from pytest_memaudit.errors import ConfigError
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.gates.limits import parse_threshold_option
from pytest_memaudit.metric.verdict import decide, format_p

from conftest import one_layer_model_source

pytest_plugins = ["pytester"]


def family(*p_values, signal="argmax_membership"):
    return [SimpleNamespace(signal=signal, layer=f"l{i}", estimate=0.1, low=0.0, high=0.2, p_value=p)
            for i, p in enumerate(p_values)]


def test_a_verdict_at_another_level_is_the_verdict_decided_at_that_level():
    """Holm over 0.004, 0.005, 0.3: corrected 0.012, by hand. Below 0.05: detected at 0.05, inconclusive
    at 0.01 (0.012 < 0.05), none at 0.001 (0.012 >= 0.005)."""
    tests = family(0.004, 0.005, 0.3)
    at_001 = decide(tests, level=0.01, permutations=10_000)
    assert at_001.memorization == "inconclusive" and at_001.p_value == pytest.approx(0.012)
    for level, outcome in ((0.05, "detected"), (0.01, "inconclusive"), (0.001, "none")):
        again = at_001.at_level(level)
        assert again == decide(tests, level=level, permutations=10_000)
        assert (again.memorization, again.level, again.p_value) == (outcome, level, at_001.p_value)


def test_a_level_the_permutations_cannot_reach_is_inconclusive_at_best():
    """3 tests, 999 relabellings: the smallest corrected p is 3 / 1000 = 0.003. At 0.001 nothing can be
    detected; the reason asks for ceil(3 / 0.001) = 3000 permutations."""
    v = decide(family(0.001, 0.5, 0.5), level=0.01, permutations=999)
    assert v.memorization == "detected" and v.smallest_p == pytest.approx(0.003)
    strict = v.at_level(0.001)
    assert strict.memorization == "inconclusive" and "use at least 3000 permutations" in strict.reason
    assert decide(family(math.nan), permutations=999).at_level(0.05).memorization == "none"  # no test: none


def test_the_verdict_gate_is_the_models_not_a_layers(tmp_path):
    (tmp_path / "memaudit.yaml").write_text("layers:\n  conv.in: {verdict_p_min: 0.05}\n")
    with pytest.raises(ConfigError, match="verdict_p_min gates the model's verdict over every layer, not one layer"):
        load_audit_file(tmp_path / "memaudit.yaml")
    with pytest.raises(ConfigError, match="not one layer"):
        parse_threshold_option("conv.in:verdict_p_min=0.05")
    assert parse_threshold_option("verdict_p_min=0.05") == ("*", "verdict_p_min", {"limit": 0.05})
    (tmp_path / "memaudit.yaml").write_text("thresholds: {verdict_p_min: 1.5}\n")
    with pytest.raises(ConfigError, match=r"verdict_p_min = 1.5 is outside \[0, 1\]"):
        load_audit_file(tmp_path / "memaudit.yaml")


PERMUTATIONS = 2000
IMAGES = 10  # members, and as many held-out images


def setup(pytester, members_brighter: bool) -> None:
    """A one-layer model whose loss is lower on brighter images, members and held-out images in folders:
    brighter members (its loss tells them apart: memorization by its reference attack) or both drawn
    alike (a null)."""
    folder = pytester.path / "audits"
    folder.mkdir()
    (folder / "bright.py").write_text(one_layer_model_source("-images.flatten(1).mean(1)"))  # lower on brighter images
    (folder / "memaudit.yaml").write_text(textwrap.dedent("""\
        allow_no_gates: true
        thresholds: {verdict_p_min: 0.01}
        models:
          bright:
            factory: bright:build
            loss: bright:loss
            audited_layers: [stem]
            image_size: 16
        """))
    rng = np.random.default_rng(0)
    for kind, low in (("members", 128 if members_brighter else 0), ("heldout", 0)):
        (pytester.path / kind).mkdir()
        for i in range(IMAGES):
            pixels = rng.integers(low, low + 128, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(pytester.path / kind / f"{i}.png")


def run(pytester, *args):
    return pytester.runpytest("audits", "--memaudit-model", "bright", "--memaudit-data", "members",
                              "--memaudit-holdout", "heldout", "--memaudit-augmentations", "2",
                              "--memaudit-control", "none", "--memaudit-permutations", str(PERMUTATIONS),
                              "-p", "no:cacheprovider", *args)


def test_a_detected_verdict_fails_the_run_and_says_why_everywhere(pytester):
    setup(pytester, members_brighter=True)
    result = run(pytester, "--memaudit-json", "out.json", "--junitxml", "junit.xml", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.assert_outcomes(passed=1, failed=1)
    data = json.loads((pytester.path / "out.json").read_text())
    verdict = data["summary"]["verdict"]
    # One layer, so the two-stage Holm's first step is the number of signals times the smallest raw p
    # (by hand, from the stored raw p-values of every test in the family).
    raw = [row["p_value"] for row in data["signals"] if row["p_value"] is not None]
    raw.append(data["layers"][0]["membership"]["p_value"])
    signals = {row["signal"] for row in data["signals"] if row["p_value"] is not None} | {"argmax_membership"}
    assert verdict["p_value"] == pytest.approx(len(signals) * min(raw))
    assert min(raw) == pytest.approx(1 / (PERMUTATIONS + 1))  # perfectly apart: no relabelling does as well
    assert (verdict["memorization"], verdict["level"]) == ("detected", 0.01)
    message = (f"memorization detected: {verdict['signal']} at {verdict['layer']}*corrected p = "
               f"{format_p(verdict['p_value'])} is below verdict_p_min = 0.01 (Holm across*")
    result.stdout.fnmatch_lines([f"{message}", "*FAILED audits/memaudit.yaml::verdict*"])
    gate = data["summary"]["verdict_gate"]
    assert gate["outcome"] == "failed" and gate["message"].startswith("memorization detected:")
    assert (gate["checks"][0]["key"], gate["checks"][0]["limit"], gate["checks"][0]["passed"]) == (
        "verdict_p_min", 0.01, False)
    assert gate["checks"][0]["value"] == pytest.approx(verdict["p_value"])
    case = next(c for c in ET.parse(pytester.path / "junit.xml").iter("testcase") if c.get("name") == "verdict")
    assert "is below verdict_p_min = 0.01" in case.find("failure").get("message")
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["memaudit_verdict"] == "detected"
    html = (pytester.path / "memaudit-report" / "report.html").read_text()
    assert "verdict gate failed: memorization detected" in html

    # Re-gated from the stored file: the same failure; at a level the permutations cannot reach (the
    # smallest corrected p is that count of signals / 2001), the verdict is inconclusive and passes.
    again = pytester.runpytest("audits", "--memaudit-from", "out.json", "-p", "no:cacheprovider")
    assert again.ret == pytest.ExitCode.TESTS_FAILED, again.stdout.str()
    strict = pytester.runpytest("audits", "--memaudit-from", "out.json", "--memaudit-threshold", "verdict_p_min=0.001",
                                "--memaudit-json", "strict.json", "-p", "no:cacheprovider")
    assert strict.ret == pytest.ExitCode.OK, strict.stdout.str()
    stored = json.loads((pytester.path / "strict.json").read_text())["summary"]["verdict"]
    assert (stored["memorization"], stored["level"]) == ("inconclusive", 0.001)
    assert stored["p_value"] == pytest.approx(verdict["p_value"])
    assert f"use at least {len(signals) * 1000} permutations" in stored["reason"]
    strict.stdout.fnmatch_lines(["*inconclusive: a weak signal*"])


def test_the_level_follows_the_configuration_and_the_gate_can_be_turned_off(pytester):
    setup(pytester, members_brighter=True)
    loose = run(pytester, "--memaudit-threshold", "verdict_p_min=off", "--memaudit-json", "off.json")
    assert loose.ret == pytest.ExitCode.OK, loose.stdout.str()
    loose.assert_outcomes(passed=1)  # the layer's item; the verdict has none
    verdict = json.loads((pytester.path / "off.json").read_text())["summary"]
    assert (verdict["verdict"]["memorization"], verdict["verdict"]["level"], verdict["verdict_gate"]) == (
        "detected", 0.01, None)
    audit_file = pytester.path / "audits" / "memaudit.yaml"
    audit_file.write_text(audit_file.read_text().replace("{verdict_p_min: 0.01}",
                                                         "{verdict_p_min: {limit: 0.01, severity: warn}}"))
    warned = run(pytester, "--memaudit-json", "warn.json")
    assert warned.ret == pytest.ExitCode.OK, warned.stdout.str()
    warned.assert_outcomes(passed=2, warnings=1)
    warned.stdout.fnmatch_lines(["*MemauditWarning: memorization detected: * is below verdict_p_min = 0.01*"])
    assert json.loads((pytester.path / "warn.json").read_text())["summary"]["verdict_gate"]["outcome"] == "warned"
    # a second audit file that gives the verdicts another level: which one holds is the user's to say
    (pytester.path / "audits" / "memaudit_strict.yaml").write_text("thresholds: {verdict_p_min: 0.001}\n")
    both = run(pytester, "--collect-only")
    assert both.ret == pytest.ExitCode.INTERRUPTED, both.stdout.str()
    both.stdout.fnmatch_lines(["*verdict_p_min gives the verdicts the level 0.001, and another audit file gives them "
                               "0.01: set it in one file*"])


def test_without_held_out_images_the_verdict_is_not_testable(pytester):
    setup(pytester, members_brighter=True)
    result = run(pytester, "--memaudit-holdout", "none", "-rs")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*memaudit: not testable: verdict_p_min needs held-out images*"])


def test_a_null_passes_the_verdict_gate(pytester):
    """Members and held-out images drawn alike: the verdict is not detected (a seeded run)."""
    setup(pytester, members_brighter=False)
    result = run(pytester, "--memaudit-json", "null.json")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=2)
    summary = json.loads((pytester.path / "null.json").read_text())["summary"]
    assert summary["verdict"]["memorization"] == "none" and summary["verdict_gate"]["outcome"] == "passed"


def test_a_verdict_gate_the_permutations_cannot_reach_is_warned_about(pytester):
    """The one-layer model with its loss: 6 signals (the argmax membership, 4 per-image signals, the
    loss), the loss a single test, so its smallest corrected p is 6 / (P + 1): 200 permutations give
    6 / 201 = 0.0299, above 0.01; 600 would reach it."""
    setup(pytester, members_brighter=True)
    result = run(pytester, "--collect-only", "--memaudit-permutations", "200")
    result.stdout.fnmatch_lines(["*verdict_p_min = 0.01 cannot fail: with 200 permutations the verdict's smallest p "
                                 "after its two-stage holm correction is 0.0299; use --memaudit-permutations 600 or "
                                 "more*"])
    assert "cannot fail" not in run(pytester, "--collect-only", "--memaudit-permutations", "600").stdout.str()
