"""The report's table of per-image signals: one row per layer, one cell per signal (AUC, its
interval, the permutation p), and the loss attack's row."""

from __future__ import annotations

from typing import Any

from ..metric.imagesignals import LOSS_LAYER, SIGNALS
from ..results.result import AuditResult
from .format import fmt, fmt_p


def signals_section(result: AuditResult) -> dict[str, Any] | None:
    if not result.signals:
        return None
    columns = [signal for signal in SIGNALS if signal != "loss" and any(s.signal == signal for s in result.signals)]
    cells: dict[str, dict[str, str]] = {}
    for s in result.signals:
        cells.setdefault(s.layer, {})[s.signal] = f"{fmt(s.auc)} [{fmt(s.low)}, {fmt(s.high)}], p {fmt_p(s.p_value)}"
    rows = [{"layer": layer, "cells": [cells[layer].get(signal, "n/a") for signal in columns]}
            for layer in cells if layer != LOSS_LAYER]
    first = result.signals[0]
    return {
        "columns": [signal.replace("_", " ") for signal in columns],
        "rows": rows,
        "loss": cells.get(LOSS_LAYER, {}).get("loss"),
        "members": first.n_members,
        "holdout": first.n_heldout,
        "permutations": first.permutations,
    }
