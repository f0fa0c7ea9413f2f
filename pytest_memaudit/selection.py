"""Exact order statistics of float32 values spread over processes, without gathering the values.

Each process holds some rows of a (rows, units) float32 matrix. The k-th smallest value of each
unit over every process's rows is found by a radix selection on the bit patterns: float32 bits
map to int32 keys that sort as the floats do, and each round narrows every query's key range
``2**RADIX_BITS``-fold from the counts of keys below the range's inner boundaries, summed over
the processes (one all-reduce of units x queries x (2**RADIX_BITS - 1) int32 counts). After
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
    ranks = np.asarray(ranks)
    targets, queries = ranks.shape
    if targets != n_groups + 1:
        raise ValueError(f"ranks must have one row per target ({n_groups + 1}), got {targets}")
    keys = float_keys(values)
    units = keys.shape[1]
    every = _sorted_columns(keys)
    per_group = [_sorted_columns(keys[groups == g]) for g in range(n_groups)]
    wanted = torch.from_numpy(ranks.astype(np.int32))[None, :, :, None]
    steps = torch.arange(1, 1 << RADIX_BITS, dtype=torch.int64)
    low = torch.full((units, targets, queries), -(1 << 31), dtype=torch.int64)  # each range: [low, low + width)
    for done in range(RADIX_BITS, 33, RADIX_BITS):
        width = 1 << (32 - done)  # of the sub-ranges this round chooses among
        bounds = (low[..., None] + width * steps).to(torch.int32)  # (units, targets, queries, steps), <= 2**31 - 1
        below = torch.searchsorted(every, bounds.view(units, -1), out_int32=True).view(bounds.shape)
        for g, column in enumerate(per_group):
            below[:, g + 1] -= torch.searchsorted(column, bounds[:, g + 1].reshape(units, -1).contiguous(),
                                                  out_int32=True).view(units, queries, -1)
        all_reduce(below, "sum")
        low += width * (below < wanted).sum(dim=3)  # sub-ranges wholly below the wanted rank
    return key_floats(low.to(torch.int32).numpy()).transpose(1, 2, 0)


def _sorted_columns(keys: np.ndarray) -> torch.Tensor:
    """(units, rows) int32: each unit's keys, sorted."""
    columns = np.ascontiguousarray(keys.T)
    columns.sort(axis=1)
    return torch.from_numpy(columns)
