"""``AuditResult``: the one source of truth for every figure, and its JSON form."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .gates import GateOutcome
from .stats import LayerStats, depth_correlation
from .unitmem import UnitMemValues

SCHEMA_VERSION = 1


@dataclass
class LayerResult:
    name: str  # display name, as the seed report writes it
    module: str  # module path, as named_modules() writes it
    values: UnitMemValues
    stats: LayerStats
    thresholds: dict[str, float | None] | None = None
    outcome: GateOutcome | None = None
    control_mean: float | None = None  # the same layer's mean UnitMem with random weights

    @property
    def channels(self) -> int:
        return int(self.values.unitmem.size)

    def to_json(self) -> dict[str, Any]:
        entry = {
            "name": self.name,
            "module": self.module,
            "channels": self.channels,
            "unitmem": _floats(self.values.unitmem),
            "max_sample": self.values.max_sample.tolist(),
            "mu_max": _floats(self.values.mu_max),
            "mu_rest": _floats(self.values.mu_rest),
            "dead": np.flatnonzero(self.values.dead).tolist(),
            "top_samples": self.values.top_samples.tolist(),
            "top_values": [_floats(row) for row in self.values.top_values],
            **{key: _number(value) for key, value in self.stats.as_dict().items()},
            "control_mean_unitmem": _number(self.control_mean),
            "thresholds": self.thresholds,
            "outcome": None if self.outcome is None else ("passed" if self.outcome.passed else "failed"),
            "checks": None
            if self.outcome is None
            else [
                {"key": c.key, "figure": c.figure, "value": _number(c.value), "limit": c.limit, "passed": c.passed}
                for c in self.outcome.checks
            ],
        }
        return entry


@dataclass
class AuditResult:
    model: str
    settings: dict[str, Any]  # resolved run settings (device, image size, batch size, ...)
    data_source: str
    samples: list[str]  # data point i's id: path relative to the data root, or builtin/NNNN
    layers: list[LayerResult]
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable images
    checkpoint: dict[str, Any] | None = None  # path, sha256, bytes
    timing: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings the user should see in the report
    canaries: list[str] = field(default_factory=list)  # sample ids planted to be memorized
    control: "AuditResult | None" = None

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if name in (layer.name, layer.module):
                return layer
        raise KeyError(name)

    @property
    def units(self) -> int:
        return sum(layer.channels for layer in self.layers)

    def data_point_ranking(self) -> list[tuple[str, int]]:
        """Data points by how many units pick them as their maximum, most first (ties: by index).

        The seed's "most memorized images": a data point that many units single out is one the
        encoder has specialized units for.
        """
        counts = np.zeros(len(self.samples), dtype=np.int64)
        for layer in self.layers:
            counts += np.bincount(layer.values.max_sample, minlength=len(self.samples))
        order = np.argsort(-counts, kind="stable")
        return [(self.samples[i], int(counts[i])) for i in order]

    def canary_ranks(self) -> dict[str, int]:
        """1-based rank of each canary in ``data_point_ranking`` (1 = picked by the most units)."""
        ranking = [sample for sample, _ in self.data_point_ranking()]
        return {canary: ranking.index(canary) + 1 for canary in self.canaries}

    def depth_correlation(self) -> tuple[float, float]:
        return depth_correlation([layer.stats.mean_unitmem for layer in self.layers])

    def to_json(self) -> dict[str, Any]:
        rho, p = self.depth_correlation()
        all_values = np.concatenate([layer.values.unitmem for layer in self.layers]) if self.layers else np.zeros(0)
        outcomes = [layer.outcome for layer in self.layers if layer.outcome is not None]
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "reduce": self.settings.get("reduce"),
            "settings": self.settings,
            "checkpoint": self.checkpoint,
            "data_source": self.data_source,
            "samples": self.samples,
            "skipped": self.skipped,
            "summary": {
                "units": int(all_values.size),
                "mean_unitmem": _number(float(all_values.mean())) if all_values.size else None,
                "depth_spearman_rho": _number(rho),
                "depth_spearman_p": _number(p),
                "layers_passed": sum(o.passed for o in outcomes),
                "layers_failed": sum(not o.passed for o in outcomes),
            },
            "timing": self.timing,
            "environment": self.environment,
            "notes": self.notes,
            "canaries": [{"id": c, "rank": r} for c, r in self.canary_ranks().items()],
            "data_point_ranking": [{"id": s, "units": n} for s, n in self.data_point_ranking()[:50]],
            "layers": [layer.to_json() for layer in self.layers],
            "control": None if self.control is None else self.control.to_json(),
        }


def write_json_atomic(path: str | Path, document: Any) -> Path:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1, allow_nan=False)
    write_text_atomic(path, text)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide reports and JSON from other readers (CI artifacts)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _number(value: float | None) -> float | None:
    """JSON has no NaN: undefined figures are written as null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value)


def _floats(array: np.ndarray) -> list[float | None]:
    return [_number(float(v)) for v in np.asarray(array, dtype=np.float64)]
