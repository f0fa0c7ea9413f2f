"""Audit configuration: run settings, YAML audit files, and the thresholds each layer gets.

An audit file (``audits/memaudit.yaml``) holds thresholds and, optionally, user models::

    thresholds: {ttest_p_max: 0.05, mean_unitmem_max: 0.8}   # every layer
    layers:                                                  # per layer (seed name or module path)
      conv.out: {ttest_p_max: 0.1}
    models:
      var_d16:                                               # only when auditing var_d16
        thresholds: {...}
        layers: {...}
      my_encoder:                                            # a user model
        factory: mypkg.encoders:build
        audited_layers: [stem, blocks.0, blocks.1]
        image_size: 224

A layer's thresholds, most general first, each overriding the one before: the file's
``thresholds``, the model's ``thresholds``, the file's ``layers`` entry, the model's ``layers``
entry, then ``--memaudit-threshold`` on the command line.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .gates import INTERVAL_FIGURES, LIMITS, MULTIPLE_TESTING, SETTINGS, SEVERITIES, THRESHOLD_KEYS, WHEN, Gate
from .models import ModelSpec, get_model_spec, user_model_spec

PRECISIONS = ("float32", "bfloat16", "tf32")
CONTROLS = ("random", "planted")  # --memaudit-control: none, or a comma-separated list of these
DEFAULT_THRESHOLDS: dict[str, Gate | float] = {key: Gate(None) for key in LIMITS} | {
    "fraction_above_level": 0.9
}


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides the computed numbers (thresholds do not): the audit's cache key."""

    model: str = "demo"
    checkpoint: str | None = None
    data: str | None = None  # a directory, or None for the model's default image set
    samples: int | None = None
    image_size: int | None = None  # None: the model's default
    augmentations: int = 10
    reduce: str = "mean"
    batch_size: int | None = None  # views per forward pass; None: by device
    device: str = "auto"
    seed: int = 0
    topk: int = 10
    precision: str = "float32"
    workers: int | None = None
    median_memory: int = 2048  # MB the median's N x units matrix may take in memory; over it, on disk
    control: str | None = None  # "none" or a comma-separated list of CONTROLS; None: the model's default
    holdout: str | None = None  # a directory, "builtin" or "none"; None: the model's default held-out set
    planted_units: int = 16  # planted images (one default-strength unit each) in the planted control
    planted_strength: float = 8.0  # a planted image's activation over its unit's mean
    groups: int = 10  # data point groups for the jackknife error bars
    permutations: int = 10_000  # label permutations of the membership test
    state: str | None = None  # directory of the resumable snapshots; None: none
    state_every: int = 300  # seconds between snapshots (0: after every batch)
    dist_timeout: int = 1800  # seconds a process waits for the others at a collective

    def as_dict(self) -> dict:
        return asdict(self)


_INT_FIELDS = {"samples": 2, "image_size": 16, "augmentations": 0, "batch_size": 1, "seed": 0, "topk": 1, "workers": 0,
               "median_memory": 0, "planted_units": 1, "groups": 2, "permutations": 100, "state_every": 0,
               "dist_timeout": 1}
_CHOICES = {"reduce": ("mean", "median"), "precision": PRECISIONS}


def make_settings(**values: Any) -> RunSettings:
    """RunSettings from option values (None = not given), validated; ConfigError otherwise."""
    known = {f.name for f in fields(RunSettings)}
    given = {key: value for key, value in values.items() if value is not None}
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    for key, minimum in _INT_FIELDS.items():
        if key in given:
            try:
                given[key] = int(given[key])
            except (TypeError, ValueError):
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be a whole number, got {given[key]!r}") from None
            if given[key] < minimum:
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be at least {minimum}, got {given[key]}")
    if "image_size" in given and given["image_size"] % 16:
        raise ConfigError(
            f"--memaudit-image-size must be a multiple of 16 (the encoder downsamples 4 times), got {given['image_size']}"
        )
    for key, choices in _CHOICES.items():
        if key in given and given[key] not in choices:
            raise ConfigError(f"--memaudit-{key} must be one of {', '.join(choices)}, got {given[key]!r}")
    if "planted_strength" in given:
        try:
            given["planted_strength"] = float(given["planted_strength"])
        except (TypeError, ValueError):
            raise ConfigError(f"--memaudit-planted-strength must be a number, got {given['planted_strength']!r}") from None
        if not 1 < given["planted_strength"] < 1e6:
            raise ConfigError(
                "--memaudit-planted-strength is a planted image's activation over its unit's mean: a number above 1, "
                f"got {given['planted_strength']:g}"
            )
    if "control" in given:
        roles = [role.strip() for role in str(given["control"]).split(",")]
        if roles != ["none"] and (not roles or any(role not in CONTROLS for role in roles)):
            raise ConfigError(
                f"--memaudit-control must be none or a comma-separated list of {', '.join(CONTROLS)}, "
                f"got {given['control']!r}"
            )
        given["control"] = ",".join(roles)
    if "device" in given:
        device = str(given["device"])
        if device not in ("auto", "cpu") and not (device == "cuda" or device.startswith("cuda:")):
            raise ConfigError(f"--memaudit-device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return RunSettings(**given)


# ---------------------------------------------------------------------------- audit files

_TOP_KEYS = ("version", "thresholds", "layers", "models", "multiple_testing")
_GATE_FIELDS = ("limit", "when", "severity")
Partial = dict[str, Any]  # what one level of configuration sets of a threshold: some of a Gate's fields, or "value"
_MODEL_KEYS = ("factory", "audited_layers", "image_size", "description", "thresholds", "layers")


@dataclass
class AuditFile:
    """A parsed, validated audit YAML file."""

    path: Path
    thresholds: dict[str, Partial] = field(default_factory=dict)
    layers: dict[str, dict[str, Partial]] = field(default_factory=dict)
    model_thresholds: dict[str, dict[str, Partial]] = field(default_factory=dict)
    model_layers: dict[str, dict[str, dict[str, Partial]]] = field(default_factory=dict)
    user_models: dict[str, ModelSpec] = field(default_factory=dict)
    multiple_testing: str = "holm"  # how p-value gates are corrected across the audited layers

    def model_spec(self, name: str) -> ModelSpec:
        return get_model_spec(name, self.user_models)

    def thresholds_for(
        self, model: ModelSpec, overrides: dict[str, dict[str, Partial]] | None = None
    ) -> dict[str, dict[str, Gate | float]]:
        """Thresholds of every layer of ``model`` (keyed by display name): a Gate per limit key,
        the level for ``fraction_above_level``. Each level of configuration sets only the fields
        it names (a bare number sets a gate's limit and keeps its ``when`` and ``severity``).

        ``overrides`` (from the command line) maps ``"*"`` or a layer name to threshold values.
        Raises ConfigError for layer names the model does not have.
        """
        overrides = overrides or {}
        layer_blocks = [("layers", self.layers), (f"models: {model.name}: layers", self.model_layers.get(model.name, {}))]
        for where, block in [*layer_blocks, ("--memaudit-threshold", {k: v for k, v in overrides.items() if k != "*"})]:
            for name in block:
                if model.layer(name) is None:
                    raise ConfigError(_unknown_layer_message(self.path, where, name, model))
        result = {}
        for layer in model.layers:
            levels = [self.thresholds, self.model_thresholds.get(model.name, {})]
            levels += [block.get(name, {}) for _, block in layer_blocks for name in (layer.module, layer.name)]
            levels += [overrides.get(name, {}) for name in ("*", layer.module, layer.name)]
            merged = {key: default.as_dict() if isinstance(default, Gate) else {"value": default}
                      for key, default in DEFAULT_THRESHOLDS.items()}
            for level in levels:
                for key, partial in level.items():
                    merged[key].update(partial)
            result[layer.name] = {key: Gate(**fields) if key in LIMITS else fields["value"]
                                  for key, fields in merged.items()}
        return result


def _unknown_layer_message(path, where, name, model: ModelSpec) -> str:
    candidates = [layer.name for layer in model.layers] + [layer.module for layer in model.layers]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"{path}: {where}: model {model.name} has no layer {name!r}.{hint} "
        f"Its layers are: {', '.join(layer.name for layer in model.layers)}."
    )


def load_audit_file(path: str | Path) -> AuditFile:
    """Parse and validate an audit YAML file; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the audit file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the audit file is not UTF-8 text") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    document = {} if document is None else document
    _expect_mapping(path, "the top level", document)
    _check_keys(path, "the top level", document, _TOP_KEYS)
    audit = AuditFile(path=path)
    if "multiple_testing" in document:
        if document["multiple_testing"] not in MULTIPLE_TESTING:
            raise ConfigError(f"{path}: multiple_testing must be one of {', '.join(MULTIPLE_TESTING)}, "
                              f"got {document['multiple_testing']!r}")
        audit.multiple_testing = document["multiple_testing"]
    audit.thresholds = _threshold_block(path, "thresholds", document.get("thresholds"))
    audit.layers = _layer_block(path, "layers", document.get("layers"))
    models = document.get("models") or {}
    _expect_mapping(path, "models", models)
    for name, entry in models.items():
        where = f"models: {name}"
        _expect_mapping(path, where, entry)
        _check_keys(path, where, entry, _MODEL_KEYS)
        audit.model_thresholds[str(name)] = _threshold_block(path, f"{where}: thresholds", entry.get("thresholds"))
        audit.model_layers[str(name)] = _layer_block(path, f"{where}: layers", entry.get("layers"))
        if "factory" in entry or "audited_layers" in entry:
            audit.user_models[str(name)] = _user_model(path, where, str(name), entry)
    return audit


def _user_model(path, where, name, entry) -> ModelSpec:
    factory = entry.get("factory")
    if not isinstance(factory, str) or ":" not in factory:
        raise ConfigError(f"{path}: {where}: factory must be 'package.module:function', got {factory!r}")
    layers = entry.get("audited_layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError(
            f"{path}: {where}: audited_layers must be a non-empty list of module paths "
            "(as model.named_modules() writes them), or of {name: ..., module: ...} mappings"
        )
    for item in layers:
        ok = isinstance(item, str) or (isinstance(item, dict) and set(item) == {"name", "module"})
        if not ok:
            raise ConfigError(f"{path}: {where}: audited_layers entry {item!r} is not a module path or a {{name, module}} mapping")
    image_size = entry.get("image_size", 256)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16:
        raise ConfigError(f"{path}: {where}: image_size must be a whole number of at least 16, got {image_size!r}")
    return user_model_spec(name, {**entry, "layers": layers}, str(path))


def _threshold_block(path, where, block) -> dict[str, Partial]:
    if block is None:
        return {}
    _expect_mapping(path, where, block)
    _check_keys(path, where, block, THRESHOLD_KEYS)
    return {key: threshold_entry(f"{path}: {where}: {key}", key, value) for key, value in block.items()}


def threshold_entry(where: str, key: str, value: Any) -> Partial:
    """What a YAML threshold entry sets: a number (or null) is a gate's limit; a mapping may set
    ``limit``, ``when`` and ``severity``; ``fraction_above_level`` takes a number only."""
    if key in SETTINGS:
        if value is None:
            raise ConfigError(f"{where} must be a number ({SETTINGS[key]})")
        return {"value": threshold_value(where, key, value)}
    if not isinstance(value, dict):
        return {"limit": threshold_value(where, key, value)}
    unknown = [field_ for field_ in value if field_ not in _GATE_FIELDS]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; a gate has {', '.join(_GATE_FIELDS)}")
    partial: Partial = {}
    if "limit" in value:
        partial["limit"] = threshold_value(f"{where}: limit", key, value["limit"])
    if "when" in value:
        if value["when"] not in WHEN:
            raise ConfigError(f"{where}: when must be one of {', '.join(WHEN)}, got {value['when']!r}")
        figure = LIMITS[key][0]
        if value["when"] == "significant" and figure not in INTERVAL_FIGURES:
            with_intervals = ", ".join(k for k, (f, _) in LIMITS.items() if f in INTERVAL_FIGURES)
            raise ConfigError(
                f"{where}: when: significant needs a figure with an interval; {figure} has none. "
                f"Gates that accept it: {with_intervals}."
            )
        partial["when"] = value["when"]
    if "severity" in value:
        if value["severity"] not in SEVERITIES:
            raise ConfigError(f"{where}: severity must be one of {', '.join(SEVERITIES)}, got {value['severity']!r}")
        partial["severity"] = value["severity"]
    return partial


def threshold_value(where: str, key: str, value: Any) -> float | None:
    """A validated limit: a number in its figure's range, or None (off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number (or null to turn it off), got {value!r}")
    value = float(value)
    low = -1.0 if key in ("excess_over_control_max", "membership_excess_max") else 0.0
    if math.isnan(value) or not low <= value <= 1.0:
        meaning = SETTINGS.get(key) or LIMITS[key][1]
        raise ConfigError(f"{where} = {value:g} is outside [{low:g}, 1] ({meaning})")
    return value


def _layer_block(path, where, block) -> dict[str, dict[str, float | None]]:
    if block is None:
        return {}
    _expect_mapping(path, where, block)
    return {str(name): _threshold_block(path, f"{where}: {name}", entry) for name, entry in block.items()}


def _expect_mapping(path, where, value) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping (key: value), got {type(value).__name__}")


def _check_keys(path, where, mapping, allowed) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {where}: unknown key {key!r}.{hint} Allowed: {', '.join(allowed)}.")


def parse_threshold_option(text: str) -> tuple[str, str, Partial]:
    """``KEY=VALUE`` or ``LAYER:KEY=VALUE`` from --memaudit-threshold -> (layer or '*', key, value)."""
    target, sep, raw = text.partition("=")
    layer, _, key = target.rpartition(":") if ":" in target else ("*", "", target)
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--memaudit-threshold {text!r}: write KEY=VALUE or LAYER:KEY=VALUE, e.g. ttest_p_max=0.01")
    if key not in THRESHOLD_KEYS:
        close = difflib.get_close_matches(key, THRESHOLD_KEYS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--memaudit-threshold {text!r}: unknown threshold {key!r}.{hint} Known: {', '.join(THRESHOLD_KEYS)}.")
    raw = raw.strip()
    try:
        value = None if raw.lower() in ("none", "null", "off") else float(raw)
    except ValueError:
        raise ConfigError(f"--memaudit-threshold {text!r}: {raw!r} is not a number (or 'off')") from None
    return layer.strip() or "*", key, threshold_entry(f"--memaudit-threshold {key}", key, value)



def control_roles(settings: RunSettings, spec: ModelSpec) -> tuple[str, ...]:
    """The controls audited beside the model: of ``random`` and ``planted``."""
    text = settings.control or spec.default_control
    return tuple(role for role in CONTROLS if role in text.split(","))


def has_holdout(settings: RunSettings, spec: ModelSpec) -> bool:
    return settings.holdout != "none" and (settings.holdout is not None or spec.default_holdout is not None)


def audit_has(settings: RunSettings, spec: ModelSpec) -> set[str]:
    """The figures that need something extra (gates.NEEDS) which this audit will have."""
    has = set()
    if has_holdout(settings, spec):
        has |= {"membership_excess", "membership_p"}
    if "random" in control_roles(settings, spec):
        has.add("excess_over_control")
    return has
