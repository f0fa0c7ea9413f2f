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
import glob
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from . import hardware, yamlsafe
from .errors import ConfigError
from .gates import (COMPARED, GATES, INTERVAL_FIGURES, LIMITS, MULTIPLE_TESTING, P_VALUE_FIGURES, SETTINGS, SEVERITIES,
                    THRESHOLD_KEYS, WHEN, Gate)
from .models import (
    BUILTIN_MODELS, TOKEN_CHOICES, UNIT_LAYOUTS, InputContract, LayerSpec, ModelSpec, get_model_spec, user_model_spec)
from .yamlsafe import quote, shorten

PRECISIONS = ("float32", "bfloat16", "tf32")
VIEW_RECIPES = ("seed", "simclr", "flip", "plain")  # --memaudit-views and a model's views:, or a 'module:function' factory
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
    views: str | None = None  # the view recipe (VIEW_RECIPES or 'module:function'); None: the model's
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
    embedding_layer: str | None = None  # whose activations embed images for clustering; None: the last audited
    state: str | None = None  # directory of the resumable snapshots; None: none
    state_every: int = 300  # seconds between snapshots (0: after every batch)
    dist_timeout: int = 1800  # seconds a process waits for the others at a collective

    def as_dict(self) -> dict:
        return asdict(self)


# (least, most) of each whole-number setting. The most is a bound no sensible audit reaches, set
# so that a mistyped value is refused here, not after the compute as an overflow (the seed: what
# torch's generators take) or as an allocation of gigabytes (views, top-k lists, groups).
INT64_MAX = 2**63 - 1
_INT_FIELDS = {"samples": (2, INT64_MAX), "image_size": (16, 2**20), "augmentations": (0, 10_000),
               "batch_size": (1, 2**31), "seed": (0, INT64_MAX), "topk": (1, 100_000), "workers": (0, 1024),
               "median_memory": (0, 2**40), "planted_units": (1, 1_000_000), "groups": (2, 100_000),
               "permutations": (100, 10**9), "state_every": (0, 10**9), "dist_timeout": (1, 10**7)}
_CHOICES = {"reduce": ("mean", "median"), "precision": PRECISIONS}


def make_settings(**values: Any) -> RunSettings:
    """RunSettings from option values (None = not given), validated; ConfigError otherwise."""
    known = {f.name for f in fields(RunSettings)}
    given = {key: value for key, value in values.items() if value is not None}
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    for key, (least, most) in _INT_FIELDS.items():
        if key in given:
            try:
                given[key] = int(given[key])
            except (TypeError, ValueError):
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be a whole number, got {given[key]!r}") from None
            if given[key] < least:
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be at least {least}, got {given[key]}")
            if given[key] > most:
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be at most {most}, got {given[key]}")
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
    if "views" in given:
        check_views_value("--memaudit-views", given["views"])
    if "device" in given and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(given["device"])):
        raise ConfigError(f"--memaudit-device must be auto, cpu, cuda or cuda:N (N: a GPU number, 0 the first), "
                          f"got {quote(given['device'])}")
    return RunSettings(**given)


def check_views_value(where: str, value: Any) -> None:
    """ConfigError unless ``value`` names a view recipe or a 'package.module:function' factory."""
    if value in VIEW_RECIPES or (isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value)):
        return
    raise ConfigError(f"{where} must be {', '.join(VIEW_RECIPES)} or 'package.module:function' (a function in your "
                      f"code that takes the image size and returns your torchvision transforms v2 pipeline), "
                      f"got {quote(value)}")


def checkpoint_series(given: list[str], base: Path) -> dict[str, str]:
    """--memaudit-checkpoint values (globs expanded, relative to ``base``) by label, the file name without
    its extension, in natural order of the labels (step-2 before step-10). ConfigError for a glob that
    matches nothing and for two files with one label."""
    paths = []
    for text in given:
        if not any(char in text for char in "*?["):
            paths.append(text)
            continue
        found = sorted(glob.glob(text if os.path.isabs(text) else str(base / text)))
        if not found:
            raise ConfigError(f"--memaudit-checkpoint {quote(text)} matches no file (relative to {base})")
        paths += found
    series: dict[str, str] = {}
    for path in paths:
        label = Path(path).stem
        if label in series and os.path.abspath(series[label]) != os.path.abspath(path):
            raise ConfigError(f"--memaudit-checkpoint: {series[label]} and {path} are both named {label}; the tests of a "
                              "checkpoint series are named by file name, so give the files different names")
        series[label] = path
    return dict(sorted(series.items(), key=lambda item: natural_key(item[0])))


def natural_key(text: str) -> list:
    """Sorts numbers in names by value: step-2 before step-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text)]


def settings_from_record(record: dict[str, Any]) -> RunSettings:
    """The settings a finished audit ran with, from its results' ``settings`` (resolved values: the
    image size, batch size, device and controls it used)."""
    known = {f.name for f in fields(RunSettings)}
    return RunSettings(**{key: value for key, value in record.items() if key in known})


def check_image_fits(settings: RunSettings) -> None:
    """ConfigError when an image's views at ``settings.image_size`` cannot fit in the machine's memory.

    The law is a lower bound, so that only impossible sizes are refused: an image's views are made
    together, as float32 RGB, and one view goes through the model at least with its first layer's
    output at full resolution (the first layer's width is known for the built-in models; for a user
    model only the input counts)."""
    spec = BUILTIN_MODELS.get(settings.model)
    size = settings.image_size or (spec.default_image_size if spec else None)
    memory = hardware.physical_memory_bytes()
    if size is None or memory is None:
        return
    channels = spec.input_layer_channels if spec else 0
    views = max(settings.augmentations, 1)
    needed = size * size * (3 + channels) * 4
    if needed > memory:
        per_pixel = "the RGB input" + (f" and its first layer's {channels} channels" if channels else "")
        raise ConfigError(
            f"--memaudit-image-size {size}: one {size}x{size} view of {settings.model} needs at least "
            f"{_binary_size(needed)} ({3 + channels} float32 values per pixel: {per_pixel}), more than this "
            f"machine's {_binary_size(memory)} of memory. Audit at a smaller size"
            + (f" (the model's own is {spec.default_image_size})." if spec else ".")
        )
    if 3 * views > 3 + channels and 3 * views * size * size * 4 > memory:
        raise ConfigError(
            f"--memaudit-augmentations {settings.augmentations}: one image's {views} views at {size}x{size} need "
            f"{_binary_size(3 * views * size * size * 4)} (3 float32 values per pixel each), more than this "
            f"machine's {_binary_size(memory)} of memory. Audit with fewer augmentations or at a smaller size."
        )


def _binary_size(count: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(count, 1), 1024)), len(units) - 1)
    return f"{count / 1024**power:.1f} {units[power]}"


# ---------------------------------------------------------------------------- audit files

_TOP_KEYS = ("version", "thresholds", "layers", "models", "multiple_testing", "allow_no_gates", "compare")
_GATE_FIELDS = ("limit", "when", "severity")
Partial = dict[str, Any]  # what one level of configuration sets of a threshold: some of a Gate's fields, or "value"
_MODEL_KEYS = ("factory", "audited_layers", "image_size", "description", "thresholds", "layers", "checkpoint",
               "input_range", "normalize", "channels_last", "channels", "order", "views", "loss")
_LAYER_KEYS = ("module", "name", "units", "units_axis", "tokens", "output", "call")


@dataclass
class AuditFile:
    """A parsed, validated audit YAML file."""

    path: Path
    thresholds: dict[str, Partial] = field(default_factory=dict)
    layers: dict[str, dict[str, Partial]] = field(default_factory=dict)
    model_thresholds: dict[str, dict[str, Partial]] = field(default_factory=dict)
    model_layers: dict[str, dict[str, dict[str, Partial]]] = field(default_factory=dict)
    user_models: dict[str, ModelSpec] = field(default_factory=dict)
    compare: dict[str, Partial] = field(default_factory=dict)  # compare gates (<figure>_rise_max), every layer
    compare_layers: dict[str, dict[str, Partial]] = field(default_factory=dict)  # ... per layer
    multiple_testing: str = "holm"  # how p-value gates are corrected across the audited layers
    allow_no_gates: bool = False  # an audit that gates nothing is a measurement, not a mistake
    model_views: dict[str, str] = field(default_factory=dict)  # a model's views: (built-in models' too)

    def model_spec(self, name: str) -> ModelSpec:
        return with_views(get_model_spec(name, self.user_models), self.model_views, self.path)

    def applies_to(self, model: str) -> bool:
        """A file that declares models of its own (a factory) is about them and the models it names
        under ``models:``; a file that declares none is about every model."""
        return not self.user_models or model in self.model_thresholds

    def thresholds_for(
        self, model: ModelSpec, overrides: dict[str, dict[str, Partial]] | None = None
    ) -> dict[str, dict[str, Gate | float]]:
        """Thresholds of every layer of ``model`` (keyed by display name): a Gate per limit key,
        the level for ``fraction_above_level``, and a Gate per compare gate that some level sets.
        Each level of configuration sets only the fields it names (a bare number sets a gate's
        limit and keeps its ``when`` and ``severity``). The ``compare:`` block and its ``layers``
        are levels beside ``thresholds`` and ``layers`` (their keys are the compare gates').

        ``overrides`` (from the command line) maps ``"*"`` or a layer name to threshold values.
        Raises ConfigError for layer names the model does not have.
        """
        overrides = overrides or {}
        layer_blocks = [("layers", self.layers), (f"models: {model.name}: layers", self.model_layers.get(model.name, {})),
                        ("compare: layers", self.compare_layers)]
        for where, block in [*layer_blocks, ("--memaudit-threshold", {k: v for k, v in overrides.items() if k != "*"})]:
            for name in block:
                if model.layer(name) is None:
                    raise ConfigError(_unknown_layer_message(self.path, where, name, model))
        result = {}
        for layer in model.layers:
            levels = [self.thresholds, self.model_thresholds.get(model.name, {}), self.compare]
            levels += [block.get(name, {}) for _, block in layer_blocks for name in (layer.module, layer.name)]
            levels += [overrides.get(name, {}) for name in ("*", layer.module, layer.name)]
            merged = {key: default.as_dict() if isinstance(default, Gate) else {"value": default}
                      for key, default in DEFAULT_THRESHOLDS.items()}
            for level in levels:
                for key, partial in level.items():
                    merged.setdefault(key, Gate(None).as_dict()).update(partial)
            result[layer.name] = {key: Gate(**fields) if key in GATES else fields["value"]
                                  for key, fields in merged.items()}
        return result


    def check_gates(self, thresholds: dict[str, dict[str, Gate | float]], overridden: bool = False) -> None:
        """ConfigError when ``thresholds`` (from ``thresholds_for``) check nothing on any layer, so
        every layer would pass whatever it measures; unless the file says ``allow_no_gates: true``."""
        if self.allow_no_gates:
            return
        active = {key for limits in thresholds.values() for key, gate in limits.items()
                  if isinstance(gate, Gate) and gate.limit is not None}
        if active:
            return
        raise ConfigError(
            f"{self.path}: no layer has a threshold{' (after --memaudit-threshold)' if overridden else ''}, so every "
            "layer would pass whatever it measures. Set thresholds (see docs/yaml.md in the repository), or write "
            "'allow_no_gates: true' at the top level to run the audit as a measurement only."
        )


def _unknown_layer_message(path, where, name, model: ModelSpec) -> str:
    candidates = [layer.name for layer in model.layers] + [layer.module for layer in model.layers]
    close = difflib.get_close_matches(name, candidates, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"{path}: {where}: model {model.name} has no layer {quote(name)}.{hint} "
        f"Its layers are: {', '.join(layer.name for layer in model.layers)}."
    )


@dataclass
class AuditCatalog:
    """The audit files of a session and the models they declare, each declared once."""

    files: dict[Path, AuditFile] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)  # user models, by name
    declared_in: dict[str, Path] = field(default_factory=dict)
    views: dict[str, str] = field(default_factory=dict)  # the views: files set for models, by model
    views_in: dict[str, Path] = field(default_factory=dict)

    def add(self, audit: AuditFile) -> None:
        """Register ``audit`` and its models; ConfigError when another file declares one differently."""
        for name, spec in audit.user_models.items():
            other = self.declared_in.get(name)
            if other is not None and other != audit.path and self.models[name] != spec:
                raise ConfigError(
                    f"model {name!r} is declared differently in {other} and in {audit.path}: declare it in one file "
                    "(the others may still set its thresholds under models:), or the same way in both"
                )
            self.models.setdefault(name, spec)
            self.declared_in.setdefault(name, audit.path)
        for name, views in audit.model_views.items():
            if self.views.get(name, views) != views:
                raise ConfigError(f"model {name!r} is audited with views {self.views[name]!r} in {self.views_in[name]} "
                                  f"and {views!r} in {audit.path}: set its views: in one file")
            self.views[name] = views
            self.views_in.setdefault(name, audit.path)
        self.files[audit.path] = audit

    def model_spec(self, name: str) -> ModelSpec:
        return with_views(get_model_spec(name, self.models), self.views, self.views_in.get(name))


def with_views(spec: ModelSpec, views: dict[str, str], path: Path | None) -> ModelSpec:
    """``spec`` with the views: an audit file sets for it (a user factory found beside that file)."""
    if spec.name not in views:
        return spec
    return replace(spec, views=views[spec.name], views_folder=str(Path(path).resolve().parent) if path else None)


def load_catalog(paths: list[Path]) -> AuditCatalog:
    """The catalog of the audit files at ``paths``; every problem is a ConfigError naming a file."""
    catalog = AuditCatalog()
    for path in paths:
        catalog.add(load_audit_file(path))
    return catalog


def load_audit_file(path: str | Path) -> AuditFile:
    """Parse and validate an audit YAML file; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            text = handle.read(yamlsafe.MAX_BYTES + 1).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the audit file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the audit file is not UTF-8 text") from None
    try:
        document = yamlsafe.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    document = {} if document is None else document
    _expect_mapping(path, "the top level", document)
    if "views" in document:
        raise ConfigError(f"{path}: views: is a model's (the views it trained on): write it under models: NAME: "
                          "views: (a built-in model's name works too, e.g. models: demo: views: simclr)")
    _check_keys(path, "the top level", document, _TOP_KEYS)
    audit = AuditFile(path=path)
    if "multiple_testing" in document:
        if document["multiple_testing"] not in MULTIPLE_TESTING:
            raise ConfigError(f"{path}: multiple_testing must be one of {', '.join(MULTIPLE_TESTING)}, "
                              f"got {document['multiple_testing']!r}")
        audit.multiple_testing = document["multiple_testing"]
    audit.allow_no_gates = document.get("allow_no_gates", False)
    if not isinstance(audit.allow_no_gates, bool):
        raise ConfigError(f"{path}: allow_no_gates must be true or false, got {quote(audit.allow_no_gates)}")
    audit.thresholds = _threshold_block(path, "thresholds", document.get("thresholds"))
    audit.compare, audit.compare_layers = _compare_block(path, "compare", document.get("compare"))
    audit.layers = _layer_block(path, "layers", document.get("layers"))
    models = document.get("models") or {}
    _expect_mapping(path, "models", models)
    for name, entry in models.items():
        where = f"models: {shorten(str(name))}"
        _expect_mapping(path, where, entry)
        _check_keys(path, where, entry, _MODEL_KEYS)
        audit.model_thresholds[str(name)] = _threshold_block(path, f"{where}: thresholds", entry.get("thresholds"))
        audit.model_layers[str(name)] = _layer_block(path, f"{where}: layers", entry.get("layers"))
        if "views" in entry:
            check_views_value(f"{path}: {where}: views", entry["views"])
            audit.model_views[str(name)] = entry["views"]
        if "factory" in entry or "audited_layers" in entry:
            audit.user_models[str(name)] = _user_model(path, where, str(name), entry)
    return audit


def _user_model(path, where, name, entry) -> ModelSpec:
    factory = entry.get("factory")
    if not isinstance(factory, str) or ":" not in factory:
        raise ConfigError(f"{path}: {where}: factory must be 'package.module:function', got {quote(factory)}")
    layers = entry.get("audited_layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError(
            f"{path}: {where}: audited_layers must be a non-empty list of module paths "
            "(as model.named_modules() writes them, or pytest --memaudit-list-layers), or of mappings with a "
            f"module and any of {', '.join(_LAYER_KEYS[1:])}"
        )
    specs = [_layer_spec(path, f"{where}: audited_layers", item) for item in layers]
    _check_layers_unambiguous(path, where, [(spec.name, spec.module) for spec in specs])
    image_size = entry.get("image_size", 256)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 16:
        raise ConfigError(f"{path}: {where}: image_size must be a whole number of at least 16, got {image_size!r}")
    checkpoint = entry.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
        raise ConfigError(f"{path}: {where}: checkpoint must be a path (relative to the YAML's folder), got {checkpoint!r}")
    loss = entry.get("loss")
    if loss is not None and (not isinstance(loss, str) or ":" not in loss):
        raise ConfigError(f"{path}: {where}: loss must be 'package.module:function' (a function of the checkpoint "
                          f"returning each view's loss), got {quote(loss)}")
    values = {**entry, "layers": tuple(specs), "input": _input_contract(path, where, entry)}
    return user_model_spec(name, values, str(path))


def _layer_spec(path, where, item) -> LayerSpec:
    """An audited_layers entry: a module path, or a mapping with ``module`` and optional keys."""
    if isinstance(item, str) and item:
        return LayerSpec(item, item)
    if not isinstance(item, dict) or not isinstance(item.get("module"), str) or not item["module"]:
        raise ConfigError(f"{path}: {where}: entry {item!r} is not a module path or a mapping with a module")
    where = f"{where}: {item['module']}"
    _check_keys(path, where, item, _LAYER_KEYS)
    name = item.get("name", item["module"])
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: {where}: name must be a non-empty string, got {name!r}")
    if "units" in item and "units_axis" in item:
        raise ConfigError(f"{path}: {where}: give units or units_axis, not both")
    units = item.get("units")
    if units == "tokens":
        raise ConfigError(f"{path}: {where}: 'units: tokens' is now 'units: token_channels' (the channels of each "
                          "token, axis 2 of a (batch, tokens, channels) output); rename it")
    if units is not None and units not in UNIT_LAYOUTS:
        raise ConfigError(f"{path}: {where}: units must be one of {', '.join(UNIT_LAYOUTS)}, got {units!r} "
                          "(or give the axis number as units_axis)")
    if "units_axis" in item:
        units = item["units_axis"]
        if not _whole(units) or units == 0:
            raise ConfigError(f"{path}: {where}: units_axis must be the number of the output's unit axis (0 is the "
                              f"batch; -1 the last), got {units!r}")
    tokens = item.get("tokens", "all")
    if tokens not in TOKEN_CHOICES:
        raise ConfigError(f"{path}: {where}: tokens must be one of {', '.join(TOKEN_CHOICES)}, got {tokens!r}")
    output = item.get("output")
    if output is not None and not (isinstance(output, str) or (_whole(output) and output >= 0)):
        raise ConfigError(f"{path}: {where}: output must be a part's index (0, 1, ...) or key, got {output!r}")
    call = item.get("call")
    if call is not None and call != "all" and not (_whole(call) and call >= 0):
        raise ConfigError(f"{path}: {where}: call must be a call's number (0 is the first) or 'all', got {call!r}")
    return LayerSpec(name, item["module"], units=units, tokens=tokens, output=output, call=call)


def _input_contract(path, where, entry) -> InputContract:
    """``input_range: [low, high]`` or ``normalize: {mean, std}`` (one of them), ``channels_last``, and
    ``channels`` (1 or 3) with their ``order`` (RGB or BGR)."""
    channels_last = entry.get("channels_last", False)
    if not isinstance(channels_last, bool):
        raise ConfigError(f"{path}: {where}: channels_last must be true or false, got {channels_last!r}")
    channels = entry.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"{path}: {where}: channels must be 3 (colour) or 1 (greyscale: the model gets each view's "
                          f"luma), got {quote(channels)}")
    order = entry.get("order", "RGB")
    if order not in ("RGB", "BGR"):
        raise ConfigError(f"{path}: {where}: order must be RGB or BGR (the model's channel order), got {quote(order)}")
    if channels == 1 and "order" in entry:
        raise ConfigError(f"{path}: {where}: order is the order of 3 channels; a 1-channel model has none, "
                          "leave it out")
    layout = {"channels_last": channels_last, "channels": channels, "order": order}
    if "input_range" in entry and "normalize" in entry:
        raise ConfigError(f"{path}: {where}: give input_range or normalize, not both (normalize applies to images "
                          "in [0, 1])")
    normalize = entry.get("normalize")
    if normalize is not None:
        _expect_mapping(path, f"{where}: normalize", normalize)
        _check_keys(path, f"{where}: normalize", normalize, ("mean", "std"))
        mean, std = normalize.get("mean"), normalize.get("std")
        names = "the grey channel" if channels == 1 else ", ".join(order)
        for key, values in (("mean", mean), ("std", std)):
            if not (isinstance(values, list) and len(values) == channels and all(_number(v) for v in values)):
                raise ConfigError(f"{path}: {where}: normalize: {key} must be {channels} number{'s' * (channels > 1)} "
                                  f"({names}, in the model's order), got {values!r}")
        if any(v <= 0 for v in std):
            raise ConfigError(f"{path}: {where}: normalize: std must be positive, got {std!r}")
        return InputContract(mean=tuple(map(float, mean)), std=tuple(map(float, std)), **layout)
    value_range = entry.get("input_range", [-1, 1])
    if not (isinstance(value_range, list) and len(value_range) == 2 and all(_number(v) for v in value_range)
            and value_range[0] < value_range[1]):
        raise ConfigError(f"{path}: {where}: input_range must be [low, high] with low < high, e.g. [-1, 1] or "
                          f"[0, 1], got {value_range!r}")
    return InputContract(value_range=(float(value_range[0]), float(value_range[1])), **layout)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_layers_unambiguous(path, where, layers: list[tuple[str, str]]) -> None:
    """Each audited layer is found by its name or its module path, so no two may share either, and no
    layer's name may be another's module path: thresholds and results would go to the wrong layer."""
    names: dict[str, int] = {}
    modules: dict[str, int] = {}
    for number, (name, module) in enumerate(layers, 1):
        if name in names:
            raise ConfigError(f"{path}: {where}: audited_layers: {quote(name)} is listed twice "
                              f"(entries {names[name]} and {number}); give each layer its own name")
        if module in modules:
            raise ConfigError(f"{path}: {where}: audited_layers: module {quote(module)} is audited twice "
                              f"(entries {modules[module]} and {number}); list each module once")
        names[name], modules[module] = number, number
    for name, number in names.items():
        other = modules.get(name)
        if other is not None and other != number:
            raise ConfigError(f"{path}: {where}: audited_layers: {quote(name)} names entry {number} and is the module "
                              f"of entry {other}; rename the layer, so that each name finds one layer")


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
    partial = _gate_fields(where, value, "a gate")
    if "limit" in value:
        partial["limit"] = threshold_value(f"{where}: limit", key, value["limit"])
    figure = LIMITS[key][0]
    if partial.get("when") == "significant" and figure not in INTERVAL_FIGURES:
        with_intervals = ", ".join(k for k, (f, _) in LIMITS.items() if f in INTERVAL_FIGURES)
        raise ConfigError(
            f"{where}: when: significant needs a figure with an interval; {figure} has none. "
            f"Gates that accept it: {with_intervals}."
        )
    return partial


def _gate_fields(where: str, value: dict, kind: str) -> Partial:
    """The ``when`` and ``severity`` a gate's mapping sets, checked (its ``limit`` is the caller's)."""
    unknown = [field_ for field_ in value if field_ not in _GATE_FIELDS]
    if unknown:
        raise ConfigError(f"{where}: unknown field {quote(unknown[0])}; {kind} has {', '.join(_GATE_FIELDS)}")
    partial: Partial = {}
    for name, choices in (("when", WHEN), ("severity", SEVERITIES)):
        if name in value:
            if value[name] not in choices:
                raise ConfigError(f"{where}: {name} must be one of {', '.join(choices)}, got {quote(value[name])}")
            partial[name] = value[name]
    return partial


def threshold_value(where: str, key: str, value: Any) -> float | None:
    """A validated limit: a number in its figure's range, or None (off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number (or null to turn it off), got {quote(value)}")
    value = float(value)
    low = -1.0 if key in ("excess_over_control_max", "membership_excess_max") else 0.0
    if math.isnan(value) or not low <= value <= 1.0:
        meaning = SETTINGS.get(key) or LIMITS[key][1]
        raise ConfigError(f"{where} = {value:g} is outside [{low:g}, 1] ({meaning})")
    return value


def _compare_block(path, where, block) -> tuple[dict[str, Partial], dict[str, dict[str, Partial]]]:
    """The ``compare:`` block: compare gates by figure for every layer, and ``layers:`` overrides."""
    if block is None:
        return {}, {}
    _expect_mapping(path, where, block)
    _check_keys(path, where, block, (*COMPARED, "layers"))
    gates = {f"{figure}_rise_max": compare_entry(f"{path}: {where}: {figure}", figure, value)
             for figure, value in block.items() if figure != "layers"}
    layers = block.get("layers") or {}
    _expect_mapping(path, f"{where}: layers", layers)
    per_layer = {}
    for name, entry in layers.items():
        inner = f"{where}: layers: {shorten(str(name))}"
        _expect_mapping(path, inner, entry)
        _check_keys(path, inner, entry, tuple(COMPARED))
        per_layer[str(name)] = {f"{figure}_rise_max": compare_entry(f"{path}: {inner}: {figure}", figure, value)
                                for figure, value in entry.items()}
    return gates, per_layer


def compare_entry(where: str, figure: str, value: Any) -> Partial:
    """What a compare gate entry sets: a limit (``compare_limit``), or a mapping of ``limit``, ``when``
    (``significant``: only a rise beyond noise) and ``severity``."""
    if not isinstance(value, dict):
        return compare_limit(where, figure, value)
    partial = _gate_fields(where, value, "a compare gate")
    if "limit" in value:
        partial.update(compare_limit(f"{where}: limit", figure, value["limit"]))
    return partial


def compare_limit(where: str, figure: str, value: Any) -> Partial:
    """A compare gate's limit: a number (the largest rise allowed), ``'N%'`` (N percent of the baseline's
    value) or None (off)."""
    if value is None:
        return {"limit": None, "relative": False}
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            fraction = float(value.strip()[:-1]) / 100
        except ValueError:
            fraction = math.nan
        if not (math.isfinite(fraction) and fraction >= 0):
            raise ConfigError(f"{where}: {quote(value)} is not a percentage (write e.g. 10%)")
        return {"limit": fraction, "relative": True}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number (the largest rise allowed), a percentage of the baseline's value "
                          f"such as 10%, or null to turn it off; got {quote(value)}")
    highest = 2.0 if figure in ("membership_excess", "excess_over_control") else 1.0
    value = float(value)
    if math.isnan(value) or not 0 <= value <= highest:
        raise ConfigError(f"{where} = {value:g} is outside [0, {highest:g}] (the rise of {COMPARED[figure]})")
    return {"limit": value, "relative": False}


def parse_compare_option(text: str) -> tuple[str, str, Partial]:
    """``[LAYER:]FIGURE:DELTA[:WHEN]`` from --memaudit-compare-fail -> (layer or '*', gate key, partial).
    DELTA is an absolute rise (0.02) or a percentage of the baseline's value (10%); WHEN, as a compare gate's
    ``when`` in the YAML: ``estimate`` (the default: the estimated rise alone) or ``significant`` (only a rise
    beyond noise)."""
    gate, _, when = text.rpartition(":")
    when = when.strip()
    if ":" not in gate or not when.isalpha() or when.lower() in ("off", "none", "null"):
        gate, when = text, ""
    elif when not in WHEN:
        raise ConfigError(f"--memaudit-compare-fail {quote(text)}: {quote(when)} is not when a compare gate fails: "
                          "write significant (only a rise beyond noise) or estimate (the estimated rise, the default)")
    target, _, delta = gate.rpartition(":")
    layer, _, figure = target.rpartition(":")
    figure, delta = figure.strip(), delta.strip()
    if not target or not figure or not delta:
        raise ConfigError(f"--memaudit-compare-fail {quote(text)}: write [LAYER:]FIGURE:DELTA[:significant], "
                          "e.g. mean_unitmem:0.02, mean_unitmem:10% or mean_unitmem:0.02:significant")
    if figure not in COMPARED:
        if figure in P_VALUE_FIGURES:
            hint = " A p-value's change is no effect size: gate the rise of membership_excess instead."
        else:
            close = difflib.get_close_matches(figure, list(COMPARED), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--memaudit-compare-fail {quote(text)}: no compare gate for {quote(figure)}.{hint} "
                          f"Figures: {', '.join(COMPARED)}.")
    if delta.lower() in ("off", "none", "null"):
        value: Any = None
    elif delta.endswith("%"):
        value = delta
    else:
        try:
            value = float(delta)
        except ValueError:
            raise ConfigError(f"--memaudit-compare-fail {quote(text)}: {quote(delta)} is not a number, a percentage "
                              "(10%) or 'off'") from None
    partial = compare_limit(f"--memaudit-compare-fail {figure}", figure, value)
    if when:
        partial["when"] = when
    return layer.strip() or "*", f"{figure}_rise_max", partial


def _layer_block(path, where, block) -> dict[str, dict[str, float | None]]:
    if block is None:
        return {}
    _expect_mapping(path, where, block)
    return {str(name): _threshold_block(path, f"{where}: {shorten(str(name))}", entry) for name, entry in block.items()}


def _expect_mapping(path, where, value) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping (key: value), got {type(value).__name__}")


def _check_keys(path, where, mapping, allowed) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {where}: unknown key {quote(key)}.{hint} Allowed: {', '.join(allowed)}.")


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
