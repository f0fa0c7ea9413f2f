"""Failures in the user's model, and bad option values: one usage error (exit 4) naming the cause,
never an INTERNALERROR or a traceback."""

import pytest

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from pytest_memaudit.pipeline import hardware
from pytest_memaudit.pipeline.settings import check_image_fits, make_settings
from pytest_memaudit.errors import AuditError, ConfigError, user_code

pytest_plugins = ["pytester"]

ENCODERS = """
import torch


class Boom(torch.nn.Module):
    def forward(self, x):
        raise ValueError("shapes do not match: " + "x" * 5000)


def build(checkpoint):
    net = torch.nn.Sequential()
    net.add_module("stem", torch.nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("boom", Boom())
    return net


def broken_factory(checkpoint):
    raise RuntimeError("no weights at " + str(checkpoint))
"""


@pytest.fixture
def user_models(pytester):
    pytester.makepyfile(userenc=ENCODERS)
    pytester.syspathinsert()
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("""
thresholds: {mean_unitmem_max: 1.0}
models:
  boom: {factory: 'userenc:build', audited_layers: [stem], image_size: 16}
  broken: {factory: 'userenc:broken_factory', audited_layers: [stem], image_size: 16}
""")


def run(pytester, *args):
    return pytester.runpytest("audits", "--memaudit-data", "builtin", "--memaudit-samples", "3", "--memaudit-augmentations", "0",
                              "-p", "no:cacheprovider", *args)


def assert_one_usage_error(result, pattern):
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text and "Traceback" not in text
    result.stderr.fnmatch_lines([pattern])


def test_failing_forward_pass(pytester, user_models):
    result = run(pytester, "--memaudit-model", "boom")
    assert_one_usage_error(result, "ERROR: memaudit: the audit cannot run: the forward pass of boom (model) on views of shape * failed with "
                                   "ValueError: shapes do not match: xxx*")
    assert len(result.stderr.str()) < 1500  # the cause, cut short


def test_failing_factory(pytester, user_models):
    (pytester.path / "weights.pt").write_bytes(b"")  # exists; the factory cannot load it
    result = run(pytester, "--memaudit-model", "broken", "--memaudit-checkpoint", "weights.pt")
    assert_one_usage_error(result, "ERROR: memaudit: the audit cannot run: model 'broken': its factory "
                                   "userenc:broken_factory('weights.pt') failed with RuntimeError: no weights at weights.pt")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--memaudit-device", "cuda:abc"], "*--memaudit-device must be auto, cpu, cuda or cuda:N*, got 'cuda:abc'"),
        (["--memaudit-threshold", "gap_min=2"], "*--memaudit-threshold gap_min = 2 is outside [[]0, 1[]]*"),
        (["--memaudit-threshold", "gapmin=0.1"], "*unknown threshold 'gapmin'. Did you mean 'gap_min'*"),
        (["--memaudit-threshold", "gap_min=high"], "*'high' is not a number (or 'off')"),
        (["--memaudit-image-size", "100000"], "*--memaudit-image-size 100000: one 100000x100000 view of var_d16 needs at "
                                              "least 5.9 TiB (163 float32 values per pixel*more than this machine's*"),
    ],
)
def test_bad_option_values_are_usage_errors(pytester, user_models, args, pattern):
    result = run(pytester, "--memaudit-model", "var_d16", *args)
    assert_one_usage_error(result, f"ERROR: memaudit: {pattern}")
    assert "collected" not in result.stdout.str()


def test_device_syntax():
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert make_settings(device=good).device == good
    for bad in ("cuda:abc", "cuda:", "cuda:-1", "cpu:0", "gpu", "cuda:1:2"):
        with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
            make_settings(device=bad)


def test_image_size_law(monkeypatch):
    monkeypatch.setattr(hardware, "physical_memory_bytes", lambda: 2**30)  # a 1 GiB machine
    check_image_fits(make_settings(model="var_d16", image_size=1024))  # 1024**2 * 163 * 4 B = 652 MiB
    with pytest.raises(ConfigError, match=r"one 2048x2048 view of var_d16 needs at least 2.5 GiB \(163 float32 values "
                                          r"per pixel: the RGB input and its first layer's 160 channels\), more than "
                                          r"this machine's 1.0 GiB"):
        check_image_fits(make_settings(model="var_d16", image_size=2048))  # 2048**2 * 163 * 4 B = 2.55 GiB
    check_image_fits(make_settings(model="demo", image_size=2048))  # 2048**2 * 35 * 4 B = 0.55 GiB
    with pytest.raises(ConfigError, match=r"needs at least 1.0 GiB \(3 float32 values per pixel: the RGB input\)"):
        check_image_fits(make_settings(model="mine", image_size=9472))  # a user model: the input only
    monkeypatch.setattr(hardware, "physical_memory_bytes", lambda: None)  # unknown: nothing refused
    check_image_fits(make_settings(model="var_d16", image_size=65536))


def test_user_code_names_the_cause():
    with pytest.raises(AuditError, match=r"^loading thing failed with KeyError: 'w'$") as info:
        with user_code("loading thing"):
            {}["w"]
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ConfigError, match="as it was"):  # an AuditError passes through unchanged
        with user_code("loading thing"):
            raise ConfigError("as it was")
    with pytest.raises(KeyboardInterrupt):
        with user_code("loading thing"):
            raise KeyboardInterrupt


def test_augmentations_law(monkeypatch):
    """An image's views are made together: their RGB input alone must fit."""
    monkeypatch.setattr(hardware, "physical_memory_bytes", lambda: 2**30)
    check_image_fits(make_settings(model="demo", image_size=256, augmentations=1000))  # 1000 * 3 * 256**2 * 4 B: 750 MiB
    with pytest.raises(ConfigError, match=r"one image's 2000 views at 256x256"):
        check_image_fits(make_settings(model="var_d16", augmentations=2000))  # at the model's own size
    with pytest.raises(ConfigError, match=r"--memaudit-augmentations 2000: one image's 2000 views at 256x256 need "
                                          r"1.5 GiB \(3 float32 values per pixel each\), more than this machine's 1.0 GiB"):
        check_image_fits(make_settings(model="demo", image_size=256, augmentations=2000))
