"""Audit files: the YAML audit files (thresholds, layers, user models) and the thresholds each layer gets.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..errors import ConfigError, quote, shorten
from ..models import TOKEN_CHOICES, UNIT_LAYOUTS, InputContract, LayerSpec, ModelSpec, get_model_spec, user_model_spec
from ..pipeline.settings import check_views_value
from ..results.outcomes import GATES, LIMITS, MULTIPLE_TESTING, Gate
from . import yamlsafe
from .limits import check_keys, check_model_gates, compare_block, expect_mapping, is_number, threshold_block, is_whole

if TYPE_CHECKING:
    from .limits import Partial

DEFAULT_THRESHOLDS: dict[str, Gate | float] = {key: Gate(None) for key in LIMITS} | {
    "fraction_above_level": 0.9
}

_TOP_KEYS = ("version", "thresholds", "layers", "models", "multiple_testing", "allow_no_gates", "compare")

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
    expect_mapping(path, "the top level", document)
    if "views" in document:
        raise ConfigError(f"{path}: views: is a model's (the views it trained on): write it under models: NAME: "
                          "views: (a built-in model's name works too, e.g. models: demo: views: simclr)")
    check_keys(path, "the top level", document, _TOP_KEYS)
    audit = AuditFile(path=path)
    if "multiple_testing" in document:
        if document["multiple_testing"] not in MULTIPLE_TESTING:
            raise ConfigError(f"{path}: multiple_testing must be one of {', '.join(MULTIPLE_TESTING)}, "
                              f"got {document['multiple_testing']!r}")
        audit.multiple_testing = document["multiple_testing"]
    audit.allow_no_gates = document.get("allow_no_gates", False)
    if not isinstance(audit.allow_no_gates, bool):
        raise ConfigError(f"{path}: allow_no_gates must be true or false, got {quote(audit.allow_no_gates)}")
    audit.thresholds = threshold_block(path, "thresholds", document.get("thresholds"))
    audit.compare, audit.compare_layers = compare_block(path, "compare", document.get("compare"))
    audit.layers = _layer_block(path, "layers", document.get("layers"))
    models = document.get("models") or {}
    expect_mapping(path, "models", models)
    for name, entry in models.items():
        where = f"models: {shorten(str(name))}"
        expect_mapping(path, where, entry)
        check_keys(path, where, entry, _MODEL_KEYS)
        audit.model_thresholds[str(name)] = threshold_block(path, f"{where}: thresholds", entry.get("thresholds"))
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
    check_keys(path, where, item, _LAYER_KEYS)
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
        if not is_whole(units) or units == 0:
            raise ConfigError(f"{path}: {where}: units_axis must be the number of the output's unit axis (0 is the "
                              f"batch; -1 the last), got {units!r}")
    tokens = item.get("tokens", "all")
    if tokens not in TOKEN_CHOICES:
        raise ConfigError(f"{path}: {where}: tokens must be one of {', '.join(TOKEN_CHOICES)}, got {tokens!r}")
    output = item.get("output")
    if output is not None and not (isinstance(output, str) or (is_whole(output) and output >= 0)):
        raise ConfigError(f"{path}: {where}: output must be a part's index (0, 1, ...) or key, got {output!r}")
    call = item.get("call")
    if call is not None and call != "all" and not (is_whole(call) and call >= 0):
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
        expect_mapping(path, f"{where}: normalize", normalize)
        check_keys(path, f"{where}: normalize", normalize, ("mean", "std"))
        mean, std = normalize.get("mean"), normalize.get("std")
        names = "the grey channel" if channels == 1 else ", ".join(order)
        for key, values in (("mean", mean), ("std", std)):
            if not (isinstance(values, list) and len(values) == channels and all(is_number(v) for v in values)):
                raise ConfigError(f"{path}: {where}: normalize: {key} must be {channels} number{'s' * (channels > 1)} "
                                  f"({names}, in the model's order), got {values!r}")
        if any(v <= 0 for v in std):
            raise ConfigError(f"{path}: {where}: normalize: std must be positive, got {std!r}")
        return InputContract(mean=tuple(map(float, mean)), std=tuple(map(float, std)), **layout)
    value_range = entry.get("input_range", [-1, 1])
    if not (isinstance(value_range, list) and len(value_range) == 2 and all(is_number(v) for v in value_range)
            and value_range[0] < value_range[1]):
        raise ConfigError(f"{path}: {where}: input_range must be [low, high] with low < high, e.g. [-1, 1] or "
                          f"[0, 1], got {value_range!r}")
    return InputContract(value_range=(float(value_range[0]), float(value_range[1])), **layout)


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


def _layer_block(path, where, block) -> dict[str, dict[str, float | None]]:
    if block is None:
        return {}
    expect_mapping(path, where, block)
    blocks = {str(name): threshold_block(path, f"{where}: {shorten(str(name))}", entry) for name, entry in block.items()}
    for name, entry in blocks.items():
        check_model_gates(f"{path}: {where}: {shorten(name)}", entry)
    return blocks
