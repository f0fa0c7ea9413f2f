"""The report's "Compared with" section: how each layer moved from the baseline run, the depth plot
of both runs, and the units whose UnitMem rose most."""

from __future__ import annotations

import math
from typing import Any

from ..data.images import display_id
from ..gates.compare import Comparison
from ..results.outcomes import COMPARED
from ..results.result import AuditResult
from . import figures
from .format import fmt, fmt_p
from .thumbnails import Gallery

# The figures the delta table shows, where both runs have them (the JSON has every compared figure).
SHOWN = ("mean_unitmem", "p90_unitmem", "max_unitmem", "excess_over_control", "membership_excess")


def compare_section(result: AuditResult, comparison: Comparison, gallery: Gallery) -> dict[str, Any]:
    baseline = comparison.baseline
    shown = [figure for figure in SHOWN if any(figure in layer.changes for layer in comparison.layers)]
    rows = []
    for layer in comparison.layers:
        cells = []
        for figure in shown:
            change = layer.changes.get(figure)
            if change is None:
                cells.append(None)
                continue
            interval = change.interval
            cells.append({
                "both": f"{fmt(change.baseline)} → {fmt(change.current)}",
                "delta": fmt(change.delta, "+.3f"),
                "interval": None if interval is None else f"[{fmt(interval.low, '+.3f')}, {fmt(interval.high, '+.3f')}]",
                "moved": bool(change.beyond_noise),
            })
        rows.append({"name": layer.name, "cells": cells, "shift_p": fmt_p(layer.shift_p_adjusted)})
    names = [layer.name for layer in result.layers]
    now = [layer.intervals.get("mean_unitmem") for layer in result.layers]
    then = [baseline.layer(name).intervals.get("mean_unitmem") for name in names]
    plot = figures.depth_plot(names, [
        figures.Line("this run", "trained", [layer.stats.mean_unitmem for layer in result.layers],
                     [i.low if i else math.nan for i in now], [i.high if i else math.nan for i in now]),
        figures.Line("baseline", "baseline", [baseline.layer(name).stats.mean_unitmem for name in names],
                     [i.low if i else math.nan for i in then], [i.high if i else math.nan for i in then]),
    ])
    checkpoint = baseline.checkpoint or {}
    return {
        "label": comparison.label,
        "same_checkpoint": comparison.same_checkpoint,
        "differences": comparison.differences,
        "baseline": [
            ("model", baseline.model),
            ("checkpoint", display_id(checkpoint.get("path", "none"))),
            ("checkpoint sha256", checkpoint.get("sha256", "n/a")),
            ("data source", display_id(baseline.data_source)),
            ("data points (N)", str(len(baseline.samples))),
            ("views per image", str(baseline.settings.get("views_per_image"))),
        ],
        "columns": [{"figure": figure, "meaning": COMPARED[figure]} for figure in shown],
        "rows": rows,
        "moved": sum(cell["moved"] for row in rows for cell in row["cells"] if cell),
        "plot": plot,
        "risers": [{"layer": unit.layer, "unit": unit.unit, "baseline": fmt(unit.baseline), "current": fmt(unit.current),
                    "rise": fmt(unit.current - unit.baseline, "+.3f"), "point": gallery.point(unit.max_sample)}
                   for unit in comparison.risers],
    }
