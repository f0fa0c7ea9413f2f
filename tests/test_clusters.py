"""k-means, the silhouette and the choice of k against blobs of known membership and a brute-force silhouette."""

import math

import numpy as np
import pytest
import torch

from pytest_memaudit.analysis.clusters import cluster_features, kmeans, silhouette_score
from pytest_memaudit.errors import AuditError


def blobs(sizes, dims=6, spread=0.05, seed=0):
    """Shuffled, well-separated positive Gaussian blobs; returns (points, blob of each point)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(1, 5, (len(sizes), dims))  # typically 4 sqrt(dims / 6) apart
    truth = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[truth] + spread * rng.standard_normal((truth.size, dims))
    order = rng.permutation(truth.size)
    return points[order], truth[order]


def expected_labels(truth):
    """The blobs numbered largest first, ties by their lowest member index (the documented order)."""
    blob_ids = np.unique(truth)
    rank = sorted(blob_ids, key=lambda b: (-np.sum(truth == b), np.flatnonzero(truth == b)[0]))
    return np.array([rank.index(b) for b in truth])


def brute_force_silhouette(x, labels):
    n = len(x)
    scores = []
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = sum(math.dist(x[i], x[j]) for j in own) / len(own)
        b = min(sum(math.dist(x[i], x[j]) for j in range(n) if labels[j] == c) / np.sum(labels == c)
                for c in set(labels.tolist()) - {labels[i]})
        scores.append((b - a) / max(a, b))
    return sum(scores) / n


def test_kmeans_recovers_blobs_with_their_means_and_inertia():
    points, truth = blobs([30, 20, 20, 10])
    result = kmeans(torch.from_numpy(points), 4, seed=1)
    labels = result.labels.numpy()
    assert result.labels.dtype == torch.int64
    np.testing.assert_array_equal(labels, expected_labels(truth))
    means = np.stack([points[labels == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(result.centroids.numpy(), means, rtol=0, atol=1e-12)
    assert result.inertia == pytest.approx(sum(((points[labels == c] - means[c]) ** 2).sum() for c in range(4)),
                                           rel=1e-12)
    assert np.bincount(labels).tolist() == [30, 20, 20, 10]
    # the two 20-point blobs: cluster 1 is the one holding the lower index
    assert np.flatnonzero(labels == 1)[0] < np.flatnonzero(labels == 2)[0]


def test_kmeans_is_deterministic_and_leaves_the_global_rng_alone():
    points = torch.from_numpy(np.random.default_rng(2).standard_normal((60, 5)))
    state = torch.random.get_rng_state()
    first, second = kmeans(points, 5, seed=7), kmeans(points, 5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.labels, second.labels) and torch.equal(first.centroids, second.centroids)
    assert first.inertia == second.inertia
    features = np.abs(points.numpy())
    a, b = cluster_features(features, seed=3), cluster_features(features, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.k == b.k and np.array_equal(a.labels, b.labels) and a.silhouettes == b.silhouettes


def test_kmeans_with_k_of_one_and_with_fewer_distinct_rows_than_k():
    points = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    one = kmeans(points, 1, seed=0)
    assert one.labels.tolist() == [0, 0, 0, 0] and one.centroids.tolist() == [[0.0, 1.5]] and one.inertia == 3.0
    three = kmeans(points, 3, seed=0)  # two distinct rows: the third cluster stays empty
    assert three.labels.tolist() == [1, 0, 0, 0] and three.inertia == 0.0


def test_silhouette_matches_a_brute_force_double_loop():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((13, 3))
    labels = np.array([0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2, 3, 1])  # cluster 3 is a single point
    assert silhouette_score(torch.from_numpy(x), labels) == pytest.approx(brute_force_silhouette(x, labels), abs=1e-12)
    labels = rng.integers(0, 2, 13)
    assert silhouette_score(torch.from_numpy(x), labels) == pytest.approx(brute_force_silhouette(x, labels), abs=1e-12)


def test_silhouette_is_undefined_for_one_cluster_or_one_cluster_per_point():
    x = torch.arange(8.0).reshape(4, 2)
    assert math.isnan(silhouette_score(x, np.zeros(4, int)))
    assert math.isnan(silhouette_score(x, np.arange(4)))


def test_cluster_features_chooses_k_and_partitions_blobs():
    points, truth = blobs([25, 15, 10], dims=20, spread=0.2, seed=5)
    result = cluster_features(points, seed=0)
    assert result.k == 3
    assert result.labels.dtype == np.int64
    np.testing.assert_array_equal(result.labels, expected_labels(truth))
    assert result.sizes.tolist() == [25, 15, 10]
    assert sorted(result.silhouettes) == list(range(2, 9))
    assert result.silhouette == result.silhouettes[3] == max(result.silhouettes.values()) > 0.5


@pytest.mark.parametrize("features", [np.ones((3, 5)), np.full((10, 4), 2.5), np.zeros((0, 4))])
def test_too_few_rows_or_identical_rows_give_one_cluster(features):
    result = cluster_features(features, seed=0)
    assert result.k == 1 and result.labels.tolist() == [0] * len(features)
    assert result.sizes.tolist() == [len(features)] and math.isnan(result.silhouette)


def test_k_is_limited_by_distinct_rows():
    features = np.repeat(np.array([[0.0, 1.0], [5.0, 1.0], [0.0, 9.0]]), 4, axis=0)
    result = cluster_features(features, seed=0)
    assert sorted(result.silhouettes) == [2, 3] and result.k == 3 and result.silhouette == 1.0
    assert result.sizes.tolist() == [4, 4, 4] and result.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("call, message", [
    (lambda: kmeans(torch.zeros(3, 2), 4, seed=0), "1 <= k <= 3"),
    (lambda: kmeans(torch.zeros(3), 1, seed=0), "matrix"),
    (lambda: kmeans(torch.tensor([[0.0], [math.nan]]), 1, seed=0), "finite"),
    (lambda: silhouette_score(torch.zeros(3, 2), np.zeros(2)), "one label per row"),
    (lambda: cluster_features(-np.ones((5, 2)), seed=0), "nonnegative"),
    (lambda: cluster_features(np.ones(5), seed=0), "matrix"),
])
def test_bad_input_is_an_audit_error(call, message):
    with pytest.raises(AuditError, match=message):
        call()
