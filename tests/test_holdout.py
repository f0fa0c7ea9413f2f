"""Held-out images: how they join the audit, and the inputs that must be refused or flagged."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import make_images
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.errors import DataError
from pytest_memaudit.models import LayerSpec, ModelSpec

REPO = Path(__file__).resolve().parents[1]


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


SPEC = ModelSpec(name="small", layers=(LayerSpec("conv", "conv"),), build=lambda checkpoint: Small(),
                 default_image_size=16)


def audit(**settings):
    values = dict(model="small", augmentations=0, device="cpu", control="none", permutations=200) | settings
    return run_audit(make_settings(**values), SPEC)


def test_held_out_folder_joins_the_stream_after_the_members(tmp_path):
    members = make_images(tmp_path / "train", 6, size=16, seed=1)
    held = make_images(tmp_path / "val", 5, size=16, seed=2)
    result = audit(data=str(members), holdout=str(held))
    assert result.samples == [f"img_{i:03d}.png" for i in range(6)] + [f"holdout:img_{i:03d}.png" for i in range(5)]
    assert result.labels == ["member"] * 6 + ["holdout"] * 5
    assert result.membership.members == 6 and result.membership.holdout == 5
    assert all(index < 6 for layer in result.layers for index in layer.values.max_sample)  # UnitMem: members only
    data = result.to_json()
    assert data["sizes"] == {"member": 6, "holdout": 5, "planted": 0}
    assert data["summary"]["membership"]["p_value"] is not None and data["layers"][0]["membership"]["members"] == 6


def test_samples_apply_to_each_set(tmp_path):
    members = make_images(tmp_path / "train", 9, size=16, seed=1)
    held = make_images(tmp_path / "val", 9, size=16, seed=2)
    result = audit(data=str(members), holdout=str(held), samples=4)
    assert result.labels.count("member") == 4 and result.labels.count("holdout") == 4


def test_held_out_images_that_are_members_are_refused(tmp_path):
    members = make_images(tmp_path / "train", 6, size=16, seed=1)
    held = make_images(tmp_path / "val", 4, size=16, seed=2)
    shutil.copy(members / "img_002.png", held / "copy_of_2.png")
    with pytest.raises(DataError, match=r"shares images with the members .*holdout:copy_of_2.png = img_002.png"):
        audit(data=str(members), holdout=str(held))


def test_an_empty_held_out_folder_is_refused(tmp_path):
    members = make_images(tmp_path / "train", 6, size=16, seed=1)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"held-out set \(--memaudit-holdout\): no images found"):
        audit(data=str(members), holdout=str(tmp_path / "val"))


def test_a_small_held_out_set_warns_about_power(tmp_path):
    members = make_images(tmp_path / "train", 21, size=16, seed=1)
    held = make_images(tmp_path / "val", 2, size=16, seed=2)
    result = audit(data=str(members), holdout=str(held))
    assert any("less than 10% of the members (21)" in note and "little power" in note for note in result.notes)


def test_builtin_held_out_images_follow_the_members():
    result = audit(data="builtin", samples=5, holdout="builtin")
    assert result.samples == [f"builtin/{i:04d}" for i in range(10)]
    assert result.labels == ["member"] * 5 + ["holdout"] * 5


def test_the_quick_start_shows_the_three_results(tmp_path):
    """The README's main command on the shipped demo: it passes, the planted units are found one by one
    (recall at least 0.9, their argmax hits), the random control's verdict is none, and each answer
    is its subject's verdict (the planted control's: 16 units among 1,664 do not move the member
    share, so the membership verdict does not see them).

    No wall-clock limit: the demo takes 43 s on a quiet 2-core machine and an hour on a loaded one, and
    only its answers are under test (a hang would still show, as pytest never finishing)."""
    shutil.copytree(REPO / "audits", tmp_path / "audits")
    run = subprocess.run([sys.executable, "-m", "pytest", "audits/", "-p", "no:cacheprovider"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "memaudit-report" / "results.json").read_text())
    planted, control = data["planted"], data["control"]
    assert planted["recall"] >= 0.9 and planted["argmax_hits"] >= 0.9 * len(planted["images"])
    assert control["verdict"]["memorization"] == "none"
    assert data["sizes"] == {"member": 262, "holdout": 240, "planted": 16}
    answers = {"detected": "yes: the planted control was detected", "inconclusive": "not reliably",
               "none": "no: the planted control was not detected"}
    for question in ("Would this audit see memorization if it were there? "
                     + answers[planted["verdict"]["memorization"]],
                     "Does it stay quiet where there is no memorization? yes: the random-weights control's verdict "
                     "is none",
                     "Does demo single out its training images?"):
        assert question in run.stdout
    assert data["summary"]["verdict"]["memorization"] in ("none", "inconclusive", "detected")
    report = (tmp_path / "memaudit-report" / "report.html").read_text()
    assert 'id="evidence"' in report and 'id="planted"' in report and 'id="membership"' in report
