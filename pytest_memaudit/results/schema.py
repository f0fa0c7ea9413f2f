"""The results file's schema, checked in full before a file from outside (``--memaudit-from``, a
baseline) is used: every field the gates, the terminal summary and the report read has its type
and range checked here, so that a damaged or hand-edited file is one clear error naming the field
(``layers[0].membership``), never a traceback, a silently dropped layer or an allocation that
exhausts memory later. Consistency between fields (lengths, indices, duplicates) is checked too.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..metric.unitmem import LABELS

# A stored audit's image size decides the size its report decodes thumbnails at: bounded, so that a
# damaged value cannot ask for gigabytes (the options allow at least 16; no encoder audits views
# anywhere near this large).
MAX_STORED_IMAGE_SIZE = 16384


class SchemaError(ValueError):
    """``where`` in the document is not what the schema says."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where or 'the document'} {problem}")


Check = Callable[[Any, str], None]


def number(*, null: bool = True, low: float = -math.inf, high: float = math.inf) -> Check:
    """A JSON number (null: an undefined figure, when ``null``) within [low, high]."""
    def check(value: Any, where: str) -> None:
        if value is None and null:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(where, f"must be a number{' or null' if null else ''}, got {_short(value)}")
        if not low <= value <= high:
            raise SchemaError(where, f"must lie in [{low:g}, {high:g}], got {value:g}")
    return check


def whole(*, null: bool = False, low: int | None = 0, high: int | None = None) -> Check:
    """A whole number (an integral float too: JSON writers differ) within [low, high]."""
    def check(value: Any, where: str) -> None:
        if value is None and null:
            return
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise SchemaError(where, f"must be a whole number{' or null' if null else ''}, got {_short(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise SchemaError(where, f"must be a whole number in [{low}, {'...' if high is None else high}], got {value}")
    return check


def text(*, null: bool = False, choices: tuple[str, ...] | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if value is None and null:
            return
        if not isinstance(value, str) or (choices is not None and value not in choices):
            wanted = f"one of {', '.join(choices)}" if choices else "a string"
            raise SchemaError(where, f"must be {wanted}{' or null' if null else ''}, got {_short(value)}")
    return check


def flag(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise SchemaError(where, f"must be true or false, got {_short(value)}")


def anything(value: Any, where: str) -> None:
    """Shown as it is, never computed with (timing, environment)."""


def items(item: Check, *, null: bool = False, least: int = 0) -> Check:
    """A list of at least ``least`` items, each checked by ``item``."""
    def check(value: Any, where: str) -> None:
        if value is None and null:
            return
        if not isinstance(value, list):
            raise SchemaError(where, f"must be a list{' or null' if null else ''}, got {_short(value)}")
        if len(value) < least:
            raise SchemaError(where, f"must hold at least {least} item(s), holds {len(value)}")
        for i, entry in enumerate(value):
            item(entry, f"{where}[{i}]")
    return check


def mapping(value_check: Check, *, null: bool = False) -> Check:
    """An object with any keys, each value checked by ``value_check``."""
    def check(value: Any, where: str) -> None:
        if value is None and null:
            return
        if not isinstance(value, dict):
            raise SchemaError(where, f"must be an object{' or null' if null else ''}, got {_short(value)}")
        for key, entry in value.items():
            value_check(entry, f"{where}.{key}")
    return check


def record(required: dict[str, Check], optional: dict[str, Check] | None = None, *, null: bool = False) -> Check:
    """An object with these keys (others are allowed and left alone)."""
    def check(value: Any, where: str) -> None:
        if value is None and null:
            return
        if not isinstance(value, dict):
            raise SchemaError(where, f"must be an object{' or null' if null else ''}, got {_short(value)}")
        for key, key_check in required.items():
            if key not in value:
                raise SchemaError(where, f"lacks {key!r}")
            key_check(value[key], f"{where}.{key}" if where else key)
        for key, key_check in (optional or {}).items():
            if key in value:
                key_check(value[key], f"{where}.{key}" if where else key)
    return check


def either(*checks: Check) -> Check:
    def check(value: Any, where: str) -> None:
        problems = []
        for one in checks:
            try:
                return one(value, where)
            except SchemaError as exc:
                problems.append(str(exc))
        raise SchemaError(where, f"fits none of its forms ({'; '.join(problems)})")
    return check


def _short(value: Any) -> str:
    shown = "null" if value is None else repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


FIGURE = number()
SHARE = number(low=0, high=1)
INTERVAL = record({"estimate": FIGURE, "se": FIGURE, "low": FIGURE, "high": FIGURE, "groups": whole()}, null=True)
MEMBERSHIP = record({"members": whole(), "holdout": whole(), "member_share": SHARE, "expected_share": SHARE,
                     "topk_member_share": SHARE, "distinct_argmax": whole(), "p_value": SHARE,
                     "permutations": whole()}, {"excess_interval": INTERVAL}, null=True)
GATE = either(number(), record({"limit": number()}, {"when": text(), "severity": text()}))
CHECK = record({"key": text(), "figure": text(), "value": FIGURE, "limit": number(), "passed": flag, "when": text(),
                "severity": text(), "low": FIGURE, "high": FIGURE}, {"baseline": FIGURE})
UNITMEM = number(null=False)  # defined for every unit (a dead unit has 0)
LAYER = record({
    "name": text(), "module": text(),
    "unitmem": items(UNITMEM, least=1), "max_sample": items(whole()), "mu_max": items(FIGURE), "mu_rest": items(FIGURE),
    "dead": items(whole()), "top_samples": items(items(whole(low=-1))), "top_values": items(items(FIGURE)),
    "mean_unitmem": UNITMEM, "median_unitmem": UNITMEM, "max_unitmem": UNITMEM, "p90_unitmem": UNITMEM,
    "group_size": whole(), "top_mean": FIGURE, "bottom_mean": FIGURE, "gap": FIGURE, "ttest_t": FIGURE,
    "ttest_p": number(low=0, high=1), "dead_units": whole(),
}, {
    "unit_axis": record({"axis": whole(), "shape": items(whole()), "source": text()}, null=True),
    "intervals": mapping(INTERVAL, null=True), "membership": MEMBERSHIP, "control_mean_unitmem": FIGURE,
    "excess_over_control": INTERVAL, "thresholds": mapping(GATE, null=True), "outcome": text(null=True),
    "checks": items(CHECK, null=True),
})
CORRELATION = record({"rho": FIGURE, "ci_low": FIGURE, "ci_high": FIGURE, "p_value": FIGURE, "n": whole(),
                      "dropped": whole()})
DOCUMENT = record({
    "model": text(),
    "settings": record({"image_size": whole(low=16, high=MAX_STORED_IMAGE_SIZE)}),
    "data_source": text(),
    "samples": items(text()),
    "summary": record({}, {"membership": MEMBERSHIP, "multiple_testing": text()}),
    "layers": items(LAYER, least=1),
}, {
    "checkpoint": either(text(null=True), record({}, {"path": text(null=True), "sha256": text(null=True)})),
    "holdout_source": text(null=True),
    "labels": items(text(choices=LABELS), null=True),
    "skipped": items(record({"id": text(), "reason": text()}), null=True),
    "timing": anything, "environment": anything, "distributed": anything, "notes": items(text(), null=True),
    "canaries": items(record({"id": text()}), null=True),
    "data_points": record({
        "score": items(FIGURE), "argmax_units": items(whole()), "best_rank": items(FIGURE),
        "characteristics": mapping(items(FIGURE)),
        "layer_argmax_units": mapping(record({"index": items(whole()), "count": items(whole())})),
    }, null=True),
    "image_characteristics": mapping(CORRELATION, null=True),
    "image_characteristics_holdout": mapping(CORRELATION, null=True),
    "clusters": record({"layer": text(), "index": items(whole()), "cluster": items(whole()), "silhouette": FIGURE,
                        "sizes": items(whole()), "mean_score": items(FIGURE)}, null=True),
    "classes": record({"names": items(text()), "images": items(whole()), "mean_score": items(FIGURE),
                       "unit_share": items(FIGURE), "kruskal_h": FIGURE, "kruskal_p": FIGURE}, null=True),
    "control": record({"role": text(), "description": text(), "layers": items(LAYER, least=1)},
                      {"membership": MEMBERSHIP}, null=True),
    "planted": record({
        "strength": number(null=False), "top_share": number(null=False),
        "units": items(record({"layer": text(), "unit": whole(), "image_index": whole(), "strength": FIGURE,
                               "scale": FIGURE, "unitmem": FIGURE, "rank": whole(null=True), "found": flag,
                               "argmax_hit": flag, "measured_strength": FIGURE})),
    }, {"membership": MEMBERSHIP, "curve": anything}, null=True),
})


def check_document(document: Any) -> None:
    """SchemaError for the first field of a results document that is not as the schema says, or
    for fields that disagree with each other."""
    DOCUMENT(document, "")
    samples = len(document["samples"])
    if document.get("labels") and len(document["labels"]) != samples:
        raise SchemaError("labels", f"holds {len(document['labels'])} entries for {samples} samples")
    subjects = [("layers", document["layers"], document["summary"].get("membership"))]
    if document.get("control"):
        subjects.append(("control.layers", document["control"]["layers"], document["control"].get("membership")))
    for where, layers, membership in subjects:
        for key in ("name", "module"):
            seen: dict[str, int] = {}
            for i, layer in enumerate(layers):
                if layer[key] in seen:
                    raise SchemaError(f"{where}[{i}].{key}", f"repeats {where}[{seen[layer[key]]}]'s {layer[key]!r}: a "
                                      "layer is listed twice")
                seen[layer[key]] = i
        for i, layer in enumerate(layers):
            _check_layer(layer, f"{where}[{i}]", samples)
            if membership is not None and layer.get("membership") is None:
                raise SchemaError(f"{where}[{i}].membership", "is null, yet the run measured membership (its "
                                  "summary has it): every layer has its own")
    points = document.get("data_points")
    if points:
        for key in ("score", "argmax_units", "best_rank"):
            if len(points[key]) != samples:
                raise SchemaError(f"data_points.{key}", f"holds {len(points[key])} entries for {samples} samples")
        for name, values in points["characteristics"].items():
            if len(values) != samples:
                raise SchemaError(f"data_points.characteristics.{name}", f"holds {len(values)} entries for {samples} "
                                  "samples")
        for name, sparse in points["layer_argmax_units"].items():
            if len(sparse["index"]) != len(sparse["count"]) or any(i >= samples for i in sparse["index"]):
                raise SchemaError(f"data_points.layer_argmax_units.{name}", "does not fit the samples")
    clusters = document.get("clusters")
    if clusters and (len(clusters["index"]) != len(clusters["cluster"]) or any(i >= samples for i in clusters["index"])):
        raise SchemaError("clusters", "does not fit the samples (index and cluster lists)")
    planted = document.get("planted")
    if planted:
        units = {layer["name"]: len(layer["unitmem"]) for layer in document["layers"]}
        for i, unit in enumerate(planted["units"]):
            if unit["image_index"] >= samples or unit["unit"] >= units.get(unit["layer"], 0):
                raise SchemaError(f"planted.units[{i}]", "names a layer, unit or image that is not in the results")


def _check_layer(layer: dict[str, Any], where: str, samples: int) -> None:
    units = len(layer["unitmem"])
    for key in ("max_sample", "mu_max", "mu_rest"):
        if len(layer[key]) != units:
            raise SchemaError(f"{where}.{key}", f"holds {len(layer[key])} entries for {units} units")
    for key in ("top_samples", "top_values"):
        if any(len(row) != units for row in layer[key]):
            raise SchemaError(f"{where}.{key}", f"has a row that does not hold one entry per unit ({units})")
    if any(index >= units for index in layer["dead"]):
        raise SchemaError(f"{where}.dead", f"names a unit outside the layer's {units}")
    if any(index >= samples for index in layer["max_sample"]) or any(
            index >= samples for row in layer["top_samples"] for index in row):
        raise SchemaError(f"{where}", f"names a data point outside the {samples} samples")
