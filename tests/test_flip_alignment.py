"""View alignment on flip views (an image and its mirror image) sees an encoder that learned to give
its members and their mirror images one code: a small memorizer of that kind (the demo encoder at
16x16, trained in seconds) is found, and neither its untrained copy nor its blind copy is; so is
the shipped demo_memorizer, whose training taught it that besides its members' reconstruction."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu

from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.controls.random import blind_copy
from pytest_memaudit.data.images import ImageSet
from pytest_memaudit.models import ModelSpec, get_model_spec, var_layer_specs
from pytest_memaudit.models.demo import build_demo
from pytest_memaudit.models.train_demo import as_pixels

from conftest import on_one_thread

MEMBERS = ImageSet.builtin(6, 16, 0, start=4000)
HELDOUT = ImageSet.builtin(24, 16, 0, start=4100)
OTHERS = ImageSet.builtin(12, 16, 0, start=3000)
LAYERS = tuple(layer for layer in var_layer_specs() if layer.name in ("conv.in", "down.2.downsample", "conv.out"))  # neither members nor held-out: kept as they were


def invariance_memorizer(steps: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the demo encoder, the demo encoder trained ``steps`` Adam steps to give each member's mirror
    image the member's own output, every other image's output and its mirror image's kept). Its
    unit means are not mirror-invariant to begin with (its downsampling pads on one side only)."""
    untrained = build_demo(None).float().requires_grad_(False)
    encoder = build_demo(None).float().train().requires_grad_(True)
    members, others = as_pixels(MEMBERS), as_pixels(OTHERS)
    inputs = torch.cat([members, members.flip(-1), others, others.flip(-1)])
    with torch.no_grad():
        targets = untrained(torch.cat([members, members, others, others.flip(-1)]))
    optimizer = torch.optim.Adam(encoder.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = F.mse_loss(encoder(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return untrained, encoder.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def memorizer():
    with on_one_thread():
        return invariance_memorizer(40)


def audit(encoder, views="flip"):
    spec = ModelSpec("invariance_memorizer", LAYERS, build=lambda _: encoder,
                     default_image_size=16, default_data=lambda size, seed: MEMBERS,
                     default_holdout=lambda size: HELDOUT, default_control="none")
    result = run_audit(make_settings(model="invariance_memorizer", views=views, permutations=999, control="none"),
                       model=spec)
    return {(s.signal, s.layer): s for s in result.signals}


def hand_alignment(encoder, images: ImageSet) -> np.ndarray:
    """-sum_u (a_u - b_u)^2 / sum_u (a_u + b_u)^2 in float64, a and b the units' mean |activation| at
    conv.out (the encoder's output) on the image and on its mirror image (2 views: variance
    ((a - b) / 2)^2, mean (a + b) / 2)."""
    x = as_pixels(images).double()
    net = copy.deepcopy(encoder).double()
    with torch.no_grad():
        a, b = (net(v).abs().mean((2, 3)).numpy() for v in (x, x.flip(-1)))
    return -((a - b) ** 2).sum(1) / ((a + b) ** 2).sum(1)


def test_a_small_invariance_memorizer_is_found_by_view_alignment_on_flip_views(memorizer):
    _, encoder = memorizer
    found = audit(encoder)[("view_alignment", "conv.out")]
    members, heldout = hand_alignment(encoder, MEMBERS), hand_alignment(encoder, HELDOUT)
    assert found.auc == pytest.approx(mannwhitneyu(members, heldout).statistic / (6 * 24), abs=1e-9)
    assert found.auc > 0.8 and found.p_value < 0.01 and found.low > 0.5


def test_its_untrained_copy_is_not_found(memorizer):
    untrained, _ = memorizer
    assert min(s.p_value for s in audit(untrained).values()) > 0.01


def test_its_blind_copy_gives_no_test(memorizer):
    _, encoder = memorizer
    fixed = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    signals = audit(blind_copy(encoder, fixed))
    assert signals and all(math.isnan(s.p_value) for s in signals.values())


def test_the_shipped_memorizer_is_found_at_its_latent_on_flip_views():
    spec = get_model_spec("demo_memorizer")
    spec = dataclasses.replace(spec, layers=tuple(layer for layer in spec.layers if layer.name == "conv.out"), loss=None)
    result = run_audit(make_settings(model="demo_memorizer", views="flip", control="none", permutations=2000),
                       model=spec)
    found = {(s.signal, s.layer): s for s in result.signals}[("view_alignment", "conv.out")]
    assert (found.n_members, found.n_heldout) == (24, 104)
    # The audit's AUC against a hand computation: the small memorizer's test above.
    assert found.auc == pytest.approx(0.716, abs=0.001) and found.p_value < 0.001  # as docs/signals.md says
