"""The gates' vocabulary that a result holds: the threshold keys and the figures they limit, a configured
``Gate``, a ``Check`` of one figure against it and a layer's ``GateOutcome``.

Every threshold key is ``<figure>_max`` (the gate is crossed when the figure is above the
limit) or ``<figure>_min`` (crossed when below); ``fraction_above_level`` is not a limit but the
UnitMem level that the ``fraction_above`` figure counts units above. A gate has a ``limit``
(None: off), ``when`` it is crossed (``estimate``: the figure itself crosses; ``significant``:
its whole 95% interval lies beyond the limit, for figures with an interval) and a ``severity``
(``fail`` fails the layer's test; ``warn`` only warns). p-value figures are Holm-adjusted across
the audited layers unless ``multiple_testing`` is ``none``.

Compare gates limit how far a figure rose over a baseline run's: their keys are
``<figure>_rise_max``, their figures ``<figure>_rise`` (this run's value minus the baseline's),
and a relative gate's limit is a fraction of the baseline's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


# key -> (figure, what it limits), in the order failures are reported.
LIMITS: dict[str, tuple[str, str]] = {
    "membership_excess_max": (
        "membership_excess",
        "share of units whose argmax is a member minus the members' share of the data points (needs held-out images)",
    ),
    "membership_p_min": (
        "membership_p",
        "permutation p-value that members are picked by units more than held-out images (needs held-out images)",
    ),
    "excess_over_control_max": (
        "excess_over_control",
        "mean UnitMem minus the same layer's mean in the random-weights control (needs the random control)",
    ),
    "mean_unitmem_max": ("mean_unitmem", "the layer's mean UnitMem"),
    "p90_unitmem_max": ("p90_unitmem", "the layer's 90th-percentile UnitMem"),
    "max_unitmem_max": ("max_unitmem", "the layer's highest unit UnitMem"),
    "fraction_above_max": ("fraction_above", "the share of units above fraction_above_level"),
    "dead_fraction_max": ("dead_fraction", "the share of dead units"),
    "gap_min": ("gap", "top-10% mean minus bottom-10% mean UnitMem"),
    "ttest_p_max": ("ttest_p", "Welch t-test p of top-10% against bottom-10% units (not a memorization test)"),
}

SETTINGS = {"fraction_above_level": "the UnitMem level that fraction_above counts units above"}

THRESHOLD_KEYS = tuple(LIMITS) + tuple(SETTINGS)

# Figures a compare gate may limit the rise of (a rise is a regression), and what they are.
COMPARED: dict[str, str] = {
    "membership_excess": "the membership excess (share of units whose argmax is a member minus the members' share)",
    "excess_over_control": "mean UnitMem minus the random-weights control's",
    "mean_unitmem": "the layer's mean UnitMem",
    "median_unitmem": "the layer's median UnitMem",
    "p90_unitmem": "the layer's 90th-percentile UnitMem",
    "max_unitmem": "the layer's highest unit UnitMem",
    "fraction_above": "the share of units above fraction_above_level",
    "dead_fraction": "the share of dead units",
    "gap": "top-10% mean minus bottom-10% mean UnitMem",
}

RISE_LIMITS: dict[str, tuple[str, str]] = {
    f"{figure}_rise_max": (f"{figure}_rise", f"rise of {meaning} over the baseline run")
    for figure, meaning in COMPARED.items()
}

GATES = LIMITS | RISE_LIMITS  # every gate key -> (figure, what it limits), in the order failures are reported

INTERVAL_FIGURES = ("mean_unitmem", "median_unitmem", "p90_unitmem", "gap", "excess_over_control", "membership_excess")

P_VALUE_FIGURES = ("membership_p", "ttest_p")

WHEN = ("estimate", "significant")

SEVERITIES = ("fail", "warn")

MULTIPLE_TESTING = ("holm", "none")

NEEDS = {  # figures an audit has only with something extra, and how to get it
    "membership_excess": "held-out images (--memaudit-holdout DIR)",
    "membership_p": "held-out images (--memaudit-holdout DIR)",
    "excess_over_control": "the random-weights control (--memaudit-control random)",
    "membership_excess_rise": "held-out images in this run and in the baseline",
    "excess_over_control_rise": "the random-weights control in this run and in the baseline",
}


@dataclass(frozen=True)
class Gate:
    """One threshold as configured."""

    limit: float | None
    when: str = "estimate"
    severity: str = "fail"
    relative: bool = False  # a compare gate's limit as a fraction of the baseline's value

    def as_dict(self) -> dict:
        fields = {"limit": self.limit, "when": self.when, "severity": self.severity}
        return fields | {"relative": True} if self.relative else fields


@dataclass(frozen=True)
class Figure:
    """A figure's value and, where it has one, its 95% interval. A rise over a baseline also has the
    baseline's value, and whether it is beyond noise where no interval says so (None: unknown)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    baseline: float = math.nan
    beyond_noise: bool | None = None


@dataclass(frozen=True)
class Check:
    key: str
    figure: str
    value: float
    limit: float
    passed: bool
    when: str = "estimate"
    severity: str = "fail"
    low: float = math.nan
    high: float = math.nan
    baseline: float = math.nan  # compare gates: the baseline's value of the figure
    relative: float | None = None  # a relative compare gate's fraction (``limit`` is then that share of the baseline)

    @property
    def message(self) -> str:
        if math.isnan(self.value):
            return f"{self.figure} is undefined (NaN), limit {self.key} = {self.limit:g}"
        if self.key in RISE_LIMITS:
            figure = self.figure.removesuffix("_rise")
            limit = (f"{self.relative * 100:g}% of the baseline's {abs(self.baseline):.4g} = {self.limit:.4g}"
                     if self.relative is not None else f"{self.limit:g}")
            text = (f"{figure} rose from {self.baseline:.4g} (baseline) to {self.baseline + self.value:.4g} "
                    f"({self.value:+.4g}), more than {self.key} = {limit}")
        else:
            relation = "exceeds" if self.key.endswith("_max") else "is below"
            text = f"{self.figure} = {self.value:.4g} {relation} {self.key} = {self.limit:g}"
        if self.when == "significant":
            side = "above" if self.key.endswith("_max") else "below"
            if math.isfinite(self.low) and math.isfinite(self.high):
                text += f" (its whole 95% interval [{self.low:.4g}, {self.high:.4g}] lies {side} the limit)"
            else:
                text += " (and the layer's UnitMem distribution shifted beyond noise: Mann-Whitney, Holm-adjusted)"
        return text


@dataclass(frozen=True)
class GateOutcome:
    layer: str
    checks: tuple[Check, ...]

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed and c.severity == "fail")

    @property
    def warnings(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed and c.severity == "warn")

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        """failed, warned (crossed only warn-gates), passed, or not gated (no check applied)."""
        if not self.checks:
            return "not gated"
        if self.failures:
            return "failed"
        return "warned" if self.warnings else "passed"

    def failure_message(self) -> str:
        compare = sum(check.key in RISE_LIMITS for check in self.failures)
        crossed = [f"{count} {kind}" for count, kind in ((len(self.failures) - compare, "threshold(s)"),
                                                         (compare, "compare gate(s)")) if count]
        lines = [f"layer {self.layer}: {' and '.join(crossed)} crossed"]
        lines += [f"  {check.message}" for check in self.failures]
        return "\n".join(lines)

    def warning_message(self) -> str:
        return f"layer {self.layer}: " + "; ".join(check.message for check in self.warnings)


def as_json(thresholds: dict[str, Gate | float]) -> dict:
    return {key: value.as_dict() if isinstance(value, Gate) else value for key, value in thresholds.items()}
