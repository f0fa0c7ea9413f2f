"""The JSON of the parts a result holds (intervals, membership, checks, planted units, memorized data
points, per-image signals), both ways; NaN and infinities are written as null."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..analysis.datapoints import Classes, Clusters, DataPoints, Memorized
from ..controls.planted import PlantedResult, PlantedUnit, PlantedUnitResult
from ..metric.imagesignals import SignalResult
from ..metric.membership import Membership
from ..metric.stats import CorrelationResult, Interval
from ..metric.verdict import Verdict
from .outcomes import Check

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
        "units": membership.units,
        "excluded_units": membership.excluded_units,
    }


def _membership_from_json(data: dict | None) -> Membership | None:
    if data is None:
        return None
    return Membership(data["members"], data["holdout"], _float(data["member_share"]), _float(data["expected_share"]),
                      _float(data["topk_member_share"]), data["distinct_argmax"], _float(data["p_value"]),
                      data["permutations"], _interval_from_json(data.get("excess_interval")),
                      data.get("units"), data.get("excluded_units", 0))


def _check_json(check: Check) -> dict[str, Any]:
    compare = {"baseline": _number(check.baseline), "relative": check.relative} if math.isfinite(check.baseline) else {}
    return {"key": check.key, "figure": check.figure, "value": _number(check.value), "limit": check.limit,
            "passed": check.passed, "when": check.when, "severity": check.severity,
            "low": _number(check.low), "high": _number(check.high)} | compare


def _check_from_json(data: dict[str, Any]) -> Check:
    return Check(data["key"], data["figure"], _float(data["value"]), data["limit"], data["passed"], data["when"],
                 data["severity"], _float(data["low"]), _float(data["high"]), _float(data.get("baseline")),
                 data.get("relative"))


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
        "verdict": None if planted.verdict is None else planted.verdict.as_dict(),
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
                         data.get("curve") or [], None if data.get("verdict") is None
                         else Verdict.from_dict(data["verdict"]))


def _memorized_json(memorized: Memorized | None, samples: list[str]) -> dict[str, Any]:
    if memorized is None:
        return {"data_points": None, "image_characteristics": None, "image_characteristics_holdout": None,
                "clusters": None, "classes": None}
    points, clusters, classes = memorized.points, memorized.clusters, memorized.classes
    return {
        "data_points": {
            "ids": samples,
            "score": _floats(points.score),  # kept to datapoints.KEPT_DIGITS when scored
            "argmax_units": points.argmax_units.tolist(),
            "best_rank": [None if math.isnan(r) else int(r) for r in points.best_rank],
            "characteristics": {name: _floats(values)
                                for name, values in points.characteristics.items()},
            "layer_argmax_units": {name: {"index": np.flatnonzero(counts).tolist(),
                                          "count": counts[counts > 0].tolist()}
                                   for name, counts in points.layer_argmax_units.items()},
        },
        "image_characteristics": {name: _correlation_json(c) for name, c in memorized.correlations.items()},
        "image_characteristics_holdout": {name: _correlation_json(c)
                                          for name, c in memorized.correlations_holdout.items()} or None,
        "clusters": None if clusters is None else {
            "layer": clusters.layer, "index": clusters.index.tolist(), "cluster": clusters.labels.tolist(),
            "k": int(clusters.sizes.size), "silhouette": _number(clusters.silhouette),
            "sizes": clusters.sizes.tolist(), "mean_score": _floats(clusters.mean_score),
        },
        "classes": None if classes is None else {
            "names": classes.names, "images": classes.images.tolist(), "mean_score": _floats(classes.mean_score),
            "unit_share": _floats(classes.unit_share), "kruskal_h": _number(classes.kruskal_h),
            "kruskal_p": _number(classes.kruskal_p),
        },
    }


def _correlation_json(c: CorrelationResult) -> dict[str, Any]:
    return {"rho": _number(c.rho), "ci_low": _number(c.ci_low), "ci_high": _number(c.ci_high),
            "p_value": _number(c.p_value), "n": c.n, "dropped": c.dropped}


def _memorized_from_json(data: dict[str, Any]) -> Memorized | None:
    entry = data.get("data_points")
    if entry is None:
        return None
    count = len(entry["score"])
    layer_units = {}
    for name, sparse in entry["layer_argmax_units"].items():
        counts = np.zeros(count, dtype=np.int64)
        counts[sparse["index"]] = sparse["count"]
        layer_units[name] = counts
    points = DataPoints(_array(entry["score"]), np.asarray(entry["argmax_units"], dtype=np.int64),
                        _array(entry["best_rank"]), layer_units,
                        {name: _array(values) for name, values in entry["characteristics"].items()})
    clusters = data.get("clusters")
    classes = data.get("classes")
    return Memorized(
        points=points,
        correlations={name: _correlation_from_json(c) for name, c in (data.get("image_characteristics") or {}).items()},
        correlations_holdout={name: _correlation_from_json(c)
                              for name, c in (data.get("image_characteristics_holdout") or {}).items()},
        clusters=None if clusters is None else Clusters(
            clusters["layer"], np.asarray(clusters["index"], dtype=np.int64), np.asarray(clusters["cluster"], dtype=np.int64),
            _float(clusters["silhouette"]), np.asarray(clusters["sizes"], dtype=np.int64), _array(clusters["mean_score"])),
        classes=None if classes is None else Classes(
            classes["names"], np.asarray(classes["images"], dtype=np.int64), _array(classes["mean_score"]),
            _array(classes["unit_share"]), _float(classes["kruskal_h"]), _float(classes["kruskal_p"])),
    )


def _correlation_from_json(data: dict[str, Any]) -> CorrelationResult:
    return CorrelationResult(_float(data["rho"]), _float(data["ci_low"]), _float(data["ci_high"]),
                             _float(data["p_value"]), data["n"], data["dropped"])


def _signal_json(signal: SignalResult) -> dict[str, Any]:
    return {key: _number(value) if isinstance(value, float) else value for key, value in signal.as_dict().items()}


def _signal_from_json(data: dict[str, Any]) -> SignalResult:
    return SignalResult(data["signal"], data["layer"], _float(data["estimate"]), _float(data["low"]),
                        _float(data["high"]), _float(data["p_value"]), int(data["n_members"]), int(data["n_heldout"]),
                        int(data["permutations"]))


def _number(value: float | None) -> float | None:
    """JSON has no NaN: undefined figures are written as null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _floats(array: np.ndarray) -> list[float | None]:
    """JSON numbers of ``array``, every digit kept (each reads back as the same float64)."""
    return [_number(v) for v in np.asarray(array, dtype=np.float64).tolist()]


def _array(values: list[float | None]) -> np.ndarray:
    return np.array([_float(v) for v in values], dtype=np.float64)
