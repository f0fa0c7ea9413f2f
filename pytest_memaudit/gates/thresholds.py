"""Thresholds to outcomes: which of a layer's figures crossed which limit (the keys, ``Gate`` and
``GateOutcome`` are in ``results/outcomes.py``, as a result stores them)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..metric.stats import Interval, fraction_above, holm
from ..results.outcomes import COMPARED, GATES, NEEDS, P_VALUE_FIGURES, RISE_LIMITS, Check, Figure, Gate, GateOutcome

if TYPE_CHECKING:
    from ..results.result import AuditResult, LayerResult


def layer_figures(layer: LayerResult, level: float, adjusted_p: dict[str, float] | None = None) -> dict[str, Figure]:
    """Every figure a threshold can limit, for one layer, with intervals where there are any.

    ``adjusted_p`` replaces the layer's raw p-values (multiple-testing correction)."""
    stats = layer.stats
    figures = {
        "mean_unitmem": stats.mean_unitmem,
        "median_unitmem": stats.median_unitmem,
        "p90_unitmem": stats.p90_unitmem,
        "max_unitmem": stats.max_unitmem,
        "fraction_above": fraction_above(layer.values.unitmem, level),
        "dead_fraction": stats.dead_units / layer.channels,
        "gap": stats.gap,
        "ttest_p": stats.ttest_p,
    }
    if layer.control_excess is not None:
        figures["excess_over_control"] = layer.control_excess.estimate
    if layer.membership is not None and layer.membership.units != 0:  # 0: every unit dead or constant
        figures["membership_excess"] = layer.membership.excess
        figures["membership_p"] = layer.membership.p_value
    figures.update(adjusted_p or {})
    intervals = layer_intervals(layer)
    return {
        name: Figure(float(value), intervals[name].low, intervals[name].high) if name in intervals
        else Figure(float(value))
        for name, value in figures.items()
    }


def layer_intervals(layer: LayerResult) -> dict[str, Interval]:
    """The jackknife interval of each of a layer's figures that has one."""
    intervals = dict(layer.intervals)
    if layer.control_excess is not None:
        intervals["excess_over_control"] = layer.control_excess
    if layer.membership is not None and layer.membership.excess_interval is not None:
        intervals["membership_excess"] = layer.membership.excess_interval
    return intervals


def adjusted_p_values(result: AuditResult, method: str) -> dict[str, dict[str, float]]:
    """Per layer, its p-value figures corrected across the result's layers (``holm``) or as they
    are (``none``). A layer without a figure (no held-out images) is not in its family."""
    adjusted: dict[str, dict[str, float]] = {layer.name: {} for layer in result.layers}
    for figure in P_VALUE_FIGURES:
        layers = [layer for layer in result.layers if _p_value(layer, figure) is not None]
        raw = [_p_value(layer, figure) for layer in layers]
        for layer, value in zip(layers, holm(raw) if method == "holm" else raw):
            adjusted[layer.name][figure] = value
    return adjusted


def _p_value(layer: LayerResult, figure: str) -> float | None:
    if figure == "ttest_p":
        return layer.stats.ttest_p
    return None if layer.membership is None or layer.membership.units == 0 else layer.membership.p_value


def evaluate(layer: str, figures: dict[str, Figure], thresholds: dict[str, Gate | float]) -> GateOutcome:
    """Check every gate with a limit whose figure the layer has (rise figures: when compared with a
    baseline). With ``when: significant`` a gate is crossed only when the figure's whole interval lies
    past the limit, or, without an interval, when the figure is past it and beyond noise."""
    checks = []
    for key, (figure, _) in GATES.items():
        gate = thresholds.get(key)
        if not isinstance(gate, Gate) or gate.limit is None or figure not in figures:
            continue
        found = figures[figure]
        value = found.value
        limit = gate.limit * abs(found.baseline) if gate.relative else float(gate.limit)
        is_max = key.endswith("_max")
        past = value > limit if is_max else value < limit
        if math.isnan(value) or math.isnan(limit):
            passed = False
        elif gate.when == "significant" and math.isfinite(found.low) and math.isfinite(found.high):
            passed = not (found.low > limit if is_max else found.high < limit)
        elif gate.when == "significant":
            passed = not (past and bool(found.beyond_noise))
        else:
            passed = not past
        checks.append(Check(key, figure, value, limit, passed, gate.when, gate.severity, found.low, found.high,
                            found.baseline, float(gate.limit) if gate.relative else None))
    return GateOutcome(layer, tuple(checks))


def evaluate_layer(layer: LayerResult, thresholds: dict[str, Gate | float], adjusted_p: dict[str, float],
                   rises: dict[str, Figure] | None = None) -> tuple[GateOutcome, dict[str, Figure]]:
    """``layer``'s outcome under its ``thresholds`` (kept on the layer, for the JSON and the report),
    and the figures it was judged on; ``adjusted_p`` as ``adjusted_p_values`` gives it; ``rises``: its
    ``<figure>_rise`` figures, when compared with a baseline (``compare.LayerChange.rise_figures``)."""
    figures = layer_figures(layer, fraction_above_level(thresholds), adjusted_p) | (rises or {})
    outcome = evaluate(layer.name, figures, thresholds)
    layer.thresholds, layer.outcome = thresholds, outcome
    return outcome, figures


def evaluate_result(result: AuditResult, thresholds: dict[str, dict[str, Gate | float]],
                    multiple_testing: str = "holm") -> dict[str, GateOutcome]:
    """Gate an audit without pytest: each layer of ``result`` that ``thresholds`` (layer name ->
    its thresholds, as ``config.AuditFile.thresholds_for`` gives them) names, with p-values
    corrected across the result's layers. The outcomes are also kept on the layers."""
    adjusted = adjusted_p_values(result, multiple_testing)
    return {layer.name: evaluate_layer(layer, thresholds[layer.name], adjusted[layer.name])[0]
            for layer in result.layers if layer.name in thresholds}


def missing_figures(thresholds: dict[str, Gate | float], has: set[str]) -> list[tuple[str, str]]:
    """(key, what it needs) for every gate with a limit whose figure this audit will not have."""
    return [
        (key, NEEDS[figure])
        for key, (figure, _) in GATES.items()
        if isinstance(thresholds.get(key), Gate) and thresholds[key].limit is not None
        and figure in NEEDS and figure not in has
    ]


def fraction_above_level(thresholds: dict[str, Gate | float]) -> float:
    level = thresholds.get("fraction_above_level")
    return 0.9 if not isinstance(level, (int, float)) else float(level)


def figures_had(result: AuditResult) -> set[str]:
    """The figures that need something extra (NEEDS) which a finished result has."""
    has = set()
    if result.membership is not None or any(layer.membership is not None for layer in result.layers):
        has |= {"membership_excess", "membership_p"}
    if any(layer.control_excess is not None for layer in result.layers):
        has.add("excess_over_control")
    return has


def rises_had(current: set[str], baseline: set[str]) -> set[str]:
    """The rise figures two runs can be compared on, from the NEEDS-figures each has."""
    return {f"{figure}_rise" for figure in COMPARED if figure not in NEEDS or figure in current & baseline}


def without_rise_gates(thresholds: dict[str, Gate | float]) -> dict[str, Gate | float]:
    """A layer's thresholds without its compare gates (a run compared with no baseline)."""
    return {key: value for key, value in thresholds.items() if key not in RISE_LIMITS}


HOLDOUT_FIGURES = ("membership_excess", "membership_p")  # a run's own figures that need held-out images


def holdout_gates(thresholds: dict[str, Gate | float]) -> list[str]:
    """The gate keys (with a limit) of ``thresholds`` whose figure needs held-out images."""
    return [key for key, value in thresholds.items() if key in GATES and GATES[key][0] in HOLDOUT_FIGURES
            and isinstance(value, Gate) and value.limit is not None]
