"""Per data point rows that a stream collects batch by batch, in arrays allocated once.

During a CPU audit the heap keeps what a forward pass frees for the next pass
(``pipeline/heap.py``). Small arrays kept from every batch would land between the passes'
activations and pin those stretches of the heap, so the heap, and the audit's peak memory, would
grow with the number of batches (benchmarks/RESULTS.md, "Memory"). ``RowStore`` instead sizes its
arrays for the whole stream at the first batch and copies each batch into them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np


class RowStore:
    """Arrays of ``capacity`` rows by key, filled batch by batch: every batch brings the same keys,
    each with the same number of rows. A key's row shape and dtype are those of its first batch."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.count = 0
        self._arrays: dict[Hashable, np.ndarray] = {}

    def add(self, batch: Mapping[Hashable, np.ndarray]) -> None:
        columns = {key: np.asarray(values) for key, values in batch.items()}
        if not columns:
            return
        sizes = {len(values) for values in columns.values()}
        if len(sizes) != 1:
            raise ValueError(f"a batch's rows differ in number between keys: {sorted(sizes)}")
        n = sizes.pop()
        if self._arrays and columns.keys() != self._arrays.keys():
            raise ValueError(f"a batch brings the keys {sorted(map(str, columns))}, earlier batches "
                             f"{sorted(map(str, self._arrays))}")
        if self.count + n > self.capacity:
            raise ValueError(f"{self.count + n} rows do not fit in a store of {self.capacity}")
        for key, values in columns.items():
            if key not in self._arrays:
                self._arrays[key] = np.empty((self.capacity, *values.shape[1:]), dtype=values.dtype)
            self._arrays[key][self.count : self.count + n] = values
        self.count += n

    def arrays(self) -> dict[Hashable, np.ndarray]:
        """The rows filled so far, by key: views, not copies."""
        return {key: array[: self.count] for key, array in self._arrays.items()}

    def load(self, arrays: Mapping[Hashable, np.ndarray]) -> None:
        """Replace the rows by ``arrays`` (same number of rows each), keeping room for the capacity."""
        self._arrays, self.count = {}, 0
        self.capacity = max(self.capacity, *(len(values) for values in arrays.values()), 0)
        self.add(arrays)
