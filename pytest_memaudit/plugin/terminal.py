"""The end-of-session summary table (rich), rendered to text for pytest's terminal writer."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..data.images import display_id
from ..gates.compare import Comparison
from ..gates.thresholds import adjusted_p_values
from ..pipeline.views import record_of
from ..report.evidence import evidence
from ..results.result import AuditResult


def _threads_and_workers(result: AuditResult) -> str:
    """``; 2 CPU threads, 1 decode worker`` as the audit chose them (older results lack the threads)."""
    threads, workers = result.environment.get("cpu_threads"), result.settings.get("workers")
    if threads is None or workers is None:
        return ""
    return f"; {threads} CPU thread(s), {workers} decode worker(s)"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def render_summary(result: AuditResult, markup: bool = False, comparison: Comparison | None = None) -> str:
    """The per-layer table and a few lines; never truncated (a log is better wide than cut). With a
    ``comparison``, a column of each layer's change of mean UnitMem from the baseline."""
    table = Table(title=None, show_edge=False, pad_edge=False, header_style="bold")
    columns = ["layer", "units", "mean", "±95%"] + (["Δ mean"] if comparison else []) + ["max", "t", "p", "dead"]
    control = result.control is not None
    membership = result.membership is not None
    if control:
        columns += ["control", "excess"]
    if membership:
        columns += ["members", "mem p"]
    for name in columns:
        table.add_column(name, justify="left" if name == "layer" else "right", no_wrap=True)
    table.add_column("gate", justify="left", no_wrap=True)
    adjusted = adjusted_p_values(result, result.multiple_testing)
    for layer in result.layers:
        s = layer.stats
        mean = layer.intervals.get("mean_unitmem")
        row = [layer.name, str(layer.channels), _fmt(s.mean_unitmem),
               _fmt(None if mean is None else (mean.high - mean.low) / 2)]
        row += [_delta_cell(comparison, layer.name)] if comparison else []
        row += [_fmt(s.max_unitmem), _fmt(s.ttest_t, ".2f"), _fmt(s.ttest_p, ".2e"), str(s.dead_units)]
        if control:
            row += [_fmt(layer.control_mean), _fmt(None if layer.control_excess is None else layer.control_excess.estimate,
                                                   "+.3f")]
        if membership:
            m = layer.membership
            row += [f"{m.member_share:.0%}/{m.expected_share:.0%}",
                    _fmt(adjusted[layer.name].get("membership_p"), ".2g")]
        table.add_row(*row, _gate_cell(layer))
    views = result.settings.get("views_per_image")
    held = len(result.samples) - result.members
    lines = (
        f"{result.model}: {result.members} members{f' + {held} held-out images' if held else ''} x {views} "
        f"{record_of(result.settings)['name']} views "
        f"at {result.settings.get('image_size')}px, reduce={result.settings.get('reduce')}, "
        f"precision={result.settings.get('precision')}, device={result.settings.get('device')}; {result.units} units; "
        f"{_fmt(result.timing.get('wall_s'), '.1f')} s ({_fmt(result.timing.get('views_per_s'), '.1f')} views/s)"
    ) + _threads_and_workers(result)
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=markup, no_color=not markup, width=1000,
                      highlight=False, soft_wrap=True)
    console.print(table)
    console.print(lines, markup=False)
    if membership:
        left_out = sum(layer.membership.excluded_units for layer in result.layers if layer.membership)
        console.print("members: share of units whose argmax is a member / the members' share of the images; "
                      f"mem p: permutation p of that share over images ({result.multiple_testing}-adjusted across "
                      f"layers){f'; {left_out} dead or constant units left out' if left_out else ''}",
                      markup=False)
    if comparison:
        _print_comparison(console, comparison)
    for item in evidence(result):
        colour = {"yes": "green", "no": "red", "signal": "yellow"}[item["css"]]
        console.print(Text.assemble((item["question"], "bold"), " ", (item["answer"], colour)))
        console.print(f"  {item['detail']}", markup=False)
    if result.skipped:
        console.print(f"{len(result.skipped)} unreadable image(s) skipped, e.g. {display_id(result.skipped[0]['id'])}: "
                      f"{result.skipped[0]['reason']}", markup=False)
    for note in result.notes:
        console.print(f"note: {display_id(note)}", markup=False)
    return buffer.getvalue()


def render_series_summary(runs: dict[str | None, AuditResult], comparisons: dict[str | None, Comparison | None],
                          markup: bool = False) -> str:
    """One run's summary (``render_summary``); for a checkpoint series, a table of every layer's mean
    UnitMem and gate at each checkpoint, then the last checkpoint's summary."""
    labels = list(runs)
    last = labels[-1]
    if labels == [None]:
        return render_summary(runs[None], markup, comparisons.get(None))
    table = Table(title=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("layer", no_wrap=True)
    for label in labels:
        table.add_column(label, justify="right", no_wrap=True)
    for layer in runs[last].layers:
        cells = []
        for label in labels:
            found = runs[label].layer(layer.name)
            delta = "" if comparisons.get(label) is None else f" ({_delta_cell(comparisons[label], layer.name)})"
            status = "" if found.outcome is None or found.outcome.status in ("passed", "not gated") else (
                f" [{'red' if found.outcome.status == 'failed' else 'yellow'}]{found.outcome.status}[/]")
            cells.append(_fmt(found.stats.mean_unitmem) + delta + status)
        table.add_row(layer.name, *cells)
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=markup, no_color=not markup, width=1000, highlight=False,
                      soft_wrap=True)
    console.print(f"checkpoint series: mean UnitMem per layer at each of {len(labels)} checkpoints, natural order"
                  + (" (in brackets: the change from the baseline; * beyond noise)" if any(comparisons.values()) else ""),
                  markup=False)
    console.print(table)
    console.print(f"the last checkpoint, {last}, in full:", markup=False)
    return buffer.getvalue() + render_summary(runs[last], markup, comparisons.get(last))


def _delta_cell(comparison: Comparison, layer: str) -> str:
    change = comparison.layer(layer)
    change = None if change is None else change.changes.get("mean_unitmem")
    if change is None:
        return "n/a"
    return _fmt(change.delta, "+.3f") + (" *" if change.beyond_noise else "")


def _print_comparison(console: Console, comparison: Comparison) -> None:
    """Which baseline, and (prominently) what differs besides the checkpoint."""
    baseline = comparison.baseline
    sha = ((baseline.checkpoint or {}).get("sha256") or "none")[:12]
    same = "; the same checkpoint" if comparison.same_checkpoint else ""
    console.print(f"Δ mean: mean UnitMem minus the baseline's, {comparison.label} (model {baseline.model}, checkpoint "
                  f"{sha}, {len(baseline.samples)} data points{same}); * beyond noise", markup=False)
    if comparison.differences:
        listed = "; ".join(f"{what} {old} -> {new}" for what, old, new in comparison.differences)
        console.print(Text.assemble(("the runs differ besides the checkpoint: ", "bold yellow"), listed,
                                    (" (the changes mix both)", "yellow")))


def _gate_cell(layer) -> str:
    outcome = layer.outcome
    if outcome is None or outcome.status == "not gated":
        return "not gated"
    if outcome.status == "passed":
        return "[green]passed[/]"
    crossed = outcome.failures or outcome.warnings
    colour = "red" if outcome.status == "failed" else "yellow"
    return f"[{colour}]{outcome.status}[/]: " + ", ".join(f"{c.figure} {_fmt(c.value, '.3g')}" for c in crossed)
