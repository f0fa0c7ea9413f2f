"""The membership contrast: do units single out the images a model trained on more often than
unseen images of the same kind?

Members (training images) and held-out images are pooled. For each unit, the pooled data point
with its highest activation is its *argmax* (a tie goes to a label-blind pick among the tied,
``unitmem.tie_order``). Units whose activation is the same on every pooled data point (dead units,
and units blind to their input) pick nothing: they are left out, and counted (``excluded_units``).
``c[i]`` counts the remaining units whose argmax is data point i. One statistic answers the
question, per layer and over all layers together:

- ``member_share``: the share of those units whose argmax is a member, against
  ``expected_share``, the members' share of the pooled data points; ``excess`` is the difference;
- ``p_value``: one-sided, for that same excess, from its distribution when the member/held-out
  labels are permuted over data points (never over units: units that share an argmax are not
  independent), with a seeded set of permutations shared by every test of one audited model. The
  test assumes only that, without memorization, members and held-out images are exchangeable;
- ``excess_interval``: the 95% interval of the excess from the same permutations, by inverting the
  test under a shift model (the excess's spread is the one it has under the null): excess minus
  the null's 97.5% and 2.5% quantiles. It lies wholly above 0 exactly when the one-sided p is
  below 0.025 (up to ties), so the interval, the p-value and the gates never disagree. A few
  images that are most units' argmax (hubs) widen the null, and with it the interval.
- ``topk_member_share``: the same share over every unit's top-k data points (descriptive);
- ``distinct_argmax``: how many data points are some unit's argmax: the test's effective size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .stats import Interval
from .unitmem import Extremes, LayerState

DEFAULT_PERMUTATIONS = 10_000
CONSTANT_TOLERANCE = 1e-5  # a unit whose maximum is within this share of its mean is constant (see picking_units)
# Permutations are drawn and summed this many indicator cells at a time (8 MB of float64; larger chunks
# measured no faster, and the peak memory of an audit's statistics is largely these chunks).
_CHUNK_ELEMENTS = 1 << 20


@dataclass
class Membership:
    """The membership contrast of one layer (or of all layers together) of one audited model."""

    members: int
    holdout: int
    member_share: float
    expected_share: float
    topk_member_share: float
    distinct_argmax: int
    p_value: float
    permutations: int
    excess_interval: Interval | None = None
    units: int | None = None  # units in the statistic (with an argmax); None: not recorded (an older file)
    excluded_units: int = 0  # dead or constant units, left out

    @property
    def excess(self) -> float:
        return self.member_share - self.expected_share


@dataclass
class Contrast:
    """The membership contrast of one audited model: per layer, overall, and per data point."""

    layers: dict[str, Membership]
    overall: Membership
    pooled: np.ndarray  # global indices of the pooled data points
    is_member: np.ndarray  # (pooled,) bool
    argmax_counts: np.ndarray  # (pooled,) units of all layers whose argmax is each pooled data point
    layer_counts: dict[str, np.ndarray] = field(default_factory=dict)  # the same per layer


def membership_contrast(
    states: dict[str, LayerState],
    point_labels: np.ndarray,
    member_labels: Sequence[int],
    holdout_labels: Sequence[int],
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    units: Mapping[str, Sequence[int]] | None = None,
) -> Contrast | None:
    """The contrast of ``member_labels`` against ``holdout_labels`` over the layers in ``states``
    (name -> state, in forward order); None when either side has no data points. ``units`` (layer
    name -> unit indices): only those units take part (the planted control's planted units)."""
    pooled_labels = [*member_labels, *holdout_labels]
    pooled = np.flatnonzero(np.isin(point_labels, pooled_labels))
    is_member = np.isin(point_labels[pooled], member_labels)
    members, holdout = int(is_member.sum()), int((~is_member).sum())
    if members == 0 or holdout == 0:
        return None
    position = np.full(point_labels.size, -1, dtype=np.int64)
    position[pooled] = np.arange(pooled.size)

    layer_counts, topk_shares, excluded = {}, {}, {}
    for name, state in states.items():
        extremes = state.extremes(pooled_labels)
        picks = picking_units(extremes)
        if units is not None:
            chosen = np.zeros(picks.shape, dtype=bool)
            chosen[np.asarray(units.get(name, ()), dtype=np.int64)] = True
            picks &= chosen
            excluded[name] = int(np.count_nonzero(chosen & ~picks))
        else:
            excluded[name] = int(np.count_nonzero(~picks))
        layer_counts[name] = _argmax_counts(extremes.argmax[picks], position, pooled.size)
        top_index = state.top(pooled_labels)[1][:, picks]
        topk_shares[name] = float(is_member[position[top_index]].mean()) if top_index.size else math.nan

    columns = np.empty((pooled.size, len(layer_counts) + 1))  # float64 already: permutation_test makes no copy
    for i, counts in enumerate(layer_counts.values()):
        columns[:, i] = counts
    columns[:, -1] = columns[:, :-1].sum(axis=1)
    p_values, null_sums = permutation_test(columns, is_member, permutations, seed, keep_null=True)
    expected = members / pooled.size

    def contrast(i: int, topk_share: float, left_out: int) -> Membership:
        counts = columns[:, i]
        units = int(counts.sum())
        if not units:
            return Membership(members, holdout, math.nan, expected, topk_share, 0, math.nan, permutations, None, 0,
                              left_out)
        share = float(counts[is_member].sum() / units)
        interval = shift_interval(share - expected, null_sums[:, i] / units - expected, pooled.size)
        return Membership(members, holdout, share, expected, topk_share, int(np.count_nonzero(counts)), p_values[i],
                          permutations, interval, units, left_out)

    per_layer = {name: contrast(i, topk_shares[name], excluded[name]) for i, name in enumerate(states)}
    units = np.array([per_layer[name].units for name in states], dtype=np.float64)
    shares = np.array(list(topk_shares.values()))
    overall_topk = float(np.dot(np.nan_to_num(shares), units) / units.sum()) if units.sum() else math.nan
    overall = contrast(len(states), overall_topk, sum(excluded.values()))
    return Contrast(per_layer, overall, pooled, is_member, columns[:, -1].astype(np.int64), layer_counts)


def shift_interval(estimate: float, null: np.ndarray, points: int, confidence: float = 0.95) -> Interval | None:
    """The interval of ``estimate`` that inverts its permutation test under a shift model: the values
    d for which ``estimate - d`` is not in either tail of the ``null`` draws (the statistic under
    permuted labels). se is the null's standard deviation; ``points``, the data points permuted,
    stands in the interval's ``groups`` (its degrees of freedom, where a comparison needs them)."""
    if null.size < 2:
        return None
    tail = (1 - confidence) / 2
    low_q, high_q = np.quantile(null, [tail, 1 - tail])
    return Interval(float(estimate), float(np.std(null, ddof=1)), float(estimate - high_q), float(estimate - low_q),
                    points)


def permutation_test(columns: np.ndarray, is_member: np.ndarray, permutations: int, seed: int,
                     keep_null: bool = False):
    """One-sided p-value per column of ``columns`` (data points x tests): is the members' sum of
    the column higher than chance? Its null distribution comes from ``permutations`` seeded
    relabellings of the data points, the same relabellings for every column.
    p = (1 + relabellings at least as extreme) / (1 + permutations); NaN for a column of zeros (no
    unit picked anything) or without both sides. With argmax counts as the column, the members'
    sum is the member share times the units: the gated statistic itself. With ``keep_null``, also
    the (permutations, tests) member sums of every relabelling."""
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim == 1:
        columns = columns[:, None]
    n, tests = columns.shape
    members = int(np.count_nonzero(is_member))
    if members in (0, n) or permutations < 1:
        nan = [math.nan] * tests
        return (nan, np.zeros((0, tests))) if keep_null else nan
    observed = columns[is_member].sum(axis=0)
    rng = np.random.default_rng(seed)
    template = np.zeros(n)
    template[:members] = 1.0
    at_least = np.zeros(tests, dtype=np.int64)
    null = np.empty((permutations, tests)) if keep_null else None
    chunk = max(1, _CHUNK_ELEMENTS // n)
    tolerance = 1e-9 * np.maximum(1.0, [np.abs(column).sum() for column in columns.T])  # a column at a time
    for start in range(0, permutations, chunk):
        rows = min(chunk, permutations - start)
        indicators = np.tile(template, (rows, 1))
        rng.permuted(indicators, axis=1, out=indicators)  # in place: the same draws, no second copy
        sums = indicators @ columns  # (rows, tests): each relabelling's member sums
        at_least += np.count_nonzero(sums >= observed - tolerance, axis=0)
        if keep_null:
            null[start : start + rows] = sums
    p = np.where(np.any(columns != 0, axis=0), (1 + at_least) / (1 + permutations), math.nan).tolist()
    return (p, null) if keep_null else p


def picking_units(extremes: Extremes) -> np.ndarray:
    """(units,) bool: the units whose maximum over the data points stands above their mean, so that
    their argmax picks a data point. A unit whose maximum is within CONSTANT_TOLERANCE (relative)
    of its mean responds alike to every data point (dead, saturated, or blind to its input): its
    argmax would be a rounding error or a tie-break, not a pick."""
    if extremes.count == 0:
        return np.zeros(extremes.maximum.shape, dtype=bool)
    mean = extremes.total / extremes.count
    return extremes.maximum - mean > CONSTANT_TOLERANCE * np.abs(extremes.maximum)


def _argmax_counts(argmax: np.ndarray, position: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(position[argmax], minlength=size)
