"""Per-image signals of memorization, each contrasted members against held-out images.

Every signal is one number per image (and per layer), oriented so that "higher" is what
memorization is expected to do to a member:

- ``view_alignment``: minus the spread of the image's views in the layer's unit space, the sum over
  units of the variance across views of the unit's mean |activation|, over the squared norm of
  their mean over views (scale-free). A network that memorized an image tends to map its views
  closer together (the idea behind SSLMem and the UnitMem paper's LayerMem). Needs 2 views or more.
- ``activation_norm``: the root mean square over units of the views' mean |activation|.
- ``neighbour_distance``: the Euclidean distance, units standardized over the audited images, from
  the image's view-mean to the nearest other audited image's (members and held-out pooled, so
  that both kinds have the same candidates and the labels stay exchangeable): a memorized image
  is expected to lie apart.
- ``argmax_units``: the units whose argmax over the pooled images is the image (the membership
  test's argmax counts, per image).
- ``loss``: the loss the model's ``loss:`` factory gives for the plain (unaugmented) image (lower
  loss: more memorized, so minus the loss), the reference attack.

Contrast: the AUC (probability that a member's value exceeds a held-out image's, ties counting
half), DeLong's 95% interval for it, and a one-sided permutation p over data points (the members'
rank sum against seeded relabellings, ``membership.permutation_test`` over ranks; the same relabellings
for every signal and layer). The permutation test assumes only that, without memorization, the
labels are exchangeable among the pooled images. The per-image scalars cost O(N) memory;
``neighbour_distance`` needs each image's view-mean (units floats per layer), so it is measured on a
seeded sample of at most NEIGHBOUR_IMAGES data points (``neighbour_sample``; all of them in smaller
audits), drawn without regard to their labels: its memory and its O(n^2) search stay bounded at any
N, and the images left out have no value (left out of its test, as NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .rows import RowStore

SIGNALS = ("view_alignment", "activation_norm", "neighbour_distance", "argmax_units", "loss")
STREAMED = ("view_alignment", "activation_norm")  # computed from each batch's views as it passes
LOSS_LAYER = "model"  # the loss signal's ``layer``: it belongs to the whole model, not to a layer
# neighbour_distance's sample: 2,000 view-means of var_d16's 8,192 units are 66 MB (float32), and
# its nearest-neighbour search, 2,000^2 x units multiply-adds, takes seconds
NEIGHBOUR_IMAGES = 2000
NEIGHBOUR_BLOCK = 1 << 19  # distances computed this many at a time (a few temporaries of 4 MB each)


@dataclass(frozen=True)
class SignalResult:
    """One signal at one layer: members against held-out images. ``estimate`` is the AUC (0.5: no
    difference), ``low``/``high`` its 95% interval, ``p_value`` one-sided (members higher)."""

    signal: str
    layer: str
    estimate: float
    low: float
    high: float
    p_value: float
    n_members: int
    n_heldout: int
    permutations: int

    @property
    def auc(self) -> float:
        return self.estimate

    def as_dict(self) -> dict:
        return asdict(self) | {"auc": self.estimate}


def signal_key(role: str, layer: str, signal: str) -> str:
    """How the stream files a subject's per-image values of one signal at one layer."""
    return f"{role}\t{layer}\t{signal}"


def check_loss(loss, images: int, model: str) -> np.ndarray:
    """The per-image loss (float64) from what a ``loss:`` function returned for a batch of
    ``images`` plain images; an AuditError unless that is one finite number per image."""
    import torch

    from ..errors import AuditError

    if not isinstance(loss, torch.Tensor) or loss.numel() != images:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise AuditError(f"model {model}: its loss function returned {shape} for a batch of {images} images; it "
                         f"must return one loss per image (a tensor of shape ({images},))")
    values = loss.detach().double().reshape(images)
    if not torch.isfinite(values).all():
        raise AuditError(f"model {model}: its loss function returned a non-finite loss (NaN or infinity); check it "
                         "on these images, or remove 'loss:' to audit without the reference attack")
    return values.cpu().numpy()


def view_scalars(per_view) -> dict[str, "object"]:
    """Per-image ``view_alignment`` and ``activation_norm`` (float64 tensors of n) and the view-mean
    (n, units) of a layer's per-view unit means, a tensor (n, views, units)."""
    values = per_view.double()
    mean = values.mean(dim=1)
    scalars = {"activation_norm": mean.pow(2).mean(dim=1).sqrt()}
    if values.shape[1] >= 2:
        spread = values.var(dim=1, unbiased=False).sum(dim=1)
        scalars["view_alignment"] = -spread / mean.pow(2).sum(dim=1).clamp_min(1e-300)
    return scalars | {"mean": mean.float()}


def neighbour_sample(count: int, seed: int) -> np.ndarray:
    """(count,) bool over the listing's data points: those whose view-means are kept for
    ``neighbour_distance``, every one up to NEIGHBOUR_IMAGES, else a seeded draw of that many."""
    if count <= NEIGHBOUR_IMAGES:
        return np.ones(count, dtype=bool)
    chosen = np.zeros(count, dtype=bool)
    chosen[np.random.default_rng([seed, 0x4E1B]).choice(count, size=NEIGHBOUR_IMAGES, replace=False)] = True
    return chosen


class ViewMeans:
    """The view-means (units floats per layer, float32) of the data points of ``sample`` (bool by
    listing position), by ``signal_key``, as the stream adds batches: what ``neighbour_distance`` needs.
    ``capacity``: how many sampled data points this process streams (default: all of the sample)."""

    def __init__(self, sample: np.ndarray, capacity: int | None = None):
        self.sample = sample
        capacity = int(sample.sum()) if capacity is None else capacity
        self._positions, self._rows = RowStore(capacity), RowStore(capacity)

    def add(self, positions: Sequence[int], means: Mapping[str, np.ndarray]) -> None:
        """A batch's view-means (n, units) by key, of the data points at ``positions`` (n,)."""
        positions = np.asarray(positions, dtype=np.int64)
        kept = self.sample[positions]
        self._positions.add({"positions": positions[kept]})
        self._rows.add({key: np.asarray(rows, dtype=np.float32)[kept] for key, rows in means.items()})

    def views(self) -> dict:
        """Positions (kept,) and rows by key (kept, units): views of the stored rows, not copies."""
        return {"positions": self._positions.arrays().get("positions", np.zeros(0, dtype=np.int64)),
                "rows": self._rows.arrays()}

    def state_dict(self) -> dict:
        """``views()``, copied (for a snapshot)."""
        views = self.views()
        return {"positions": views["positions"].copy(), "rows": {key: rows.copy() for key, rows in views["rows"].items()}}

    def load_state_dict(self, state: dict) -> None:
        self._positions.load({"positions": np.asarray(state["positions"], dtype=np.int64)})
        self._rows.load({key: np.asarray(rows, dtype=np.float32) for key, rows in state["rows"].items()})


def neighbour_column(indices: np.ndarray, rows: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """``neighbour_distance`` of the ``pooled`` data points (indices) among those of them that have a
    view-mean (``rows``, of the data points ``indices``); NaN for the others."""
    column = np.full(pooled.size, np.nan)
    slot = {int(index): row for row, index in enumerate(np.asarray(indices).tolist())}
    at = [k for k, index in enumerate(pooled.tolist()) if index in slot]
    if len(at) >= 2:
        column[at] = neighbour_distances(np.asarray(rows)[[slot[index] for index in pooled[at].tolist()]])
    return column


def neighbour_distances(vectors: np.ndarray) -> np.ndarray:
    """Each row's Euclidean distance to its nearest other row, columns standardized first (a
    constant column is left out). ``vectors``: (n, units), n >= 2."""
    x = np.asarray(vectors, dtype=np.float64)
    sd = x.std(axis=0)
    keep = sd > 0
    x = (x[:, keep] - x[:, keep].mean(axis=0)) / sd[keep]
    squared = np.einsum("ij,ij->i", x, x)
    nearest = np.full(len(x), np.inf)
    chunk = max(1, NEIGHBOUR_BLOCK // max(1, len(x)))
    for start in range(0, len(x), chunk):
        block = squared[start:start + chunk, None] + squared[None, :] - 2 * x[start:start + chunk] @ x.T
        rows = np.arange(start, min(start + chunk, len(x)))
        block[rows - start, rows] = np.inf
        nearest[rows] = block.min(axis=1)
    return np.sqrt(np.maximum(nearest, 0))


def auc(members: np.ndarray, heldout: np.ndarray) -> float:
    """P(member > held-out) + P(tie) / 2, from mid-ranks (the Mann-Whitney U over n1 n2)."""
    from scipy.stats import rankdata

    members, heldout = np.asarray(members, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    ranks = rankdata(np.concatenate([members, heldout]))
    n1, n2 = members.size, heldout.size
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2))


def delong_interval(members: np.ndarray, heldout: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """DeLong's normal interval for the AUC (its placement-value variance), clipped to [0, 1]. It
    collapses to a point at AUC 0 or 1, where the placements have no spread; it needs 2 of each."""
    from scipy.stats import norm, rankdata

    members, heldout = np.asarray(members, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    n1, n2 = members.size, heldout.size
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan
    pooled = rankdata(np.concatenate([members, heldout]))
    # A member's placement: the share of held-out images below it (ties half); a held-out image's:
    # the share of members above it.
    member_placement = (pooled[:n1] - rankdata(members)) / n2
    heldout_placement = 1 - (pooled[n1:] - rankdata(heldout)) / n1
    estimate = member_placement.mean()
    se = math.sqrt(member_placement.var(ddof=1) / n1 + heldout_placement.var(ddof=1) / n2)
    z = norm.ppf(0.5 + confidence / 2)
    return float(max(0.0, estimate - z * se)), float(min(1.0, estimate + z * se))


def contrast_signals(columns: Mapping[tuple[str, str], np.ndarray], is_member: np.ndarray, permutations: int,
                     seed: int) -> list[SignalResult]:
    """One SignalResult per (signal, layer) column of per-image values over the pooled images
    (``is_member`` says which are members). Images without a value (NaN) are left out of that
    column's AUC and interval; its permutation p uses the images that have one. A column whose values
    are all alike (up to ``membership.CONSTANT_TOLERANCE``, relative), as every column of a network
    blind to its input, cannot tell members from anything: its p is NaN (no test), not 1."""
    from .membership import CONSTANT_TOLERANCE

    is_member = np.asarray(is_member, dtype=bool)
    keys = list(columns)
    complete = [key for key in keys if np.all(np.isfinite(columns[key]))]
    p_values = dict(zip(complete, _rank_permutation_test([columns[k] for k in complete], is_member, permutations,
                                                        seed))) if complete else {}
    results = []
    for key in keys:
        values = np.asarray(columns[key], dtype=np.float64)
        finite = np.isfinite(values)
        members, heldout = values[finite & is_member], values[finite & ~is_member]
        if key not in p_values:
            p_values[key] = _rank_permutation_test([values[finite]], is_member[finite], permutations, seed)[0]
        if members.size == 0 or heldout.size == 0:
            estimate, low, high = math.nan, math.nan, math.nan
        else:
            estimate = auc(members, heldout)
            low, high = delong_interval(members, heldout)
        seen = values[finite]
        alike = seen.size == 0 or np.ptp(seen) <= CONSTANT_TOLERANCE * np.max(np.abs(seen))
        p_value = math.nan if alike else float(p_values[key])
        results.append(SignalResult(key[0], key[1], estimate, low, high, p_value, int(members.size),
                                    int(heldout.size), permutations))
    return results


def signal_columns(streamed: Mapping[str, Mapping[str, np.ndarray]], means: Mapping[str, np.ndarray],
                   argmax_counts: Mapping[str, np.ndarray], pooled: np.ndarray, layers: Sequence[str],
                   loss: np.ndarray | None = None) -> dict[tuple[str, str], np.ndarray]:
    """The per-image columns over the ``pooled`` data points (global indices), by (signal, layer) in
    layer order: the streamed scalars (``streamed[layer][signal]``, by data point), the neighbour
    distances from the view-means (``means[layer]``: (data points, their view-means)), the argmax
    counts (already over the pooled images), then minus the loss, if any."""
    columns: dict[tuple[str, str], np.ndarray] = {}
    for layer in layers:
        for signal in STREAMED:
            if signal in streamed.get(layer, {}):
                columns[(signal, layer)] = np.asarray(streamed[layer][signal], dtype=np.float64)[pooled]
        if layer in means and pooled.size >= 2:
            columns[("neighbour_distance", layer)] = neighbour_column(*means[layer], pooled)
        if layer in argmax_counts:
            columns[("argmax_units", layer)] = np.asarray(argmax_counts[layer], dtype=np.float64)
    if loss is not None:
        columns[("loss", LOSS_LAYER)] = -np.asarray(loss, dtype=np.float64)[pooled]
    return columns


def image_signals(role: str, contrast, values: Mapping[str, np.ndarray], layers: Sequence[str], permutations: int,
                  seed: int, view_means: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[SignalResult]:
    """A model subject's signals over its membership ``contrast``'s pooled images (none without
    held-out images), from the stream's per-image ``values`` (by ``signal_key``, by data point) and
    ``view_means`` (by ``signal_key``: the sampled data points and their view-means, ``ViewMeans``)."""
    if contrast is None:
        return []
    streamed = {layer: {signal: values[signal_key(role, layer, signal)] for signal in STREAMED
                        if signal_key(role, layer, signal) in values} for layer in layers}
    means = {layer: view_means[signal_key(role, layer, "mean")] for layer in layers
             if signal_key(role, layer, "mean") in view_means}
    columns = signal_columns(streamed, means, contrast.layer_counts, contrast.pooled, layers,
                             values.get(signal_key(role, LOSS_LAYER, "loss")))
    return contrast_signals(columns, contrast.is_member, permutations, seed)


def _rank_permutation_test(columns: Sequence[np.ndarray], is_member: np.ndarray, permutations: int,
                           seed: int) -> list[float]:
    """The permutation p of the members' rank sum (Mann-Whitney's U) per column (of equal lengths).
    Each column is ranked on its own into one array: ranking them all at once holds several
    temporaries of data points x columns."""
    from .membership import permutation_test
    from .stats import scipy_stats

    rankdata = scipy_stats().rankdata
    ranks = np.empty((len(columns[0]), len(columns)))
    for j, column in enumerate(columns):
        ranks[:, j] = rankdata(column)
    return permutation_test(ranks, is_member, permutations, seed)
