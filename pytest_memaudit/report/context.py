"""What the report shows, computed from an ``AuditResult``: rows and figures for the templates.

Every number comes from the result; templates only lay it out. Numbers are formatted here, once,
so the HTML shows exactly what this module decides (``n/a`` for undefined figures).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..data.images import display_id
from ..gates.compare import Comparison
from ..gates.thresholds import adjusted_p_values
from ..metric.stats import group_size
from ..pipeline.views import describe as describe_views
from ..pipeline.views import record_of
from ..results.outcomes import GATES, UNTESTABLE, Check
from ..results.result import AuditResult, LayerResult
from . import figures
from .compare import compare_section
from .evidence import evidence, membership_section, planted_section
from .format import fmt
from .memorized import memorized_section
from .series import series_section
from .signals import signals_section
from .thumbnails import Gallery

TABLE1_UNITS = 20
FIGURE3_UNITS = 10
PICKED_SHOWN = 12  # data points shown per group in Figure 4


def report_context(result: AuditResult, gallery: Gallery, comparison: Comparison | None = None,
                   series: list[tuple[str, AuditResult]] | None = None) -> dict[str, Any]:
    """Everything the report template renders; thumbnails are collected as rows are built."""
    values = [layer.values.unitmem for layer in result.layers]
    all_values = np.concatenate(values)
    top, bottom, k = extreme_units(values)
    rho, p = result.depth_correlation()
    ranked = ranked_units(result.layers)
    adjusted = adjusted_p_values(result, result.multiple_testing)
    context = {
        "result": result,
        "gallery": gallery.mode,
        "summary": {
            "layers": len(result.layers),
            "units": int(all_values.size),
            "samples": len(result.samples),
            "members": result.members,
            "holdout": len(result.samples) - result.members,
            "views": result.settings.get("views_per_image"),
            "groups": result.settings.get("groups"),
            "mean": fmt(float(all_values.mean())),
            "rho": fmt(rho, ".3f"),
            "p": fmt(p, ".4g"),
            "group": k,
        },
        "verdict": verdict(result.layers, result),
        "gates": gate_table(result.layers),
        "table1": [unit_row(rank, result.layers[i], u, gallery) for rank, (i, u) in enumerate(ranked[:TABLE1_UNITS], 1)],
        "table2": [layer_row(layer) for layer in result.layers],
        "control": result.control is not None,
        "evidence": evidence(result),
        "membership": membership_section(result, gallery, adjusted),
        "planted": planted_section(result, gallery),
        "signals": signals_section(result),
        "memorized": memorized_section(result, gallery),
        "top_units": [top_images(result.layers[i], u, gallery) for i, u in ranked[:FIGURE3_UNITS]],
        "most_picked": picked(result, top, gallery),
        "least_picked": picked(result, bottom, gallery),
        "canaries": canary_rows(result, gallery),
        "run": run_record(result),
        "skipped": [{"id": display_id(item["id"]), "reason": item["reason"]} for item in result.skipped]
        if gallery.mode != "none" else [],
        "skipped_count": len(result.skipped),
        "heatmap": figures.heatmap(
            [layer.name for layer in result.layers],
            values,
            [("a", "(a) all units", None),
             ("b", f"(b) top 10% of units ({k} of {all_values.size})", top),
             ("c", f"(c) bottom 10% of units ({k} of {all_values.size})", bottom)],
        ),
        "color_stops": figures.color_stops(),
        "histogram": figures.histogram(all_values, float(all_values.mean())),
        "depth": depth_figure(result),
        "compare": None if comparison is None else compare_section(result, comparison, gallery),
        "series": None if series is None else series_section(series),
    }
    context["thumbnails"] = gallery.stylesheet()  # last: after every row has asked for its images
    return context


def extreme_units(values: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Per-layer masks of the top and bottom 10% of all units (k = group_size of the total).

    Ties are broken by forward order, so the groups hold exactly k units each.
    """
    flat = np.concatenate(values)
    k = min(group_size(flat.size), flat.size)
    top = np.zeros(flat.size, dtype=bool)
    top[np.argsort(-flat, kind="stable")[:k]] = True
    bottom = np.zeros(flat.size, dtype=bool)
    bottom[np.argsort(flat, kind="stable")[:k]] = True
    splits = np.cumsum([v.size for v in values])[:-1]
    return np.split(top, splits), np.split(bottom, splits), k


def ranked_units(layers: list[LayerResult]) -> list[tuple[int, int]]:
    """(layer index, unit) of every unit, highest UnitMem first; ties in forward order."""
    layer_of = np.concatenate([np.full(layer.channels, i) for i, layer in enumerate(layers)])
    unit_of = np.concatenate([np.arange(layer.channels) for layer in layers])
    order = np.argsort(-np.concatenate([layer.values.unitmem for layer in layers]), kind="stable")
    return list(zip(layer_of[order].tolist(), unit_of[order].tolist()))


def gate_status(layer: LayerResult) -> str:
    """failed, not testable, warned, passed, or not gated: no outcome, or an outcome without a gate."""
    return "not gated" if layer.outcome is None else layer.outcome.status


def verdict(layers: list[LayerResult], result: AuditResult | None = None) -> dict[str, str]:
    """The report's banner: the gates' outcome, the model's verdict gate (gates/verdictgate.py) first."""
    gated = [layer for layer in layers if layer.outcome is not None and layer.outcome.status != "not gated"]
    failed = [layer.name for layer in gated if layer.outcome.status == "failed"]
    warned = [layer.name for layer in gated if layer.outcome.status == "warned"]
    untestable = [layer.name for layer in gated if layer.outcome.status == UNTESTABLE]
    ungated = len(layers) - len(gated)
    model = None if result is None or result.verdict_gate is None or result.verdict is None else result.verdict_gate
    if not gated and model is None:
        return {"status": "not gated", "text": "No threshold applied to any layer: nothing was gated."}
    text = ""
    if model is not None:
        from ..gates.verdictgate import gate_message

        text = f"The model's verdict gate {model.status}: {gate_message(result.verdict, model)}. "
    if not gated:
        text += "No threshold applied to any layer."
    elif failed:
        text += f"{len(failed)} of {len(gated)} gated layers crossed a threshold: {', '.join(failed)}."
    elif untestable:
        text += (f"{len(untestable)} of {len(gated)} gated layers could not be tested on every gate (every unit "
                 f"dead or constant): {', '.join(untestable)}; no layer crossed a threshold.")
    else:
        text += f"All {len(gated)} gated layers are within their thresholds."
    if warned:
        text += f" {len(warned)} crossed a warning threshold: {', '.join(warned)}."
    if gated and ungated:
        text += f" {ungated} layer(s) had no threshold and were not gated."
    statuses = [layer.outcome.status for layer in gated] + ([model.status] if model is not None else [])
    status = ("failed" if "failed" in statuses else UNTESTABLE if UNTESTABLE in statuses
              else "warned" if "warned" in statuses else "passed")
    return {"status": status, "text": text}


def gate_table(layers: list[LayerResult]) -> dict[str, Any]:
    """One column per threshold in use, one row per layer: failed layers first, then warned,
    passed and not gated; forward order within each."""
    used = {check.key for layer in layers if layer.outcome for check in layer.outcome.checks}
    used |= {key for layer in layers if layer.outcome for key, _ in layer.outcome.untestable}
    keys = [key for key in GATES if key in used]
    rank = {"failed": 0, UNTESTABLE: 1, "warned": 2, "passed": 3, "not gated": 4}
    rows = []
    for layer in sorted(layers, key=lambda layer: rank[gate_status(layer)]):
        level = (layer.thresholds or {}).get("fraction_above_level")
        checks = {c.key: check_cell(c, level) for c in (layer.outcome.checks if layer.outcome else ())}
        checks |= {key: {"value": UNTESTABLE, "relation": "", "limit": "", "state": "untestable", "mark": None,
                         "note": why} for key, why in (layer.outcome.untestable if layer.outcome else ())}
        rows.append({"name": layer.name, "module": layer.module, "status": gate_status(layer),
                     "cells": [checks.get(key) for key in keys]})
    columns = [{"key": key, "figure": GATES[key][0], "meaning": GATES[key][1]} for key in keys]
    return {"columns": columns, "rows": rows}


def check_cell(check: Check, level: float | None) -> dict[str, Any]:
    """A figure next to its limit, with the rule that decided: the estimate's relation to the limit, or, for a
    ``when: significant`` gate whose estimate lies past the limit, where its interval lies (so that a passed
    cell never reads "0.31 ≤ 0.25")."""
    upper = check.key.endswith("_max")
    past = check.value > check.limit if upper else check.value < check.limit
    side = "above" if upper else "below"
    if check.when == "significant" and past and math.isfinite(check.low) and math.isfinite(check.high):
        relation = f"interval {'not ' if check.passed else ''}wholly {side}"
    elif check.when == "significant" and past:
        relation = f"{'not ' if check.passed else ''}beyond noise {side}"
    elif upper:
        relation = "≤" if check.passed else ">"
    else:
        relation = "≥" if check.passed else "<"
    notes = []
    if check.key == "fraction_above_max" and level is not None:
        notes.append(f"UnitMem > {fmt(level, 'g')}")
    if check.relative is not None:
        notes.append(f"{check.relative * 100:g}% of the baseline's {fmt(abs(check.baseline), '.3g')}")
    if check.when == "significant" and math.isfinite(check.low) and math.isfinite(check.high):
        notes.append(f"95% [{fmt(check.low, '.3g')}, {fmt(check.high, '.3g')}]")
    elif check.when == "significant":
        notes.append("fails only beyond noise")
    if check.severity == "warn":
        notes.append("warning only")
    state = "passed" if check.passed else "failed" if check.severity == "fail" else "warned"
    return {"value": fmt(check.value, ".4g"), "relation": relation, "limit": fmt(check.limit, "g"),
            "state": state, "mark": {"failed": "FAIL", "warned": "WARN"}.get(state), "note": "; ".join(notes) or None}


def unit_row(rank: int, layer: LayerResult, unit: int, gallery: Gallery) -> dict[str, Any]:
    return {
        "rank": rank,
        "layer": layer.name,
        "unit": unit,
        "unitmem": fmt(layer.values.unitmem[unit]),
        "point": gallery.point(layer.values.max_sample[unit]),
    }


def layer_row(layer: LayerResult) -> dict[str, Any]:
    s = layer.stats
    mean = layer.intervals.get("mean_unitmem")
    excess = layer.control_excess
    return {
        "name": layer.name,
        "module": layer.module,
        "channels": layer.channels,
        "k": s.group_size,
        "top": fmt(s.top_mean),
        "bottom": fmt(s.bottom_mean),
        "t": fmt(s.ttest_t, ".2f"),
        "p": fmt(s.ttest_p, ".4g"),
        "mean": fmt(s.mean_unitmem),
        "mean_ci": fmt(None if mean is None else (mean.high - mean.low) / 2),
        "median": fmt(s.median_unitmem),
        "max": fmt(s.max_unitmem),
        "dead": s.dead_units,
        "control": fmt(layer.control_mean),
        "excess": fmt(None if excess is None else excess.estimate, "+.3f"),
        "excess_ci": "n/a" if excess is None else f"[{fmt(excess.low, '+.3f')}, {fmt(excess.high, '+.3f')}]",
    }


def top_images(layer: LayerResult, unit: int, gallery: Gallery) -> dict[str, Any]:
    """A unit and the data points that activate it most (the audit's top-k), most first."""
    values = layer.values
    return {
        "layer": layer.name,
        "unit": unit,
        "unitmem": fmt(values.unitmem[unit]),
        "images": [(gallery.point(values.top_samples[j, unit]), fmt(values.top_values[j, unit], ".3g"))
                   for j in range(values.top_samples.shape[0])],
    }


def picked(result: AuditResult, masks: list[np.ndarray], gallery: Gallery) -> list[tuple[Any, int]]:
    """Data points that the units in ``masks`` pick as their maximum, most picks first."""
    counts = np.zeros(len(result.samples), dtype=np.int64)
    for layer, mask in zip(result.layers, masks):
        counts += np.bincount(layer.values.max_sample[mask], minlength=len(result.samples))
    order = np.argsort(-counts, kind="stable")[:PICKED_SHOWN]
    return [(gallery.point(i), int(counts[i])) for i in order if counts[i]]


def canary_rows(result: AuditResult, gallery: Gallery) -> list[dict[str, Any]]:
    if not result.canaries:
        return []
    units = dict(result.data_point_ranking())
    position = {sample: i for i, sample in enumerate(result.samples)}
    return [{"point": gallery.point(position[canary]), "rank": rank, "units": units[canary]}
            for canary, rank in sorted(result.canary_ranks().items(), key=lambda item: item[1])]


def depth_figure(result: AuditResult) -> figures.DepthPlot:
    intervals = [layer.intervals.get("mean_unitmem") for layer in result.layers]
    lines = [figures.Line("mean UnitMem", "trained", [layer.stats.mean_unitmem for layer in result.layers],
                          [i.low if i else math.nan for i in intervals], [i.high if i else math.nan for i in intervals])]
    if result.control is not None:
        lines.append(figures.Line("random-weights control", "control",
                                  [math.nan if layer.control_mean is None else layer.control_mean
                                   for layer in result.layers]))
    return figures.depth_plot([layer.name for layer in result.layers], lines)


def unit_axes(layers: list[LayerResult]) -> str:
    """Which axis of each layer's output holds its units (0 is the batch), layers grouped by axis."""
    by_axis: dict[str, list[str]] = {}
    for layer in layers:
        axis = "not recorded" if layer.unit_axis is None else f"axis {layer.unit_axis.axis}"
        by_axis.setdefault(axis, []).append(layer.name)
    return "; ".join(f"{axis}: {', '.join(names)}" for axis, names in by_axis.items())


def run_record(result: AuditResult) -> list[tuple[str, str]]:
    """(label, value) rows that say how the numbers were made."""
    s, t = result.settings, result.timing
    checkpoint = result.checkpoint or {}
    n = len(result.samples)
    wall = t.get("wall_s")
    rows = [
        ("model", result.model),
        ("checkpoint", display_id(checkpoint.get("path", "none"))),
        ("checkpoint sha256", checkpoint.get("sha256", "n/a")),
        ("data source", display_id(result.data_source)),
        ("data points (N)", f"{n} audited, {len(result.skipped)} unreadable skipped"),
        ("image size", f"{s.get('image_size')} px"),
        ("model input", str(s.get("input", "n/a"))),
        ("unit axes", unit_axes(result.layers)),
        ("views", describe_views(record_of(s))),
        ("augmentations", f"{s.get('augmentations')} ({s.get('views_per_image')} views per image)"),
        ("seed", str(s.get("seed"))),
        ("reduction", str(s.get("reduce"))),
        ("precision", str(s.get("precision"))),
        ("device", str(s.get("device"))),
        ("batch size", f"{s.get('batch_size')} views"),
        ("decode workers", str(s.get("workers"))),
        ("top-k kept per unit", str(s.get("topk"))),
        ("control", str(s.get("control"))),
    ]
    rows += list(result.environment.items())  # versions of python, torch, the plugin, ...
    rows += [
        ("wall time", f"{fmt(wall, '.1f')} s ({fmt(t.get('forward_s'), '.1f')} s in forward passes)"),
        ("throughput", f"{fmt(t.get('views_per_s'), '.1f')} views/s, "
                       f"{fmt(n / wall if wall else None, '.2f')} images/s"),
    ]
    return rows
