"""The input a model declares (range or normalization, memory layout) is the input it gets.

The model's own input is audited (an nn.Identity as its first module), so a[i, c] is the mean
|input| of channel c over the image, computed here from the PNG files with PIL in float64.
"""

import importlib
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import activations, make_images
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.gates.config import load_audit_file
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.errors import AuditError

ENCODER = '''
import torch
from torch import nn


class Flattening(nn.Module):
    """Flattens with .view(), as many classifiers do: fine in NCHW, an error in channels-last."""

    def __init__(self):
        super().__init__()
        self.input = nn.Identity()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        features = self.conv(self.input(x))
        return self.fc(features.view(features.size(0), -1))


def build(checkpoint):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Flattening().eval()
'''
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def declare(tmp_path, monkeypatch):
    """A YAML-declared model (factory module beside the file) with ``extra`` model keys -> its spec."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the YAML's folder goes on sys.path: undo that
    count = iter(range(100))

    def make(extra: str, channels: int = 3):
        module = f"flattening_{tmp_path.name}_{next(count)}"
        (tmp_path / f"{module}.py").write_text(ENCODER.replace("nn.Conv2d(3, 4", f"nn.Conv2d({channels}, 4"))
        path = tmp_path / "memaudit.yaml"
        path.write_text(textwrap.dedent(f"""\
            models:
              flat:
                factory: {module}:build
                audited_layers: [{{module: input, units: channels_first}}, fc]
                image_size: 16
            """) + textwrap.indent(textwrap.dedent(extra), "    "))
        return load_audit_file(path).model_spec("flat")

    return make


@pytest.fixture
def images(tmp_path):
    folder = make_images(tmp_path / "imgs", 5, size=16)
    return folder, make_settings(model="flat", data=str(folder), augmentations=0, control="none", device="cpu", topk=5)


def pixels(folder, samples) -> np.ndarray:
    """(N, H, W, 3) float64 in [0, 1], decoded with PIL."""
    return np.stack([np.asarray(Image.open(folder / s).convert("RGB"), dtype=np.float64) / 255 for s in samples])


@pytest.mark.parametrize("extra, to_input", [
    ("", lambda x: x * 2 - 1),
    ("input_range: [-1, 1]\n", lambda x: x * 2 - 1),
    ("input_range: [0, 1]\n", lambda x: x),
    ("input_range: [0, 255]\n", lambda x: x * 255),
    (f"normalize: {{mean: {MEAN}, std: {STD}}}\n", lambda x: (x - np.array(MEAN)) / np.array(STD)),
], ids=["default", "minus-one-to-one", "zero-to-one", "zero-to-255", "imagenet"])
def test_the_model_gets_the_input_it_declares(declare, images, extra, to_input):
    folder, settings = images
    result = run_audit(settings, declare(extra))
    expected = np.abs(to_input(pixels(folder, result.samples))).mean(axis=(1, 2))  # (N, 3)
    np.testing.assert_allclose(activations(result, "input"), expected, rtol=2e-6, atol=1e-6)


def test_an_imagenet_normalized_model_is_measured_right_past_its_input(declare, images):
    folder, settings = images
    spec = declare(f"normalize: {{mean: {MEAN}, std: {STD}}}\n")
    result = run_audit(settings, spec)
    x = torch.from_numpy((pixels(folder, result.samples) - np.array(MEAN)) / np.array(STD)).permute(0, 3, 1, 2)
    x = x.contiguous()  # NCHW, as the model needs
    model = importlib.import_module(spec.factory.partition(":")[0]).build(None).double()
    with torch.no_grad():
        fc = model(x)
    np.testing.assert_allclose(activations(result, "fc"), fc.abs().numpy(), rtol=1e-5, atol=1e-7)
    assert result.layer("fc").unit_axis.source == "the only axis besides the batch"


def test_a_view_flattening_model_runs_in_its_own_layout_and_fails_cleanly_in_channels_last(declare, images):
    _, settings = images
    assert run_audit(settings, declare("")).layer("fc").channels == 5  # user models default to NCHW
    with pytest.raises(AuditError, match=r"the forward pass of flat \(model\) on views of shape \(1, 3, 16, 16\) failed with RuntimeError: "
                                         r"view size is not compatible with input tensor's size and stride"):
        run_audit(settings, declare("channels_last: true\n"))


LUMA = np.array([0.2989, 0.587, 0.114])  # ITU-R 601, as torchvision's rgb_to_grayscale


@pytest.mark.parametrize("extra, channels, to_input, described", [
    ("order: BGR\n", 3, lambda x: x[..., ::-1] * 2 - 1, "BGR in [-1, 1]"),
    (f"order: BGR\nnormalize: {{mean: {MEAN[::-1]}, std: {STD[::-1]}}}\n", 3,
     lambda x: (x[..., ::-1] - np.array(MEAN[::-1])) / np.array(STD[::-1]), "BGR, (x - mean) / std"),
    ("channels: 1\n", 1, lambda x: (x @ LUMA)[..., None] * 2 - 1, "greyscale (1 channel, luma) in [-1, 1]"),
    ("channels: 1\ninput_range: [0, 255]\n", 1, lambda x: (x @ LUMA)[..., None] * 255,
     "greyscale (1 channel, luma) in [0, 255]"),
    ("channels: 1\nnormalize: {mean: [0.45], std: [0.25]}\n", 1, lambda x: ((x @ LUMA)[..., None] - 0.45) / 0.25,
     "greyscale (1 channel, luma), (x - mean) / std"),
], ids=["bgr", "bgr-normalized", "grey", "grey-0-255", "grey-normalized"])
def test_a_bgr_or_one_channel_model_gets_the_input_it_declares(declare, images, extra, channels, to_input, described):
    """Declared in the YAML, not wrapped: the model's first module sees its channels, in its order."""
    folder, settings = images
    result = run_audit(settings, declare(extra, channels))
    expected = np.abs(to_input(pixels(folder, result.samples))).mean(axis=(1, 2))  # (N, channels)
    np.testing.assert_allclose(activations(result, "input"), expected, rtol=2e-6, atol=1e-6)
    assert result.settings["input"].startswith(described)


@pytest.mark.parametrize("extra, message", [
    ("channels: 2\n", r"channels must be 3 \(colour\) or 1 \(greyscale: the model gets each view's luma\), got 2"),
    ("order: rgb\n", r"order must be RGB or BGR \(the model's channel order\), got 'rgb'"),
    ("channels: 1\norder: BGR\n", r"order is the order of 3 channels; a 1-channel model has none"),
    (f"channels: 1\nnormalize: {{mean: {MEAN}, std: {STD}}}\n",
     r"normalize: mean must be 1 number \(the grey channel, in the model's order\)"),
    ("order: BGR\nnormalize: {mean: [0.5], std: [0.5]}\n", r"normalize: mean must be 3 numbers \(B, G, R, in the "
                                                            r"model's order\)"),
])
def test_a_wrong_channel_contract_is_refused_with_what_to_write(declare, extra, message):
    with pytest.raises(AuditError, match=message):
        declare(extra)
