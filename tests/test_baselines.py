"""Saved runs, comparison with a baseline, compare gates and re-gating stored results, through the
plugin as a CI job runs them: a tiny three-layer model declared in YAML, checkpoints written here."""

import errno
import hashlib
import json
import re

import pytest
import scipy.stats
import torch

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from conftest import make_images
from test_outputs import fail_writes_in
from test_report import Page

pytest_plugins = ["pytester"]

TINY = """
import torch


def make():
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("stem", torch.nn.Conv2d(3, 8, 3, padding=1))
    net.add_module("act", torch.nn.ReLU())
    net.add_module("mid", torch.nn.Conv2d(8, 8, 3, padding=1))
    net.add_module("act2", torch.nn.ReLU())
    net.add_module("head", torch.nn.Conv2d(8, 6, 1))
    return net


def build(checkpoint):
    net = make()
    if checkpoint:
        net.load_state_dict(torch.load(checkpoint, weights_only=True))
    return net
"""
MODEL = "models:\n  tiny: {factory: 'tinyck:build', audited_layers: [stem, mid, head], image_size: 16}\n"
GATES = "thresholds: {mean_unitmem_max: 1.0}\n"
LAYERS = ["stem", "mid", "head"]
QUICK = ("-p", "no:cacheprovider")


def tiny_make():
    namespace = {}
    exec(TINY, namespace)
    return namespace["make"]()


@pytest.fixture
def project(pytester):
    """The tiny model's factory, an audit file, and two checkpoints: ``a.pt``, and ``b.pt`` whose head
    (the last layer) picks one input channel per unit instead of mixing them (its UnitMem rises)."""
    pytester.makepyfile(tinyck=TINY)
    pytester.syspathinsert()
    pytester.makeini("[pytest]\n")
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text(GATES + MODEL)
    state = tiny_make().state_dict()
    torch.save(state, pytester.path / "a.pt")
    state["head.weight"] = torch.zeros_like(state["head.weight"])
    state["head.weight"][torch.arange(6), torch.arange(6)] = 1.0
    state["head.bias"] = torch.zeros_like(state["head.bias"])
    torch.save(state, pytester.path / "b.pt")
    return pytester


def audit(pytester, *extra, checkpoint="a.pt"):
    return pytester.runpytest("audits", "--memaudit-model", "tiny", "--memaudit-checkpoint", checkpoint,
                              "--memaudit-data", "builtin", "--memaudit-samples", "8", "--memaudit-augmentations", "0",
                              "--memaudit-control", "none", "--memaudit-holdout", "none", *QUICK, *extra)


def results(pytester, path="memaudit-report/results.json"):
    return json.loads((pytester.path / path).read_text())


def saved(pytester):
    return sorted((pytester.path / ".memaudit" / "tiny").glob("*.json"))


def sha12(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_save_then_compare_the_same_checkpoint_moves_nothing(project):
    first = audit(project, "--memaudit-save", "release-1")
    assert first.ret == 0
    [entry] = saved(project)
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z_{sha12(project.path / 'a.pt')}_release-1\.json", entry.name)
    first.stdout.fnmatch_lines([f"memaudit: saved run written to {entry}"])
    assert json.loads(entry.read_text()) == results(project)  # the entry is the run's results file

    second = audit(project, "--memaudit-compare", "release-1", "--memaudit-compare-fail", "mean_unitmem:0",
                   "--memaudit-compare-fail", "max_unitmem:0")
    assert second.ret == 0
    second.assert_outcomes(passed=3)
    comparison = results(project)["comparison"]
    assert comparison["baseline"]["checkpoint"]["sha256"].startswith(sha12(project.path / "a.pt"))
    assert comparison["differences"] == []
    assert [layer["name"] for layer in comparison["layers"]] == LAYERS
    for layer in comparison["layers"]:
        assert layer["shift_p"] == 1.0
        for figure, change in layer["figures"].items():
            assert change["delta"] == 0 and change["baseline"] == change["current"], (layer["name"], figure)
            assert change["beyond_noise"] is False
    rows = [line.split("│") for line in second.outlines if line.split("│")[0].strip() in LAYERS]
    assert [row[4].strip() for row in rows] == ["+0.000"] * 3  # the Δ mean column
    page = Page((project.path / "memaudit-report" / "report.html").read_text())
    assert 'href="#compare"' in (project.path / "memaudit-report" / "report.html").read_text()
    assert "Both runs audited the same checkpoint" in page.text and "0 of the changes below are beyond noise" in page.text
    assert [cells[0] for cells, _ in page.tables["compare"]] == LAYERS
    assert "risers" not in page.tables  # no unit rose


def test_a_changed_layer_moves_alone_and_its_compare_gate_fails_it(project):
    assert audit(project, "--memaudit-save", "release").ret == 0
    baseline = results(project)
    result = audit(project, "--memaudit-compare", "release", "--memaudit-compare-fail", "mean_unitmem:0.05",
                   checkpoint="b.pt")
    assert result.ret == 1
    result.assert_outcomes(passed=2, failed=1)
    current = results(project)
    before, after = (data["layers"][2]["mean_unitmem"] for data in (baseline, current))
    assert after - before > 0.05
    result.stdout.fnmatch_lines([
        "*layer head: 1 compare gate(s) crossed*",
        f"*mean_unitmem rose from {before:.4g} (baseline) to {after:.4g} ({after - before:+.4g}), more than "
        "mean_unitmem_rise_max = 0.05",
        "FAILED audits/memaudit.yaml::head - layer head: 1 compare gate(s) crossed",
    ])
    changes = {layer["name"]: layer["figures"] for layer in current["comparison"]["layers"]}
    for name in ("stem", "mid"):  # upstream of the change: the very same numbers
        assert all(change["delta"] == 0 for change in changes[name].values()), name
    assert changes["head"]["mean_unitmem"]["delta"] == pytest.approx(after - before, abs=1e-12)
    assert changes["head"]["mean_unitmem"]["beyond_noise"] is True
    assert [layer["outcome"] for layer in current["layers"]] == ["passed", "passed", "failed"]
    page = Page((project.path / "memaudit-report" / "report.html").read_text())
    stem, head = page.tables["compare"][0][0], page.tables["compare"][2][0]
    assert stem[1].startswith(f"{baseline['layers'][0]['mean_unitmem']:.3f} → {current['layers'][0]['mean_unitmem']:.3f}"
                              " (+0.000 [")
    assert head[1].startswith(f"{before:.3f} → {after:.3f} (▲ {after - before:+.3f} [")
    risers = page.tables["risers"]
    assert risers and {cells[0] for cells, _ in risers} == {"head"}
    assert "Unit identity" in page.text and "descends from" in page.text


def test_significant_rise_uses_both_runs_jackknife_intervals(project):
    """The rise's interval: se = sqrt(se1^2 + se2^2), t with Welch-Satterthwaite degrees of freedom."""
    assert audit(project, "--memaudit-json", "base.json").ret == 0
    (project.path / "audits" / "memaudit.yaml").write_text(
        GATES + MODEL + "compare:\n  mean_unitmem: {limit: 0.0, when: significant}\n")
    assert audit(project, "--memaudit-compare", "base.json", checkpoint="b.pt").ret in (0, 1)
    base, now = results(project, "base.json")["layers"][2], results(project)["layers"][2]
    i1, i2 = now["intervals"]["mean_unitmem"], base["intervals"]["mean_unitmem"]
    v1, v2 = i1["se"] ** 2, i2["se"] ** 2
    df = (v1 + v2) ** 2 / (v1**2 / (i1["groups"] - 1) + v2**2 / (i2["groups"] - 1))
    half = scipy.stats.t.ppf(0.975, df) * (v1 + v2) ** 0.5
    delta = now["mean_unitmem"] - base["mean_unitmem"]
    [check] = now["checks"][1:]
    assert check["key"] == "mean_unitmem_rise_max" and check["baseline"] == base["mean_unitmem"]
    assert check["low"] == pytest.approx(delta - half, rel=1e-9) and check["high"] == pytest.approx(delta + half, rel=1e-9)
    assert check["passed"] is not (delta - half > 0)


def test_a_command_line_compare_gate_can_ask_for_a_rise_beyond_noise(project):
    """--memaudit-compare-fail FIGURE:DELTA:significant, as a YAML compare gate's when: significant: a rise
    past DELTA whose interval reaches below DELTA is noise, and the gate passes; without it, the estimate fails."""
    assert audit(project, "--memaudit-json", "base.json").ret == 0
    assert audit(project, "--memaudit-compare", "base.json", "--memaudit-compare-fail", "head:mean_unitmem:0:significant",
                 checkpoint="b.pt").ret in (0, 1)
    [check] = results(project)["layers"][2]["checks"][1:]
    assert check["key"] == "mean_unitmem_rise_max" and check["when"] == "significant"
    floor = max(check["low"], 0.0)
    assert check["value"] > floor
    limit = f"{floor + (check['value'] - floor) / 2:.6f}"  # below the estimate, above the interval's low end
    noisy = audit(project, "--memaudit-compare", "base.json", "--memaudit-compare-fail", f"head:mean_unitmem:{limit}",
                  checkpoint="b.pt")
    assert noisy.ret == 1
    noisy.stdout.fnmatch_lines(["*layer head: 1 compare gate(s) crossed*"])
    assert audit(project, "--memaudit-compare", "base.json", "--memaudit-compare-fail",
                 f"head:mean_unitmem:{limit}:significant", checkpoint="b.pt").ret == 0


def test_relative_limits_yaml_layer_overrides_and_the_command_line(project):
    assert audit(project, "--memaudit-json", "base.json").ret == 0
    (project.path / "audits" / "memaudit.yaml").write_text(
        GATES + MODEL + "compare:\n  max_unitmem: 10%\n  layers:\n    head: {max_unitmem: 90%}\n")
    result = audit(project, "--memaudit-compare", "base.json", checkpoint="b.pt")
    base_max = results(project, "base.json")["layers"][2]["max_unitmem"]
    head = results(project)["layers"][2]
    rise = head["max_unitmem"] - base_max
    assert 0.1 * base_max < rise < 0.9 * base_max  # 10% would fail it; the layer's 90% does not
    assert result.ret == 0
    check = next(c for c in head["checks"] if c["key"] == "max_unitmem_rise_max")
    assert check["relative"] == 0.9 and check["limit"] == pytest.approx(0.9 * base_max)
    assert head["thresholds"]["max_unitmem_rise_max"] == {"limit": 0.9, "when": "estimate", "severity": "fail",
                                                          "relative": True}
    result = audit(project, "--memaudit-compare", "base.json", "--memaudit-compare-fail", "head:max_unitmem:10%",
                   checkpoint="b.pt")
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"*max_unitmem rose from {base_max:.4g} (baseline) to *, more than "
                                 f"max_unitmem_rise_max = 10% of the baseline's {base_max:.4g} = {0.1 * base_max:.4g}"])


def test_compare_gates_without_a_baseline_are_not_applied(project):
    (project.path / "audits" / "memaudit.yaml").write_text(GATES + MODEL + "compare: {mean_unitmem: 0.0}\n")
    result = audit(project)
    assert result.ret == 0
    assert all("mean_unitmem_rise_max" not in layer["thresholds"] for layer in results(project)["layers"])
    result.stdout.fnmatch_lines(["note: the audit files' compare gates (compare:) were not applied: there was no "
                                 "baseline to compare with*"])  # said, not silently dropped
    assert sum("compare gates" in note for note in results(project)["notes"]) == 1


def test_from_reproduces_the_run_time_report_and_json_and_regates(project):
    data = make_images(project.path / "imgs", 6, size=16)
    assert audit(project, "--memaudit-data", str(data)).ret == 0
    folder = project.path / "memaudit-report"
    (project.path / "stored.json").write_bytes((folder / "results.json").read_bytes())
    result = project.runpytest("audits", "--memaudit-from", "stored.json", "--memaudit-html", "again/report.html",
                               "--junitxml", "junit.xml", *QUICK)
    assert result.ret == 0
    result.assert_outcomes(passed=3)
    assert (project.path / "again" / "report.html").read_bytes() == (folder / "report.html").read_bytes()
    assert (project.path / "again" / "results.json").read_bytes() == (folder / "results.json").read_bytes()
    assert "background-image: url(" in (folder / "report.html").read_text()  # the thumbnails are in both
    assert 'name="memaudit_mean_unitmem"' in (project.path / "junit.xml").read_text()

    # the thresholds as they are now, on the selected layers only; the images gone: names only
    (project.path / "audits" / "memaudit.yaml").write_text("layers: {head: {mean_unitmem_max: 0.01}}\n" + MODEL)
    for image in data.iterdir():
        image.unlink()
    data.rmdir()
    result = project.runpytest("audits", "--memaudit-from", "stored.json", "-k", "head or mid", *QUICK)
    assert result.ret == 1
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*layer head: 1 threshold(s) crossed*",
                                 "memaudit: the report shows image names only: the audited images (*imgs) cannot be "
                                 "read here: *"])
    regated = results(project)
    assert [(layer["name"], layer["outcome"]) for layer in regated["layers"]] == [("mid", "not gated"),
                                                                                  ("head", "failed")]
    html = (folder / "report.html").read_text()
    assert "background-image: url(" not in html and "img_000.png" in html


def _nested(depth):
    return "[" * depth


def _layer_membership_null(doc):
    doc["layers"][0]["membership"] = None


def _unitmem_null(doc):
    for layer in doc["layers"]:
        layer["unitmem"] = [None] * len(layer["unitmem"])


def _image_size(doc):
    doc["settings"]["image_size"] = -7


def _layer_twice(doc):
    doc["layers"].append(dict(doc["layers"][0]))


def _unit_out_of_range(doc):
    doc["layers"][1]["dead"] = [99]


REGATING_PROBES = [  # (change, the error's reason): each ended in a traceback, an INTERNALERROR or a dropped layer
    (None, "is not a pytest-memaudit results file (its JSON nests too deeply to read)"),
    (_layer_membership_null, "(layers[0].membership is null, yet the run measured membership (its summary has it): "
                             "every layer has its own)"),
    (_unitmem_null, "(layers[0].unitmem[0] must be a number, got null)"),
    (_image_size, "(settings.image_size must be a whole number in [16, 16384], got -7)"),
    (_layer_twice, "(layers[3].name repeats layers[0]'s 'stem': a layer is listed twice)"),
    (_unit_out_of_range, "(layers[1].dead names a unit outside the layer's 8)"),
]


def test_damaged_results_are_refused_before_use(project):
    """Re-gating or comparing with a damaged file is one usage error naming the field (exit 4), not exit 1
    with a traceback, INTERNALERROR, a report that fails, or a layer silently dropped."""
    assert audit(project, "--memaudit-holdout", "builtin", "--memaudit-json", "stored.json").ret == 0
    stored = results(project, "stored.json")
    assert stored["summary"]["membership"] is not None
    for change, reason in REGATING_PROBES:
        if change is None:
            (project.path / "odd.json").write_text(_nested(200_000))
        else:
            document = json.loads(json.dumps(stored))
            change(document)
            (project.path / "odd.json").write_text(json.dumps(document))
        for option in ("--memaudit-from", "--memaudit-compare"):
            args = ("audits", option, "odd.json", *QUICK) if option == "--memaudit-from" else (option, "odd.json")
            result = project.runpytest(*args) if option == "--memaudit-from" else audit(project, *args)
            assert result.ret == pytest.ExitCode.USAGE_ERROR, (change, option)
            result.stderr.fnmatch_lines([f"ERROR: memaudit: *odd.json*{reason.replace('[', '[[]')}*"])
            assert "Traceback" not in result.stdout.str() + result.stderr.str()
            assert "collected" not in result.stdout.str()


def test_holdout_none_leaves_the_membership_gates_out_and_names_them(project):
    """An explicit --memaudit-holdout none (training images only, as the seed report's analysis) gates on the
    rest and names the gates it did not evaluate in the terminal, the JSON and the report; without the option
    a gate that cannot be evaluated stays a collection error."""
    (project.path / "audits" / "memaudit.yaml").write_text(
        "thresholds: {mean_unitmem_max: 1.0, membership_p_min: 0.01, membership_excess_max: {limit: 0.1, when: "
        "significant}}\n" + MODEL)
    result = audit(project)
    assert result.ret == 0, result.stdout.str()
    note = ("not evaluated: membership_excess_max, membership_p_min: these gates need held-out images and this run "
            "has none (--memaudit-holdout none); the layers were gated on the rest")
    result.stdout.fnmatch_lines([f"*{note}*"])
    data = results(project)
    assert note in data["notes"]
    assert all(set(layer["thresholds"]) & {"membership_p_min", "membership_excess_max"} == set()
               and layer["outcome"] == "passed" for layer in data["layers"])
    assert note in (project.path / "memaudit-report" / "report.html").read_text()
    result = project.runpytest("audits", "--memaudit-model", "tiny", "--memaudit-checkpoint", "a.pt", "--memaudit-data",
                               "builtin", "--memaudit-samples", "8", "--memaudit-control", "none", *QUICK)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*gates this audit cannot evaluate: membership_excess_max needs held-out images*"])


def test_stored_run_without_what_a_gate_needs_is_a_collection_error(project):
    assert audit(project, "--memaudit-json", "stored.json").ret == 0
    (project.path / "audits" / "memaudit.yaml").write_text("thresholds: {membership_p_min: 0.01}\n" + MODEL)
    result = project.runpytest("audits", "--memaudit-from", "stored.json", *QUICK)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*gates the stored audit {project.path / 'stored.json'} cannot evaluate: "
                                 "membership_p_min needs held-out images*"])


@pytest.mark.parametrize("content, message", [
    ('{"schema_version": 3, "samples": [], "layers": []}',
     "*was written with results schema 3, newer than this pytest-memaudit reads (2): upgrade pytest-memaudit*"),
    ('{"schema_version": 2, "samples": [], "lay', "*is not valid JSON (*): a truncated or damaged results file?*"),
    ('{"benchmarks": []}', "*is not a pytest-memaudit results file*"),
    ('{"schema_version": 1, "samples": [], "layers": []}', "*has results schema 1, from an older pytest-memaudit*"),
    ('{"schema_version": 2, "model": "tiny", "samples": [], "layers": [{"name": "stem"}]}',
     "*is an incomplete or damaged results file (*lacks *); write it again*"),
], ids=["newer", "truncated", "not-ours", "older", "incomplete"])
@pytest.mark.parametrize("option", ["--memaudit-from", "--memaudit-compare"])
def test_results_files_that_cannot_be_read_are_usage_errors(project, content, message, option):
    (project.path / "odd.json").write_text(content)
    if option == "--memaudit-from":
        result = project.runpytest("audits", option, "odd.json", *QUICK)
    else:
        result = audit(project, option, "odd.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: memaudit: *odd.json{message}"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_names_latest_autosave_and_the_list(project):
    assert audit(project, "--memaudit-save", "release").ret == 0
    assert audit(project, "--memaudit-autosave", checkpoint="b.pt").ret == 0
    first, second = saved(project)
    assert first.name.endswith("_release.json") and second.name.endswith(f"_{sha12(project.path / 'b.pt')}_auto.json")
    listing = project.runpytest("--memaudit-list-saved")
    assert listing.ret == 0
    listing.stdout.fnmatch_lines([f"saved runs in {project.path / '.memaudit'} (2), oldest first:",
                                  "saved (UTC)*model*checkpoint*name*file",
                                  f"*tiny*{sha12(project.path / 'a.pt')}*release*tiny/{first.name}",
                                  f"*tiny*{sha12(project.path / 'b.pt')}*auto*tiny/{second.name}"])
    assert "collected" not in listing.stdout.str()
    latest = audit(project, "--memaudit-compare", "latest", checkpoint="b.pt")  # the autosaved b.pt: no change
    assert latest.ret == 0
    assert results(project)["comparison"]["baseline"]["label"] == f"latest ({second})"
    unknown = audit(project, "--memaudit-compare", "relase")
    assert unknown.ret == pytest.ExitCode.USAGE_ERROR
    unknown.stderr.fnmatch_lines(["ERROR: memaudit: --memaudit-compare 'relase': no saved run of that name. Did you "
                                  "mean 'release'? Saved names: auto, release.*"])
    bad = audit(project, "--memaudit-save", "my release")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: memaudit: --memaudit-save 'my release': a saved run's NAME is *"])


def test_baseline_of_other_layers_or_another_model_is_a_usage_error(project):
    assert audit(project, "-k", "head", "--memaudit-json", "head.json").ret == 0
    result = audit(project, "--memaudit-compare", "head.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: memaudit: cannot compare with the baseline: the baseline head.json did not "
                                 "audit layer(s) stem, mid (it audited head)*"])
    assert audit(project, "-k", "head", "--memaudit-compare", "head.json").ret == 0  # the same layer: fine
    data = results(project, "head.json")
    data["model"] = "other"
    (project.path / "other.json").write_text(json.dumps(data))
    result = audit(project, "-k", "head", "--memaudit-compare", "other.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the baseline other.json is an audit of model other, this run audits tiny*"])


def test_different_settings_are_said_prominently(project):
    assert audit(project, "--memaudit-json", "base.json").ret == 0
    result = audit(project, "--memaudit-compare", "base.json", "--memaudit-seed", "3", "--memaudit-samples", "6")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["the runs differ besides the checkpoint: data points 8 -> 6 (* in common with the "
                                 "baseline); seed 0 -> 3 (the changes mix both)"])
    page = Page((project.path / "memaudit-report" / "report.html").read_text())
    assert "Not like for like. Besides the checkpoint, the runs differ in: data points: 8 in the baseline" in page.text


def test_read_only_store_is_an_error_and_the_rest_is_written(project, monkeypatch):
    assert audit(project, "--memaudit-save", "release").ret == 0
    fail_writes_in(monkeypatch, project.path / ".memaudit" / "tiny", errno.EROFS)
    result = audit(project, "--memaudit-save", "again")
    assert result.ret == 3
    result.stdout.fnmatch_lines([
        "*memaudit summary*",
        f"memaudit: results written to {project.path}/memaudit-report/results.json",
        f"memaudit: report written to {project.path}/memaudit-report/report.html",
        f"memaudit: ERROR: the saved run could not be written to {project.path}/.memaudit/tiny/*_again.json: "
        "Read-only file system",
    ])
    assert len(saved(project)) == 1


def test_compare_fail_needs_a_baseline_and_a_known_figure(project):
    result = audit(project, "--memaudit-compare-fail", "mean_unitmem:0.02")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--memaudit-compare-fail gates the rise over a baseline: name one with "
                                 "--memaudit-compare*"])
    assert audit(project, "--memaudit-json", "base.json").ret == 0
    result = audit(project, "--memaudit-compare", "base.json", "--memaudit-compare-fail", "membership_p:0.02")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no compare gate for 'membership_p'. A p-value's change is no effect size*"])


def test_compare_gate_on_what_the_baseline_lacks_is_a_collection_error(project):
    assert audit(project, "--memaudit-json", "base.json").ret == 0  # no held-out images
    (project.path / "audits" / "memaudit.yaml").write_text(GATES + MODEL + "compare: {membership_excess: 0.03}\n")
    result = audit(project, "--memaudit-compare", "base.json")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*gates this audit cannot evaluate: membership_excess_rise_max needs held-out images "
                                 "in this run and in the baseline*"])


def test_runs_saved_within_one_second_keep_their_order(tmp_path):
    # The checkpoints' hashes sort against the order of saving: dates alone must order the entries.
    from datetime import datetime, timezone

    from pytest_memaudit.gates.baselines import save_run, saved_runs

    now = datetime(2026, 11, 29, 13, 16, 35, 400_000, tzinfo=timezone.utc)
    for sha, name in [("f" * 64, "release"), ("a" * 64, "auto"), ("0" * 64, "nightly")]:
        save_run(tmp_path, {"model": "tiny", "checkpoint": {"sha256": sha}}, name, now)
    runs = saved_runs(tmp_path)
    assert [run.name for run in runs] == ["release", "auto", "nightly"]
    assert [run.saved.second for run in runs] == [35, 36, 37]
    other = save_run(tmp_path, {"model": "other", "checkpoint": None}, "other", now)  # its own dates
    assert other.name == "20261129T131635Z_none_other.json"
