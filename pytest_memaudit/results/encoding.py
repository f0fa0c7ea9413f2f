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

def interval_json(interval: Interval | None) -> dict | None:
    if interval is None:
        return None
    return {"estimate": float_out(interval.estimate), "se": float_out(interval.se), "low": float_out(interval.low),
            "high": float_out(interval.high), "groups": interval.groups}


def interval_from_json(data: dict | None) -> Interval | None:
    if data is None:
        return None
    return Interval(float_in(data["estimate"]), float_in(data["se"]), float_in(data["low"]), float_in(data["high"]),
                    data["groups"])


def membership_json(membership: Membership | None) -> dict | None:
    if membership is None:
        return None
    return {
        "members": membership.members,
        "holdout": membership.holdout,
        "member_share": float_out(membership.member_share),
        "expected_share": float_out(membership.expected_share),
        "excess": float_out(membership.excess),
        "excess_interval": interval_json(membership.excess_interval),
        "topk_member_share": float_out(membership.topk_member_share),
        "distinct_argmax": membership.distinct_argmax,
        "p_value": float_out(membership.p_value),
        "permutations": membership.permutations,
        "units": membership.units,
        "excluded_units": membership.excluded_units,
    }


def membership_from_json(data: dict | None) -> Membership | None:
    if data is None:
        return None
    return Membership(data["members"], data["holdout"], float_in(data["member_share"]), float_in(data["expected_share"]),
                      float_in(data["topk_member_share"]), data["distinct_argmax"], float_in(data["p_value"]),
                      data["permutations"], interval_from_json(data.get("excess_interval")),
                      data.get("units"), data.get("excluded_units", 0))


def check_json(check: Check) -> dict[str, Any]:
    compare = {"baseline": float_out(check.baseline), "relative": check.relative} if math.isfinite(check.baseline) else {}
    return {"key": check.key, "figure": check.figure, "value": float_out(check.value), "limit": check.limit,
            "passed": check.passed, "when": check.when, "severity": check.severity,
            "low": float_out(check.low), "high": float_out(check.high)} | compare


def check_from_json(data: dict[str, Any]) -> Check:
    return Check(data["key"], data["figure"], float_in(data["value"]), data["limit"], data["passed"], data["when"],
                 data["severity"], float_in(data["low"]), float_in(data["high"]), float_in(data.get("baseline")),
                 data.get("relative"))


def planted_json(planted: PlantedResult | None, samples: list[str]) -> dict | None:
    if planted is None:
        return None
    return {
        "strength": planted.strength,
        "top_share": planted.top_share,
        "recall": float_out(planted.recall),
        "argmax_hits": planted.argmax_hits,
        "images": [samples[i] for i in planted.images],
        "detection_strength": planted.detection_strength,
        "curve": planted.curve,
        "membership": membership_json(planted.membership),
        "verdict": None if planted.verdict is None else planted.verdict.as_dict(),
        "units": [
            {"layer": u.plant.layer, "unit": u.plant.unit, "image": samples[u.plant.image],
             "image_index": u.plant.image, "strength": u.plant.strength, "scale": u.plant.scale,
             "unitmem": float_out(u.unitmem), "rank": u.rank, "found": u.found, "argmax_hit": u.argmax_hit,
             "measured_strength": float_out(u.measured_strength)}
            for u in planted.units
        ],
    }


def planted_from_json(data: dict | None, samples: list[str]) -> PlantedResult | None:
    if data is None:
        return None
    units = [
        PlantedUnitResult(PlantedUnit(u["layer"], u["unit"], u["image_index"], u["strength"], u["scale"]),
                          float_in(u["unitmem"]), u["rank"], u["found"], u["argmax_hit"], float_in(u["measured_strength"]))
        for u in data["units"]
    ]
    return PlantedResult(units, data["strength"], data["top_share"], membership_from_json(data.get("membership")),
                         data.get("curve") or [], None if data.get("verdict") is None
                         else Verdict.from_dict(data["verdict"]))


def memorized_json(memorized: Memorized | None, samples: list[str]) -> dict[str, Any]:
    if memorized is None:
        return {"data_points": None, "image_characteristics": None, "image_characteristics_holdout": None,
                "clusters": None, "classes": None}
    points, clusters, classes = memorized.points, memorized.clusters, memorized.classes
    return {
        "data_points": {
            "ids": samples,
            "score": floats_out(points.score),  # kept to datapoints.KEPT_DIGITS when scored
            "argmax_units": points.argmax_units.tolist(),
            "best_rank": [None if math.isnan(r) else int(r) for r in points.best_rank],
            "characteristics": {name: floats_out(values)
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
            "k": int(clusters.sizes.size), "silhouette": float_out(clusters.silhouette),
            "sizes": clusters.sizes.tolist(), "mean_score": floats_out(clusters.mean_score),
        },
        "classes": None if classes is None else {
            "names": classes.names, "images": classes.images.tolist(), "mean_score": floats_out(classes.mean_score),
            "unit_share": floats_out(classes.unit_share), "kruskal_h": float_out(classes.kruskal_h),
            "kruskal_p": float_out(classes.kruskal_p),
        },
    }


def _correlation_json(c: CorrelationResult) -> dict[str, Any]:
    return {"rho": float_out(c.rho), "ci_low": float_out(c.ci_low), "ci_high": float_out(c.ci_high),
            "p_value": float_out(c.p_value), "n": c.n, "dropped": c.dropped}


def memorized_from_json(data: dict[str, Any]) -> Memorized | None:
    entry = data.get("data_points")
    if entry is None:
        return None
    count = len(entry["score"])
    layer_units = {}
    for name, sparse in entry["layer_argmax_units"].items():
        counts = np.zeros(count, dtype=np.int64)
        counts[sparse["index"]] = sparse["count"]
        layer_units[name] = counts
    points = DataPoints(array_in(entry["score"]), np.asarray(entry["argmax_units"], dtype=np.int64),
                        array_in(entry["best_rank"]), layer_units,
                        {name: array_in(values) for name, values in entry["characteristics"].items()})
    clusters = data.get("clusters")
    classes = data.get("classes")
    return Memorized(
        points=points,
        correlations={name: _correlation_from_json(c) for name, c in (data.get("image_characteristics") or {}).items()},
        correlations_holdout={name: _correlation_from_json(c)
                              for name, c in (data.get("image_characteristics_holdout") or {}).items()},
        clusters=None if clusters is None else Clusters(
            clusters["layer"], np.asarray(clusters["index"], dtype=np.int64), np.asarray(clusters["cluster"], dtype=np.int64),
            float_in(clusters["silhouette"]), np.asarray(clusters["sizes"], dtype=np.int64), array_in(clusters["mean_score"])),
        classes=None if classes is None else Classes(
            classes["names"], np.asarray(classes["images"], dtype=np.int64), array_in(classes["mean_score"]),
            array_in(classes["unit_share"]), float_in(classes["kruskal_h"]), float_in(classes["kruskal_p"])),
    )


def _correlation_from_json(data: dict[str, Any]) -> CorrelationResult:
    return CorrelationResult(float_in(data["rho"]), float_in(data["ci_low"]), float_in(data["ci_high"]),
                             float_in(data["p_value"]), data["n"], data["dropped"])


def signal_json(signal: SignalResult) -> dict[str, Any]:
    return {key: float_out(value) if isinstance(value, float) else value for key, value in signal.as_dict().items()}


def signal_from_json(data: dict[str, Any]) -> SignalResult:
    return SignalResult(data["signal"], data["layer"], float_in(data["estimate"]), float_in(data["low"]),
                        float_in(data["high"]), float_in(data["p_value"]), int(data["n_members"]), int(data["n_heldout"]),
                        int(data["permutations"]))


def float_out(value: float | None) -> float | None:
    """JSON has no NaN: undefined figures are written as null."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value)


def float_in(value: Any) -> float:
    """A JSON number read back (null: NaN)."""
    return math.nan if value is None else float(value)


def floats_out(array: np.ndarray) -> list[float | None]:
    """JSON numbers of ``array``, every digit kept (each reads back as the same float64)."""
    return [float_out(v) for v in np.asarray(array, dtype=np.float64).tolist()]


def array_in(values: list[float | None]) -> np.ndarray:
    """``floats_out``'s list read back."""
    return np.array([float_in(v) for v in values], dtype=np.float64)
