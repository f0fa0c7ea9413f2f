"""neighbour_distance on a bounded sample of data points: the view-means an audit keeps do not grow
with N, and the distances of the sampled images are those among the sample."""

import numpy as np
import torch
from scipy.spatial.distance import cdist
from torch import nn

from pytest_memaudit.metric import imagesignals
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.metric.imagesignals import ViewMeans, neighbour_column, neighbour_sample
from pytest_memaudit.models import LayerSpec, ModelSpec


def test_every_data_point_up_to_the_cap_then_a_seeded_sample_of_the_cap():
    assert neighbour_sample(imagesignals.NEIGHBOUR_IMAGES, seed=0).all()
    large = neighbour_sample(50_000, seed=3)
    assert large.sum() == imagesignals.NEIGHBOUR_IMAGES
    assert np.array_equal(large, neighbour_sample(50_000, seed=3))
    assert not np.array_equal(large, neighbour_sample(50_000, seed=4))


def test_the_view_means_kept_stay_at_the_sample_however_many_images_stream():
    count, units = 30_000, 16
    means = ViewMeans(neighbour_sample(count, seed=0))
    for start in range(0, count, 1000):
        positions = list(range(start, start + 1000))
        means.add(positions, {"k": np.full((1000, units), start, dtype=np.float32)})
    state = means.state_dict()
    assert state["rows"]["k"].shape == (imagesignals.NEIGHBOUR_IMAGES, units)
    assert np.array_equal(state["positions"], np.flatnonzero(neighbour_sample(count, seed=0)))
    assert np.array_equal(state["rows"]["k"][:, 0], state["positions"] // 1000 * 1000)  # each row its own


def test_distances_among_the_sampled_pooled_images_nan_for_the_rest():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 3))
    indices = np.array([0, 2, 3, 5, 7, 8])  # data points with a view-mean
    pooled = np.array([1, 2, 3, 5, 7, 8, 9])  # the contrast's images: 1 and 9 have none, 0 is not pooled
    column = neighbour_column(indices, rows, pooled)
    assert np.isnan(column[[0, 6]]).all()
    x = rows[1:]  # those of 2, 3, 5, 7, 8, standardized over themselves
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    d = cdist(z, z)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(column[1:6], d.min(axis=1), rtol=1e-10)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.a(x)


def test_an_audit_measures_neighbour_distance_on_its_sample(monkeypatch):
    monkeypatch.setattr(imagesignals, "NEIGHBOUR_IMAGES", 12)
    spec = ModelSpec(name="small", layers=(LayerSpec("a", "a"),), build=lambda checkpoint: Small(), default_image_size=16)
    result = run_audit(make_settings(model="small", data="builtin", samples=20, holdout="builtin", augmentations=2,
                                     control="none", device="cpu", permutations=100), spec)
    by_signal = {signal.signal: signal for signal in result.signals}
    assert by_signal["neighbour_distance"].n_members + by_signal["neighbour_distance"].n_heldout == 12
    assert (by_signal["view_alignment"].n_members, by_signal["view_alignment"].n_heldout) == (20, 20)
