"""The HTML report: its tables and figures against the JSON of the same run, the gallery modes,
escaping, size at full scale, a failing renderer, and a real browser."""

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# import before any in-process pytester run (see test_plugin.py)
import pytest_memaudit.pipeline.audit  # noqa: F401
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from conftest import make_images
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.data.builtin import builtin_ids
from pytest_memaudit.models import var_layer_specs
from pytest_memaudit.report import GALLERY_MODES, ImageSetThumbnails, figures, html as report_html, render_html
from pytest_memaudit.results.result import AuditResult, LayerResult
from pytest_memaudit.metric.stats import Interval, layer_stats
from pytest_memaudit.metric.unitmem import UnitMemValues, unitmem_from

pytest_plugins = ["pytester"]

VAR_CHANNELS = [160] * 7 + [320] * 6 + [640] * 8 + [32]
EVIL_NAME = "<script>alert(1)</script>.png"  # a folder "<script>alert(1)<" holding "script>.png"
GATES = "thresholds:\n  mean_unitmem_max: 1.0\nlayers:\n  conv.out: {mean_unitmem_max: 0.0001}\n"


class Page(HTMLParser):
    """What the report shows: table body rows (cell texts and thumbnail classes) by table class,
    every URL in an attribute or a CSS url(), script elements, and the visible text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[tuple[list[str], list[str]]]] = {}
        self.urls: list[str] = []
        self.scripts = 0
        self.thumb_classes: list[str] = []
        self._text: list[str] = []
        self._table = self._row = self._cell = None
        self._style = False
        self.feed(text)
        self.text = " ".join("".join(self._text).split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [value for key, value in attrs.items() if key in ("src", "href", "xlink:href", "srcset")]
        classes = (attrs.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
        elif tag == "style":
            self._style = True
        elif tag == "table":
            self._table = self.tables.setdefault(classes[0], [])
        elif tag == "tr" and self._table is not None:
            self._row = ([], [])
        elif tag == "td" and self._row is not None:
            self._cell = []
        if "th" in classes:
            self.thumb_classes += [c for c in classes if c != "th"]
            if self._row is not None:
                self._row[1].extend(c for c in classes if c != "th")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row[0].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row[0]:  # header rows have th cells only
                self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "style":
            self._style = False

    def handle_data(self, data):
        if self._style:
            self.urls += re.findall(r"url\(\"?([^\")]*)", data)
            return
        self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def close(text: str, value: float) -> bool:
    """``text`` shows ``value`` to the precision it is printed with (3 or 4 significant figures)."""
    return math.isclose(float(text), value, rel_tol=5e-4, abs_tol=5e-4)


@dataclass
class Run:
    root: Path
    proc: subprocess.CompletedProcess
    data: dict
    html: str
    page: Page


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, var_checkpoint) -> Run:
    """One plugin run in a fresh process: 8 images (one named like a script tag), conv.out gated to fail."""
    root = tmp_path_factory.mktemp("report_run")
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "audits").mkdir()
    (root / "audits" / "memaudit.yaml").write_text(GATES)
    data = make_images(root / "imgs", 7, size=32)
    (data / "<script>alert(1)<").mkdir()
    shutil.copy(data / "img_000.png", data / EVIL_NAME)
    command = [sys.executable, "-m", "pytest", "audits", "--memaudit-model", "var_d16",
               "--memaudit-checkpoint", str(var_checkpoint), "--memaudit-data", "imgs", "--memaudit-image-size", "32",
               "--memaudit-augmentations", "0", "-p", "no:cacheprovider", "--junitxml", "junit.xml"]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
    report = root / "memaudit-report"
    assert (report / "report.html").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    html = (report / "report.html").read_text(encoding="utf-8")
    return Run(root, proc, json.loads((report / "results.json").read_text()), html, Page(html))


def test_report_and_json_go_to_the_default_folder(plugin_run):
    assert plugin_run.proc.returncode == 1  # conv.out's gate failed; the report does not change that
    out = plugin_run.proc.stdout
    assert f"memaudit: results written to {plugin_run.root / 'memaudit-report' / 'results.json'}" in out
    assert f"memaudit: report written to {plugin_run.root / 'memaudit-report' / 'report.html'}" in out
    assert EVIL_NAME in plugin_run.data["samples"] and len(plugin_run.data["samples"]) == 8


def test_gate_table_lists_failures_first_with_figures_and_limits(plugin_run):
    rows = plugin_run.page.tables["gates"]
    layers = {layer["name"]: layer for layer in plugin_run.data["layers"]}
    assert [cells[0] for cells, _ in rows] == ["conv.out"] + [name for name in layers if name != "conv.out"]
    for cells, _ in rows:
        layer = layers[cells[0]]
        check = layer["checks"][0]
        assert cells[1:3] == [layer["module"], layer["outcome"]] and len(cells) == 4  # one threshold in use
        pattern = r"(\S+) ≤ (\S+)" if check["passed"] else r"FAIL (\S+) > (\S+)"
        match = re.fullmatch(pattern, cells[3])
        assert match and close(match[1], check["value"]) and float(match[2]) == check["limit"]
    assert "failed 1 of 22 gated layers crossed a threshold: conv.out." in plugin_run.page.text


def test_table1_is_the_20_highest_units_with_their_top_data_point(plugin_run):
    data = plugin_run.data
    units = [(value, i, u) for i, layer in enumerate(data["layers"]) for u, value in enumerate(layer["unitmem"])]
    expected = sorted(units, key=lambda t: (-t[0], t[1], t[2]))[:20]
    rows = plugin_run.page.tables["table1"]
    assert len(rows) == 20
    for rank, ((cells, thumbs), (value, i, u)) in enumerate(zip(rows, expected), 1):
        layer = data["layers"][i]
        index = layer["max_sample"][u]
        assert cells[:4] == [str(rank), layer["name"], str(u), f"{value:.3f}"]
        assert cells[4] == data["samples"][index] and thumbs == [f"dp{index}"]


def test_table2_per_layer_numbers_match_the_json(plugin_run):
    rows = plugin_run.page.tables["table2"]
    assert [cells[0] for cells, _ in rows] == [layer["name"] for layer in plugin_run.data["layers"]]
    keys = ["top_mean", "bottom_mean", "ttest_t", "ttest_p", "mean_unitmem"]
    for (cells, _), layer in zip(rows, plugin_run.data["layers"]):
        assert cells[1:3] == [str(layer["channels"]), str(int(layer["group_size"]))]
        assert all(close(text, layer[key]) for text, key in zip(cells[3:8], keys)), (cells, layer["name"])
        mean = layer["intervals"]["mean_unitmem"]
        assert close(cells[8], (mean["high"] - mean["low"]) / 2)  # the mean's 95% interval, half its width
        assert close(cells[9], layer["median_unitmem"]) and close(cells[10], layer["max_unitmem"])
        assert cells[11] == str(int(layer["dead_units"])) and len(cells) == 15
        excess = layer["excess_over_control"]
        assert close(cells[12], layer["control_mean_unitmem"])  # the random control, on by default
        assert close(cells[13], excess["estimate"])
        low, high = (float(x) for x in cells[14].strip("[]").split(", "))
        assert close(str(low), excess["low"]) and close(str(high), excess["high"])


def test_figure_summaries_match_the_json(plugin_run):
    summary, text = plugin_run.data["summary"], plugin_run.page.text
    assert f"the overall mean UnitMem is {summary['mean_unitmem']:.3f}" in text
    match = re.search(r"with its depth: ρ = (\S+), p = (\S+) \(22 layers\)", text)
    assert close(match[1], summary["depth_spearman_rho"]) and close(match[2], summary["depth_spearman_p"])
    assert "(b) top 10% of units (819 of 8192)" in text and "(c) bottom 10% of units (819 of 8192)" in text


def test_junit_properties_carry_each_layers_figures(plugin_run):
    cases = {case.get("name"): case for case in ET.parse(plugin_run.root / "junit.xml").iter("testcase")}
    for layer in plugin_run.data["layers"]:
        properties = {p.get("name"): float(p.get("value")) for p in cases[layer["name"]].iter("property")}
        for figure in ("mean_unitmem", "max_unitmem", "p90_unitmem", "ttest_p"):
            assert properties[f"memaudit_{figure}"] == pytest.approx(layer[figure], abs=1e-6)


def test_self_contained_and_escaped(plugin_run):
    page = plugin_run.page
    assert page.urls and all(url.startswith(("data:", "#")) for url in page.urls)
    for url in page.urls:
        if url.startswith("data:image/"):
            Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).verify()
    assert page.scripts == 0 and "<script>alert" not in plugin_run.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in plugin_run.html and EVIL_NAME in page.text
    # each data point shown is embedded once: every image URI is a thumbnail class or a figure
    thumbnails = re.findall(r"\.(dp\d+) \{ background-image: url\(\"data:image/", plugin_run.html)
    assert sorted(thumbnails) == sorted(set(page.thumb_classes)) and len(thumbnails) == 8
    assert "@media print" in plugin_run.html


# --- rendering results built directly -------------------------------------------------------


def synthetic_result(samples, names, channels, topk=10, seed=0) -> AuditResult:
    """Random but well-formed per-unit values for ``channels`` units per layer."""
    rng = np.random.default_rng(seed)
    layers = []
    for name, units in zip(names, channels):
        top_values = -np.sort(-rng.gamma(2.0, 1.0, size=(topk, units)), axis=0)
        top_samples = rng.integers(0, len(samples), size=(topk, units))
        mu_rest = top_values[0] * rng.uniform(0.05, 0.95, units)
        unitmem, dead = unitmem_from(top_values[0], mu_rest)
        values = UnitMemValues(unitmem, top_values[0], mu_rest, top_samples[0].copy(), dead, top_values, top_samples)
        layers.append(LayerResult(name, name.replace(".", "_"), values, layer_stats(unitmem, dead)))
    settings = {"model": "synthetic", "image_size": 64, "augmentations": 10, "views_per_image": 10, "reduce": "mean",
                "seed": seed, "precision": "float32", "device": "cpu", "batch_size": 32, "topk": topk, "control": "none"}
    return AuditResult("synthetic", settings, "generated", list(samples), layers,
                       timing={"wall_s": 2.0, "forward_s": 1.5, "views": 10.0 * len(samples), "views_per_s": 5.0 * len(samples)})


class ColourSource:
    """Thumbnail pixels made on the fly: a flat colour per data point."""

    def pixels(self, sample):
        return np.full((40, 30, 3), sum(map(ord, sample)) % 256, dtype=np.uint8)


SMALL_SAMPLES = [f"class_{i % 3}/photo {i:02d}.jpg" for i in range(30)]


@pytest.fixture
def small_result():
    return synthetic_result(SMALL_SAMPLES, ["stem", "block.0", "head"], [24, 40, 16], topk=5)


@pytest.mark.parametrize("gallery, source", [("images", ColourSource()), ("images", None), ("names", ColourSource()),
                                             ("none", ColourSource())])
def test_gallery_modes(small_result, gallery, source):
    html = render_html(small_result, source, gallery)
    page = Page(html)
    shown = [cells[4] for cells, _ in page.tables["table1"]]
    thumbnails = re.findall(r"background-image: url\(\"data:image/\w+;base64,", html)
    if gallery == "images" and source is not None:
        assert len(thumbnails) == len(set(page.thumb_classes)) > 0
    else:
        assert thumbnails == [] and page.thumb_classes == []
    if gallery == "none":
        assert not any(sample in html for sample in small_result.samples)
        assert all(re.fullmatch(r"data point #\d+", label) for label in shown)
    else:
        assert all(label in small_result.samples for label in shown)
    assert "NOT GATED" in page.text.upper() and {cells[2] for cells, _ in page.tables["gates"]} == {"not gated"}


def test_plugin_offers_the_reports_gallery_modes():
    assert pytest_memaudit.plugin.GALLERY_MODES == GALLERY_MODES


def test_control_columns_and_canaries(small_result):
    for layer, control in zip(small_result.layers, (0.1, 0.2, 0.3)):
        layer.control_mean = control
        excess = layer.stats.mean_unitmem - control
        layer.control_excess = Interval(excess, 0.01, excess - 0.02, excess + 0.02, 10)
    small_result.control = synthetic_result(SMALL_SAMPLES, ["stem", "block.0", "head"], [24, 40, 16], seed=1)
    small_result.canaries = [SMALL_SAMPLES[7], SMALL_SAMPLES[2]]
    page = Page(render_html(small_result, None, "names"))
    for (cells, _), layer in zip(page.tables["table2"], small_result.layers):
        excess = layer.control_excess
        assert close(cells[12], layer.control_mean) and close(cells[13], excess.estimate)
        assert cells[14] == f"[{excess.low:+.3f}, {excess.high:+.3f}]"
    ranks = small_result.canary_ranks()
    rows = page.tables["canaries"]
    assert sorted((cells[0], cells[1]) for cells, _ in rows) == sorted(
        (canary, f"{rank} of 30") for canary, rank in ranks.items())


def test_full_size_report_stays_under_10_mb():
    """10,000 data points, var_d16's 8,192 units, top-10 per unit, thumbnails generated on the fly."""
    names = [layer.name for layer in var_layer_specs()]
    result = synthetic_result(builtin_ids(10_000), names, VAR_CHANNELS)
    html = render_html(result, ImageSetThumbnails(ImageSet.builtin(10_000, 64, seed=0)), "images")
    size = len(html.encode("utf-8"))
    assert 500_000 < size < 10_000_000, size
    assert len(re.findall(r"\.dp\d+ \{ background-image", html)) > 100  # the thumbnails are really in it


def decode_png(uri):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_heatmap_gives_every_channel_its_rows_and_greys_units_outside_the_group():
    values = [np.array([0.0, 1.0]), np.array([0.2, 0.4, 0.6, 0.8, 0.9])]
    masks = [np.array([False, True]), np.array([True, False, False, False, False])]
    hm = figures.heatmap(["a", "b"], values, [("a", "all", None), ("b", "some", masks)], column_width=3, gap=1)
    assert (hm.width, hm.height) == (7, 256)
    everything, some = decode_png(hm.panels[0].image), decode_png(hm.panels[1].image)
    assert (everything[:128, 0] == figures.colormap(0.0)).all() and (everything[128:, 2] == figures.colormap(1.0)).all()
    rows_of_b = [np.flatnonzero((everything[:, 4] == figures.colormap(v)).all(axis=1)) for v in values[1]]
    assert [(r.min(), r.max()) for r in rows_of_b] == [(0, 51), (52, 102), (103, 153), (154, 204), (205, 255)]
    assert (everything[:, 3] == figures.BACKGROUND).all()  # the gap between columns
    assert (some[:128, 0] == figures.OUTSIDE_GROUP).all() and (some[128:, 0] == figures.colormap(1.0)).all()
    assert [[unit for unit, _, _ in column] for column in hm.panels[1].hover] == [[1], [0]]


def test_histogram_bars_hold_every_unit():
    values = np.array([0.05, 0.05, 0.51, 0.99, 1.0])
    h = figures.histogram(values, float(values.mean()), bins=10)
    counts = [int(text.rsplit(": ", 1)[1].split()[0]) for *_, text in h.bars]
    assert counts == [2, 1, 2] and h.mean_x == pytest.approx(h.left + values.mean() * h.plot_width)
    assert figures.nice_ticks(1234) == [0, 500, 1000, 1500] and figures.nice_ticks(0.31, most=5) == [0, 0.1, 0.2, 0.3, 0.4]


# --- through the plugin ---------------------------------------------------------------------


def run_conv_out(pytester, var_checkpoint, *extra, limit="1.0"):
    pytester.makefile(".ini", pytest="[pytest]\n")
    (pytester.path / "audits").mkdir(exist_ok=True)
    (pytester.path / "audits" / "memaudit.yaml").write_text(f"thresholds: {{mean_unitmem_max: {limit}}}\n")
    return pytester.runpytest("audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint),
                              "--memaudit-samples", "4", "--memaudit-image-size", "32", "--memaudit-augmentations", "0",
                              "-k", "conv.out", "-p", "no:cacheprovider", *extra)


@pytest.mark.parametrize("limit, status", [("1.0", 3), ("0.0001", pytest.ExitCode.TESTS_FAILED)])
def test_failed_render_keeps_json_sets_old_report_aside_and_gate_status(pytester, var_checkpoint, monkeypatch, limit,
                                                                        status):
    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")

    monkeypatch.setattr(report_html, "render_html", broken)
    folder = pytester.mkdir("memaudit-report")
    (folder / "report.html").write_text("previous report")
    result = run_conv_out(pytester, var_checkpoint, limit=limit)
    assert result.ret == status
    result.stdout.fnmatch_lines([f"*memaudit: ERROR: the report could not be written to {folder / 'report.html'}: "
                                 "RuntimeError: template exploded; the file left there by an earlier run (modified *) "
                                 f"was renamed to {folder / 'report.html.stale'}"])
    assert [layer["name"] for layer in json.loads((folder / "results.json").read_text())["layers"]] == ["conv.out"]
    assert (folder / "report.html.stale").read_text() == "previous report"
    assert sorted(p.name for p in folder.iterdir()) == ["report.html.stale", "results.json"]  # no temporary left over


def test_report_off_and_explicit_paths(pytester, var_checkpoint):
    result = run_conv_out(pytester, var_checkpoint, "--memaudit-html", "none")
    assert result.ret == 0 and not (pytester.path / "memaudit-report").exists()
    assert "memaudit: report written" not in result.stdout.str()
    result = run_conv_out(pytester, var_checkpoint, "--memaudit-html", "out/audit.html", "--memaudit-gallery", "none")
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"memaudit: results written to {pytester.path / 'out' / 'results.json'}",
                                 f"memaudit: report written to {pytester.path / 'out' / 'audit.html'}"])
    html = (pytester.path / "out" / "audit.html").read_text()
    assert "builtin/0000" not in html and "data point #0" in html


# --- a real browser -------------------------------------------------------------------------


def test_report_renders_in_chromium_without_console_errors(plugin_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    report = plugin_run.root / "memaudit-report" / "report.html"
    proc = subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "CONSOLE" in line] == []
    dom = Page(proc.stdout)
    assert len(dom.tables["table1"]) == 20 and len(dom.tables["table2"]) == 22
    assert dom.urls == plugin_run.page.urls  # every figure and thumbnail survived parsing


# --- small-multiples scatter panels ---------------------------------------------------------


def scatter_example():
    return figures.scatter_grid([
        ("<share>", np.array([0.1, 0.5, np.nan, 0.9, 0.3]), np.array([1.0, 2.0, 3.0, np.nan, np.inf]), "rho 0.21 [0.10, 0.32]"),
        ("slope", np.array([-3.1, -1.2, -2.0]), np.array([0.0, 1.0, 0.5]), ""),
    ], columns=1, y_label="score")


def test_scatter_grid_geometry():
    g = scatter_example()
    first, second = g.panels
    assert first.skipped == 3 and second.skipped == 0
    # finite x 0.1 to 0.5: step 0.1 (nice_ticks of the span 0.4); y 1 to 2: step 0.2
    assert [label for _, label in first.x_ticks] == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    assert [label for _, label in first.y_ticks] == ["1", "1.2", "1.4", "1.6", "1.8", "2"]
    assert [label for _, label in second.x_ticks] == ["-3.5", "-3", "-2.5", "-2", "-1.5", "-1"]
    left, right, bottom = first.left, first.left + first.plot_width, first.top + first.plot_height
    # the data span the ticks exactly here: the points sit in the plot area's corners
    assert [(x, y) for x, y, _ in first.points] == [pytest.approx((left, bottom)), pytest.approx((right, first.top))]
    assert first.x_ticks[0][0] == left and first.x_ticks[-1][0] == pytest.approx(right)
    # -2.0 of [-3.5, -1] is 60% across, 0.5 of [0, 1] half way up
    assert second.points[2][:2] == pytest.approx((left + 0.6 * second.plot_width, bottom - 0.5 * second.plot_height))
    for panel in g.panels:
        assert all(left <= x <= right and panel.top <= y <= bottom for x, y, _ in panel.points)
    # one column: stacked cells, the shared y label's margin on the left
    assert (first.x, first.y, second.x, second.y) == (18, 0, 18, first.height)
    assert (g.width, g.height) == (18 + first.width, 2 * first.height)
    three = figures.scatter_grid([("a", [1, 2], [3, 4], "")] * 4, columns=3)
    assert (three.width, three.height) == (3 * three.panels[0].width, 2 * three.panels[0].height)
    assert [(p.x // p.width, p.y // p.height) for p in three.panels] == [(0, 0), (1, 0), (2, 0), (0, 1)]


def test_scatter_grid_renders_one_circle_per_finite_point():
    template = report_html._environment().from_string('{% import "_figures.html.j2" as f %}{{ f.scatter_grid(g) }}')
    svg = ET.fromstring(template.render(g=scatter_example()).strip())
    assert svg.tag == "svg" and svg.get("viewBox") == f"0 0 {scatter_example().width} {scatter_example().height}"
    circles = svg.findall(".//circle")
    assert len(circles) == 2 + 3
    assert [c.find("title").text for c in circles[:2]] == ["0.1, 1", "0.5, 2"]
    texts = [t.text for t in svg.iter("text")]
    assert "<share>" in texts and "rho 0.21 [0.10, 0.32] (3 without a value)" in texts and "score" in texts
