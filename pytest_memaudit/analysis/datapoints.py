"""What gets memorized: a memorization score per data point, and what goes with it.

**The score.** Every unit of every audited layer has an argmax: the audited image (member or
held-out) it responds to most. A data point's *argmax units* are the units whose argmax it is,
and its *score* is the sum of those units' UnitMem: an image that many units, or a few highly
memorizing ones, single out scores high; an image no unit singles out scores 0. Its *best rank*
is its highest position (1 = first) in any unit's top-k list. The score of a held-out image
measures the same thing for an image the model never trained on, which is what makes the two
sets comparable.

**What goes with it**: image characteristics (``characteristics.py``) correlated with the score
(Spearman, with a bootstrap interval), separately for members and held-out images; clusters of
the highest-scoring images in the model's own pooled features; and, when the images are in class
folders, the score per class with a Kruskal-Wallis test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.characteristics import CHARACTERISTICS
from ..metric.stats import CorrelationResult, kruskal_wallis, spearman_interval
from ..metric.unitmem import LayerState
from .clusters import cluster_features

# Per data point values (scores, image characteristics) keep 7 significant digits: what any reading of
# them needs, at half the JSON's size with a million data points. They are rounded once, when scored,
# so the report of a fresh audit and the report of its results.json (--memaudit-from) show one number.
KEPT_DIGITS = 7
CLUSTERED_SHARE = 0.1  # the highest-scoring tenth of the scored data points is clustered
CLUSTERED_MIN, CLUSTERED_MAX = 8, 2000


@dataclass
class DataPoints:
    """Per data point (aligned with ``AuditResult.samples``)."""

    score: np.ndarray  # float64: summed UnitMem of its argmax units
    argmax_units: np.ndarray  # int64
    best_rank: np.ndarray  # float64: 1-based, NaN when in no unit's top-k
    layer_argmax_units: dict[str, np.ndarray]  # int64 per layer
    characteristics: dict[str, np.ndarray] = field(default_factory=dict)  # float64, NaN: undefined


@dataclass
class Clusters:
    layer: str  # whose per-unit activations embedded the images
    index: np.ndarray  # data points clustered (the highest-scoring)
    labels: np.ndarray  # their cluster, 0 the largest
    silhouette: float
    sizes: np.ndarray
    mean_score: np.ndarray


@dataclass
class Classes:
    names: list[str]
    images: np.ndarray  # members per class
    mean_score: np.ndarray
    unit_share: np.ndarray  # share of all units whose argmax is one of the class's members
    kruskal_h: float
    kruskal_p: float


@dataclass
class Memorized:
    """What the audit says about which images are memorized."""

    points: DataPoints
    correlations: dict[str, CorrelationResult]  # members
    correlations_holdout: dict[str, CorrelationResult]  # held-out images (empty without any)
    clusters: Clusters | None = None
    classes: Classes | None = None


def score_data_points(states: dict[str, LayerState], unitmem: dict[str, np.ndarray], labels: Sequence[int],
                      count: int, characteristics: dict[str, np.ndarray] | None = None) -> DataPoints:
    """The scores of ``count`` data points from each layer's state (read over ``labels``) and the
    layer's UnitMem; ``characteristics``: the data points' image characteristics, carried along."""
    score = np.zeros(count)
    argmax_units = np.zeros(count, dtype=np.int64)
    best_rank = np.full(count, np.inf)
    per_layer = {}
    for name, state in states.items():
        argmax = state.extremes(labels).argmax
        per_layer[name] = np.bincount(argmax, minlength=count)
        argmax_units += per_layer[name]
        score += np.bincount(argmax, weights=unitmem[name], minlength=count)
        top = state.top(labels)[1]
        for rank, row in enumerate(top, 1):
            np.minimum.at(best_rank, row, rank)
    best_rank[np.isinf(best_rank)] = np.nan
    kept = {name: kept_digits(values) for name, values in (characteristics or {}).items()}
    return DataPoints(kept_digits(score), argmax_units, best_rank, per_layer, kept)


def kept_digits(values: np.ndarray) -> np.ndarray:
    """``values`` to ``KEPT_DIGITS`` significant digits, exactly as the JSON writes and reads them back."""
    return np.array([float(f"{v:.{KEPT_DIGITS}g}") for v in np.asarray(values, dtype=np.float64).tolist()],
                    dtype=np.float64)


def characteristic_correlations(points: DataPoints, rows: np.ndarray, seed: int) -> dict[str, CorrelationResult]:
    """Spearman's rho of each characteristic with the score over the data points ``rows``."""
    return {name: spearman_interval(points.characteristics[name][rows], points.score[rows], seed=seed)
            for name in CHARACTERISTICS if name in points.characteristics}


def embedded_rows(points: DataPoints) -> np.ndarray:
    """The data points to cluster: the highest-scoring tenth of those with a score (between
    CLUSTERED_MIN and CLUSTERED_MAX of them), highest first; none when fewer than CLUSTERED_MIN
    have a score."""
    scored = np.flatnonzero(points.score > 0)
    wanted = min(CLUSTERED_MAX, max(CLUSTERED_MIN, math.ceil(CLUSTERED_SHARE * scored.size)))
    top = scored[np.argsort(-points.score[scored], kind="stable")[:wanted]]
    return top if top.size >= CLUSTERED_MIN else top[:0]


def cluster_memorized(points: DataPoints, embedding: np.ndarray, layer: str, seed: int) -> Clusters | None:
    """k-means (k by silhouette) of the highest-scoring data points (``embedded_rows``) in
    ``embedding`` (their activations at the layer, in that order: those data points x its units)."""
    top = embedded_rows(points)
    if top.size == 0:
        return None
    clustering = cluster_features(embedding, seed)
    mean_score = np.array([points.score[top[clustering.labels == k]].mean() for k in range(clustering.k)])
    silhouette = clustering.silhouettes.get(clustering.k, math.nan)
    return Clusters(layer, top, clustering.labels, silhouette, clustering.sizes, mean_score)


def image_classes(ids: Sequence[str], rows: np.ndarray) -> list[str] | None:
    """The class of each of the data points ``rows`` when they lie in class folders
    (``class/file``, ImageFolder's layout), else None."""
    parts = [ids[i].split("/", 1) for i in rows]
    if not parts or any(len(p) != 2 or not p[0] for p in parts):
        return None
    names = [p[0] for p in parts]
    return names if len(set(names)) >= 2 else None


def class_table(points: DataPoints, classes: list[str], rows: np.ndarray) -> Classes:
    names, member_class = np.unique(np.asarray(classes), return_inverse=True)
    count = len(names)
    scores = points.score[rows]
    units = points.argmax_units[rows]
    total = points.argmax_units.sum()
    images = np.bincount(member_class, minlength=count)
    by_class = np.argsort(member_class, kind="stable")
    groups = np.split(scores[by_class], np.cumsum(images)[:-1])
    h, p = kruskal_wallis(groups)
    return Classes(
        names=names.tolist(),
        images=images,
        mean_score=np.bincount(member_class, weights=scores, minlength=count) / images,
        unit_share=(np.bincount(member_class, weights=units, minlength=count) / total if total
                    else np.full(count, math.nan)),
        kruskal_h=h,
        kruskal_p=p,
    )


def what_gets_memorized(points: DataPoints, labels: Sequence[str], ids: Sequence[str],
                        embedding: np.ndarray | None, embedding_layer: str, seed: int,
                        folders: bool = True) -> Memorized:
    """``folders``: the members are files under a data folder (their ids may name classes)."""
    labels = np.asarray(labels)
    members = np.flatnonzero(labels == "member")
    held_out = np.flatnonzero(labels != "member")
    classes = image_classes(ids, members) if folders else None
    return Memorized(
        points=points,
        correlations=characteristic_correlations(points, members, seed),
        correlations_holdout=characteristic_correlations(points, held_out, seed) if held_out.size else {},
        clusters=None if embedding is None else cluster_memorized(points, embedding, embedding_layer, seed),
        classes=None if classes is None else class_table(points, classes, members),
    )
