"""The end-of-session summary table (rich), rendered to text for pytest's terminal writer."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.table import Table

from .data import display_id
from .results import AuditResult


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def render_summary(result: AuditResult, markup: bool = False) -> str:
    """The per-layer table and a few lines; never truncated (a log is better wide than cut)."""
    table = Table(title=None, show_edge=False, pad_edge=False, header_style="bold")
    columns = ["layer", "units", "mean", "max", "top10%", "bottom10%", "t", "p", "dead"]
    control = result.control is not None
    if control:
        columns.append("control")
    for name in columns:
        table.add_column(name, justify="left" if name == "layer" else "right", no_wrap=True)
    table.add_column("gate", justify="left", no_wrap=True)
    for layer in result.layers:
        s = layer.stats
        row = [layer.name, str(layer.channels), _fmt(s.mean_unitmem), _fmt(s.max_unitmem), _fmt(s.top_mean),
               _fmt(s.bottom_mean), _fmt(s.ttest_t, ".2f"), _fmt(s.ttest_p, ".2e"), str(s.dead_units)]
        if control:
            row.append(_fmt(layer.control_mean))
        if layer.outcome is None or not layer.outcome.checks:
            gate = "not gated"
        elif layer.outcome.passed:
            gate = "[green]passed[/]"
        else:
            gate = "[red]failed[/]: " + ", ".join(f"{c.figure} {_fmt(c.value, '.3g')}" for c in layer.outcome.failures)
        table.add_row(*row, gate)
    views = result.settings.get("views_per_image")
    n = len(result.samples)
    lines = (
        f"{result.model}: {n} data points x {views} views at {result.settings.get('image_size')}px, "
        f"reduce={result.settings.get('reduce')}, precision={result.settings.get('precision')}, "
        f"device={result.settings.get('device')}; {result.units} units; "
        f"{_fmt(result.timing.get('wall_s'), '.1f')} s ({_fmt(result.timing.get('views_per_s'), '.1f')} views/s)"
    )
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=markup, no_color=not markup, width=1000,
                      highlight=False, soft_wrap=True)
    console.print(table)
    console.print(lines, markup=False)
    if result.skipped:
        console.print(f"{len(result.skipped)} unreadable image(s) skipped, e.g. {display_id(result.skipped[0]['id'])}: "
                      f"{result.skipped[0]['reason']}", markup=False)
    for note in result.notes:
        console.print(f"note: {display_id(note)}", markup=False)
    return buffer.getvalue()
