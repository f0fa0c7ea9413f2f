"""Comparison with a baseline, compare gates and the saved-runs store, on results built here: numbers
against hand computations and exact enumeration."""

import itertools
import json
import math
import re
from datetime import datetime, timezone

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pytest_memaudit.gates.baselines import check_name, find_baseline, format_saved, new_entry, save_run, saved_runs
from pytest_memaudit.gates.compare import compare
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.gates.limits import parse_compare_option
from pytest_memaudit.errors import ConfigError
from pytest_memaudit.results.outcomes import Figure, Gate
from pytest_memaudit.gates.thresholds import evaluate
from pytest_memaudit.models import LayerSpec, ModelSpec
from pytest_memaudit.metric.stats import Interval, difference_interval, distribution_shift_p
from test_report import synthetic_result

NAMES = ["stem", "block.0", "head"]


def test_difference_interval_by_hand():
    now, then = Interval(0.50, 0.02, 0.0, 0.0, 10), Interval(0.40, 0.03, 0.0, 0.0, 8)
    v1, v2 = 0.02**2, 0.03**2
    df = (v1 + v2) ** 2 / (v1**2 / 9 + v2**2 / 7)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(v1 + v2)
    got = difference_interval(now, then)
    assert got.estimate == pytest.approx(0.10) and got.se == pytest.approx(math.sqrt(v1 + v2))
    assert (got.low, got.high) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    exact = difference_interval(Interval(0.3, 0.0, 0.3, 0.3, 10), Interval(0.3, 0.0, 0.3, 0.3, 10))
    assert (exact.low, exact.high) == (0.0, 0.0)
    undefined = difference_interval(Interval(0.3, math.nan, math.nan, math.nan, 1), then)
    assert math.isnan(undefined.low) and undefined.estimate == pytest.approx(-0.1)


def test_distribution_shift_p_is_the_exact_two_sided_mann_whitney():
    now, then = np.array([0.9, 0.8, 0.35, 0.7]), np.array([0.1, 0.2, 0.3, 0.4, 0.05])
    pooled = np.concatenate([now, then])

    def u(first):  # pairs (a in first, b in the rest) with a > b
        rest = np.setdiff1d(np.arange(pooled.size), first)
        return sum(pooled[i] > pooled[j] for i in first for j in rest)

    observed = u(range(now.size))
    mean = now.size * then.size / 2
    splits = [u(first) for first in itertools.combinations(range(pooled.size), now.size)]
    expected = np.mean([abs(value - mean) >= abs(observed - mean) for value in splits])
    assert distribution_shift_p(now, then) == pytest.approx(expected)
    assert distribution_shift_p(np.full(3, 0.2), np.full(4, 0.2)) == 1.0


def shifted(result, layer, amount):
    """``result`` with ``amount`` added to every UnitMem value of one layer (stats and mean interval too)."""
    from dataclasses import replace

    from pytest_memaudit.metric.stats import layer_stats

    target = result.layer(layer)
    values = replace(target.values, unitmem=target.values.unitmem + amount)
    target.values, target.stats = values, layer_stats(values.unitmem, values.dead)
    return result


def test_compare_moves_only_the_changed_layer_and_holm_adjusts_the_shift():
    base = synthetic_result([f"s{i}" for i in range(20)], NAMES, [30, 40, 20], topk=3)
    rises = np.arange(20, 0, -1) * 0.005  # unit u of the head rises by (20 - u) / 200
    now = shifted(synthetic_result([f"s{i}" for i in range(20)], NAMES, [30, 40, 20], topk=3), "head", rises)
    comparison = compare(now, base, "base")
    assert comparison.differences == []
    raw = [scipy_stats.mannwhitneyu(a.values.unitmem, b.values.unitmem).pvalue for a, b in zip(now.layers, base.layers)]
    order = np.argsort(raw)
    holm = np.empty(3)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        holm[i] = running
    assert [layer.shift_p_adjusted for layer in comparison.layers] == pytest.approx(holm.tolist())
    for layer in comparison.layers[:2]:
        assert all(change.delta == 0 and change.beyond_noise is False for change in layer.changes.values())
    head = comparison.layer("head").changes
    assert head["mean_unitmem"].delta == pytest.approx(rises.mean())
    # synthetic results have no jackknife intervals: max and mean fall back on the (Holm-adjusted) shift test
    assert head["mean_unitmem"].interval is None
    assert head["mean_unitmem"].beyond_noise == (comparison.layer("head").shift_p_adjusted < 0.05)
    assert [(u.layer, u.unit) for u in comparison.risers] == [("head", i) for i in range(20)]
    assert [u.current - u.baseline for u in comparison.risers] == pytest.approx(rises.tolist())


def test_compare_names_what_differs_and_refuses_other_widths():
    base = synthetic_result(["a", "b", "c"], NAMES, [10, 10, 10])
    now = synthetic_result(["a", "b", "d", "e"], NAMES, [10, 10, 10])
    now.settings = now.settings | {"image_size": 32, "seed": 4}
    assert compare(now, base, "base").differences == [
        ("data points", "3", "4 (2 in common with the baseline)"), ("image size", "64", "32"), ("seed", "0", "4")]
    wider = synthetic_result(["a", "b", "c"], NAMES, [10, 12, 10])
    with pytest.raises(ConfigError, match="block.0 has 12 units here and 10 there"):
        compare(wider, base, "base")


def test_rise_gates_absolute_relative_and_significant():
    figures = {"mean_unitmem_rise": Figure(0.04, 0.01, 0.07, baseline=0.2),
               "max_unitmem_rise": Figure(0.1, baseline=-0.5, beyond_noise=False)}
    mean, top = evaluate("head", figures, {"mean_unitmem_rise_max": Gate(0.03),
                                           "max_unitmem_rise_max": Gate(0.1, relative=True)}).checks
    assert mean.passed is False and mean.limit == 0.03  # 0.04 > 0.03
    assert top.passed is False and top.limit == pytest.approx(0.05) and top.relative == 0.1  # 10% of |-0.5|
    [top] = evaluate("head", figures, {"max_unitmem_rise_max": Gate(0.25, relative=True)}).checks
    assert top.passed is True  # 0.1 <= 25% of 0.5
    [top] = evaluate("head", figures, {"max_unitmem_rise_max": Gate(0.1, "significant", relative=True)}).checks
    assert top.passed is True  # past the limit, but not beyond noise
    figures["max_unitmem_rise"] = Figure(0.1, baseline=-0.5, beyond_noise=True)
    [top] = evaluate("head", figures, {"max_unitmem_rise_max": Gate(0.1, "significant", relative=True)}).checks
    assert top.passed is False
    outcome = evaluate("head", figures, {"mean_unitmem_rise_max": Gate(0.0, "significant")})
    assert outcome.checks[0].passed is False  # the whole interval [0.01, 0.07] is above 0
    assert outcome.failure_message() == (
        "layer head: 1 compare gate(s) crossed\n  mean_unitmem rose from 0.2 (baseline) to 0.24 (+0.04), more than "
        "mean_unitmem_rise_max = 0 (its whole 95% interval [0.01, 0.07] lies above the limit)")
    [check] = evaluate("head", figures, {"mean_unitmem_rise_max": Gate(0.02, "significant")}).checks
    assert check.passed is True  # the interval reaches below 0.02


def test_compare_options_and_yaml_blocks(tmp_path):
    assert parse_compare_option("mean_unitmem:0.02") == ("*", "mean_unitmem_rise_max", {"limit": 0.02, "relative": False})
    assert parse_compare_option("conv.out:gap:15%") == ("conv.out", "gap_rise_max", {"limit": 0.15, "relative": True})
    assert parse_compare_option("gap:off") == ("*", "gap_rise_max", {"limit": None, "relative": False})
    assert parse_compare_option("head:mean_unitmem:0.02:significant") == (
        "head", "mean_unitmem_rise_max", {"limit": 0.02, "relative": False, "when": "significant"})
    assert parse_compare_option("mean_unitmem:10%:estimate") == (
        "*", "mean_unitmem_rise_max", {"limit": 0.1, "relative": True, "when": "estimate"})
    assert parse_compare_option("head:gap:off") == ("head", "gap_rise_max", {"limit": None, "relative": False})
    for text, message in [("mean_unitmem=0.02", "write [LAYER:]FIGURE:DELTA[:significant]"),
                          ("mean_unitmem:0.02:sometimes", "'sometimes' is not when a compare gate fails: write "
                                                          "significant (only a rise beyond noise"), ("mean_unitmen:0.02", "Did you mean 'mean_unitmem'"),
                          ("gap:x%", "is not a percentage"), ("gap:1.5", "outside [0, 1]"), ("gap:abc", "is not a number")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_compare_option(text)
    path = tmp_path / "memaudit.yaml"
    path.write_text("thresholds: {mean_unitmem_max: 1.0}\ncompare:\n  mean_unitmem: {limit: 5%, when: significant}\n"
                    "  membership_excess: 0.03\n  layers:\n    head: {mean_unitmem: 0.1}\n")
    model = ModelSpec("m", tuple(LayerSpec(name, name) for name in NAMES), build=None)
    thresholds = load_audit_file(path).thresholds_for(model, {"stem": {"gap_rise_max": {"limit": 0.2, "relative": False}}})
    assert thresholds["block.0"]["mean_unitmem_rise_max"] == Gate(0.05, "significant", "fail", relative=True)
    assert thresholds["head"]["mean_unitmem_rise_max"] == Gate(0.1, "significant", "fail")  # a number: absolute
    assert thresholds["stem"]["gap_rise_max"] == Gate(0.2) and "gap_rise_max" not in thresholds["head"]
    for block, message in [("compare: {mean_unitmem_max: 0.1}", "unknown key 'mean_unitmem_max'. Did you mean 'mean_unitmem'"),
                           ("compare: {gap: {limit: 0.1, when: sometimes}}", "when must be one of"),
                           ("compare: {layers: {hed: {gap: 0.1}}}", "has no layer 'hed'. Did you mean 'head'"),
                           ("compare: {gap: -0.1}", "outside [0, 1]")]:
        path.write_text(block + "\n")
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_audit_file(path).thresholds_for(model)


def test_saved_runs_store(tmp_path):
    document = {"model": "my enc", "checkpoint": {"sha256": "ab" * 32}, "layers": []}
    when = datetime(2026, 11, 30, 14, 25, 1, tzinfo=timezone.utc)
    first = save_run(tmp_path, document, "release", when)
    second = save_run(tmp_path, document, "release", when)  # the same second: the next one
    other = save_run(tmp_path, {"model": "demo", "checkpoint": None}, "release", when)
    assert first.relative_to(tmp_path).as_posix() == f".memaudit/my_enc/20261130T142501Z_{'ab' * 6}_release.json"
    assert second.name == f"20261130T142502Z_{'ab' * 6}_release.json" and other.name == "20261130T142501Z_none_release.json"
    assert json.loads(first.read_text()) == document
    (tmp_path / ".memaudit" / "demo" / "notes.json").write_text("{}")  # not an entry
    assert [run.path for run in saved_runs(tmp_path)] == [first, other, second]  # by date, then file name
    assert find_baseline("latest", tmp_path, tmp_path, "my enc") == second
    assert find_baseline("release", tmp_path, tmp_path, "demo") == other  # the model's own first
    assert find_baseline(f"my_enc/{first.stem}", tmp_path, tmp_path, "demo") == first
    assert find_baseline(str(first), tmp_path, tmp_path, "demo") == first
    with pytest.raises(ConfigError, match="no saved run of model var_d16"):
        find_baseline("latest", tmp_path, tmp_path, "var_d16")
    with pytest.raises(ConfigError, match="no such results file"):
        find_baseline("gone.json", tmp_path, tmp_path, "demo")
    assert format_saved(tmp_path, saved_runs(tmp_path)).splitlines()[3].split() == [
        "2026-11-30", "14:25:01", "demo", "none", "release", f"demo/{other.name}"]
    assert new_entry(tmp_path, document, "x", when).name.endswith("_x.json")
    for name in ("latest", "a b", "-x", "v1.json", "x" * 65):
        with pytest.raises(ConfigError, match="a saved run's NAME is"):
            check_name(name)
