"""The report's "Checkpoint series" section: every layer's figures across the checkpoints of a series,
a line per layer, in series order (memorization over training)."""

from __future__ import annotations

import math
from typing import Any

from ..gates.thresholds import fraction_above_level, layer_figures
from ..results.outcomes import Figure
from ..results.result import AuditResult
from . import figures
from .format import fmt

# (figure, what the plot shows), as the gates name the figures
PLOTTED = (
    ("mean_unitmem", "mean UnitMem"),
    ("p90_unitmem", "90th-percentile UnitMem"),
    ("max_unitmem", "highest unit UnitMem"),
    ("excess_over_control", "mean UnitMem minus the random control's"),
    ("membership_excess", "membership excess"),
    ("dead_fraction", "share of dead units"),
)
COLOURS = 10  # line colours, series-0 to series-9 in the stylesheet, in turn
STEP = 64  # px per checkpoint on the x axis


def series_section(series: list[tuple[str, AuditResult]]) -> dict[str, Any]:
    labels = [label for label, _ in series]
    names = [layer.name for layer in series[-1][1].layers]
    found: list[dict[str, dict[str, Figure]]] = [
        {layer.name: layer_figures(layer, fraction_above_level(layer.thresholds or {})) for layer in result.layers}
        for _, result in series
    ]
    panels = []
    for figure, title in PLOTTED:
        if not any(figure in by_layer[name] for by_layer in found for name in names):
            continue
        lines = [figures.Line(name, _css(i), [by_layer[name][figure].value if figure in by_layer[name] else math.nan
                                              for by_layer in found])
                 for i, name in enumerate(names)]
        panels.append({"title": title, "plot": figures.depth_plot(labels, lines, step=STEP, y_label=title, legend=False)})
    rows = []
    for name in names:
        cells = []
        for _, result in series:
            layer = result.layer(name)
            status = "not gated" if layer.outcome is None else layer.outcome.status
            cells.append({"mean": fmt(layer.stats.mean_unitmem), "status": status})
        rows.append({"name": name, "cells": cells})
    return {
        "checkpoints": labels,
        "last": labels[-1],
        "legend": [(name, _css(i)) for i, name in enumerate(names)],
        "panels": panels,
        "rows": rows,
    }


def _css(index: int) -> str:
    return f"series-{index % COLOURS}"
