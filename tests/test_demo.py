"""The demo model: its shipped weights and metadata, its training set, its script, its audit."""

import hashlib
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.data.builtin import canary_image
from pytest_memaudit.errors import CheckpointError
from pytest_memaudit.models import get_model_spec, var_layer_specs
from pytest_memaudit.models.demo import (
    CANARY_REPEATS,
    DATA_SEED,
    DEMO_IMAGES,
    METADATA,
    WEIGHTS,
    build_demo,
    demo_image_set,
    pixels_sha256,
    training_copies,
)
from pytest_memaudit.models.var import VAREncoder


def test_demo_spec_has_the_var_layers_and_loads_its_shipped_weights():
    spec = get_model_spec("demo")
    assert spec.layers == var_layer_specs() and len(spec.layers) == 22
    assert (spec.default_image_size, spec.default_control) == (64, "random,planted")
    held_out = spec.default_holdout(64)
    assert held_out.ids == [f"builtin/{i:04d}" for i in range(DEMO_IMAGES, 2 * DEMO_IMAGES)]
    assert not set(held_out.ids) & set(demo_image_set().ids)  # never trained on
    assert spec.locate(None) == WEIGHTS and WEIGHTS.stat().st_size < 8 * 2**20

    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    expected = VAREncoder(ch=32).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}

    model = spec.build(spec.locate(None))
    modules = dict(model.named_modules())
    assert all(layer.module in modules for layer in spec.layers)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.conv_in.weight, state["conv_in.weight"].float())
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 4, 4)


def test_shipped_metadata_matches_the_data_set_and_the_weights():
    metadata = json.loads(METADATA.read_text())
    images = demo_image_set()
    data = metadata["data"]
    assert [c["id"] for c in data["canaries"]] == images.canaries
    assert [c["repeats_per_epoch"] for c in data["canaries"]] == list(CANARY_REPEATS)
    assert (data["generated_images"], data["data_seed"], data["image_size"]) == (DEMO_IMAGES, DATA_SEED, 64)
    assert data["description"] == images.description
    assert data["pixels_sha256"] == pixels_sha256(images)  # the generators still make those images
    assert metadata["weights_sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert metadata["model"] == {"class": "VAREncoder", "ch": 32, "weights_dtype": "float16"}
    losses = [loss for _, loss in metadata["loss_curve"]]
    assert losses[-1] == metadata["final_loss"] < losses[0]


def test_demo_training_set_is_deterministic_and_holds_the_canaries():
    images = demo_image_set()
    again = get_model_spec("demo").default_data(64, 123)  # the audit's seed does not change it
    assert images.ids == again.ids and images.canaries == again.canaries
    assert len(images) == DEMO_IMAGES + len(CANARY_REPEATS)
    assert images.canaries == [f"canary/{k}" for k in range(len(CANARY_REPEATS))]
    assert set(images.canaries) <= set(images.ids)
    assert images.description == f"demo training set ({DEMO_IMAGES} generated images + 6 canaries)"
    for position in (0, 7, len(images) - 1):
        assert torch.equal(images.load(position), again.load(position))

    canaries = [images.load(images.ids.index(c)) for c in images.canaries]
    assert torch.equal(canaries[2], torch.from_numpy(canary_image(2, 64, DATA_SEED)).permute(2, 0, 1))
    cells = canaries[0].reshape(3, 8, 8, 8, 8)  # (channel, cell row, row, cell column, column)
    assert (cells == cells[:, :, :1, :, :1]).all()  # an 8x8 mosaic of flat cells
    assert len({c.numpy().tobytes() for c in canaries}) == len(canaries)

    copies = training_copies(images)
    for canary, repeats in zip(images.canaries, CANARY_REPEATS):
        assert copies.count(images.ids.index(canary)) == repeats
    assert copies.count(0) == 1 and len(copies) == DEMO_IMAGES + sum(CANARY_REPEATS)


def test_training_script_runs_end_to_end(tmp_path):
    out = tmp_path / "tiny.pt"
    run = subprocess.run(
        [sys.executable, "-m", "pytest_memaudit.models.train_demo", "--out", str(out), "--steps", "3", "--images", "8",
         "--image-size", "32", "--log-every", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    losses = [float(x) for x in re.findall(r"^step +\d+/3 +loss ([\d.]+)", run.stdout, re.MULTILINE)]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert "final loss" in run.stdout and str(out) in run.stdout

    spec = get_model_spec("demo")
    assert spec.locate(str(out)) == out  # --memaudit-checkpoint: a retrained demo
    with pytest.raises(CheckpointError, match="does not exist"):
        spec.locate(str(tmp_path / "missing.pt"))
    model = build_demo(out)
    assert isinstance(model, VAREncoder) and model.conv_in.out_channels == 32
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["training"]["steps"] == 3 and metadata["data"]["generated_images"] == 8
    assert metadata["final_loss"] == pytest.approx(losses[-1], abs=5e-6)  # printed to 5 decimals
    assert [c["id"] for c in metadata["data"]["canaries"]] == demo_image_set().canaries


def test_demo_audit_has_a_control_and_ranks_every_canary():
    settings = make_settings(model="demo", image_size=32, augmentations=1, device="cpu", control="random", samples=40)
    result = run_audit(settings)
    images = demo_image_set().sample(40, 0)
    held_out = get_model_spec("demo").default_holdout(32).sample(40, 0)
    assert result.samples == images.ids + held_out.ids and result.canaries == images.canaries
    assert result.labels == ["member"] * 40 + ["holdout"] * 40
    assert result.membership is not None and result.membership.members == 40 == result.membership.holdout
    assert result.settings["control"] == "random" and result.control is not None and result.planted is None
    assert [layer.name for layer in result.layers] == [layer.name for layer in var_layer_specs()]
    for layer, control_layer in zip(result.layers, result.control.layers):
        assert layer.control_mean == control_layer.stats.mean_unitmem
        assert 0 <= layer.control_mean <= 1
    assert any(l.stats.mean_unitmem != l.control_mean for l in result.layers)  # trained != random

    ranks = result.canary_ranks()
    assert list(ranks) == images.canaries
    ranking = result.data_point_ranking()
    assert sum(units for _, units in ranking) == result.units
    for canary, rank in ranks.items():
        assert 1 <= rank <= len(images) and ranking[rank - 1][0] == canary
    assert [c["id"] for c in result.to_json()["canaries"]] == images.canaries
    assert np.isfinite([layer.control_mean for layer in result.layers]).all()


def test_demo_audit_samples_its_own_set_when_asked():
    settings = make_settings(model="demo", image_size=16, augmentations=0, samples=12, seed=5, device="cpu", control="none")
    result = run_audit(settings)
    expected = demo_image_set().sample(12, seed=5)
    assert result.samples[:12] == expected.ids and len(result.samples) == 24  # 12 members, 12 held out
    assert result.to_json()["sizes"] == {"member": 12, "holdout": 12, "planted": 0}
    assert result.canaries == [c for c in demo_image_set().canaries if c in expected.ids]
    assert result.data_source.startswith("12 chosen from the demo training set")
