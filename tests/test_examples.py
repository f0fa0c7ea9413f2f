"""The recipes in examples/: each lists its layers and runs at a tiny size (random weights, no
downloads), as a user would run it: pytest on the example's folder."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# pytester's in-process runs forget modules first imported inside them; C extensions cannot be
# loaded twice, so import what an audit and the examples use before any run.
import pytest_memaudit.pipeline.audit  # noqa: F401
import pytest_memaudit.plugin.discovery  # noqa: F401
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
import torchvision.models
from conftest import make_images

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# name -> (image size of the tiny run, audited layers in forward order: (name, units, unit axis))
CASES = {
    "resnet50": (32, [("stem", 64, 1), ("layer1", 256, 1), ("layer2", 512, 1), ("layer3", 1024, 1), ("layer4", 2048, 1)]),
    "vit_b_16": (224, [("patches", 768, 1), ("block.0", 768, 2), ("block.5", 768, 2), ("attention.11", 768, 2),
                       ("block.11", 768, 2), ("cls", 768, 2)]),  # built for 224 x 224
    "swin_t": (32, [("patches", 96, 3), ("stage.1", 96, 3), ("stage.2", 192, 3), ("stage.3", 384, 3),
                    ("stage.4", 768, 3), ("norm", 768, 3)]),
}
QUICK = ["--memaudit-data", "builtin", "--memaudit-samples", "4", "--memaudit-augmentations", "0",
         "--memaudit-html", "none", "-p", "no:cacheprovider"]


@pytest.fixture
def example(pytester, request):
    name = request.param
    shutil.copytree(EXAMPLES / name, pytester.path / name)
    return name


@pytest.mark.parametrize("example", list(CASES), indirect=True)
def test_list_layers(pytester, example):
    size, layers = CASES[example]
    result = pytester.runpytest(example, "--memaudit-model", example, "--memaudit-image-size", str(size),
                                "--memaudit-list-layers", "-p", "no:cacheprovider")
    assert result.ret == 0
    audited = [line.split() for line in result.outlines if line.startswith("*")]
    modules = {name: module for name, module in _yaml_layers(pytester.path / example / f"memaudit_{example}.yaml")}
    assert [row[1] for row in audited] == [modules[name] for name, _, _ in layers]  # forward order
    assert [(int(row[-2]), row[-1]) for row in audited] == [(units, "1") for _, units, _ in layers]  # units, calls
    for row, (_, _, axis) in zip(audited, layers):
        assert f" {axis} (" in " ".join(row)


def _yaml_layers(path: Path) -> list[tuple[str, str]]:
    import yaml

    (entry,) = yaml.safe_load(path.read_text())["models"].values()
    return [(item, item) if isinstance(item, str) else (item["name"], item["module"]) for item in entry["audited_layers"]]


@pytest.mark.parametrize("example", ["vit_b_16", "swin_t"], indirect=True)
def test_tiny_audit(pytester, example):
    size, layers = CASES[example]
    result = pytester.runpytest(example, "--memaudit-model", example, "--memaudit-image-size", str(size),
                                "--memaudit-control", "none", "--memaudit-threshold", "excess_over_control_max=off",
                                "--memaudit-json", "out.json", *QUICK)
    result.assert_outcomes(passed=len(layers))
    data = json.loads((pytester.path / "out.json").read_text())
    assert [(layer["name"], layer["channels"], layer["unit_axis"]["axis"]) for layer in data["layers"]] == layers
    assert data["settings"]["input"].startswith("(x - mean) / std of x in [0, 1], mean [0.485, 0.456, 0.406]")
    for layer in data["layers"]:
        assert all(0 <= value <= 1 for value in layer["unitmem"]) and layer["outcome"] == "passed"


@pytest.mark.parametrize("example", ["resnet50"], indirect=True)
def test_resnet50_with_a_checkpoint_measures_what_float64_gives(pytester, example):
    """The checkpoint reaches the factory, the views are ImageNet-normalized and channels-last, and
    a[i, u] of two stages equals the same network's float64 forward pass, reduced here."""
    size, layers = CASES[example]
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    checkpoint = pytester.path / "resnet50-random.pth"
    torch.save(reference.state_dict(), checkpoint)
    data_dir = make_images(pytester.path / "imgs", 4, size=size)
    result = pytester.runpytest(example, "--memaudit-model", example, "--memaudit-image-size", str(size),
                                "--memaudit-checkpoint", str(checkpoint), "--memaudit-data", str(data_dir),
                                "--memaudit-augmentations", "0", "--memaudit-json", "out.json", "--memaudit-html", "none",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(layers))  # gated as the YAML says, with the random control
    data = json.loads((pytester.path / "out.json").read_text())
    assert data["checkpoint"]["path"] == str(checkpoint)
    assert data["settings"]["input"].endswith("channels-last")
    assert [(layer["name"], layer["channels"], layer["unit_axis"]["axis"]) for layer in data["layers"]] == layers

    pixels = np.stack([np.asarray(Image.open(data_dir / sample).convert("RGB"), dtype=np.float64) / 255
                       for sample in data["samples"]])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    net = reference.double()
    with torch.no_grad():
        x = torch.from_numpy((pixels - mean) / std).permute(0, 3, 1, 2)
        stem = net.relu(net.bn1(net.conv1(x)))
        layer1 = net.layer1(net.maxpool(stem))
        layer4 = net.layer4(net.layer3(net.layer2(layer1)))
    for name, output in (("stem", stem), ("layer1", layer1), ("layer4", layer4)):
        expected = output.abs().mean(dim=(2, 3)).numpy()
        # float32 convolutions 50 layers deep: errors of about 1e-6 of the layer's largest value
        np.testing.assert_allclose(_activations(data, name), expected, rtol=1e-4, atol=1e-5 * expected.max(),
                                   err_msg=name)


def _activations(data: dict, name: str) -> np.ndarray:
    """a[i, u] of every data point, from the JSON's top-k lists (k >= N keeps them all)."""
    layer = next(layer for layer in data["layers"] if layer["name"] == name)
    samples, values = np.array(layer["top_samples"]), np.array(layer["top_values"], dtype=np.float64)
    a = np.full((len(data["samples"]), layer["channels"]), np.nan)
    for row in range(samples.shape[0]):
        a[samples[row], np.arange(layer["channels"])] = values[row]
    assert not np.isnan(a).any()
    return a
