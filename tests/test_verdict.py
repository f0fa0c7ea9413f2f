"""The verdict: its rule on hand-made families of tests, and on whole audits of a tiny encoder, its
random control and its blind control (the same architecture fed one fixed image)."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.controls.random import blind_copy
from pytest_memaudit.gates.thresholds import evaluate_result
from pytest_memaudit.models import LayerSpec, ModelSpec
from pytest_memaudit.results.result import AuditResult
from pytest_memaudit.metric.verdict import decide

DEFAULT_AUDIT = Path(__file__).resolve().parents[1] / "audits" / "memaudit.yaml"


def test(layer, p, estimate=0.1, low=-0.05, high=0.25, signal="argmax_membership"):
    """Any object with the six attributes is a test (duck-typed), as other signals' tests will be."""
    return SimpleNamespace(signal=signal, layer=layer, estimate=estimate, low=low, high=high, p_value=p)


test.__test__ = False  # a helper, not a pytest test


def test_detected_when_a_corrected_p_is_below_the_level():
    # Holm over 3: 3 x 0.001 = 0.003 < 0.01
    v = decide([test("a", 0.2), test("b", 0.001, estimate=0.3, low=0.1, high=0.5), test("c", 0.5)])
    assert (v.memorization, v.layer, v.tests) == ("detected", "b", 3)
    assert v.p_value == pytest.approx(0.003) and v.raw_p_value == 0.001
    assert (v.estimate, v.low, v.high) == (0.3, 0.1, 0.5)
    assert "Holm across 3" in v.correction and "Rule:" in v.reason


def test_inconclusive_when_the_corrected_p_is_below_five_times_the_level():
    # Holm: sorted 0.004, 0.005, 0.3 -> 3 x 0.004 = 0.012, max(0.012, 2 x 0.005) = 0.012: in [0.01, 0.05)
    v = decide([test("a", 0.004), test("b", 0.005), test("c", 0.3)])
    assert (v.memorization, v.layer) == ("inconclusive", "a")
    assert v.p_value == pytest.approx(0.012)
    assert "0.012 (0.004 before the correction), is below 0.05 but not below 0.01" in v.reason


def test_none_when_no_corrected_p_is_below_five_times_the_level():
    # one of 22 layers at p = 0.02 (its interval above 0): chance, 22 x 0.02 = 0.44 after Holm
    v = decide([test("a", 0.02, low=0.01)] + [test(f"l{i}", 0.5) for i in range(21)])
    assert (v.memorization, v.layer) == ("none", "a") and v.p_value == pytest.approx(0.44)
    v = decide([test("a", 0.3), test("b", 0.8, estimate=-0.1, low=-0.3, high=0.1)])
    assert (v.memorization, v.layer, v.raw_p_value) == ("none", "a", 0.3)
    v = decide([test("a", math.nan), test("b", math.nan)])
    assert (v.memorization, v.layer, v.tests) == ("none", None, 0)
    assert "no test could run" in v.reason


def test_several_signals_are_corrected_across_layers_then_across_signals():
    """Two stages, by hand: Holm within each signal, a signal's smallest adjusted p, Holm across signals.
    A signal measured once for the whole model (a loss) pays for the signals, not for every layer."""
    membership = [test(f"l{i}", p) for i, p in enumerate([0.001, 0.02, 0.5])]
    alignment = [test(f"l{i}", p, signal="view_alignment") for i, p in enumerate([0.04, 0.3, 0.9])]
    loss = [test("model", 0.0009, estimate=0.77, low=0.63, high=0.91, signal="loss")]
    v = decide(membership + alignment + loss)
    # within: membership 3 x 0.001 = 0.003; alignment 3 x 0.04 = 0.12; loss 0.0009.
    # across (Holm over 0.0009, 0.003, 0.12): 3 x 0.0009 = 0.0027, max(0.0027, 2 x 0.003) = 0.006, 0.12
    assert (v.memorization, v.signal, v.layer, v.tests) == ("detected", "loss", "model", 7)
    assert v.p_value == pytest.approx(0.0027) and v.raw_p_value == 0.0009
    assert "two stages" in v.correction and "3 signals" in v.correction
    # Holm over all 7 at once would give 7 x 0.0009 = 0.0063: the same verdict here, but for 111 tests
    # (22 layers x 5 signals + the loss) 0.0009 would be 0.1 and the loss attack could never decide.
    v = decide([test(f"l{i}", 0.5, signal=s) for s in ("a", "b", "c", "d", "e") for i in range(22)] + loss)
    assert (v.memorization, v.signal) == ("detected", "loss") and v.p_value == pytest.approx(6 * 0.0009)
    # the permutations' floor counts the signal with fewest tests: 6 signals x 1 test / 101 relabellings
    v = decide([test(f"l{i}", 0.5, signal=s) for s in ("a", "b", "c", "d", "e") for i in range(22)]
               + [test("model", 1 / 101, signal="loss")], permutations=100)
    assert v.memorization == "inconclusive" and "use at least 600 permutations" in v.reason


def test_the_family_wise_rates_under_the_null():
    """22 independent uniform p-values per family, 4,000 families: detected in at most 1% of them and
    inconclusive or detected in at most 5% (Holm controls both; binomial margins of 3 standard errors)."""
    import numpy as np

    rng = np.random.default_rng(0)
    outcomes = [decide([test(f"l{i}", p) for i, p in enumerate(rng.random(22))]).memorization for _ in range(4000)]
    assert outcomes.count("detected") / 4000 <= 0.01 + 3 * math.sqrt(0.01 * 0.99 / 4000)
    assert (4000 - outcomes.count("none")) / 4000 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)


def test_too_few_permutations_for_the_level_after_holm():
    # 22 tests, 1,000 permutations: the smallest corrected p is 22 / 1001 = 0.022 > 0.01
    tests = [test(f"l{i}", 1 / 1001 if i == 0 else 0.5) for i in range(22)]
    v = decide(tests, permutations=1000)
    assert v.memorization == "inconclusive"
    assert "cannot give a corrected p below 0.01" in v.reason and "at least 2200 permutations" in v.reason
    assert decide([test(f"l{i}", 0.5) for i in range(22)], permutations=1000).memorization == "none"
    # 100 permutations: the smallest corrected p, 22 / 101, cannot even reach 0.05: no verdict is possible
    v = decide([test(f"l{i}", 0.5) for i in range(22)], permutations=100)
    assert v.memorization == "inconclusive" and "use at least 2200 permutations" in v.reason
    assert decide([test("a", 0.001)], permutations=2200).memorization == "detected"


def test_the_verdict_survives_the_json():
    v = decide([test("a", 0.004), test("b", math.nan)])
    again = type(v).from_dict(v.as_dict())
    assert again == v


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


LAYERS = (LayerSpec("a", "a"), LayerSpec("b", "b"))
FIXED = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1


def audit(build):
    spec = ModelSpec(name="twoconv", layers=LAYERS, build=lambda checkpoint: build(), default_image_size=16)
    settings = make_settings(model="twoconv", data="builtin", samples=40, holdout="builtin", augmentations=2,
                             planted_units=8, planted_strength=30, device="cpu", control="random,planted",
                             permutations=1000)
    result = run_audit(settings, spec)
    defaults = load_audit_file(DEFAULT_AUDIT)
    outcomes = evaluate_result(result, defaults.thresholds_for(spec), defaults.multiple_testing)
    return result, outcomes


def test_on_the_blind_control_nothing_is_found():
    """The network cannot see its input: every unit is constant over the images, so no layer fails
    the default gates, the planted control is not detected, and every verdict is none."""
    result, outcomes = audit(lambda: blind_copy(TwoConv(), FIXED))
    assert [o.status for o in outcomes.values()] == ["passed", "passed"]
    for layer in result.layers:
        assert (layer.membership.units, layer.membership.excluded_units) == (0, layer.channels)
    assert result.verdict.memorization == "none" and "no test could run" in result.verdict.reason
    assert result.control.verdict.memorization == "none"
    assert result.planted.verdict.memorization == "none"
    assert result.planted.recall == 0 and result.planted.argmax_hits == 0
    again = AuditResult.from_json(result.to_json())
    assert again.verdict == result.verdict and again.planted.verdict == result.planted.verdict
    assert again.control.verdict == result.control.verdict
    # a file written before verdicts and left-out units (--memaudit-from): read, its verdict derived
    old = result.to_json()
    del old["summary"]["verdict"], old["control"]["verdict"], old["planted"]["verdict"]
    for layer in old["layers"]:
        del layer["membership"]["units"], layer["membership"]["excluded_units"]
    stored = AuditResult.from_json(old)
    assert stored.layers[0].membership.units is None and stored.planted.verdict is None
    assert stored.verdict.memorization == "none" and stored.control.verdict.memorization == "none"


def test_on_the_encoder_itself_the_planted_control_is_found_and_the_random_control_is_quiet():
    """Few units (16 per layer), so that 8 planted images with a unit each move the member share: the
    share counts units, and a few memorizing units among thousands would not (the detection curve
    and recall say whether single units are found)."""
    result, outcomes = audit(TwoConv)
    assert result.planted.verdict.memorization == "detected"
    assert result.planted.recall == 1.0 and result.planted.argmax_hits == 8
    assert result.control.verdict.memorization == "none"
    # the model's own verdict and its gates say the same: generated images, untrained weights
    assert result.verdict.memorization in ("none", "inconclusive")
    assert all(o.status == "passed" for o in outcomes.values())


def test_a_p_gate_the_permutations_cannot_reach_is_warned_about(pytester):
    """The demo's 22 layers, Holm, membership_p_min 0.01: 100 permutations give at best 22 / 101."""
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text(DEFAULT_AUDIT.read_text())
    result = pytester.runpytest("audits", "--collect-only", "--memaudit-permutations", "100", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*membership_p_min = 0.01 cannot fail: with 100 permutations the smallest p-value "
                                 "after the holm correction over 22 layer(s) is 0.218; use --memaudit-permutations "
                                 "2200 or more*"])
    quiet = pytester.runpytest("audits", "--collect-only", "--memaudit-permutations", "2200", "-p", "no:cacheprovider")
    assert "cannot fail" not in quiet.stdout.str()
