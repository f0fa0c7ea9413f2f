"""Clusters of images by the audited model's own pooled features: seeded k-means and the silhouette.

Typical input: one row per memorized image, one column per unit of a layer (the unit's mean
|activation| over space on that image), so that images the model represents alike fall together.
Everything is float64 on the CPU and deterministic for a seed; random draws come from a private
``torch.Generator``, never from the global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AuditError

RESTARTS = 4  # k-means runs per call, from successive draws of one seeded generator; the lowest inertia wins
MIN_POINTS = 4  # fewer rows than this: one cluster


@dataclass(frozen=True)
class KMeansResult:
    labels: torch.Tensor  # (n,) int64; cluster 0 is the largest, ties broken by the lowest member index
    centroids: torch.Tensor  # (k, d) float64, in the order of the labels; an empty cluster keeps its last centre
    inertia: float  # sum of squared distances of the points to their centroids


@dataclass(frozen=True)
class Clustering:
    k: int
    labels: np.ndarray  # (n,) int64, numbered as in ``KMeansResult``
    silhouettes: dict[int, float]  # mean silhouette per k tried (NaN: undefined); empty when none was tried
    sizes: np.ndarray  # (k,) int64, members per cluster, largest first

    @property
    def silhouette(self) -> float:
        """Mean silhouette of the chosen k; NaN for a single cluster."""
        return self.silhouettes.get(self.k, math.nan)


def kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = 100) -> KMeansResult:
    """Lloyd's k-means from k-means++ starts, best of ``RESTARTS`` by inertia.

    Each run iterates until no assignment changes, or ``iterations`` times. An assignment tie goes
    to the lower-numbered centre. With fewer than k distinct rows some clusters stay empty.
    """
    x = _as_matrix(x, "kmeans")
    if not 1 <= k <= x.shape[0]:
        raise AuditError(f"kmeans needs 1 <= k <= {x.shape[0]} (the number of rows), got k={k}")
    if iterations < 1:
        raise AuditError(f"kmeans needs at least one iteration, got {iterations}")
    generator = torch.Generator().manual_seed(int(seed))
    best = None
    for _ in range(RESTARTS):
        labels, centroids = _lloyd(x, _kmeans_plus_plus(x, k, generator), iterations)
        inertia = float((x - centroids[labels]).square().sum())
        if best is None or inertia < best[2]:
            best = (labels, centroids, inertia)
    labels, centroids, inertia = best
    order = _largest_first(labels, k)
    renumbered = torch.empty_like(order)
    renumbered[order] = torch.arange(k)
    return KMeansResult(renumbered[labels], centroids[order], inertia)


def silhouette_score(x: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Mean silhouette over all points (Euclidean), with 0 for a point alone in its cluster.

    NaN unless there are at least 2 clusters and fewer clusters than points.
    """
    x = _as_matrix(x, "silhouette_score")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if labels.shape != (x.shape[0],):
        raise AuditError(f"silhouette_score needs one label per row: {x.shape[0]} rows, labels shaped {tuple(labels.shape)}")
    return _silhouette(_distances(x), labels)


def cluster_features(features: np.ndarray | torch.Tensor, seed: int, k_range: range = range(2, 9)) -> Clustering:
    """Cluster the rows of nonnegative pooled features, choosing k by the highest mean silhouette.

    Preprocessing: ``log1p``, then each column standardised to mean 0 and standard deviation 1
    (constant columns dropped). Per-unit mean activations differ across units by orders of
    magnitude and have long right tails; without this a few loud units would decide every
    distance, while after it each unit weighs the same and a single extreme image does not
    stretch its unit's axis. The price: a unit that barely varies across images weighs as much
    as any other, its noise included. Rows are not normalised: how strongly an image drives the
    layer overall is part of what the model sees.

    k runs over ``k_range`` where a silhouette is defined (2 <= k < n) and there are at least k
    distinct rows; ties go to the smaller k. With fewer than 4 rows, all rows identical, or no k
    to try: one cluster, silhouette NaN. The silhouette cannot prefer one cluster over several:
    read its value (below about 0.25 the clusters are weak).
    """
    features = torch.as_tensor(features).detach().cpu().to(torch.float64).numpy()
    if features.ndim != 2:
        raise AuditError(f"cluster_features needs an (images, units) matrix, got shape {features.shape}")
    if not np.isfinite(features).all() or (features < 0).any():
        raise AuditError("cluster_features needs finite, nonnegative features such as each unit's mean |activation|; "
                         "got negative or non-finite values")
    n = features.shape[0]
    one_cluster = Clustering(1, np.zeros(n, dtype=np.int64), {}, np.array([n], dtype=np.int64))
    if n < MIN_POINTS:
        return one_cluster
    logged = np.log1p(features)
    spread = logged.std(axis=0)
    kept = spread > 0
    if not kept.any():  # all rows identical
        return one_cluster
    standardised = torch.from_numpy((logged[:, kept] - logged[:, kept].mean(axis=0)) / spread[kept])
    distinct = torch.unique(standardised, dim=0).shape[0]
    candidates = [k for k in k_range if 2 <= k < n and k <= distinct]
    if not candidates:
        return one_cluster
    distances = _distances(standardised)
    runs = {k: kmeans(standardised, k, seed).labels for k in candidates}
    # a run whose Lloyd iterations emptied a cluster does not have k clusters: not a candidate
    silhouettes = {k: _silhouette(distances, labels) if torch.unique(labels).numel() == k else math.nan
                   for k, labels in runs.items()}
    defined = [k for k in candidates if not math.isnan(silhouettes[k])]
    if not defined:
        return Clustering(1, one_cluster.labels, silhouettes, one_cluster.sizes)
    k = max(defined, key=lambda k: (silhouettes[k], -k))
    labels = runs[k].numpy()
    return Clustering(k, labels, silhouettes, np.bincount(labels, minlength=k).astype(np.int64))


def _as_matrix(x, caller: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if x.dim() != 2 or x.shape[0] == 0:
        raise AuditError(f"{caller} needs a (points, features) matrix with at least one row, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise AuditError(f"{caller} needs finite values; drop or fill the rows with NaN or infinity first")
    return x


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k starting centres: the first uniformly, each next with probability proportional to its squared
    distance to the nearest centre so far (uniformly when every point sits on a centre)."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (x - x[chosen[0]]).square().sum(1)
    for _ in range(1, k):
        weights = nearest if nearest.sum() > 0 else torch.ones(n, dtype=torch.float64)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, (x - x[chosen[-1]]).square().sum(1))
    return x[chosen].clone()


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = centroids.shape[0]
    labels = None
    for _ in range(iterations):
        assigned = torch.cdist(x, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        if labels is not None and torch.equal(assigned, labels):
            break
        labels = assigned
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        filled = counts > 0
        centroids = centroids.clone()
        centroids[filled] = sums[filled] / counts[filled, None]
    return labels, centroids


def _largest_first(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster ids ordered by size, descending, then by their lowest member index (empty ones last)."""
    sizes = torch.bincount(labels, minlength=k).tolist()
    first = torch.full((k,), labels.shape[0], dtype=torch.int64).scatter_reduce(
        0, labels, torch.arange(labels.shape[0]), reduce="amin").tolist()
    return torch.tensor(sorted(range(k), key=lambda c: (-sizes[c], first[c])), dtype=torch.int64)


def _distances(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def _silhouette(distances: torch.Tensor, labels: torch.Tensor) -> float:
    n = labels.shape[0]
    _, labels = torch.unique(labels, return_inverse=True)
    clusters = int(labels.max()) + 1
    if not 2 <= clusters < n:
        return math.nan
    members = torch.nn.functional.one_hot(labels, clusters).to(torch.float64)  # (n, clusters)
    counts = members.sum(0)
    totals = distances @ members  # (n, clusters): summed distance from each point to each cluster
    own_count = counts[labels]
    within = totals.gather(1, labels[:, None])[:, 0] / (own_count - 1).clamp(min=1)
    others = (totals / counts).scatter(1, labels[:, None], math.inf).amin(1)
    scale = torch.maximum(within, others)
    defined = (own_count > 1) & (scale > 0)
    score = torch.where(defined, (others - within) / torch.where(defined, scale, 1.0), 0.0)
    return float(score.mean())
