"""``AuditResult``: the one source of truth for every figure, and its JSON form (both ways)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .gates import Check, Gate, GateOutcome, as_json
from .membership import Membership
from .planted import PlantedResult, PlantedUnit, PlantedUnitResult
from .stats import Interval, LayerStats, depth_correlation
from .unitmem import UnitMemValues

SCHEMA_VERSION = 2


@dataclass
class LayerResult:
    name: str  # display name, as the seed report writes it
    module: str  # module path, as named_modules() writes it
    values: UnitMemValues
    stats: LayerStats
    intervals: dict[str, Interval] = field(default_factory=dict)  # jackknife, by figure
    membership: Membership | None = None  # members against held-out images
    control_mean: float | None = None  # the same layer's mean UnitMem with random weights
    control_excess: Interval | None = None  # mean UnitMem minus control_mean, paired jackknife
    thresholds: dict[str, Gate | float] | None = None
    outcome: GateOutcome | None = None

    @property
    def channels(self) -> int:
        return int(self.values.unitmem.size)


@dataclass
class SubjectResult:
    """Another model audited in the same pass: the random-weights or the planted control."""

    role: str
    description: str
    layers: list[LayerResult]
    membership: Membership | None = None

    def layer(self, name: str) -> LayerResult:
        return _find_layer(self.layers, name)


@dataclass
class AuditResult:
    model: str
    settings: dict[str, Any]  # resolved run settings (device, image size, batch size, ...)
    data_source: str
    samples: list[str]  # data point i's id: path relative to the data root, builtin/NNNN, holdout:...
    layers: list[LayerResult]
    labels: list[str] = field(default_factory=list)  # data point i's label: member, holdout, planted
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable images
    checkpoint: dict[str, Any] | None = None  # path, sha256, bytes
    timing: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings the user should see in the report
    canaries: list[str] = field(default_factory=list)  # sample ids planted to be memorized
    holdout_source: str | None = None
    membership: Membership | None = None  # over all layers
    argmax_counts: list[int] | None = None  # per data point: units (all layers) whose pooled argmax it is
    control: SubjectResult | None = None
    planted: PlantedResult | None = None
    # the processes that computed it: world_size, backend (None for one process), shards (data points per process)
    distributed: dict[str, Any] | None = None

    def layer(self, name: str) -> LayerResult:
        return _find_layer(self.layers, name)

    @property
    def units(self) -> int:
        return sum(layer.channels for layer in self.layers)

    @property
    def members(self) -> int:
        """Data points UnitMem is computed over (all of them when there is no held-out set)."""
        return sum(label == "member" for label in self.labels) if self.labels else len(self.samples)

    def count(self, label: str) -> int:
        return sum(item == label for item in self.labels)

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
            "holdout_source": self.holdout_source,
            "samples": self.samples,
            "labels": self.labels,
            "sizes": {label: self.count(label) for label in ("member", "holdout", "planted")} if self.labels
            else {"member": len(self.samples), "holdout": 0, "planted": 0},
            "skipped": self.skipped,
            "summary": {
                "units": int(all_values.size),
                "mean_unitmem": _number(float(all_values.mean())) if all_values.size else None,
                "depth_spearman_rho": _number(rho),
                "depth_spearman_p": _number(p),
                "layers_passed": sum(o.status == "passed" for o in outcomes),
                "layers_warned": sum(o.status == "warned" for o in outcomes),
                "layers_failed": sum(o.status == "failed" for o in outcomes),
                "layers_not_gated": len(self.layers) - sum(o.status != "not gated" for o in outcomes),
                "membership": _membership_json(self.membership),
            },
            "timing": self.timing,
            "distributed": self.distributed,
            "environment": self.environment,
            "notes": self.notes,
            "canaries": [{"id": c, "rank": r} for c, r in self.canary_ranks().items()],
            "data_point_ranking": [{"id": s, "units": n} for s, n in self.data_point_ranking()[:50]],
            "argmax_counts": self.argmax_counts,
            "layers": [_layer_json(layer) for layer in self.layers],
            "control": None if self.control is None else _subject_json(self.control),
            "planted": _planted_json(self.planted, self.samples),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditResult:
        """The result a ``to_json`` document describes (the same figures, outcomes included)."""
        samples = data["samples"]
        return cls(
            model=data["model"],
            settings=data["settings"],
            data_source=data["data_source"],
            samples=samples,
            layers=[_layer_from_json(entry) for entry in data["layers"]],
            labels=data.get("labels") or [],
            skipped=data.get("skipped") or [],
            checkpoint=data.get("checkpoint"),
            timing=data.get("timing") or {},
            environment=data.get("environment") or {},
            notes=data.get("notes") or [],
            canaries=[entry["id"] for entry in data.get("canaries") or []],
            holdout_source=data.get("holdout_source"),
            membership=_membership_from_json(data["summary"].get("membership")),
            argmax_counts=data.get("argmax_counts"),
            control=None if data.get("control") is None else _subject_from_json(data["control"]),
            planted=_planted_from_json(data.get("planted"), samples),
            distributed=data.get("distributed"),
        )


def _find_layer(layers: list[LayerResult], name: str) -> LayerResult:
    for layer in layers:
        if name in (layer.name, layer.module):
            return layer
    raise KeyError(name)


# --- JSON of the parts ----------------------------------------------------------------------


def _layer_json(layer: LayerResult) -> dict[str, Any]:
    outcome = layer.outcome
    return {
        "name": layer.name,
        "module": layer.module,
        "channels": layer.channels,
        "unitmem": _floats(layer.values.unitmem),
        "max_sample": layer.values.max_sample.tolist(),
        "mu_max": _floats(layer.values.mu_max),
        "mu_rest": _floats(layer.values.mu_rest),
        "dead": np.flatnonzero(layer.values.dead).tolist(),
        "top_samples": layer.values.top_samples.tolist(),
        "top_values": [_floats(row) for row in layer.values.top_values],
        **{key: _number(value) for key, value in layer.stats.as_dict().items()},
        "intervals": {name: _interval_json(interval) for name, interval in layer.intervals.items()},
        "membership": _membership_json(layer.membership),
        "control_mean_unitmem": _number(layer.control_mean),
        "excess_over_control": _interval_json(layer.control_excess),
        "thresholds": None if layer.thresholds is None else as_json(layer.thresholds),
        "outcome": None if outcome is None else outcome.status,
        "checks": None if outcome is None else [_check_json(check) for check in outcome.checks],
    }


def _layer_from_json(entry: dict[str, Any]) -> LayerResult:
    unitmem = _array(entry["unitmem"])
    dead = np.zeros(unitmem.size, dtype=bool)
    dead[entry["dead"]] = True
    values = UnitMemValues(
        unitmem=unitmem,
        mu_max=_array(entry["mu_max"]),
        mu_rest=_array(entry["mu_rest"]),
        max_sample=np.asarray(entry["max_sample"], dtype=np.int64),
        dead=dead,
        top_values=np.array([_array(row) for row in entry["top_values"]]).reshape(-1, unitmem.size),
        top_samples=np.asarray(entry["top_samples"], dtype=np.int64).reshape(-1, unitmem.size),
    )
    stats = LayerStats(**{f.name: _float(entry[f.name]) if f.type != "int" else entry[f.name]
                          for f in fields(LayerStats)})
    thresholds = entry.get("thresholds")
    layer = LayerResult(
        name=entry["name"],
        module=entry["module"],
        values=values,
        stats=stats,
        intervals={name: _interval_from_json(item) for name, item in (entry.get("intervals") or {}).items()},
        membership=_membership_from_json(entry.get("membership")),
        control_mean=None if entry.get("control_mean_unitmem") is None else float(entry["control_mean_unitmem"]),
        control_excess=_interval_from_json(entry.get("excess_over_control")),
        thresholds=None if thresholds is None else {
            key: Gate(**value) if isinstance(value, dict) else value for key, value in thresholds.items()
        },
    )
    if entry.get("checks") is not None:
        layer.outcome = GateOutcome(layer.name, tuple(_check_from_json(item) for item in entry["checks"]))
    return layer


def _subject_json(subject: SubjectResult) -> dict[str, Any]:
    return {
        "role": subject.role,
        "description": subject.description,
        "membership": _membership_json(subject.membership),
        "layers": [_layer_json(layer) for layer in subject.layers],
    }


def _subject_from_json(data: dict[str, Any]) -> SubjectResult:
    return SubjectResult(data["role"], data["description"], [_layer_from_json(e) for e in data["layers"]],
                         _membership_from_json(data.get("membership")))


def _interval_json(interval: Interval | None) -> dict | None:
    if interval is None:
        return None
    return {"estimate": _number(interval.estimate), "se": _number(interval.se), "low": _number(interval.low),
            "high": _number(interval.high), "groups": interval.groups}


def _interval_from_json(data: dict | None) -> Interval | None:
    if data is None:
        return None
    return Interval(_float(data["estimate"]), _float(data["se"]), _float(data["low"]), _float(data["high"]),
                    data["groups"])


def _membership_json(membership: Membership | None) -> dict | None:
    if membership is None:
        return None
    return {
        "members": membership.members,
        "holdout": membership.holdout,
        "member_share": _number(membership.member_share),
        "expected_share": _number(membership.expected_share),
        "excess": _number(membership.excess),
        "excess_interval": _interval_json(membership.excess_interval),
        "topk_member_share": _number(membership.topk_member_share),
        "distinct_argmax": membership.distinct_argmax,
        "p_value": _number(membership.p_value),
        "permutations": membership.permutations,
    }


def _membership_from_json(data: dict | None) -> Membership | None:
    if data is None:
        return None
    return Membership(data["members"], data["holdout"], _float(data["member_share"]), _float(data["expected_share"]),
                      _float(data["topk_member_share"]), data["distinct_argmax"], _float(data["p_value"]),
                      data["permutations"], _interval_from_json(data.get("excess_interval")))


def _check_json(check: Check) -> dict[str, Any]:
    return {"key": check.key, "figure": check.figure, "value": _number(check.value), "limit": check.limit,
            "passed": check.passed, "when": check.when, "severity": check.severity,
            "low": _number(check.low), "high": _number(check.high)}


def _check_from_json(data: dict[str, Any]) -> Check:
    return Check(data["key"], data["figure"], _float(data["value"]), data["limit"], data["passed"], data["when"],
                 data["severity"], _float(data["low"]), _float(data["high"]))


def _planted_json(planted: PlantedResult | None, samples: list[str]) -> dict | None:
    if planted is None:
        return None
    return {
        "strength": planted.strength,
        "top_share": planted.top_share,
        "recall": _number(planted.recall),
        "argmax_hits": planted.argmax_hits,
        "images": [samples[i] for i in planted.images],
        "detection_strength": planted.detection_strength,
        "curve": planted.curve,
        "membership": _membership_json(planted.membership),
        "units": [
            {"layer": u.plant.layer, "unit": u.plant.unit, "image": samples[u.plant.image],
             "image_index": u.plant.image, "strength": u.plant.strength, "scale": u.plant.scale,
             "unitmem": _number(u.unitmem), "rank": u.rank, "found": u.found, "argmax_hit": u.argmax_hit,
             "measured_strength": _number(u.measured_strength)}
            for u in planted.units
        ],
    }


def _planted_from_json(data: dict | None, samples: list[str]) -> PlantedResult | None:
    if data is None:
        return None
    units = [
        PlantedUnitResult(PlantedUnit(u["layer"], u["unit"], u["image_index"], u["strength"], u["scale"]),
                          _float(u["unitmem"]), u["rank"], u["found"], u["argmax_hit"], _float(u["measured_strength"]))
        for u in data["units"]
    ]
    return PlantedResult(units, data["strength"], data["top_share"], _membership_from_json(data.get("membership")),
                         data.get("curve") or [])


# --- writing --------------------------------------------------------------------------------


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


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _floats(array: np.ndarray) -> list[float | None]:
    return [_number(float(v)) for v in np.asarray(array, dtype=np.float64)]


def _array(values: list[float | None]) -> np.ndarray:
    return np.array([_float(v) for v in values], dtype=np.float64)
