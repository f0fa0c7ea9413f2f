"""The UnitMem metric: accumulators over data points and the final per-unit values.

Input to an accumulator, one batch at a time: ``a[i, u]`` for a few data points i (the mean
over views of the mean |activation| over space of unit u), with i increasing across batches.
The spec (``shared/spec/unitmem.md``) defines, per unit u:

    mu_max[u]  = max_i a[i, u]          (argmax: the lowest index on a tie)
    mu_rest[u] = mean or median of the other N - 1 values (one maximal element set aside)
    UnitMem[u] = (mu_max - mu_rest) / (mu_max + mu_rest), 0 for a dead unit (denominator 0)

The mean reduction streams (top-k and a float64 sum per unit: memory independent of N); the
median reduction needs every value and keeps the N x units matrix, on disk past a size limit.
Accumulators live on the device the activations are on; nothing is copied to the host until
``finalize``, except the median's rows, a few MB at a time.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .errors import AuditError

REDUCTIONS = ("mean", "median")


@dataclass
class UnitMemValues:
    """Per-unit results of one layer (numpy, float64 where a value)."""

    unitmem: np.ndarray  # (units,)
    mu_max: np.ndarray  # (units,)
    mu_rest: np.ndarray  # (units,)
    max_sample: np.ndarray  # (units,) int64, index of the data point attaining mu_max
    dead: np.ndarray  # (units,) bool
    top_values: np.ndarray  # (k, units), descending
    top_samples: np.ndarray  # (k, units) int64, data point indices matching top_values


def unitmem_from(mu_max: np.ndarray, mu_rest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UnitMem and the dead-unit mask from the two per-unit statistics (float64)."""
    mu_max = np.asarray(mu_max, dtype=np.float64)
    mu_rest = np.asarray(mu_rest, dtype=np.float64)
    denominator = mu_max + mu_rest
    dead = denominator == 0
    safe = np.where(dead, 1.0, denominator)
    return np.where(dead, 0.0, (mu_max - mu_rest) / safe), dead


class _TopK:
    """The k largest values per unit and their data point indices (ties: lower index first)."""

    def __init__(self, units: int, k: int, device: torch.device):
        self.k = k
        self.values = torch.empty(0, units, dtype=torch.float32, device=device)
        self.samples = torch.empty(0, units, dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, samples: torch.Tensor) -> None:
        # Earlier rows have lower data point indices, so a stable descending sort keeps ties in
        # index order and row 0 is the lowest-index maximum.
        batch_samples = samples[:, None].expand_as(values)
        all_values = torch.cat([self.values, values])
        all_samples = torch.cat([self.samples, batch_samples])
        order = torch.sort(all_values, dim=0, descending=True, stable=True).indices[: self.k]
        if len(self.values) == self.k:  # in place: new tensors kept across passes fragment the heap
            torch.gather(all_values, 0, order, out=self.values)
            torch.gather(all_samples, 0, order, out=self.samples)
        else:
            self.values = torch.gather(all_values, 0, order)
            self.samples = torch.gather(all_samples, 0, order)


class UnitMemAccumulator:
    """Collects a[i, u] for one layer and computes UnitMem with the chosen reduction."""

    def __init__(
        self,
        units: int,
        capacity: int,
        reduce: str = "mean",
        topk: int = 10,
        device: torch.device | str = "cpu",
        memory_limit_bytes: int = 2 << 30,
        spill_dir: str | None = None,
    ):
        if reduce not in REDUCTIONS:
            raise AuditError(f"unknown reduction {reduce!r}: use one of {', '.join(REDUCTIONS)}")
        self.units = units
        self.capacity = capacity
        self.reduce = reduce
        self.count = 0
        device = torch.device(device)
        self._top = _TopK(units, max(1, topk), device)
        self._sum = torch.zeros(units, dtype=torch.float64, device=device)
        self._matrix: np.ndarray | None = None
        self._pending: list[torch.Tensor] = []  # median rows not yet copied to the matrix
        self._stored = 0  # rows copied to the matrix
        # On a GPU, rows wait there and move in blocks; on the CPU a copy buys nothing.
        self._flush_bytes = 0 if device.type == "cpu" else PENDING_BYTES
        self.spill_path: str | None = None
        if reduce == "median":
            self._matrix, self.spill_path = _allocate_matrix(
                capacity, units, memory_limit_bytes, spill_dir
            )

    def update(self, values: torch.Tensor, samples: torch.Tensor) -> None:
        """Add rows ``values`` (n, units) for data points ``samples`` (n,), increasing."""
        values = values.float()
        self._top.update(values, samples)
        self._sum += values.sum(dim=0, dtype=torch.float64)
        self.count += values.shape[0]
        if self._matrix is not None:
            self._pending.append(values)
            if (self.count - self._stored) * self.units * 4 >= self._flush_bytes:
                self._flush()

    def _flush(self) -> None:
        """Copy the pending rows to the matrix: one device-to-host copy for many batches."""
        if self._pending:
            self._matrix[self._stored : self.count] = torch.cat(self._pending).cpu().numpy()
            self._stored = self.count
            self._pending.clear()

    def finalize(self, layer: str = "layer") -> UnitMemValues:
        n = self.count
        if n < 2:
            raise AuditError(
                f"UnitMem needs at least 2 data points; {layer} saw {n}. "
                "Audit more images (--memaudit-samples, --memaudit-data)."
            )
        total = self._sum.cpu().numpy()
        top_values = self._top.values.cpu().numpy().astype(np.float64)
        top_samples = self._top.samples.cpu().numpy()
        if not np.all(np.isfinite(total)):
            bad = np.flatnonzero(~np.isfinite(total))
            raise AuditError(
                f"{layer} produced NaN or infinite activations in {bad.size} of {self.units} "
                f"units (first: unit {bad[0]}). The checkpoint's weights or the input data are "
                "broken; check the checkpoint file, or try --memaudit-precision float32."
            )
        mu_max = top_values[0]
        if self.reduce == "mean":
            mu_rest = (total - mu_max) / (n - 1)
        else:
            self._flush()
            mu_rest = _median_without_max(self._matrix[:n])
        unitmem, dead = unitmem_from(mu_max, mu_rest)
        return UnitMemValues(
            unitmem=unitmem,
            mu_max=mu_max,
            mu_rest=mu_rest,
            max_sample=top_samples[0].copy(),
            dead=dead,
            top_values=top_values,
            top_samples=top_samples,
        )

    def close(self) -> None:
        """Release the on-disk matrix, if any."""
        self._matrix = None
        self._pending.clear()
        if self.spill_path and os.path.exists(self.spill_path):
            os.unlink(self.spill_path)


# Median rows computed on a GPU wait there until this many bytes are pending, then move to the host.
PENDING_BYTES = 4 << 20


def median_matrix_bytes(samples: int, units: int) -> int:
    """Memory law of the median reduction: every a[i, u] as float32, in host memory or on disk
    (on a GPU, up to ``PENDING_BYTES`` per layer wait in device memory)."""
    return samples * units * 4


def _allocate_matrix(rows, units, limit, spill_dir) -> tuple[np.ndarray, str | None]:
    """The N x units matrix in memory, or in a temporary .npy file when over ``limit`` bytes."""
    if median_matrix_bytes(rows, units) <= limit:
        return np.empty((rows, units), dtype=np.float32), None
    fd, path = tempfile.mkstemp(prefix="memaudit-median-", suffix=".npy", dir=spill_dir)
    os.close(fd)
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, units))
    return matrix, path


def _median_without_max(matrix: np.ndarray, chunk_units: int = 1024) -> np.ndarray:
    """Median over each column after setting aside one maximal element, column chunk by chunk."""
    rest = np.empty(matrix.shape[1], dtype=np.float64)
    for start in range(0, matrix.shape[1], chunk_units):
        block = np.sort(np.asarray(matrix[:, start : start + chunk_units], dtype=np.float64), axis=0)
        rest[start : start + block.shape[1]] = np.median(block[:-1], axis=0)
    return rest
