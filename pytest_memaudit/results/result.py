"""``AuditResult``: the one source of truth for every figure, and its JSON form (both ways)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.datapoints import Memorized
from ..controls.planted import PlantedResult
from ..errors import ConfigError
from ..metric.imagesignals import SignalResult
from ..metric.membership import Membership
from ..metric.stats import Interval, LayerStats, depth_correlation
from ..metric.unitmem import UnitMemValues
from ..metric.verdict import GATED_AS, Verdict, decide, gate_sentence, membership_tests
from ..models.hooks import UnitAxis
from .encoding import (array_in, check_from_json, check_json, float_in, floats_out, interval_from_json, interval_json,
                       membership_from_json, membership_json, memorized_from_json, memorized_json, float_out,
                       planted_from_json, planted_json, signal_from_json, signal_json)
from .outcomes import UNTESTABLE, Gate, GateOutcome, as_json
from .schema import check_document

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
    unit_axis: UnitAxis | None = None  # the axis of the layer's output that holds its units, and how it was found

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
    verdict: Verdict | None = None  # the same rule as the model's, on this subject's tests

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
    memorized: Memorized | None = None  # per data point scores, characteristics, clusters, classes
    control: SubjectResult | None = None
    planted: PlantedResult | None = None
    verdict: Verdict | None = None  # memorization detected / inconclusive / none (verdict.py), over every test
    verdict_gate: GateOutcome | None = None  # the verdict against verdict_p_min (gates/verdictgate.py), once gated
    multiple_testing: str = "holm"  # how the gates corrected p-values across layers (set when gating)
    # the processes that computed it: world_size, backend (None for one process), shards (data points per process)
    distributed: dict[str, Any] | None = None
    # per-image signals, members against held-out images, per (signal, layer) (imagesignals.py)
    signals: list[SignalResult] = field(default_factory=list)

    def layer(self, name: str) -> LayerResult:
        return _find_layer(self.layers, name)

    def select_layers(self, names: set[str]) -> AuditResult:
        """The result restricted to the layers named (display names): what a live run of only those
        layers would have gated. Figures over all layers (the overall membership, the planted
        control) stay as they were computed."""
        kept = [layer for layer in self.layers if layer.name in names]
        if len(kept) == len(self.layers):
            return self
        control = None if self.control is None else replace(
            self.control, layers=[layer for layer in self.control.layers if layer.name in names])
        return replace(self, layers=kept, control=control)

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
                "mean_unitmem": float_out(float(all_values.mean())) if all_values.size else None,
                "depth_spearman_rho": float_out(rho),
                "depth_spearman_p": float_out(p),
                "layers_passed": sum(o.status == "passed" for o in outcomes),
                "layers_warned": sum(o.status == "warned" for o in outcomes),
                "layers_failed": sum(o.status == "failed" for o in outcomes),
                "layers_not_testable": sum(o.status == UNTESTABLE for o in outcomes),
                "layers_not_gated": len(self.layers) - sum(o.status != "not gated" for o in outcomes),
                "membership": membership_json(self.membership),
                "verdict": None if self.verdict is None else self.verdict.as_dict(),
                "verdict_gate": _verdict_gate_json(self.verdict_gate, self.verdict),
                "multiple_testing": self.multiple_testing,
            },
            "timing": self.timing,
            "distributed": self.distributed,
            "environment": self.environment,
            "notes": self.notes,
            "canaries": [{"id": c, "rank": r} for c, r in self.canary_ranks().items()],
            "data_point_ranking": [{"id": s, "units": n} for s, n in self.data_point_ranking()[:50]],
            **memorized_json(self.memorized, self.samples),
            "layers": [_layer_json(layer) for layer in self.layers],
            "control": None if self.control is None else _subject_json(self.control),
            "planted": planted_json(self.planted, self.samples),
            "signals": [signal_json(signal) for signal in self.signals],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditResult:
        """The result a ``to_json`` document describes (the same figures, outcomes included)."""
        samples = data["samples"]
        layers = [_layer_from_json(entry) for entry in data["layers"]]
        return cls(
            model=data["model"],
            settings=data["settings"],
            data_source=data["data_source"],
            samples=samples,
            layers=layers,
            labels=data.get("labels") or [],
            skipped=data.get("skipped") or [],
            checkpoint=data.get("checkpoint"),
            timing=data.get("timing") or {},
            environment=data.get("environment") or {},
            notes=data.get("notes") or [],
            canaries=[entry["id"] for entry in data.get("canaries") or []],
            holdout_source=data.get("holdout_source"),
            membership=membership_from_json(data["summary"].get("membership")),
            memorized=memorized_from_json(data),
            control=None if data.get("control") is None else _subject_from_json(data["control"]),
            planted=planted_from_json(data.get("planted"), samples),
            verdict=_verdict_from_json(data["summary"].get("verdict"), layers),
            verdict_gate=_verdict_gate_from_json(data["summary"].get("verdict_gate")),
            multiple_testing=data["summary"].get("multiple_testing", "holm"),
            distributed=data.get("distributed"),
            signals=[signal_from_json(entry) for entry in data.get("signals") or []],
        )


def _find_layer(layers: list[LayerResult], name: str) -> LayerResult:
    for layer in layers:
        if name in (layer.name, layer.module):
            return layer
    raise KeyError(f"{name!r} is not an audited layer of this result; its layers: {', '.join(l.name for l in layers)}")


# --- JSON of the layers and subjects --------------------------------------------------------

def _layer_json(layer: LayerResult) -> dict[str, Any]:
    outcome = layer.outcome
    return {
        "name": layer.name,
        "module": layer.module,
        "channels": layer.channels,
        "unit_axis": None if layer.unit_axis is None else {
            "axis": layer.unit_axis.axis, "shape": list(layer.unit_axis.shape), "source": layer.unit_axis.source},
        "unitmem": floats_out(layer.values.unitmem),
        "max_sample": layer.values.max_sample.tolist(),
        "mu_max": floats_out(layer.values.mu_max),
        "mu_rest": floats_out(layer.values.mu_rest),
        "dead": np.flatnonzero(layer.values.dead).tolist(),
        "top_samples": layer.values.top_samples.tolist(),
        "top_values": [floats_out(row) for row in layer.values.top_values],
        **{key: float_out(value) for key, value in layer.stats.as_dict().items()},
        "intervals": {name: interval_json(interval) for name, interval in layer.intervals.items()},
        "membership": membership_json(layer.membership),
        "control_mean_unitmem": float_out(layer.control_mean),
        "excess_over_control": interval_json(layer.control_excess),
        "thresholds": None if layer.thresholds is None else as_json(layer.thresholds),
        "outcome": None if outcome is None else outcome.status,
        "checks": None if outcome is None else [check_json(check) for check in outcome.checks],
        "untestable": None if outcome is None else [{"key": key, "reason": why} for key, why in outcome.untestable],
    }


def _layer_from_json(entry: dict[str, Any]) -> LayerResult:
    unitmem = array_in(entry["unitmem"])
    dead = np.zeros(unitmem.size, dtype=bool)
    dead[entry["dead"]] = True
    values = UnitMemValues(
        unitmem=unitmem,
        mu_max=array_in(entry["mu_max"]),
        mu_rest=array_in(entry["mu_rest"]),
        max_sample=np.asarray(entry["max_sample"], dtype=np.int64),
        dead=dead,
        top_values=np.array([array_in(row) for row in entry["top_values"]]).reshape(-1, unitmem.size),
        top_samples=np.asarray(entry["top_samples"], dtype=np.int64).reshape(-1, unitmem.size),
    )
    stats = LayerStats(**{f.name: float_in(entry[f.name]) if f.type != "int" else int(entry[f.name])
                          for f in fields(LayerStats)})
    thresholds = entry.get("thresholds")
    axis = entry.get("unit_axis")
    layer = LayerResult(
        name=entry["name"],
        module=entry["module"],
        values=values,
        stats=stats,
        intervals={name: interval_from_json(item) for name, item in (entry.get("intervals") or {}).items()},
        membership=membership_from_json(entry.get("membership")),
        control_mean=None if entry.get("control_mean_unitmem") is None else float(entry["control_mean_unitmem"]),
        control_excess=interval_from_json(entry.get("excess_over_control")),
        thresholds=None if thresholds is None else {
            key: Gate(**value) if isinstance(value, dict) else value for key, value in thresholds.items()
        },
        unit_axis=None if axis is None else UnitAxis(axis["axis"], tuple(axis["shape"]), axis["source"]),
    )
    if entry.get("checks") is not None:
        layer.outcome = GateOutcome(layer.name, tuple(check_from_json(item) for item in entry["checks"]),
                                    tuple((item["key"], item["reason"]) for item in entry.get("untestable") or ()))
    return layer


def _verdict_gate_json(outcome: GateOutcome | None, verdict: Verdict | None) -> dict[str, Any] | None:
    if outcome is None or verdict is None:
        return None
    check = outcome.checks[0]
    return {"outcome": outcome.status, "message": gate_sentence(verdict, check.key, check.limit, not check.passed),
            "checks": [check_json(check) for check in outcome.checks]}


def _verdict_gate_from_json(data: dict[str, Any] | None) -> GateOutcome | None:
    return None if data is None else GateOutcome(GATED_AS, tuple(check_from_json(item) for item in data["checks"]))


def _subject_json(subject: SubjectResult) -> dict[str, Any]:
    return {
        "role": subject.role,
        "description": subject.description,
        "membership": membership_json(subject.membership),
        "verdict": None if subject.verdict is None else subject.verdict.as_dict(),
        "layers": [_layer_json(layer) for layer in subject.layers],
    }


def _subject_from_json(data: dict[str, Any]) -> SubjectResult:
    layers = [_layer_from_json(e) for e in data["layers"]]
    return SubjectResult(data["role"], data["description"], layers, membership_from_json(data.get("membership")),
                         _verdict_from_json(data.get("verdict"), layers))


def _verdict_from_json(data: dict | None, layers: list[LayerResult]) -> Verdict | None:
    """The stored verdict; a file written before verdicts gets one from its layers' membership tests
    (as that file measured them), or none without held-out images."""
    if data is not None:
        return Verdict.from_dict(data)
    tests = membership_tests(layers)
    if not tests:
        return None
    return decide(tests, permutations=next(layer.membership.permutations for layer in layers if layer.membership))


# --- reading a file back -------------------------------------------------------------------

def read_results(path: str | Path) -> AuditResult:
    """The result a results file holds, checked: a file that is missing, not JSON (truncated), not a
    memaudit results file, of another schema version, incomplete, or a checkpoint series is a
    ConfigError saying which."""
    runs = read_runs(path)
    if None not in runs:
        raise ConfigError(f"{path} holds a checkpoint series ({', '.join(runs)}), not one run: compare with one "
                          "checkpoint's results (--memaudit-json of a run of it, or a saved run)")
    return runs[None]


def read_runs(path: str | Path) -> dict[str | None, AuditResult]:
    """The results a results file holds: ``{None: result}`` for one run, or each checkpoint's result
    by its label, in series order, for a checkpoint series (``series_document``). Checked as
    ``read_results`` says."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such results file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the results file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a pytest-memaudit results file (not UTF-8 text)") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{path} is not a pytest-memaudit results file (its JSON nests too deeply to read)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}): a truncated "
                          "or damaged results file? Write it again (--memaudit-json PATH)") from None
    if isinstance(document, dict) and {"schema_version", "series", "runs"} <= document.keys():
        _check_version(document, str(path))
        labels, runs = document["series"], document["runs"]
        if not (isinstance(labels, list) and isinstance(runs, list) and len(labels) == len(runs) == len(set(labels))
                and all(isinstance(label, str) for label in labels)):
            raise ConfigError(f"{path} is an incomplete or damaged checkpoint series; write it again")
        return {label: result_from_document(run, f"{path} (checkpoint {label})") for label, run in zip(labels, runs)}
    return {None: result_from_document(document, str(path))}


def series_document(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The results file of a checkpoint series: each checkpoint's results document, by label, in order."""
    return {"schema_version": SCHEMA_VERSION, "series": [label for label, _ in runs],
            "runs": [document | {"series_label": label} for label, document in runs]}


def result_from_document(document: Any, where: str) -> AuditResult:
    """``AuditResult.from_json`` for a document from outside: its version and shape checked first."""
    if not isinstance(document, dict) or not {"schema_version", "layers", "samples"} <= document.keys():
        raise ConfigError(f"{where} is not a pytest-memaudit results file (it lacks schema_version, samples or "
                          "layers); pass the results.json an audit wrote")
    _check_version(document, where)
    try:
        check_document(document)
        result = AuditResult.from_json(document)
        _check_shapes(result)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        problem = f"missing {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(f"{where} is an incomplete or damaged results file ({problem}); write it again") from None
    return result


def _check_version(document: dict[str, Any], where: str) -> None:
    version = document["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{where} is not a pytest-memaudit results file (schema_version {version!r})")
    if version > SCHEMA_VERSION:
        raise ConfigError(f"{where} was written with results schema {version}, newer than this pytest-memaudit reads "
                          f"({SCHEMA_VERSION}): upgrade pytest-memaudit")
    if version < SCHEMA_VERSION:
        raise ConfigError(f"{where} has results schema {version}, from an older pytest-memaudit that did not store what "
                          f"gating and the report need (schema {SCHEMA_VERSION}): audit the checkpoint again")


def _check_shapes(result: AuditResult) -> None:
    """ValueError when the per-unit and per-data-point lists of a loaded result do not fit together."""
    samples = len(result.samples)
    if not result.layers:
        raise ValueError("no layers")
    if result.labels and len(result.labels) != samples:
        raise ValueError(f"{len(result.labels)} labels for {samples} samples")
    for layer in [*result.layers, *(result.control.layers if result.control else [])]:
        values = layer.values
        units = values.unitmem.size
        if not values.max_sample.size == values.mu_max.size == values.mu_rest.size == values.top_samples.shape[1] == units:
            raise ValueError(f"layer {layer.name}: per-unit lists of different lengths")
        indices = np.concatenate([values.max_sample, values.top_samples.ravel()])
        if indices.size and not (0 <= indices.min() and indices.max() < samples):
            raise ValueError(f"layer {layer.name}: a data point index outside the {samples} samples")


# --- writing --------------------------------------------------------------------------------

# Above this many data points results are written without indentation: a line per number makes a
# full-training-set file (1.28M data points) about a third larger, for no reader's benefit.
INDENTED_SAMPLES_MAX = 100_000


def write_json_atomic(path: str | Path, document: Any) -> Path:
    """Write JSON so that readers see the old file or the new one, never half of one.

    Indented, unless ``document`` holds more than ``INDENTED_SAMPLES_MAX`` ``samples``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = isinstance(document, dict) and len(document.get("samples") or ()) > INDENTED_SAMPLES_MAX
    text = json.dumps(document, indent=None if large else 1, separators=(",", ":") if large else None,
                      allow_nan=False)
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
