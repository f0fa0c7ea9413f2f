"""Under pytest-xdist (-n 2) the audit runs once, on one worker, and the controller reports it:
the summary, the output files, and an exit status that agrees with the JSON."""

import json

import pytest

pytest.importorskip("xdist")
pytest_plugins = ["pytester"]

# Logs each run_audit call, so the test can count them. Patched once collection is done: in the
# workers only (the controller collects nothing), before the audit could run.
COUNTING_CONFTEST = """
def pytest_collection_modifyitems(items):
    import pytest_memaudit.pipeline.audit as audit

    real_run_audit = audit.run_audit

    def counted(*args, **kwargs):
        with open({log!r}, "a") as log:
            log.write("run_audit\\n")
        return real_run_audit(*args, **kwargs)

    audit.run_audit = counted
"""


TINY_ENCODER = """
import torch


def build(checkpoint):
    if checkpoint:
        raise RuntimeError("cannot load " + checkpoint)
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    for i, (c_in, c_out) in enumerate([(3, 8), (8, 8), (8, 8), (8, 4)]):
        net.add_module(f"conv{i}", torch.nn.Conv2d(c_in, c_out, 3, padding=1))
    return net
"""
LAYERS = ["conv0", "conv1", "conv2", "conv3"]


@pytest.fixture
def audits(pytester):
    folder = pytester.mkdir("audits")
    (folder / "conftest.py").write_text(COUNTING_CONFTEST.format(log=str(pytester.path / "runs.log")))
    (folder / "tinyenc.py").write_text(TINY_ENCODER)
    return folder


def audit_yaml(extra=""):
    return f"""thresholds: {{mean_unitmem_max: 1.0}}
{extra}models:
  tiny: {{factory: 'tinyenc:build', audited_layers: {LAYERS}, image_size: 16}}
"""


def xdist_args(*extra):
    return ["audits", "-n", "2", "--memaudit-model", "tiny", "--memaudit-data", "builtin", "--memaudit-samples", "6",
            "--memaudit-augmentations", "0",
            "--memaudit-json", "out.json", "-p", "no:cacheprovider", *extra]


def test_audit_runs_once_and_json_agrees_with_the_exit_status(pytester, audits):
    (audits / "memaudit.yaml").write_text(audit_yaml("layers: {conv3: {gap_min: 0.99}}\n"))
    result = pytester.runpytest_subprocess(*xdist_args())
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=3, failed=1)
    assert (pytester.path / "runs.log").read_text().splitlines() == ["run_audit"]
    data = json.loads((pytester.path / "out.json").read_text())
    assert {layer["name"]: layer["outcome"] for layer in data["layers"]} == {
        "conv0": "passed", "conv1": "passed", "conv2": "passed", "conv3": "failed"}
    assert data["summary"]["layers_failed"] == 1
    result.stdout.fnmatch_lines([
        "*layer conv3: 1 threshold(s) crossed*",
        "*memaudit summary*",
        "conv3 *failed: gap*",
        f"memaudit: results written to {pytester.path / 'out.json'}",
        f"memaudit: report written to {pytester.path / 'memaudit-report' / 'report.html'}",
    ])


def test_audit_that_cannot_run_is_one_usage_error(pytester, audits):
    (audits / "memaudit.yaml").write_text(audit_yaml())
    (pytester.path / "broken.pth").write_bytes(b"")  # exists; the factory cannot load it
    result = pytester.runpytest_subprocess(*xdist_args("--memaudit-checkpoint", "broken.pth"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stdout.str()
    assert "INTERNALERROR" not in text and "Traceback" not in text
    assert not (pytester.path / "runs.log").exists()  # the model failed to build at collection: no audit ran
    assert text.count("ERROR: memaudit: the audit cannot run") == 1
    result.stdout.fnmatch_lines(["ERROR: memaudit: the audit cannot run: model 'tiny': its factory "
                                 "tinyenc:build('broken.pth') failed with RuntimeError: cannot load broken.pth"])
    assert " passed" not in text and not (pytester.path / "out.json").exists()
