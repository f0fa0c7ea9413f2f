"""Thresholds to outcomes: which of a layer's figures crossed which limit.

Every threshold key is ``<figure>_max`` (fails when the figure is above) or ``<figure>_min``
(fails when below); ``fraction_above_level`` is not a limit but the UnitMem level that the
``fraction_above`` figure counts units above. A threshold set to ``None`` is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .stats import LayerStats, fraction_above

# key -> (figure, what it limits), in the order failures are reported.
LIMITS: dict[str, tuple[str, str]] = {
    "mean_unitmem_max": ("mean_unitmem", "the layer's mean UnitMem"),
    "p90_unitmem_max": ("p90_unitmem", "the layer's 90th-percentile UnitMem"),
    "max_unitmem_max": ("max_unitmem", "the layer's highest unit UnitMem"),
    "fraction_above_max": ("fraction_above", "the share of units above fraction_above_level"),
    "dead_fraction_max": ("dead_fraction", "the share of dead units"),
    "gap_min": ("gap", "top-10% mean minus bottom-10% mean UnitMem"),
    "ttest_p_max": ("ttest_p", "Welch t-test p of top-10% against bottom-10% units"),
    "excess_over_control_max": (
        "excess_over_control",
        "mean UnitMem minus the same layer's mean in the random-weights control",
    ),
}
SETTINGS = {"fraction_above_level": "the UnitMem level that fraction_above counts units above"}
THRESHOLD_KEYS = tuple(LIMITS) + tuple(SETTINGS)


@dataclass(frozen=True)
class Check:
    key: str
    figure: str
    value: float
    limit: float
    passed: bool

    @property
    def message(self) -> str:
        if math.isnan(self.value):
            return f"{self.figure} is undefined (NaN), limit {self.key} = {self.limit:g}"
        relation = "exceeds" if self.key.endswith("_max") else "is below"
        return f"{self.figure} = {self.value:.4g} {relation} {self.key} = {self.limit:g}"


@dataclass(frozen=True)
class GateOutcome:
    layer: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if not check.passed)

    def failure_message(self) -> str:
        lines = [f"layer {self.layer}: {len(self.failures)} threshold(s) crossed"]
        lines += [f"  {check.message}" for check in self.failures]
        return "\n".join(lines)


def layer_figures(
    stats: LayerStats, unitmem: np.ndarray, level: float, control_mean: float | None
) -> dict[str, float]:
    """Every figure a threshold can limit, for one layer."""
    figures = {
        "mean_unitmem": stats.mean_unitmem,
        "p90_unitmem": stats.p90_unitmem,
        "max_unitmem": stats.max_unitmem,
        "fraction_above": fraction_above(unitmem, level),
        "dead_fraction": stats.dead_units / len(unitmem),
        "gap": stats.gap,
        "ttest_p": stats.ttest_p,
    }
    if control_mean is not None:
        figures["excess_over_control"] = stats.mean_unitmem - control_mean
    return figures


def evaluate(layer: str, figures: dict[str, float], thresholds: dict[str, float | None]) -> GateOutcome:
    checks = []
    for key, (figure, _) in LIMITS.items():
        limit = thresholds.get(key)
        if limit is None or figure not in figures:
            continue
        value = float(figures[figure])
        if math.isnan(value):
            passed = False
        elif key.endswith("_max"):
            passed = value <= limit
        else:
            passed = value >= limit
        checks.append(Check(key, figure, value, float(limit), passed))
    return GateOutcome(layer, tuple(checks))
