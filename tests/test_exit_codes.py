"""Every exit status the README documents, each from one tiny run."""

import pytest

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401

pytest_plugins = ["pytester"]

TINY_ENCODER = """
import torch


def build(checkpoint):
    if checkpoint:
        raise RuntimeError("cannot load " + checkpoint)
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("stem", torch.nn.Conv2d(3, 6, 3, padding=1))
    net.add_module("head", torch.nn.Conv2d(6, 4, 3, padding=1))
    return net
"""
MODEL = "models:\n  tiny: {factory: 'tinyenc:build', audited_layers: [stem, head], image_size: 16}\n"
# A test of the user's that runs after the audit and puts a file where the report folder goes.
BLOCK_REPORT = """
from pathlib import Path

def test_zz_block_the_report_folder():
    Path("memaudit-report").write_text("in the way")
"""


@pytest.mark.parametrize(
    "yaml_text, extra, status, line",
    [
        ("thresholds: {mean_unitmem_max: 1.0}\n", [], 0, "*2 passed*"),
        ("thresholds: {mean_unitmem_max: 1.0}\nlayers: {head: {gap_min: 0.99}}\n", [], 1,
         "*layer head: 1 threshold(s) crossed*"),
        ("thresholds: {mean_unitmem_mx: 1.0}\n", [], 2, "*unknown key 'mean_unitmem_mx'*"),
        ("thresholds: {mean_unitmem_max: 1.0}\n", ["--memaudit-model", "tiyn"], 2, "*unknown model 'tiyn'*"),
        ("thresholds: {mean_unitmem_max: 1.0}\n", ["test_block.py"], 3,
         "memaudit: ERROR: the report could not be written to *report.html: *"),
        ("thresholds: {mean_unitmem_max: 1.0}\n", ["--memaudit-checkpoint", "x.pt"], 4,
         "*the audit cannot run: model 'tiny': its factory tinyenc:build('x.pt') failed with RuntimeError: cannot load x.pt"),
        ("thresholds: {mean_unitmem_max: 1.0}\n", ["--memaudit-augmentations", "-1"], 4,
         "*--memaudit-augmentations must be at least 0, got -1"),
    ],
    ids=["passed", "gate-failed", "bad-yaml", "unknown-model", "output-not-written", "cannot-run", "bad-option"],
)
def test_exit_status(pytester, yaml_text, extra, status, line):
    pytester.makepyfile(tinyenc=TINY_ENCODER, test_block=BLOCK_REPORT)
    pytester.syspathinsert()
    (pytester.path / "x.pt").write_bytes(b"")  # exists; the factory cannot load it
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text(yaml_text + MODEL)
    result = pytester.runpytest("audits", "--memaudit-model", "tiny", "--memaudit-data", "builtin", "--memaudit-samples", "4",
                                "--memaudit-augmentations", "0", "-p", "no:cacheprovider", *extra)
    assert result.ret == status
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text
    (result.stdout if status < 4 else result.stderr).fnmatch_lines([line])


@pytest.mark.parametrize("name, value, line", [
    ("seed", "99999999999999999999999", "*--memaudit-seed must be at most 9223372036854775807, got 99999999999999999999999"),
    ("augmentations", "1000000000", "*--memaudit-augmentations must be at most 10000, got 1000000000"),
    ("seed", "abc", "*--memaudit-seed must be a whole number, got 'abc'"),
    ("reduce", "mode", "*--memaudit-reduce must be one of mean, median, got 'mode'"),
    ("planted-strength", "x", "*--memaudit-planted-strength must be a number, got 'x'"),
], ids=["seed-overflows", "augmentations-96GB", "not-a-number", "not-a-choice", "not-a-float"])
@pytest.mark.parametrize("where", ["command line", "ini"])
def test_option_values_are_checked_up_front_alike_from_the_command_line_and_the_ini_file(pytester, name, value, line,
                                                                                      where):
    """An out-of-range seed ran the whole audit, then overflowed (exit 3, nothing written); a bad ini value
    exited 2 where the same value on the command line exited 4."""
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    option = [f"--memaudit-{name}", value] if where == "command line" else []
    pytester.makeini(f"[pytest]\nmemaudit_{name.replace('-', '_')} = {value}\n" if where == "ini" else "[pytest]\n")
    result = pytester.runpytest("audits", "-p", "no:cacheprovider", *option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: memaudit: {line}"])
    assert "collected" not in result.stdout.str()


def test_a_factory_that_calls_sys_exit_is_the_factorys_error(pytester):
    """It was INTERNALERROR (exit 3)."""
    pytester.makepyfile(exiting="import sys\n\n\ndef build(checkpoint):\n    sys.exit(3)\n")
    pytester.syspathinsert()
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text(
        "thresholds: {mean_unitmem_max: 1.0}\nmodels:\n  quits: {factory: 'exiting:build', audited_layers: [stem]}\n")
    result = pytester.runpytest("audits", "--memaudit-model", "quits", "--memaudit-data", "builtin", "-p",
                                "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*model 'quits': its factory exiting:build(None) failed with SystemExit: 3*"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
