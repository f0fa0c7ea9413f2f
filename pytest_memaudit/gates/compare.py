"""An audit against a baseline run of the same architecture: per layer, how each figure moved and
whether that is beyond noise; which settings and data differ; the units whose UnitMem rose most.

Noise: a figure with a jackknife interval in both runs gets the interval of its change (the runs
are independent: se = sqrt(se1^2 + se2^2), ``stats.difference_interval``), beyond noise when it
excludes 0. Other figures use a two-sided Mann-Whitney test of the two runs' unit UnitMem values,
Holm-corrected across the compared layers. Unit identity (the same unit index in both runs) means
something only when one checkpoint descends from the other, as in fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..metric.stats import Interval, difference_interval, distribution_shift_p, holm
from ..results.encoding import float_out
from ..results.outcomes import COMPARED, Figure
from ..results.result import AuditResult, LayerResult
from .thresholds import fraction_above_level, layer_figures, layer_intervals

SIGNIFICANCE = 0.05  # the level of "beyond noise"
RISERS_SHOWN = 20
# Settings that change the numbers: a comparison across a difference in any of them says so.
SETTINGS_COMPARED = ("image_size", "augmentations", "reduce", "seed", "precision", "device", "topk", "groups",
                     "permutations", "control", "planted_units", "planted_strength")
# Figures whose noise the unit UnitMem distributions cannot speak for.
NOT_UNITMEM = ("membership_excess",)


@dataclass(frozen=True)
class Change:
    """One figure of one layer in both runs."""

    figure: str
    baseline: float
    current: float
    interval: Interval | None  # of current - baseline, where both runs have a jackknife interval
    beyond_noise: bool | None  # None: no test applies

    @property
    def delta(self) -> float:
        return self.current - self.baseline


@dataclass
class LayerChange:
    name: str
    changes: dict[str, Change]  # by figure, in COMPARED order
    shift_p: float  # Mann-Whitney p of the two runs' unit UnitMem values
    shift_p_adjusted: float  # Holm-adjusted across the compared layers

    def rise_figures(self) -> dict[str, Figure]:
        """The gates' ``<figure>_rise`` figures: the change, its interval, the baseline's value."""
        return {
            f"{figure}_rise": Figure(change.delta, change.interval.low if change.interval else math.nan,
                                     change.interval.high if change.interval else math.nan, change.baseline,
                                     change.beyond_noise)
            for figure, change in self.changes.items()
        }


@dataclass(frozen=True)
class UnitRise:
    layer: str
    unit: int
    baseline: float
    current: float
    max_sample: int  # the current run's data point that activates the unit most


@dataclass
class Comparison:
    label: str  # how the user named the baseline: a saved name, a path, latest, previous
    baseline: AuditResult
    layers: list[LayerChange]
    differences: list[tuple[str, str, str]]  # (what, baseline's, this run's): allowed, said prominently
    risers: list[UnitRise]  # units whose UnitMem rose most, most first
    current_sha: str | None = None  # this run's checkpoint sha256

    @property
    def same_checkpoint(self) -> bool:
        return self.current_sha is not None and _sha(self.baseline) == self.current_sha

    def layer(self, name: str) -> LayerChange | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def to_json(self) -> dict[str, Any]:
        baseline = self.baseline
        return {
            "baseline": {"label": self.label, "model": baseline.model, "checkpoint": baseline.checkpoint,
                         "data_source": baseline.data_source, "samples": len(baseline.samples)},
            "differences": [{"what": what, "baseline": old, "current": new} for what, old, new in self.differences],
            "layers": [
                {"name": layer.name, "shift_p": float_out(layer.shift_p), "shift_p_adjusted": float_out(layer.shift_p_adjusted),
                 "figures": {figure: {"baseline": float_out(c.baseline), "current": float_out(c.current),
                                      "delta": float_out(c.delta), "low": float_out(c.interval.low) if c.interval else None,
                                      "high": float_out(c.interval.high) if c.interval else None,
                                      "beyond_noise": c.beyond_noise}
                             for figure, c in layer.changes.items()}}
                for layer in self.layers
            ],
        }


def check_architecture(model: str, layers: list[tuple[str, str]], baseline: AuditResult, label: str) -> None:
    """ConfigError unless ``baseline`` audited the same model and every one of ``layers`` ((name, module)
    pairs, this run's) with the same module. The baseline may have audited more layers (this run used -k)."""
    where = f"the baseline {label}"
    if baseline.model != model:
        raise ConfigError(f"{where} is an audit of model {baseline.model}, this run audits {model}: compare with a "
                          f"baseline of {model}")
    theirs = {layer.name: layer.module for layer in baseline.layers}
    missing = [name for name, _ in layers if name not in theirs]
    if missing:
        raise ConfigError(
            f"{where} did not audit layer(s) {', '.join(missing)} (it audited {', '.join(theirs)}): compare with a "
            "baseline of the same layers, or select the layers both audited with -k"
        )
    moved = [f"{name} is module {module} here and {theirs[name]} there" for name, module in layers
             if theirs[name] != module]
    if moved:
        raise ConfigError(f"{where} is of another architecture: {'; '.join(moved)}")


def check_views(current: dict[str, Any], baseline: AuditResult, label: str) -> None:
    """ConfigError unless ``baseline`` was audited with the view recipe whose record is ``current``:
    the recipe moves UnitMem by more than the changes a comparison looks for."""
    from ..pipeline.views import describe, record_of

    then = record_of(baseline.settings)
    if then["sha256"] != current["sha256"]:
        raise ConfigError(
            f"the baseline {label} was audited on other views: {describe(then)}; this run's are {describe(current)}. "
            "UnitMem depends on the views (two recipes on the same model differ by more than a change worth "
            "gating), so the runs cannot be compared: audit this run with the baseline's views (--memaudit-views, "
            "or views: under the model in the audit YAML), or save a new baseline with these views"
        )


def compare(current: AuditResult, baseline: AuditResult, label: str,
            thresholds: dict[str, dict] | None = None) -> Comparison:
    """Compare ``current`` with ``baseline`` on ``current``'s layers (``check_architecture`` and
    ``check_views`` first). ``thresholds`` (per layer) give each layer's ``fraction_above_level``."""
    from ..pipeline.views import record_of

    check_architecture(current.model, [(layer.name, layer.module) for layer in current.layers], baseline, label)
    check_views(record_of(current.settings), baseline, label)
    pairs = [(layer, baseline.layer(layer.name)) for layer in current.layers]
    widths = [f"{now.name} has {now.channels} units here and {then.channels} there" for now, then in pairs
              if now.channels != then.channels]
    if widths:
        raise ConfigError(f"the baseline {label} is of another architecture: {'; '.join(widths)}")
    shift = [distribution_shift_p(now.values.unitmem, then.values.unitmem) for now, then in pairs]
    adjusted = holm(shift)
    layers = []
    for (now, then), p, p_adjusted in zip(pairs, shift, adjusted):
        level = fraction_above_level((thresholds or {}).get(now.name, {}))
        layers.append(LayerChange(now.name, layer_changes(now, then, level, p_adjusted), p, p_adjusted))
    return Comparison(label, baseline, layers, differences(current, baseline), unit_risers(pairs), _sha(current))


def layer_changes(now: LayerResult, then: LayerResult, level: float, shift_p_adjusted: float) -> dict[str, Change]:
    """Each compared figure both runs have, with the interval of its change and whether it is beyond noise."""
    figures_now, figures_then = layer_figures(now, level), layer_figures(then, level)
    intervals_now, intervals_then = layer_intervals(now), layer_intervals(then)
    changes = {}
    for figure in COMPARED:
        if figure not in figures_now or figure not in figures_then:
            continue
        interval = None
        if figure in intervals_now and figure in intervals_then:
            interval = difference_interval(intervals_now[figure], intervals_then[figure])
        if interval is not None and math.isfinite(interval.low):
            beyond = not interval.low <= 0 <= interval.high
        elif figure in NOT_UNITMEM or math.isnan(shift_p_adjusted):
            beyond = None
        else:
            beyond = shift_p_adjusted < SIGNIFICANCE
        changes[figure] = Change(figure, figures_then[figure].value, figures_now[figure].value,
                                 interval if interval is not None and math.isfinite(interval.low) else None, beyond)
    return changes


def unit_risers(pairs: list[tuple[LayerResult, LayerResult]], count: int = RISERS_SHOWN) -> list[UnitRise]:
    """The units whose UnitMem rose most (same layer, same unit index), most first; ties in forward order."""
    rises = [(now.values.unitmem - then.values.unitmem, now, then) for now, then in pairs]
    flat = np.concatenate([rise for rise, _, _ in rises])
    order = [i for i in np.argsort(-flat, kind="stable")[:count] if flat[i] > 0]
    starts = np.cumsum([0] + [rise.size for rise, _, _ in rises])
    result = []
    for i in order:
        k = int(np.searchsorted(starts, i, side="right") - 1)
        _, now, then = rises[k]
        unit = int(i - starts[k])
        result.append(UnitRise(now.name, unit, float(then.values.unitmem[unit]), float(now.values.unitmem[unit]),
                               int(now.values.max_sample[unit])))
    return result


def differences(current: AuditResult, baseline: AuditResult) -> list[tuple[str, str, str]]:
    """What differs between the runs besides the checkpoint: (what, baseline's, this run's)."""
    found = []
    for what, old, new in (("data", baseline.data_source, current.data_source),
                           ("held-out data", baseline.holdout_source, current.holdout_source)):
        if old != new:
            found.append((what, str(old or "none"), str(new or "none")))
    if baseline.samples != current.samples:
        common = len(set(baseline.samples) & set(current.samples))
        found.append(("data points", f"{len(baseline.samples)}",
                      f"{len(current.samples)} ({common} in common with the baseline)"))
    for key in SETTINGS_COMPARED:
        old, new = baseline.settings.get(key), current.settings.get(key)
        if old != new:
            found.append((key.replace("_", " "), str(old), str(new)))
    return found


def _sha(result: AuditResult) -> str | None:
    return (result.checkpoint or {}).get("sha256")
