"""The whole audit against an independent float64 computation (the issue's acceptance check).

The plugin audits a generated var_d16 checkpoint on 64x64 PNGs with no augmentation; the
reference decodes the same files with Pillow, runs the float64 functional encoder of
``var_reference`` and computes UnitMem in numpy straight from the spec.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
from conftest import make_images
from var_reference import reference_forward

pytest_plugins = ["pytester"]


def reference_unitmem(activations: np.ndarray, reduce: str) -> np.ndarray:
    out = []
    for column in activations.T:
        top = int(np.argmax(column))
        rest = np.delete(column, top)
        mu_max, mu_rest = column[top], (rest.mean() if reduce == "mean" else np.median(rest))
        out.append(0.0 if mu_max + mu_rest == 0 else (mu_max - mu_rest) / (mu_max + mu_rest))
    return np.array(out)


@pytest.mark.parametrize("reduce", ["mean", "median"])
def test_unitmem_matches_float64_reference(pytester, var_checkpoint, reduce):
    data = make_images(pytester.path / "imgs", 8, size=64, seed=3)
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("allow_no_gates: true\n")
    result = pytester.runpytest(
        "audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint),
        "--memaudit-data", str(data), "--memaudit-image-size", "64", "--memaudit-augmentations", "0",
        "--memaudit-reduce", reduce, "--memaudit-batch-size", "3", "--memaudit-json", "out.json",
        "-p", "no:cacheprovider",
    )
    result.assert_outcomes(passed=22)
    audit = json.loads((pytester.path / "out.json").read_text())

    files = sorted(p.name for p in data.iterdir())
    assert audit["samples"] == files
    pixels = np.stack([np.asarray(Image.open(data / f).convert("RGB"), dtype=np.float64) for f in files])
    x = torch.from_numpy(pixels / 255.0 * 2 - 1).permute(0, 3, 1, 2)
    state = torch.load(var_checkpoint, weights_only=True)
    with torch.no_grad():
        _, layers = reference_forward(state, x)
    for layer in audit["layers"]:
        activations = layers[layer["module"]].abs().mean(dim=(2, 3)).numpy()  # (images, units)
        expected = reference_unitmem(activations, reduce)
        np.testing.assert_allclose(layer["unitmem"], expected, rtol=0, atol=1e-4, err_msg=layer["name"])
        assert layer["max_sample"] == np.argmax(activations, axis=0).tolist(), layer["name"]
