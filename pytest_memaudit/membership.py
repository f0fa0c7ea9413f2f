"""The membership contrast: do units single out the images a model trained on more often than
unseen images of the same kind?

Members (training images) and held-out images are pooled. For each unit, the pooled data point
with its highest activation is its *argmax*; ``c[i]`` counts the units whose argmax is data
point i. Figures, per layer and overall:

- ``member_share``: the share of units whose argmax is a member, against ``expected_share``, the
  members' share of the pooled data points; ``excess`` is the difference (a jackknife interval
  over data point groups comes with it);
- ``topk_member_share``: the same over every unit's top-k data points;
- ``distinct_argmax``: how many data points are some unit's argmax: the test's effective size,
  since units that share an argmax are not independent;
- ``p_value``: one-sided, members' counts ``c`` rank higher than held-out images' counts. The
  rank sum of the members' ``c`` is compared with its distribution when the member/held-out
  labels are permuted over data points (never over units), with a seeded set of permutations
  shared by every test of one audited model. Ranks keep a few images that take most units from
  dominating the test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .stats import Interval, jackknife_interval, scipy_stats
from .unitmem import LayerState

DEFAULT_PERMUTATIONS = 10_000
_CHUNK_ELEMENTS = 1 << 22  # permutations are drawn and summed this many indicator cells at a time


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
    point_groups: np.ndarray,
    member_labels: Sequence[int],
    holdout_labels: Sequence[int],
    *,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> Contrast | None:
    """The contrast of ``member_labels`` against ``holdout_labels`` over the layers in ``states``
    (name -> state, in forward order); None when either side has no data points."""
    pooled_labels = [*member_labels, *holdout_labels]
    pooled = np.flatnonzero(np.isin(point_labels, pooled_labels))
    is_member = np.isin(point_labels[pooled], member_labels)
    members, holdout = int(is_member.sum()), int((~is_member).sum())
    if members == 0 or holdout == 0:
        return None
    position = np.full(point_labels.size, -1, dtype=np.int64)
    position[pooled] = np.arange(pooled.size)
    groups = int(point_groups.max()) + 1 if point_groups.size else 0
    pooled_groups = point_groups[pooled]

    layer_counts, topk_shares, leave_out = {}, {}, {}
    for name, state in states.items():
        layer_counts[name] = _argmax_counts(state.extremes(pooled_labels).argmax, position, pooled.size)
        top_index = state.top(pooled_labels)[1]
        topk_shares[name] = float(is_member[position[top_index]].mean())
        leave_out[name] = np.full((groups, 2), np.nan)  # (member argmax units, units) without group g
        for g in range(groups):
            if not np.any(pooled_groups == g):
                continue
            argmax = state.extremes(pooled_labels, exclude_group=g).argmax
            leave_out[name][g] = [is_member[position[argmax]].sum(), argmax.size]

    expected_without = np.array([_expected(is_member, pooled_groups != g) for g in range(groups)])
    columns = np.stack([*layer_counts.values(), sum(layer_counts.values())], axis=1)
    p_values = rank_permutation_test(columns, is_member, permutations, seed)

    def contrast(counts: np.ndarray, topk_share: float, p: float, picks: np.ndarray) -> Membership:
        share = float(counts[is_member].sum() / counts.sum())
        expected = members / pooled.size
        theta = picks[:, 0] / picks[:, 1] - expected_without
        interval = jackknife_interval(share - expected, theta)
        return Membership(members, holdout, share, expected, topk_share, int(np.count_nonzero(counts)), p,
                          permutations, interval)

    per_layer = {
        name: contrast(layer_counts[name], topk_shares[name], p_values[i], leave_out[name])
        for i, name in enumerate(states)
    }
    units = np.array([state.units for state in states.values()], dtype=np.float64)
    overall_topk = float(np.dot(list(topk_shares.values()), units) / units.sum())
    overall = contrast(columns[:, -1], overall_topk, p_values[-1], sum(leave_out.values()))
    return Contrast(per_layer, overall, pooled, is_member, columns[:, -1], layer_counts)


def rank_permutation_test(columns: np.ndarray, is_member: np.ndarray, permutations: int, seed: int) -> list[float]:
    """One-sided p-value per column of ``columns`` (data points x tests): do the members' values
    rank higher? The statistic is the members' rank sum (mid-ranks for ties); its null
    distribution comes from ``permutations`` seeded relabellings of the data points, the same
    relabellings for every column. p = (1 + relabellings at least as extreme) / (1 + permutations).
    """
    columns = np.asarray(columns, dtype=np.float64)
    if columns.ndim == 1:
        columns = columns[:, None]
    n, tests = columns.shape
    members = int(np.count_nonzero(is_member))
    if members in (0, n) or permutations < 1:
        return [math.nan] * tests
    ranks = scipy_stats().rankdata(columns, axis=0)
    observed = ranks[is_member].sum(axis=0)
    rng = np.random.default_rng(seed)
    template = np.zeros(n)
    template[:members] = 1.0
    at_least = np.zeros(tests, dtype=np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, permutations, chunk):
        rows = min(chunk, permutations - start)
        indicators = rng.permuted(np.tile(template, (rows, 1)), axis=1)
        sums = indicators @ ranks  # (rows, tests): each relabelling's member rank sums (exact: halves)
        at_least += np.count_nonzero(sums >= observed - 1e-6, axis=0)
    return ((1 + at_least) / (1 + permutations)).tolist()


def _argmax_counts(argmax: np.ndarray, position: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(position[argmax], minlength=size)


def _expected(is_member: np.ndarray, keep: np.ndarray) -> float:
    kept = int(np.count_nonzero(keep))
    return float(np.count_nonzero(is_member & keep) / kept) if kept else math.nan
