"""The plugin end to end, through pytester, as a user runs it."""

import json
import sys

import pytest

# pytester's in-process runs forget modules first imported inside them; numpy's and scipy's C
# extensions cannot be loaded twice, so import what an audit uses before any run.
import pytest_memaudit.pipeline.audit  # noqa: F401
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from conftest import make_images

pytest_plugins = ["pytester"]

VAR_LAYERS = [
    "conv.in", "down.0.block.0", "down.0.block.1", "down.0.downsample", "down.1.block.0", "down.1.block.1",
    "down.1.downsample", "down.2.block.0", "down.2.block.1", "down.2.downsample", "down.3.block.0",
    "down.3.block.1", "down.3.downsample", "down.4.block.0", "down.4.attn.0", "down.4.block.1", "down.4.attn.1",
    "mid.block.1", "mid.attn.1", "mid.block.2", "norm.out", "conv.out",
]
VAR_CHANNELS = [160] * 7 + [320] * 6 + [640] * 8 + [32]


@pytest.fixture
def audit_dir(pytester):
    """An audits/ folder with a threshold file every random-weights layer passes."""
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds:\n  mean_unitmem_max: 1.0\n")
    return pytester.path / "audits"


def var_args(var_checkpoint, *extra, samples=6, size=32):
    return ["audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint),
            "--memaudit-data", "builtin", "--memaudit-samples", str(samples), "--memaudit-image-size", str(size),
            "--memaudit-augmentations", "0", "-p", "no:cacheprovider", *extra]


def test_var_d16_one_test_per_layer_in_forward_order(pytester, audit_dir, var_checkpoint):
    result = pytester.runpytest(*var_args(var_checkpoint, "-v", "--memaudit-json", "out.json"))
    result.assert_outcomes(passed=22)
    assert result.ret == 0
    names = [line.split("::")[1].split(" ")[0] for line in result.outlines if "memaudit.yaml::" in line and "PASSED" in line]
    assert names == VAR_LAYERS
    result.stdout.fnmatch_lines(["*memaudit summary*", f"memaudit: results written to {pytester.path / 'out.json'}"])
    data = json.loads((pytester.path / "out.json").read_text())
    assert data["model"] == "var_d16" and data["reduce"] == "mean"
    assert [layer["name"] for layer in data["layers"]] == VAR_LAYERS
    assert [layer["channels"] for layer in data["layers"]] == VAR_CHANNELS
    assert data["samples"] == [f"builtin/{i:04d}" for i in range(6)]
    for layer in data["layers"]:
        assert len(layer["unitmem"]) == layer["channels"] == len(layer["max_sample"])
        assert all(0 <= v <= 1 for v in layer["unitmem"])
        assert all(0 <= i < 6 for i in layer["max_sample"])
        assert layer["outcome"] == "passed"
        assert layer["thresholds"]["mean_unitmem_max"] == {"limit": 1.0, "when": "estimate", "severity": "fail"}
        for key in ("top_mean", "bottom_mean", "ttest_t", "ttest_p", "module"):
            assert key in layer
    assert data["layers"][20]["module"] == "norm_out"


def test_failing_gate_names_figure_value_limit_and_layer(pytester, audit_dir, var_checkpoint):
    (audit_dir / "memaudit.yaml").write_text("layers:\n  conv.out: {mean_unitmem_max: 0.0001}\n")
    result = pytester.runpytest(*var_args(var_checkpoint, "--memaudit-json", "out.json"))
    result.assert_outcomes(passed=21, failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*layer conv.out: 1 threshold(s) crossed*",
                                 "*mean_unitmem = 0.* exceeds mean_unitmem_max = 0.0001*"])
    data = json.loads((pytester.path / "out.json").read_text())
    outcome = {layer["name"]: layer["outcome"] for layer in data["layers"]}
    assert outcome["conv.out"] == "failed" and outcome["conv.in"] == "not gated"  # no threshold applies there
    failed = data["layers"][-1]["checks"][0]
    assert failed["key"] == "mean_unitmem_max" and failed["passed"] is False and failed["value"] > 0.0001


def test_keyword_selects_layers_and_audits_only_them(pytester, audit_dir, var_checkpoint):
    result = pytester.runpytest(*var_args(var_checkpoint, "-k", "down.3", "--memaudit-json", "out.json"))
    result.assert_outcomes(passed=3)
    data = json.loads((pytester.path / "out.json").read_text())
    assert [layer["name"] for layer in data["layers"]] == ["down.3.block.0", "down.3.block.1", "down.3.downsample"]


def test_command_line_threshold_overrides_yaml(pytester, audit_dir, var_checkpoint):
    result = pytester.runpytest(*var_args(var_checkpoint, "-k", "conv.in", "--memaudit-threshold", "mean_unitmem_max=0.0"))
    result.assert_outcomes(failed=1)


def test_junit_records_figures(pytester, audit_dir, var_checkpoint):
    result = pytester.runpytest(*var_args(var_checkpoint, "-k", "norm.out", "--junitxml", "junit.xml"))
    result.assert_outcomes(passed=1)
    xml = (pytester.path / "junit.xml").read_text()
    assert 'name="memaudit_mean_unitmem"' in xml and 'name="norm.out"' in xml


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("thresholds: {mean_unitmem_mx: 0.5}", "*memaudit.yaml: thresholds: unknown key 'mean_unitmem_mx'. Did you mean 'mean_unitmem_max'*"),
        ("layers: {down.3.blok.1: {gap_min: 0.1}}", "*has no layer 'down.3.blok.1'. Did you mean 'down.3.block.1'*"),
        ("thresholds: {gap_min: high}", "*thresholds: gap_min must be a number*"),
        ("thresholds: [", "*memaudit.yaml: invalid YAML*"),
        ("", "*memaudit.yaml: no layer has a threshold, so every layer would pass whatever it measures*"),
        ("# no thresholds yet\n", "*memaudit.yaml: no layer has a threshold*allow_no_gates: true*"),
        ("thresholds: {gap_min: null, ttest_p_max: null}", "*memaudit.yaml: no layer has a threshold*"),
        ("thresholds:\n  gap_min: 0.01\n  gap_min: 0.99\n", "*duplicate key 'gap_min' (lines 2 and 3)*"),
    ],
)
def test_yaml_errors_are_collection_errors(pytester, audit_dir, var_checkpoint, yaml_text, expected):
    (audit_dir / "memaudit.yaml").write_text(yaml_text)
    result = pytester.runpytest(*var_args(var_checkpoint))
    assert result.ret == pytest.ExitCode.INTERRUPTED  # collection error: exit 2
    result.stdout.fnmatch_lines([expected])
    assert "Traceback" not in result.stdout.str()
    result.assert_outcomes(errors=1)


def test_command_line_can_turn_every_gate_off_only_with_allow_no_gates(pytester, audit_dir, var_checkpoint):
    off = ("--memaudit-threshold", "mean_unitmem_max=off")
    result = pytester.runpytest(*var_args(var_checkpoint, *off))
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*no layer has a threshold (after --memaudit-threshold)*"])
    (audit_dir / "memaudit.yaml").write_text("allow_no_gates: true\nthresholds:\n  mean_unitmem_max: 1.0\n")
    result = pytester.runpytest(*var_args(var_checkpoint, "-k", "conv.out", *off))
    result.assert_outcomes(passed=1)
    report = (pytester.path / "memaudit-report" / "report.html").read_text()
    assert "within their thresholds" not in report
    assert "No threshold applied to any layer" in report


def test_unknown_model_is_a_collection_error(pytester, audit_dir):
    result = pytester.runpytest("audits", "--memaudit-model", "var_d61")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*unknown model 'var_d61'. Did you mean 'var_d16'*"])


def assert_usage_error(result, *patterns):
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: memaudit: the audit cannot run: *{p}*" for p in patterns])
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text
    assert text.count("the audit cannot run") == 1
    result.assert_outcomes()  # not 22 failing tests


def test_missing_checkpoint_is_one_usage_error(pytester, audit_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(pytester.path / "hf"))
    monkeypatch.delenv("MEMAUDIT_CHECKPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    result = pytester.runpytest("audits", "--memaudit-model", "var_d16", "-p", "no:cacheprovider")
    assert_usage_error(result, "--memaudit-checkpoint")


def test_corrupt_checkpoint_is_one_usage_error(pytester, audit_dir, var_checkpoint):
    broken = pytester.path / "broken.pth"
    broken.write_bytes(var_checkpoint.read_bytes()[:4096])
    result = pytester.runpytest(*var_args(broken))
    assert_usage_error(result, "broken.pth")


def test_missing_data_directory(pytester, audit_dir, var_checkpoint):
    args = var_args(var_checkpoint)
    args[args.index("builtin")] = str(pytester.path / "nowhere")
    assert_usage_error(pytester.runpytest(*args), "nowhere")


def test_unreadable_images_are_skipped_and_counted(pytester, audit_dir, var_checkpoint):
    data = make_images(pytester.path / "imgs", 4, size=32)
    (data / "zz_broken.png").write_bytes(b"not a png")
    args = var_args(var_checkpoint, "-k", "conv.in", "--memaudit-json", "out.json")
    args[args.index("builtin")] = str(data)
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 unreadable image(s) skipped, e.g. zz_broken.png*"])
    out = json.loads((pytester.path / "out.json").read_text())
    assert out["samples"] == [f"img_{i:03d}.png" for i in range(4)]
    assert [s["id"] for s in out["skipped"]] == ["zz_broken.png"]


def test_no_readable_images(pytester, audit_dir, var_checkpoint):
    data = pytester.path / "imgs"
    data.mkdir()
    for i in range(3):
        (data / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    args = var_args(var_checkpoint)
    args[args.index("builtin")] = str(data)
    assert_usage_error(pytester.runpytest(*args), "none of the 3 images")


def test_collect_only_does_not_compute(pytester, audit_dir):
    result = pytester.runpytest("audits", "--memaudit-model", "var_d16", "--collect-only", "-q")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["audits/memaudit.yaml::conv.in", "*22 tests collected*"])


def test_inert_without_audit_files(pytester):
    pytester.makepyfile(test_plain="""
import sys
def test_no_torch():
    assert 'torch' not in sys.modules and 'pytest_memaudit.gates.config' not in sys.modules
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "memaudit summary" not in result.stdout.str()


def test_help_lists_every_option(pytester):
    result = pytester.runpytest("--help")
    for option in ["model", "checkpoint", "data", "samples", "image-size", "augmentations", "reduce",
                   "batch-size", "device", "seed", "json", "threshold", "precision"]:
        result.stdout.fnmatch_lines([f"*--memaudit-{option}*"])


def test_bad_option_value_is_a_usage_error(pytester, audit_dir):
    result = pytester.runpytest("audits", "--memaudit-image-size", "100")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: memaudit: --memaudit-image-size must be a multiple of 16*, got 100"])


def test_user_model_from_yaml_factory(pytester, audit_dir):
    pytester.makepyfile(tinyenc="""
import torch

def build(checkpoint):
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("stem", torch.nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("act", torch.nn.ReLU())
    net.add_module("head", torch.nn.Conv2d(4, 2, 1))
    return net
""")
    pytester.syspathinsert()
    (audit_dir / "memaudit.yaml").write_text("""
models:
  tiny:
    factory: tinyenc:build
    audited_layers: [stem, {name: head.out, module: head}]
    image_size: 16
    thresholds: {mean_unitmem_max: 1.0}
""")
    result = pytester.runpytest("audits", "-v", "--memaudit-model", "tiny", "--memaudit-data", "builtin", "--memaudit-samples", "5",
                                "--memaudit-augmentations", "2", "--memaudit-json", "out.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*memaudit.yaml::stem PASSED*", "*memaudit.yaml::head.out PASSED*"])
    data = json.loads((pytester.path / "out.json").read_text())
    assert [(l["name"], l["module"], l["channels"]) for l in data["layers"]] == [("stem", "stem", 4), ("head.out", "head", 2)]
    assert [l["unit_axis"] for l in data["layers"]] == [
        {"axis": 1, "shape": [4, 16, 16], "source": "a Conv2d's output: stem.out_channels = 4"},
        {"axis": 1, "shape": [2, 16, 16], "source": "a Conv2d's output: head.out_channels = 2"}]
    assert data["settings"]["image_size"] == 16 and len(data["samples"]) == 5


def test_fewer_images_than_asked_warns(pytester, audit_dir, var_checkpoint):
    data = make_images(pytester.path / "imgs", 3, size=32)
    args = var_args(var_checkpoint, "-k", "conv.out", samples=50)
    args[args.index("builtin")] = str(data)
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["note: asked for 50 samples but * holds only 3 images; auditing all 3"])


def test_memaudit_result_fixture_serves_own_tests(pytester, audit_dir, var_checkpoint):
    pytester.makepyfile(test_own="""
def test_conv_out(memaudit_result):
    layer = memaudit_result.layer("conv.out")
    assert layer.channels == 32 and len(memaudit_result.samples) == 6
""")
    result = pytester.runpytest(*var_args(var_checkpoint, "-k", "conv.out or test_conv_out"), "test_own.py")
    result.assert_outcomes(passed=2)
