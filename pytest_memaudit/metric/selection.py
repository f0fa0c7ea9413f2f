"""Exact order statistics of float32 values spread over processes, without gathering the values.

Each process holds some rows of a (rows, units) float32 matrix. The k-th smallest value of each
unit over every process's rows is found by a radix selection on the bit patterns: float32 bits
map to int32 keys that sort as the floats do, and each round narrows every query's key range
``2**RADIX_BITS``-fold from the counts of keys below the range's inner boundaries, summed over
the processes (one all-reduce of units x queries x (2**RADIX_BITS - 1) counts). After
``32 / RADIX_BITS`` rounds the range holds one key: the exact value, whatever the split of the
rows. Locally the counts come from binary searches in each unit's sorted keys.

Queries come in targets: target 0 is every row, target g + 1 every row outside group g (the
jackknife's leave-one-group-out sets), each with its own ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

RADIX_BITS = 4  # bits of the key fixed per round: 8 rounds of 15 counts per query
# In place, over every process: op "sum" or "max". One process: nothing to do.
AllReduce = Callable[[torch.Tensor, str], None]


def this_process(tensor: torch.Tensor, op: str) -> None:
    """The all-reduce of a single process: the tensor already holds the total."""


def float_keys(values: np.ndarray) -> np.ndarray:
    """int32 keys that sort as the float32 ``values`` do (-0.0 just below +0.0); NaN excluded."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def key_floats(keys: np.ndarray) -> np.ndarray:
    """The float32 values of ``float_keys`` (the map is its own inverse)."""
    keys = np.ascontiguousarray(keys, dtype=np.int32)
    return (keys ^ ((keys >> 31) & 0x7FFFFFFF)).view(np.float32)


def grouped_order_statistics(values: np.ndarray, groups: np.ndarray, n_groups: int, ranks: np.ndarray,
                             all_reduce: AllReduce = this_process) -> np.ndarray:
    """(targets, queries, units) float32: per unit, the ``ranks[t, q]``-th smallest value (1-based)
    of target t's rows over every process: target 0 all rows, target g + 1 the rows outside group
    g. This process holds the rows ``values`` (rows, units) with their ``groups`` (rows,).

    Every process must call this with the same ``ranks`` and unit count (it runs collectives).
    A rank outside [1, rows of the target] gives a meaningless value.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    targets, queries = ranks.shape
    if targets != n_groups + 1:
        raise ValueError(f"ranks must have one row per target ({n_groups + 1}), got {targets}")
    keys = float_keys(values)
    units = keys.shape[1]
    every = _SortedColumns(keys)
    per_group = [_SortedColumns(keys[groups == g]) for g in range(n_groups)]
    steps = np.arange(1, 1 << RADIX_BITS, dtype=np.int64)
    low = np.full((units, targets, queries), -(1 << 31), dtype=np.int64)  # each range: [low, low + width)
    for done in range(RADIX_BITS, 33, RADIX_BITS):
        width = 1 << (32 - done)  # of the sub-ranges this round chooses among
        bounds = low[..., None] + width * steps  # (units, targets, queries, steps)
        below = every.count_below(bounds)
        for g, column in enumerate(per_group):
            below[:, g + 1] -= column.count_below(bounds[:, g + 1])
        counts = torch.from_numpy(below)
        all_reduce(counts, "sum")
        low += width * (counts.numpy() < ranks[None, :, :, None]).sum(axis=3)  # sub-ranges wholly below the rank
    return key_floats(low.astype(np.int32)).transpose(1, 2, 0)


class _SortedColumns:
    """Each unit's keys, sorted, in one flat array where unit u's keys are offset by u * 2**32: one
    binary search answers queries of every unit (numpy's, single-threaded: many small searches
    run faster than on a thread pool that a busy machine keeps waiting)."""

    def __init__(self, keys: np.ndarray):
        self.rows, units = keys.shape
        columns = keys.T.astype(np.int64) + (1 << 31)  # (units, rows), in [0, 2**32)
        columns.sort(axis=1)
        self.offsets = np.arange(units, dtype=np.int64) << 32
        columns += self.offsets[:, None]
        self.flat = columns.ravel()

    def count_below(self, bounds: np.ndarray) -> np.ndarray:
        """Per unit (the first axis of ``bounds``), how many of its keys are below each bound."""
        shape = (-1,) + (1,) * (bounds.ndim - 1)
        queries = bounds + (1 << 31) + self.offsets.reshape(shape)
        starts = np.arange(bounds.shape[0], dtype=np.int64) * self.rows  # where each unit's keys begin
        return np.searchsorted(self.flat, queries) - starts.reshape(shape)
