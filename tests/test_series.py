"""A series of checkpoints audited in one pass: tests per layer and checkpoint, the same views for
every checkpoint, one report with the series, comparison with the previous checkpoint."""

import json

import pytest

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from test_baselines import LAYERS, QUICK, project  # noqa: F401  (the fixture)
from test_report import Page

pytest_plugins = ["pytester"]

SERIES = ["step-1", "step-2", "step-10"]  # natural order; step-2 is b.pt, whose head rises


@pytest.fixture
def series(project):  # noqa: F811
    folder = project.mkdir("ckpts")
    for label, source in zip(SERIES, ("a.pt", "b.pt", "a.pt")):
        (folder / f"{label}.pt").write_bytes((project.path / source).read_bytes())
    return project


def audit(pytester, *extra):
    return pytester.runpytest("audits", "--memaudit-model", "tiny", "--memaudit-data", "builtin",
                              "--memaudit-samples", "8", "--memaudit-augmentations", "2", "--memaudit-control", "none",
                              "--memaudit-holdout", "none", *QUICK, *extra)


def test_three_checkpoints_give_three_tests_per_layer_and_one_report(series, monkeypatch):
    calls = []
    real = pytest_memaudit.pipeline.views.augment_views
    monkeypatch.setattr(pytest_memaudit.pipeline.views, "augment_views", lambda *args: calls.append(1) or real(*args))
    result = audit(series, "--memaudit-checkpoint", "ckpts/step-*.pt", "--memaudit-compare", "previous",
                   "--memaudit-compare-fail", "mean_unitmem:0.05", "-v")
    assert result.ret == 1
    names = [line.split("::")[1].split(" ")[0] for line in result.outlines if line.startswith("audits/memaudit.yaml::")]
    assert names == [f"{layer}[{label}]" for layer in LAYERS for label in SERIES]
    result.assert_outcomes(passed=8, failed=1)
    result.stdout.fnmatch_lines(["FAILED audits/memaudit.yaml::head[[]step-2] - layer head: 1 compare gate*"])
    batches = len(calls)
    assert batches == 1  # 8 images x 2 views fit one 32-view batch, augmented once for all three checkpoints

    data = json.loads((series.path / "memaudit-report" / "results.json").read_text())
    assert data["series"] == SERIES and [run["series_label"] for run in data["runs"]] == SERIES
    shas = [run["checkpoint"]["sha256"] for run in data["runs"]]
    assert shas[0] == shas[2] != shas[1]
    first, second, third = data["runs"]
    assert "comparison" not in first  # nothing before it
    assert second["comparison"]["baseline"]["label"] == "the previous checkpoint, step-1"
    for run in data["runs"]:
        assert run["samples"] == first["samples"]
    for a, c in zip(first["layers"], third["layers"]):  # the same checkpoint, on the same views: the same numbers
        assert a["unitmem"] == c["unitmem"] and a["max_sample"] == c["max_sample"]
    assert [[layer["outcome"] for layer in run["layers"]] for run in data["runs"]] == [
        ["passed"] * 3, ["passed", "passed", "failed"], ["passed"] * 3]

    html = (series.path / "memaudit-report" / "report.html").read_text()
    page = Page(html)
    assert html.count('id="series"') == 1 and 'href="#series"' in html
    rows = page.tables["series"]
    assert [cells[0] for cells, _ in rows] == LAYERS
    for (cells, _), name in zip(rows, LAYERS):
        means = [run["layers"][LAYERS.index(name)]["mean_unitmem"] for run in data["runs"]]
        assert [float(cell.split()[0]) for cell in cells[1:]] == pytest.approx(means, abs=5e-4)
    assert rows[2][0][2].endswith("FAILED")
    panels = html.split('<figure class="series-panel">')[1:]
    assert [panel.split("</figcaption>")[0].split(">")[-1] for panel in panels] == [
        "mean UnitMem", "90th-percentile UnitMem", "highest unit UnitMem", "share of dead units"]
    for panel in panels:  # a line per layer, a point per checkpoint
        svg = panel.split("</svg>")[0]
        assert svg.count("<polyline") == 3 and svg.count("<circle") == 9
    assert "The other sections of this report describe the last checkpoint, step-10." in page.text

    # the stored series re-gates to the same report and JSON
    folder = series.path / "memaudit-report"
    (series.path / "series.json").write_bytes((folder / "results.json").read_bytes())
    again = series.runpytest("audits", "--memaudit-from", "series.json", "--memaudit-compare", "previous",
                             "--memaudit-compare-fail", "mean_unitmem:0.05", "--memaudit-html", "again/report.html",
                             *QUICK)
    assert again.ret == 1
    assert (series.path / "again" / "report.html").read_bytes() == (folder / "report.html").read_bytes()
    assert (series.path / "again" / "results.json").read_bytes() == (folder / "results.json").read_bytes()


def test_repeated_option_and_a_single_checkpoint(series):
    result = audit(series, "--memaudit-checkpoint", "ckpts/step-10.pt", "--memaudit-checkpoint", "ckpts/step-2.pt",
                   "-k", "head", "--memaudit-save", "nightly")
    assert result.ret == 0
    result.assert_outcomes(passed=2)
    data = json.loads((series.path / "memaudit-report" / "results.json").read_text())
    assert data["series"] == ["step-2", "step-10"]
    saved = sorted(path.name.split("_", 2)[2] for path in (series.path / ".memaudit" / "tiny").glob("*.json"))
    assert saved == ["nightly.step-10.json", "nightly.step-2.json"]
    single = audit(series, "--memaudit-checkpoint", "ckpts/step-2*.pt", "-k", "head")  # the glob finds one file
    assert single.ret == 0 and "series" not in json.loads((series.path / "memaudit-report" / "results.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["--memaudit-checkpoint", "ckpts/epoch-*.pt"], "--memaudit-checkpoint 'ckpts/epoch-*.pt' matches no file*"),
    (["--memaudit-checkpoint", "ckpts/step-1.pt", "--memaudit-checkpoint", "a/step-1.pt"],
     "--memaudit-checkpoint: ckpts/step-1.pt and a/step-1.pt are both named step-1*"),
    (["--memaudit-checkpoint", "a.pt", "--memaudit-compare", "previous"],
     "--memaudit-compare previous compares each checkpoint of a series with the one before it*"),
], ids=["no-match", "same-name", "previous-without-series"])
def test_series_usage_errors(series, extra, message):
    result = audit(series, *extra)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: memaudit: {message}"])


# --- the library: run_series against one run_audit per checkpoint ---------------------------


def test_run_series_gives_each_checkpoint_what_its_own_audit_gives(tmp_path):
    import numpy as np
    import torch

    from pytest_memaudit.pipeline.audit import run_audit, run_series
    from pytest_memaudit.pipeline.settings import make_settings
    from pytest_memaudit.models import LayerSpec, ModelSpec
    from test_baselines import tiny_make

    def build(checkpoint):
        net = tiny_make()
        net.load_state_dict(torch.load(checkpoint, weights_only=True))
        return net

    net = tiny_make()
    torch.save(net.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        net.head.weight.mul_(-3)
    torch.save(net.state_dict(), tmp_path / "b.pt")
    spec = ModelSpec("tiny", tuple(LayerSpec(name, name) for name in LAYERS), build=build, default_image_size=16)
    settings = make_settings(model="tiny", data="builtin", samples=6, augmentations=2, holdout="builtin",
                             permutations=100, planted_units=2, device="cpu")
    paths = [str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]
    series = run_series(settings, paths, spec)
    for path, result in zip(paths, series):
        alone = run_audit(make_settings(**(settings.as_dict() | {"checkpoint": path})), spec)
        assert result.checkpoint == alone.checkpoint and result.settings["checkpoint"] == path
        assert result.samples == alone.samples and result.labels == alone.labels
        assert result.membership == alone.membership
        np.testing.assert_array_equal(result.memorized.points.score, alone.memorized.points.score)
        assert result.memorized.points.argmax_units.tolist() == alone.memorized.points.argmax_units.tolist()
        for mine, theirs in zip(result.layers, alone.layers):
            assert np.array_equal(mine.values.unitmem, theirs.values.unitmem)
            assert mine.control_excess == theirs.control_excess and mine.membership == theirs.membership
            assert mine.intervals == theirs.intervals
    assert series[1].planted is series[0].planted  # one planted control, on the first checkpoint
    assert series[0].control is series[1].control  # one random control: it does not depend on the weights


def test_depth_plot_spans_negative_values():
    from pytest_memaudit.report import figures

    plot = figures.depth_plot(["a", "b", "c"], [figures.Line("x", "trained", [-0.12, 0.0, 0.31])])
    labels = [float(label) for _, label in plot.y_ticks]
    assert labels[0] <= -0.12 and labels[-1] >= 0.31 and 0.0 in labels
    y_of = dict(zip(labels, (y for y, _ in plot.y_ticks)))
    (_, y_low, _), (_, y_zero, _), (_, y_high, _) = plot.series[0].points
    assert y_zero == pytest.approx(y_of[0.0])  # 0 sits on its tick, between the others
    assert y_high < y_zero < y_low
    assert y_low == pytest.approx(y_of[0.0] + 0.12 * (y_of[labels[0]] - y_of[0.0]) / -labels[0])
