"""One gate as written (in an audit file's ``thresholds``, ``layers`` or ``compare`` block, or in
``--memaudit-threshold`` / ``--memaudit-compare-fail``), checked and read into the fields of a ``Gate``."""

from __future__ import annotations

import difflib
import math
from typing import Any

from ..errors import ConfigError, quote, shorten
from ..results.outcomes import (COMPARED, INTERVAL_FIGURES, LIMITS, MODEL_GATES, P_VALUE_FIGURES, SETTINGS,
                                SEVERITIES, THRESHOLD_KEYS, WHEN)

_GATE_FIELDS = ("limit", "when", "severity")

Partial = dict[str, Any]  # what one level of configuration sets of a threshold: some of a Gate's fields, or "value"


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def threshold_block(path, where, block) -> dict[str, Partial]:
    if block is None:
        return {}
    expect_mapping(path, where, block)
    check_keys(path, where, block, THRESHOLD_KEYS)
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


def compare_block(path, where, block) -> tuple[dict[str, Partial], dict[str, dict[str, Partial]]]:
    """The ``compare:`` block: compare gates by figure for every layer, and ``layers:`` overrides."""
    if block is None:
        return {}, {}
    expect_mapping(path, where, block)
    check_keys(path, where, block, (*COMPARED, "layers"))
    gates = {f"{figure}_rise_max": compare_entry(f"{path}: {where}: {figure}", figure, value)
             for figure, value in block.items() if figure != "layers"}
    layers = block.get("layers") or {}
    expect_mapping(path, f"{where}: layers", layers)
    per_layer = {}
    for name, entry in layers.items():
        inner = f"{where}: layers: {shorten(str(name))}"
        expect_mapping(path, inner, entry)
        check_keys(path, inner, entry, tuple(COMPARED))
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


def expect_mapping(path, where, value) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping (key: value), got {type(value).__name__}")


def check_keys(path, where, mapping, allowed) -> None:
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
    if layer.strip() not in ("", "*"):
        check_model_gates(f"--memaudit-threshold {text!r}", {key: value})
    return layer.strip() or "*", key, threshold_entry(f"--memaudit-threshold {key}", key, value)


def check_model_gates(where: str, entry: dict) -> None:
    """A model's gate (the verdict's) set for one layer: a ConfigError saying where it belongs."""
    for key in MODEL_GATES:
        if key in entry:
            raise ConfigError(f"{where}: {key} gates the model's verdict over every layer, not one layer: set it under "
                              "thresholds: (or models: NAME: thresholds:), or on the command line without a layer "
                              f"(--memaudit-threshold {key}=VALUE)")
