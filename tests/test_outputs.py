"""Output files that cannot be written: found before any compute when possible, otherwise reported at
the session's end with the path and the reason, old files set aside, and exit status 3 (or 1)."""

import errno
import json
import os
import tempfile

import pytest

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from pytest_memaudit.plugin.outputs import OutputLog, location_problem, set_aside

pytest_plugins = ["pytester"]


@pytest.fixture
def audit_dir(pytester):
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds:\n  mean_unitmem_max: 1.0\n")
    return pytester.path / "audits"


def tiny_args(var_checkpoint, *extra):
    return ["audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint),
            "--memaudit-data", "builtin", "--memaudit-samples", "4", "--memaudit-image-size", "32",
            "--memaudit-augmentations", "0", "-k", "conv.out", "-p", "no:cacheprovider", *extra]


# --- up front: a usage error before any compute ---------------------------------------------------


@pytest.mark.parametrize(
    "option, path, problem",
    [
        ("--memaudit-json", "/proc/version/out.json", "/proc/version is not a directory"),
        ("--memaudit-html", "/proc/memaudit/report.html", "cannot create files in /proc: *"),
        ("--memaudit-html", "audits", "*/audits is a directory"),
    ],
)
def test_unwritable_location_given_is_a_usage_error(pytester, audit_dir, var_checkpoint, option, path, problem):
    result = pytester.runpytest(*tiny_args(var_checkpoint, option, path))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    what = "results" if option == "--memaudit-json" else "report"
    result.stderr.fnmatch_lines([f"ERROR: memaudit: the {what} cannot be written to *: {problem}. Pass {option} PATH*"])
    assert "collected" not in result.stdout.str()  # stopped before collection
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("options", [
    ["--memaudit-json", "out/r.json", "--memaudit-html", "out/r.json"],
    ["--memaudit-json", "out/r.json", "--memaudit-html", "out/../out/r.json"],
    ["--memaudit-html", "out/results.json"],  # the JSON goes beside the report as results.json
    ["--memaudit-json", "link/r.json", "--memaudit-html", "out/r.json"],  # link -> out
])
def test_report_and_results_at_one_path_are_a_usage_error(pytester, audit_dir, var_checkpoint, options):
    """Both used to be reported written, and the report had replaced the results."""
    (pytester.path / "out").mkdir()
    (pytester.path / "link").symlink_to(pytester.path / "out")
    result = pytester.runpytest(*tiny_args(var_checkpoint, *options))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: memaudit: the report and the results would both be written to *r*.json, and "
                                 "the report would replace the results: give --memaudit-html and --memaudit-json "
                                 "different paths"])
    assert "collected" not in result.stdout.str() and not list((pytester.path / "out").iterdir())


def test_report_over_the_results_it_reads_is_a_usage_error(pytester, audit_dir, var_checkpoint):
    first = pytester.runpytest(*tiny_args(var_checkpoint, "--memaudit-json", "r.json", "--memaudit-html", "none"))
    assert first.ret == pytest.ExitCode.OK
    saved = (pytester.path / "r.json").read_bytes()
    for option in ("--memaudit-from", "--memaudit-compare"):
        args = ["audits", "-p", "no:cacheprovider", option, "r.json", "--memaudit-html", "r.json"]
        if option == "--memaudit-compare":
            args = tiny_args(var_checkpoint, option, "r.json", "--memaudit-html", "r.json", "--memaudit-json", "n.json")
        result = pytester.runpytest(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: memaudit: the report would be written to */r.json, over the results "
                                     f"that {option} reads: give --memaudit-html another path"])
        assert (pytester.path / "r.json").read_bytes() == saved


def test_unwritable_default_folder_stops_the_audit_before_it_runs(pytester, audit_dir, var_checkpoint):
    (pytester.path / "memaudit-report").write_text("a file where the report folder goes")
    result = pytester.runpytest(*tiny_args(var_checkpoint))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: memaudit: the audit cannot run: the report cannot be written to "
                                 f"{pytester.path}/memaudit-report/report.html: {pytester.path}/memaudit-report is not "
                                 "a directory*--memaudit-html none*"])
    result.assert_outcomes()


def test_location_problem(tmp_path):
    assert location_problem(tmp_path / "a" / "b" / "report.html") is None
    assert not (tmp_path / "a").exists()  # nothing created
    assert os.listdir(tmp_path) == []  # the probe is gone
    (tmp_path / "file").write_text("")
    assert location_problem(tmp_path / "file" / "x" / "out.json") == f"{tmp_path / 'file'} is not a directory"
    assert location_problem(tmp_path) == f"{tmp_path} is a directory"


# --- at the session's end: reported, old files set aside, the rest still written ------------------


BREAK_REPORT_FOLDER = """
import shutil
from pathlib import Path

def test_zz_replace_the_report_folder_by_a_file():
    shutil.rmtree("memaudit-report", ignore_errors=True)
    Path("memaudit-report").write_text("in the way")
"""


@pytest.mark.parametrize("limit, status", [("1.0", 3), ("0.0001", 1)])
def test_report_folder_lost_during_the_run(pytester, audit_dir, var_checkpoint, limit, status):
    (audit_dir / "memaudit.yaml").write_text(f"thresholds:\n  mean_unitmem_max: {limit}\n")
    pytester.makepyfile(test_zz_break=BREAK_REPORT_FOLDER)
    result = pytester.runpytest(*tiny_args(var_checkpoint, "--memaudit-json", "out/results.json"),
                                "-k", "conv.out or test_zz", "test_zz_break.py")
    assert result.ret == status
    out = result.stdout.str()
    assert "Traceback" not in out and "INTERNALERROR" not in out
    result.stdout.fnmatch_lines([
        "*memaudit summary*",
        f"memaudit: results written to {pytester.path}/out/results.json",
        f"memaudit: ERROR: the report could not be written to {pytester.path}/memaudit-report/report.html: *",
    ])
    if status == 1:
        result.stdout.fnmatch_lines(["*= FAILURES =*", "*layer conv.out: 1 threshold(s) crossed*"])
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    assert data["layers"][0]["outcome"] == ("passed" if status == 3 else "failed")


def fail_writes_in(monkeypatch, folder, error):
    """Make every atomic write into ``folder`` fail at its temporary file, as a full disk would."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if os.path.realpath(str(kwargs.get("dir"))) == os.path.realpath(folder):
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_full_disk_sets_the_old_json_aside_and_still_writes_the_report(pytester, audit_dir, var_checkpoint, monkeypatch):
    (pytester.path / "out").mkdir()
    (pytester.path / "out" / "results.json").write_text('{"old": true}')
    fail_writes_in(monkeypatch, pytester.path / "out", errno.ENOSPC)
    result = pytester.runpytest(*tiny_args(var_checkpoint, "--memaudit-json", "out/results.json"))
    assert result.ret == 3
    result.stdout.fnmatch_lines([
        f"memaudit: report written to {pytester.path}/memaudit-report/report.html",
        f"memaudit: ERROR: the results could not be written to {pytester.path}/out/results.json: No space left on "
        f"device; the file left there by an earlier run (modified *) was renamed to {pytester.path}/out/results.json.stale",
    ])
    assert sorted(os.listdir(pytester.path / "out")) == ["results.json.stale"]
    assert (pytester.path / "memaudit-report" / "report.html").stat().st_size > 1000


def test_old_file_that_cannot_be_renamed_is_called_old(tmp_path, monkeypatch):
    old = tmp_path / "results.json"
    old.write_text("{}")
    os.utime(old, (0, 1_700_000_000))

    def refuse(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    assert set_aside(old).startswith(f"the file at {old} is from an earlier run (modified 2023-11-1")
    assert set_aside(tmp_path / "missing.json") == ""
    log = OutputLog()
    log.write("results", old, lambda: refuse())
    assert log.errors == [f"the results could not be written to {old}: Permission denied; " + set_aside(old)]
    assert log.written == []


def test_default_report_goes_under_the_invocation_directory(pytester, audit_dir, var_checkpoint, tmp_path_factory):
    # Without an ini file, pytest's rootdir is the common ancestor of the paths on the command line:
    # here the parent of pytester's folder, because the data folder is a sibling of it.
    from conftest import make_images

    data = make_images(tmp_path_factory.mktemp("elsewhere"), 3, size=32)
    args = tiny_args(var_checkpoint)
    args[args.index("builtin")] = str(data)
    result = pytester.runpytest(*args)
    assert result.ret == 0
    common = os.path.commonpath([pytester.path, data])
    assert common != str(pytester.path)
    assert not os.path.exists(os.path.join(common, "memaudit-report"))
    result.stdout.fnmatch_lines([f"memaudit: results written to {pytester.path}/memaudit-report/results.json",
                                 f"memaudit: report written to {pytester.path}/memaudit-report/report.html"])


def test_thumbnails_that_cannot_be_made_leave_a_report_without_them(pytester, audit_dir, var_checkpoint, monkeypatch):
    from pytest_memaudit.pipeline import setup
    from pytest_memaudit.errors import DataError

    real_open_images, calls = setup.open_images, []

    def open_images_once(*args, **kwargs):  # the audit opens the images; the report cannot open them again
        calls.append(args)
        if len(calls) > 1:
            raise DataError("the data folder went away")
        return real_open_images(*args, **kwargs)

    monkeypatch.setattr(setup, "open_images", open_images_once)
    result = pytester.runpytest(*tiny_args(var_checkpoint))
    assert result.ret == 3
    result.stdout.fnmatch_lines([
        f"memaudit: report written to {pytester.path}/memaudit-report/report.html",
        "memaudit: ERROR: the thumbnails could not be made from builtin (generated images): "
        "DataError: the data folder went away",
    ])
    assert "background-image: url(" not in (pytester.path / "memaudit-report" / "report.html").read_text()
