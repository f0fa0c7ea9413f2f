"""The report's figures as geometry for the SVG templates, and raster parts as PNG data URIs.

Nothing here knows about audits: functions take layer names and arrays and return positions
in SVG user units (y grows downwards). Colours map UnitMem on a fixed [0, 1] scale so that
heatmaps of different runs compare at a glance.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import AuditError

# viridis at 0, 0.1, ..., 1: perceptually uniform, readable in greyscale print
VIRIDIS = np.array(
    [[0x44, 0x01, 0x54], [0x48, 0x24, 0x75], [0x41, 0x44, 0x87], [0x35, 0x5F, 0x8D], [0x2A, 0x78, 0x8E],
     [0x21, 0x91, 0x8C], [0x22, 0xA8, 0x84], [0x44, 0xBF, 0x70], [0x7A, 0xD1, 0x51], [0xBD, 0xDF, 0x26],
     [0xFD, 0xE7, 0x25]],
    dtype=np.float64,
)
OUTSIDE_GROUP = (224, 224, 224)  # cells of units not in a panel's group
BACKGROUND = (255, 255, 255)


def colormap(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of each value in [0, 1] (clipped), by linear interpolation of VIRIDIS."""
    position = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(VIRIDIS) - 1)
    low = np.minimum(np.floor(position).astype(np.intp), len(VIRIDIS) - 2)
    weight = (position - low)[..., None]
    return np.rint(VIRIDIS[low] * (1 - weight) + VIRIDIS[low + 1] * weight).astype(np.uint8)


def color_stops(count: int = 11) -> list[tuple[float, str]]:
    """(offset, #rrggbb) stops of the colour scale, for an SVG gradient."""
    offsets = np.linspace(0, 1, count)
    return [(float(o), "#%02x%02x%02x" % tuple(rgb)) for o, rgb in zip(offsets, colormap(offsets))]


def png_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def nice_ticks(top: float, most: int = 6) -> list[float]:
    """0, step, 2 step, ... up to the first tick >= ``top``, with step 1, 2 or 5 times 10^k."""
    if not top > 0:
        return [0.0, 1.0]
    raw = top / most
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


# --- Figure 1: heatmap ----------------------------------------------------------------------


@dataclass
class HeatmapColumn:
    name: str
    x: int
    channels: int
    cell: float  # height of one channel's cell


@dataclass
class HeatmapPanel:
    key: str  # "a", "b", "c"
    title: str
    image: str  # PNG data URI of the whole plot area
    hover: list[list[tuple[int, float, float]]]  # per column: (unit, y, UnitMem) of the cells shown


@dataclass
class Heatmap:
    width: int  # of the plot area; the panel's SVG adds margins for its title and labels
    height: int
    column_width: int
    columns: list[HeatmapColumn]
    panels: list[HeatmapPanel]
    label_height: int  # room below the plot for the rotated layer names


def heatmap(
    names: list[str],
    values: list[np.ndarray],
    panels: list[tuple[str, str, list[np.ndarray] | None]],
    column_width: int = 20,
    gap: int = 4,
) -> Heatmap:
    """One column per layer, one cell per channel, every column the same height.

    ``panels``: (key, title, per-layer masks of the units shown in colour; None: all). A layer
    of C channels in a plot of H rows gives channel c the rows from c*H/C; H is at least the
    widest layer, so every channel keeps at least one row.
    """
    height = max([256, *(v.size for v in values)])
    columns = [
        HeatmapColumn(name, i * (column_width + gap), v.size, height / v.size) for i, (name, v) in enumerate(zip(names, values))
    ]
    width = len(columns) * (column_width + gap) - gap
    result = []
    for key, title, masks in panels:
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:] = BACKGROUND
        hover = []
        for i, (column, unitmem) in enumerate(zip(columns, values)):
            shown = np.ones(unitmem.size, dtype=bool) if masks is None else masks[i]
            rows = np.arange(height) * unitmem.size // height  # the channel each pixel row shows
            colors = np.where(shown[rows, None], colormap(unitmem[rows]), np.array(OUTSIDE_GROUP, dtype=np.uint8))
            pixels[:, column.x : column.x + column_width] = colors[:, None, :]
            hover.append([(int(u), u * column.cell, float(unitmem[u])) for u in np.flatnonzero(shown)])
        result.append(HeatmapPanel(key, title, png_uri(pixels), hover))
    label_height = 16 + 6 * max((len(name) for name in names), default=0)
    return Heatmap(width, height, column_width, columns, result, label_height)


# --- Figure 2: histogram --------------------------------------------------------------------


@dataclass
class PlotArea:
    """An SVG figure's size and the rectangle its axes enclose, in pixels."""

    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int


@dataclass
class Histogram(PlotArea):
    bars: list[tuple[float, float, float, float, str]]  # x, y, width, height, hover text
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    mean_x: float
    mean: float
    units: int


def histogram(values: np.ndarray, mean: float, bins: int = 50) -> Histogram:
    """Counts of UnitMem values in ``bins`` equal bins over [0, 1]."""
    left, top, plot_width, plot_height = 56, 24, 640, 220
    counts, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0.0, 1.0))
    ticks = nice_ticks(float(counts.max()) if counts.size else 1.0)
    scale = plot_height / ticks[-1]
    bar_width = plot_width / bins
    bars = [
        (left + i * bar_width, top + plot_height - n * scale, bar_width, n * scale,
         f"{edges[i]:.2f} to {edges[i + 1]:.2f}: {n} units")
        for i, n in enumerate(counts.tolist())
        if n
    ]
    return Histogram(
        width=left + plot_width + 24,
        height=top + plot_height + 48,
        left=left,
        top=top,
        plot_width=plot_width,
        plot_height=plot_height,
        bars=bars,
        x_ticks=[(left + t * plot_width, f"{t:.1f}") for t in np.linspace(0, 1, 11)],
        y_ticks=[(top + plot_height - t * scale, f"{t:g}") for t in ticks],
        mean_x=left + float(np.clip(mean, 0, 1)) * plot_width,
        mean=mean,
        units=int(np.size(values)),
    )


# --- depth ----------------------------------------------------------------------------------


@dataclass
class Line:
    """One line of a per-layer plot: a value per layer and, optionally, a 95% interval per layer."""

    label: str
    css: str
    values: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


@dataclass
class Series:
    label: str
    css: str
    points: list[tuple[float, float, str]]  # x, y, hover text
    bars: list[tuple[float, float, float]] = field(default_factory=list)  # x, y of the low end, y of the high end

    @property
    def path(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in self.points)


@dataclass
class DepthPlot(PlotArea):
    series: list[Series]
    x_labels: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    y_label: str = "mean UnitMem"
    legend: bool = True  # drawn in the plot; off where the page lists the lines itself


def depth_plot(names: list[str], lines: list[Line], step: int = 30, y_label: str = "mean UnitMem",
               legend: bool = True) -> DepthPlot:
    """Each line's per-layer values against layer depth (or any sequence ``names``), with error bars where a
    line has intervals. The y axis starts at 0, or below it when a value is negative; intervals past the axes
    are cut at them."""
    left, top, plot_height = 56, 16, 220
    plot_width = max(1, len(names)) * step
    extents = [v for line in lines for v in line.values if math.isfinite(v)]
    lowest = min(extents, default=0.0)
    if lowest < 0:
        ticks = _span_ticks(np.array([lowest, max(extents, default=0.0)]))
    else:
        ticks = nice_ticks(max(extents, default=1.0), most=5)
    scale = plot_height / (ticks[-1] - ticks[0])
    xs = [left + (i + 0.5) * step for i in range(len(names))]

    def y(value: float) -> float:  # intervals reaching past the axes are cut at them
        return top + plot_height - (min(max(ticks[0], value), ticks[-1]) - ticks[0]) * scale

    series = []
    for line in lines:
        lows = line.low or [math.nan] * len(names)
        highs = line.high or [math.nan] * len(names)
        points, bars = [], []
        for x, name, v, low, high in zip(xs, names, line.values, lows, highs):
            if not math.isfinite(v):
                continue
            interval = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else ""
            points.append((x, y(v), f"{name}: {line.label} {v:.3f}{interval}"))
            if interval:
                bars.append((x, y(low), y(high)))
        series.append(Series(line.label, line.css, points, bars))
    longest = max((len(name) for name in names), default=0)
    return DepthPlot(
        width=left + plot_width + 16,
        height=top + plot_height + 16 + int(longest * 5.5),
        left=left,
        top=top,
        plot_width=plot_width,
        plot_height=plot_height,
        series=series,
        x_labels=list(zip(xs, names)),
        y_ticks=[(y(t), f"{t:g}") for t in ticks],
        y_label=y_label,
        legend=legend,
    )


# --- small multiples: scatter panels --------------------------------------------------------


@dataclass
class ScatterPanel(PlotArea):
    """One panel: ``width``/``height`` its cell, ``left``/``top`` its plot area, both relative to (x, y)."""

    x: int  # the cell's origin in the grid
    y: int
    title: str
    subtitle: str
    points: list[tuple[float, float, str]]  # cx, cy, hover text
    x_ticks: list[tuple[float, str]]  # position, label
    y_ticks: list[tuple[float, str]]
    skipped: int  # pairs left out for a non-finite value


@dataclass
class ScatterGrid:
    width: int
    height: int
    y_label: str
    panels: list[ScatterPanel]


def scatter_grid(panels: list[tuple[str, np.ndarray, np.ndarray, str]], columns: int = 3,
                 y_label: str = "") -> ScatterGrid:
    """Small multiples, ``columns`` to a row: each panel (title, x values, y values, subtitle) gets its own
    axes, spanning nice ticks around its finite points; pairs with a NaN or infinity are skipped.

    Every point becomes one SVG element: thin out very large sets before calling.
    """
    margin = 18 if y_label else 0  # room for the shared y label
    left, top, plot_width, plot_height, right, bottom = 44, 40, 200, 140, 12, 30
    cell_width, cell_height = left + plot_width + right, top + plot_height + bottom
    result = []
    for i, (title, xs, ys, subtitle) in enumerate(panels):
        xs, ys = np.asarray(xs, dtype=np.float64).ravel(), np.asarray(ys, dtype=np.float64).ravel()
        if xs.shape != ys.shape:
            raise AuditError(f"scatter panel {title!r}: {xs.size} x values but {ys.size} y values; pass one y per x")
        finite = np.isfinite(xs) & np.isfinite(ys)
        x_ticks, y_ticks = _span_ticks(xs[finite]), _span_ticks(ys[finite])

        def place(values, ticks, length):
            return (values - ticks[0]) / (ticks[-1] - ticks[0]) * length

        cx = left + place(xs[finite], x_ticks, plot_width)
        cy = top + plot_height - place(ys[finite], y_ticks, plot_height)
        result.append(ScatterPanel(
            width=cell_width,
            height=cell_height,
            left=left,
            top=top,
            plot_width=plot_width,
            plot_height=plot_height,
            x=margin + (i % columns) * cell_width,
            y=(i // columns) * cell_height,
            title=title,
            subtitle=subtitle,
            points=[(float(a), float(b), f"{x:.4g}, {y:.4g}")
                    for a, b, x, y in zip(cx, cy, xs[finite], ys[finite])],
            x_ticks=[(left + float(place(t, x_ticks, plot_width)), f"{t:g}") for t in x_ticks],
            y_ticks=[(top + plot_height - float(place(t, y_ticks, plot_height)), f"{t:g}") for t in y_ticks],
            skipped=int(np.count_nonzero(~finite)),
        ))
    shown_columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    return ScatterGrid(margin + shown_columns * cell_width, rows * cell_height, y_label, result)


def _span_ticks(values: np.ndarray, most: int = 5) -> list[float]:
    """Ticks at multiples of a nice step (chosen by ``nice_ticks``) from at or below the lowest value to at
    or above the highest; [0, 1] with no values, a small span around a single value."""
    if values.size == 0:
        return [0.0, 1.0]
    low, high = float(values.min()), float(values.max())
    if high == low:
        pad = max(abs(low), 1.0) * 0.05
        low, high = low - pad, high + pad
    step = nice_ticks(high - low, most)[1]
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]
