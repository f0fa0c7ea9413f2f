"""The UnitMem metric over a stream of labelled data points, from state that can be merged.

Input, one batch at a time: ``a[i, u]`` for a few data points i (the mean over views of the
mean |activation| over space of unit u), each data point with a label (member, held-out,
planted) and a group (a hash of its id, for error bars). Per unit u and a set of data points
(by label):

    mu_max[u]  = max_i a[i, u]          (argmax: on a tie, a fair pick among the tied, see tie_order)
    mu_rest[u] = mean or median of the other n - 1 values (one maximal element set aside)
    UnitMem[u] = (mu_max - mu_rest) / (mu_max + mu_rest), 0 for a dead unit (denominator 0)

``LayerState`` keeps, per label and group, the count, a float64 sum, the maximum and its index,
and per label the top-k values with their indices: memory independent of N. The median needs
every value, so with ``keep_values`` a ``ValueStore`` keeps the N x units matrix (on disk past a
size limit). A state's ``state_dict()``/``load_state_dict()`` save and restore it, and
``merge()`` adds another state's data points: error bars (leave one group out), resume and
several processes all rest on these three.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AuditError
from .selection import AllReduce, grouped_order_statistics, this_process

REDUCTIONS = ("mean", "median")
LABELS = ("member", "holdout", "planted")  # a data point's role; its code is the position here
MEMBER, HOLDOUT, PLANTED = range(len(LABELS))
DEFAULT_GROUPS = 10
NO_INDEX = torch.iinfo(torch.int64).max  # the index of a top-k slot no data point filled yet
INDEX_BITS = 32  # data point indices are below 2^32; tie_order packs a 31-bit key above them
_MASK62 = (1 << 62) - 1
# Median rows computed on a GPU wait there until this many bytes are pending, then move to the host.
PENDING_BYTES = 4 << 20
# The median's selection reads units a chunk at a time: about this many bytes per chunk, at
# SELECTION_BYTES_PER_VALUE per stored value (the float32 value, its int32 key, two int64 sorted copies).
SELECTION_CHUNK_BYTES = 1 << 30
SELECTION_BYTES_PER_VALUE = 24


@dataclass
class UnitMemValues:
    """Per-unit results of one layer over one set of data points (numpy, float64 where a value)."""

    unitmem: np.ndarray  # (units,)
    mu_max: np.ndarray  # (units,)
    mu_rest: np.ndarray  # (units,)
    max_sample: np.ndarray  # (units,) int64, index of the data point attaining mu_max
    dead: np.ndarray  # (units,) bool
    top_values: np.ndarray  # (k, units), descending
    top_samples: np.ndarray  # (k, units) int64, data point indices matching top_values


@dataclass
class Extremes:
    """Count, sum, maximum and argmax per unit of a set of data points."""

    count: int
    total: np.ndarray  # (units,) float64
    maximum: np.ndarray  # (units,) float64
    argmax: np.ndarray  # (units,) int64


def unitmem_from(mu_max: np.ndarray, mu_rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UnitMem and the dead-unit mask from the two per-unit statistics (float64)."""
    mu_max = np.asarray(mu_max, dtype=np.float64)
    mu_rest = np.asarray(mu_rest, dtype=np.float64)
    denominator = mu_max + mu_rest
    dead = denominator == 0
    safe = np.where(dead, 1.0, denominator)
    return np.where(dead, 0.0, (mu_max - mu_rest) / safe), dead


def tie_order(index: torch.Tensor) -> torch.Tensor:
    """Where values tie for a maximum, the data point that wins is the one with the lowest
    ``tie_order``: a 31-bit hash of its index (high bits) and the index itself (low bits, for the
    rare equal hashes). The hash orders data points in a fixed pseudo-random way that knows
    nothing of labels, so a tie goes to a member only as often as members are among the tied:
    the lowest index would give every tie to the members, who come first. Packed into one int64,
    the order reduces with a plain minimum (streaming, merging, all-reduce); ``NO_INDEX`` stays
    above every order. ``index_of`` undoes it."""
    index = index.to(torch.int64)
    x = (index + 0x2545F4914F6CDD1D) & _MASK62  # splitmix-style mixing, modulo 2^62
    x = (x ^ (x >> 30)) * 0x3F58476D1CE4E5B9 & _MASK62
    x = (x ^ (x >> 27)) * 0x14D049BB133111EB & _MASK62
    x = (x ^ (x >> 31)) >> 31  # the top 31 bits of 62
    return torch.where(index == NO_INDEX, NO_INDEX, (x << INDEX_BITS) | index)


def index_of(order: torch.Tensor) -> torch.Tensor:
    """The data point index of a ``tie_order`` value (``NO_INDEX`` stays)."""
    return torch.where(order == NO_INDEX, NO_INDEX, order & ((1 << INDEX_BITS) - 1))


def median_matrix_bytes(samples: int, units: int) -> int:
    """Memory law of the median reduction: every a[i, u] as float32, in host memory or on disk
    (on a GPU, up to ``PENDING_BYTES`` per layer wait in device memory). With several processes,
    each keeps only its own data points' rows: ``samples`` is the process's share. Computing
    the medians adds about ``SELECTION_BYTES_PER_VALUE`` x rows x units-per-chunk bytes for a
    while, at most about ``SELECTION_CHUNK_BYTES``."""
    return samples * units * 4


class LayerState:
    """Streaming, mergeable state of one layer (``units`` units) for one audited model.

    ``update`` adds a batch; ``extremes``, ``top`` and ``unitmem`` read any set of labels, with
    one group left out or none. ``state_dict``/``load_state_dict``/``merge`` as torchmetrics'
    ``Metric`` has them. Tensors live on ``device``; only reads copy to the host.
    """

    def __init__(
        self,
        units: int,
        *,
        groups: int = DEFAULT_GROUPS,
        topk: int = 10,
        device: torch.device | str = "cpu",
        keep_values: bool = False,
        capacity: int = 0,
        memory_limit_bytes: int = 2 << 30,
        spill_dir: str | None = None,
    ):
        device = torch.device(device)
        self.units, self.groups, self.topk = units, groups, max(1, topk)
        labels = len(LABELS)
        self.counts = torch.zeros(labels, groups, dtype=torch.int64, device=device)
        self.sums = torch.zeros(labels, groups, units, dtype=torch.float64, device=device)
        self.maxima = torch.full((labels, groups, units), -torch.inf, dtype=torch.float32, device=device)
        self.argmax = torch.full((labels, groups, units), NO_INDEX, dtype=torch.int64, device=device)
        self.top_values = torch.full((labels, self.topk, units), -torch.inf, dtype=torch.float32, device=device)
        self.top_index = torch.full((labels, self.topk, units), NO_INDEX, dtype=torch.int64, device=device)
        self.values = ValueStore(units, capacity, device, memory_limit_bytes, spill_dir) if keep_values else None

    # --- adding data points ------------------------------------------------------------------

    def update(self, values: torch.Tensor, index: torch.Tensor, label: torch.Tensor, group: torch.Tensor) -> None:
        """Add rows ``values`` (n, units) of data points ``index`` (n,) with their ``label`` and
        ``group`` codes (n,). Within a label, indices must increase from call to call (the stream's
        order); ``merge`` has no such rule."""
        values = values.float()
        n = values.shape[0]
        if n == 0:
            return
        slots = label * self.groups + group  # (n,) position in the flattened (label, group) grid
        flat_counts = self.counts.view(-1)
        flat_counts.index_add_(0, slots, torch.ones_like(slots))
        self.sums.view(-1, self.units).index_add_(0, slots, values.double())
        expanded = slots[:, None].expand(n, self.units)
        batch_max = torch.full_like(self.maxima.view(-1, self.units), -torch.inf)
        batch_max.scatter_reduce_(0, expanded, values, "amax")
        candidates = torch.where(values == batch_max[slots], tie_order(index)[:, None], NO_INDEX)
        batch_arg = torch.full_like(self.argmax.view(-1, self.units), NO_INDEX)
        batch_arg.scatter_reduce_(0, expanded, candidates, "amin")
        batch_arg = index_of(batch_arg)
        _merge_max(self.maxima.view(-1, self.units), self.argmax.view(-1, self.units), batch_max, batch_arg)
        for code in torch.unique(label).tolist():
            rows = label == code
            _append_top(self.top_values[code], self.top_index[code], values[rows], index[rows])
        if self.values is not None:
            self.values.append(values, index, label, group)

    def merge(self, other: LayerState) -> None:
        """Add the data points of ``other`` (disjoint from this state's) to this state."""
        self._check_compatible(other.units, other.groups, other.topk, other.values is not None)
        self.counts += other.counts.to(self.counts.device)
        self.sums += other.sums.to(self.sums.device)
        _merge_max(self.maxima, self.argmax, other.maxima.to(self.maxima.device), other.argmax.to(self.argmax.device))
        for code in range(len(LABELS)):
            merge_top(self.top_values[code], self.top_index[code],
                       other.top_values[code].to(self.top_values.device), other.top_index[code].to(self.top_index.device))
        if self.values is not None:
            self.values.extend(other.values)

    # --- saving and loading --------------------------------------------------------------------

    STATE_KEYS = ("counts", "sums", "maxima", "argmax", "top_values", "top_index")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of every tensor of the state (and the stored values, if any)."""
        state = {key: getattr(self, key).detach().cpu().clone() for key in self.STATE_KEYS}
        if self.values is not None:
            state.update({f"values.{key}": tensor for key, tensor in self.values.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this state by ``state`` (from ``state_dict``); shapes must match."""
        for key in self.STATE_KEYS:
            current = getattr(self, key)
            given = state.get(key)
            if given is None or tuple(given.shape) != tuple(current.shape) or given.dtype != current.dtype:
                found = "missing" if given is None else f"{tuple(given.shape)} {given.dtype}"
                raise AuditError(
                    f"saved layer state does not fit: {key} is {found}, expected {tuple(current.shape)} "
                    f"{current.dtype}. It was saved by another version or with other settings."
                )
            current.copy_(given)
        stored = {key.removeprefix("values."): v for key, v in state.items() if key.startswith("values.")}
        if (self.values is None) != (not stored):
            raise AuditError("saved layer state and settings disagree on keeping every value (the median reduction)")
        if self.values is not None:
            self.values.load_state_dict(stored)

    def _check_compatible(self, units: int, groups: int, topk: int, keeps_values: bool) -> None:
        mine = (self.units, self.groups, self.topk, self.values is not None)
        if mine != (units, groups, topk, keeps_values):
            raise AuditError(f"cannot merge layer states of different shape: {mine} and {(units, groups, topk, keeps_values)}")

    # --- reading -------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def extremes(self, labels: Sequence[int], exclude_group: int | None = None) -> Extremes:
        """Count, sum, maximum and argmax of the data points with these labels (minus a group)."""
        groups = [g for g in range(self.groups) if g != exclude_group]
        labels = list(labels)
        counts = self.counts[labels][:, groups]
        maxima = self.maxima[labels][:, groups].reshape(-1, self.units)
        argmax = self.argmax[labels][:, groups].reshape(-1, self.units)
        maximum = maxima.max(dim=0).values
        best = index_of(torch.where(maxima == maximum, tie_order(argmax), NO_INDEX).min(dim=0).values)
        return Extremes(
            count=int(counts.sum()),
            total=self.sums[labels][:, groups].sum(dim=(0, 1)).cpu().numpy(),
            maximum=maximum.double().cpu().numpy(),
            argmax=best.cpu().numpy(),
        )

    def top(self, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The top-k values (float64) and data point indices of these labels, (k', units) each,
        descending, ties to the lower index; k' = min(k, data points)."""
        labels = list(labels)
        values = self.top_values[labels[0]].clone()
        index = self.top_index[labels[0]].clone()
        for code in labels[1:]:
            merge_top(values, index, self.top_values[code], self.top_index[code])
        filled = min(self.topk, int(self.counts[labels].sum()))
        return values[:filled].double().cpu().numpy(), index[:filled].cpu().numpy()

    def unitmem(self, labels: Sequence[int], reduce: str, layer: str = "layer") -> tuple[UnitMemValues, np.ndarray]:
        """UnitMem of every unit over the data points with ``labels``, and the same with each
        group left out in turn: (values, leave_one_out (groups, units), NaN rows for groups that
        hold none of these data points or leave fewer than 2)."""
        if reduce not in REDUCTIONS:
            raise AuditError(f"unknown reduction {reduce!r}: use one of {', '.join(REDUCTIONS)}")
        full = self.extremes(labels)
        if full.count < 2:
            raise AuditError(
                f"UnitMem needs at least 2 data points; {layer} saw {full.count}. "
                "Audit more images (--memaudit-samples, --memaudit-data)."
            )
        _check_finite(full.total, layer, self.units)
        group_counts = self.counts[list(labels)].sum(dim=0).cpu().numpy()
        if reduce == "median":
            if self.values is None:
                raise AuditError("the median reduction needs a layer state that keeps every value")
            rests = self.values.rest_medians(labels, self.groups)
        leave_out = np.full((self.groups, self.units), np.nan)
        for g in range(self.groups):
            if group_counts[g] == 0 or full.count - group_counts[g] < 2:
                continue
            part = self.extremes(labels, exclude_group=g)
            rest = rests[g + 1] if reduce == "median" else (part.total - part.maximum) / (part.count - 1)
            leave_out[g] = unitmem_from(part.maximum, rest)[0]
        mu_rest = rests[0] if reduce == "median" else (full.total - full.maximum) / (full.count - 1)
        unitmem, dead = unitmem_from(full.maximum, mu_rest)
        top_values, top_samples = self.top(labels)
        values = UnitMemValues(unitmem, full.maximum, mu_rest, full.argmax.copy(), dead, top_values, top_samples)
        return values, leave_out

    def reindex(self, new_index: np.ndarray) -> None:
        """Rename data point i to ``new_index[i]`` wherever an index is kept. ``new_index`` must
        increase with i, so that top-k ties still go to the lowest index. (Ties for the maximum
        decided so far stay decided; later ones follow the new indices' ``tie_order``: either way
        a pick that ignores labels.)"""
        table = torch.as_tensor(np.asarray(new_index, dtype=np.int64), device=self.argmax.device)
        for tensor in (self.argmax, self.top_index):
            filled = tensor != NO_INDEX
            tensor.copy_(torch.where(filled, table[torch.where(filled, tensor, 0)], tensor))
        if self.values is not None:
            self.values.reindex(new_index)

    def close(self) -> None:
        """Release the stored values (a temporary file's disk space, if any)."""
        if self.values is not None:
            self.values.close()


class ValueStore:
    """Every a[i, u] of one layer with its data point's index, label and group: what the exact
    median needs. In host memory, or in a temporary .npy file past ``memory_limit_bytes``."""

    def __init__(self, units: int, capacity: int, device: torch.device, memory_limit_bytes: int,
                 spill_dir: str | None):
        self.units, self.capacity = units, capacity
        self.count = 0  # rows appended
        self.stored = 0  # rows copied to the matrix
        self.spill_dir: str | None = None  # where the matrix takes disk space, when it does
        self.matrix = self._allocate(capacity, memory_limit_bytes, spill_dir)
        self.index = np.empty(capacity, dtype=np.int64)
        self.label = np.empty(capacity, dtype=np.int8)
        self.group = np.empty(capacity, dtype=np.int16)
        self._pending: list[torch.Tensor] = []
        # Set when the rows are one process's share of a set spread over processes (after a
        # collective merge): medians are then over every process's rows.
        self.all_reduce: AllReduce | None = None
        # On a GPU, rows wait there and move in blocks; on the CPU a copy buys nothing.
        self._flush_bytes = 0 if torch.device(device).type == "cpu" else PENDING_BYTES

    def _allocate(self, rows: int, limit: int, spill_dir: str | None) -> np.ndarray:
        if median_matrix_bytes(rows, self.units) <= limit:
            return np.empty((rows, self.units), dtype=np.float32)
        # A file without a name (O_TMPFILE, or removed as soon as made): the mapping keeps the data, and
        # nothing is left on disk however the process ends (kill -9 too).
        self.spill_dir = spill_dir or tempfile.gettempdir()
        with tempfile.TemporaryFile(prefix="memaudit-median-", dir=self.spill_dir) as spill:
            return np.memmap(spill, dtype=np.float32, mode="w+", shape=(rows, self.units))

    def append(self, values: torch.Tensor, index: torch.Tensor, label: torch.Tensor, group: torch.Tensor) -> None:
        n = values.shape[0]
        if self.count + n > self.capacity:
            raise AuditError(f"more data points than the {self.capacity} the median's matrix was sized for")
        rows = slice(self.count, self.count + n)
        self.index[rows] = index.cpu().numpy()
        self.label[rows] = label.cpu().numpy()
        self.group[rows] = group.cpu().numpy()
        self._pending.append(values)
        self.count += n
        if (self.count - self.stored) * self.units * 4 >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Copy the pending rows to the matrix: one device-to-host copy for many batches."""
        if self._pending:
            rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)  # one: no copy to make
            self.matrix[self.stored : self.count] = rows.cpu().numpy()
            self.stored = self.count
            self._pending.clear()

    def extend(self, other: ValueStore) -> None:
        other.flush()
        n = other.count
        self.append(torch.from_numpy(np.asarray(other.matrix[:n])), torch.from_numpy(other.index[:n]),
                    torch.from_numpy(other.label[:n]), torch.from_numpy(other.group[:n]))
        self.flush()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored rows; the matrix is a view, not a copy (rows are only ever appended, so the
        view never changes, and a matrix on disk is not read into memory to be saved)."""
        self.flush()
        n = self.count
        return {
            "matrix": torch.from_numpy(self.matrix[:n]),
            "index": torch.from_numpy(self.index[:n].copy()),
            "label": torch.from_numpy(self.label[:n].copy()),
            "group": torch.from_numpy(self.group[:n].copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.count = self.stored = 0
        self._pending.clear()
        self.append(state["matrix"], state["index"], state["label"], state["group"])
        self.flush()

    def rest_medians(self, labels: Sequence[int], groups: int, chunk_bytes: int = SELECTION_CHUNK_BYTES) -> np.ndarray:
        """(groups + 1, units): row 0 the median of each unit's values over ``labels`` after
        setting one maximal value aside; row g + 1 the same with group g left out (NaN where
        fewer than 2 values remain). Over every process's rows when ``all_reduce`` is set.

        Setting the maximum aside leaves the order statistics below it as they were, so the
        median of the other n - 1 values is the mean of the order statistics floor(n/2) and
        ceil(n/2) (1-based) of all n: an exact selection of two ranks per target
        (``selection.grouped_order_statistics``), units a chunk at a time.
        """
        self.flush()
        reduce = self.all_reduce or this_process
        rows = np.flatnonzero(np.isin(self.label[: self.count], list(labels)))
        row_groups = self.group[rows]
        sizes = torch.from_numpy(np.bincount(row_groups, minlength=groups).astype(np.int64))
        most = torch.tensor([rows.size], dtype=torch.int64)
        reduce(sizes, "sum")
        reduce(most, "max")
        kept = np.concatenate([[int(sizes.sum())], int(sizes.sum()) - sizes.numpy()])  # values per target
        valid = kept >= 2
        ranks = np.where(valid[:, None], np.stack([kept // 2, (kept + 1) // 2], axis=1), 1)
        chunk = max(1, chunk_bytes // (SELECTION_BYTES_PER_VALUE * max(1, int(most))))
        result = np.full((groups + 1, self.units), np.nan)
        for start in range(0, self.units, chunk):
            block = np.asarray(self.matrix[rows, start : start + chunk], dtype=np.float32)
            pair = grouped_order_statistics(block, row_groups, groups, ranks, reduce).astype(np.float64)
            result[:, start : start + block.shape[1]] = (pair[:, 0] + pair[:, 1]) / 2
        result[~valid] = np.nan
        return result

    def reindex(self, new_index: np.ndarray) -> None:
        """Rename each stored data point i to ``new_index[i]``."""
        self.flush()
        self.index[: self.count] = np.asarray(new_index)[self.index[: self.count]]

    def close(self) -> None:
        """Release the matrix (a spilled one's disk space is freed once it is unmapped)."""
        self.matrix = None
        self._pending.clear()


def _check_finite(total: np.ndarray, layer: str, units: int) -> None:
    if not np.all(np.isfinite(total)):
        bad = np.flatnonzero(~np.isfinite(total))
        raise AuditError(
            f"{layer} produced NaN or infinite activations in {bad.size} of {units} "
            f"units (first: unit {bad[0]}). The checkpoint's weights or the input data are "
            "broken; check the checkpoint file, or try --memaudit-precision float32."
        )


def _merge_max(maxima: torch.Tensor, argmax: torch.Tensor, other_max: torch.Tensor, other_arg: torch.Tensor) -> None:
    """In place: the larger of two maxima, the lower ``tie_order`` on a tie."""
    better = (other_max > maxima) | ((other_max == maxima) & (tie_order(other_arg) < tie_order(argmax)))
    maxima.copy_(torch.where(better, other_max, maxima))
    argmax.copy_(torch.where(better, other_arg, argmax))


def _append_top(values: torch.Tensor, index: torch.Tensor, new_values: torch.Tensor, new_index: torch.Tensor) -> None:
    """In place: the k largest of the kept and new rows per unit. The new rows' indices are all
    higher than the kept ones', so a stable sort with the kept rows first breaks ties by index."""
    all_values = torch.cat([values, new_values])
    all_index = torch.cat([index, new_index[:, None].expand_as(new_values)])
    order = torch.sort(all_values, dim=0, descending=True, stable=True).indices[: values.shape[0]]
    torch.gather(all_values, 0, order, out=values)  # in place: new tensors kept across passes fragment the heap
    torch.gather(all_index, 0, order, out=index)


def merge_top(values: torch.Tensor, index: torch.Tensor, other_values: torch.Tensor, other_index: torch.Tensor) -> None:
    """In place: the k largest of two top-k lists per unit, ties to the lower index."""
    all_values = torch.cat([values, other_values])
    all_index = torch.cat([index, other_index])
    by_index = torch.argsort(all_index, dim=0, stable=True)
    all_values, all_index = all_values.gather(0, by_index), all_index.gather(0, by_index)
    order = torch.argsort(all_values, dim=0, descending=True, stable=True)[: values.shape[0]]
    values.copy_(all_values.gather(0, order))
    index.copy_(all_index.gather(0, order))
