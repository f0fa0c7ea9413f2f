"""The report's "What gets memorized" section: per-image scores, the seed report's observations
as hypotheses with their measured answers, characteristics, clusters and classes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..data.characteristics import CHARACTERISTICS
from ..metric.stats import CorrelationResult
from ..results.result import AuditResult
from . import figures
from .format import fmt, fmt_p
from .thumbnails import Gallery

EXTREMES_SHOWN = 50  # highest- and lowest-scoring data points shown
SCATTER_POINTS = 1500  # at most this many points per scatter panel (an even thinning, by score order)
CLUSTER_IMAGES_SHOWN = 12
CLASSES_SHOWN = 10

# The seed report's observations: (statement, characteristic, the sign of rho that supports it).
HYPOTHESES = [
    ("Highly memorized images often show high-frequency patterns, such as grids.", "hf_energy_share", +1),
    ("Highly memorized images often show many edges (grids, insects' legs and wings).", "edge_density", +1),
    ("Least memorized images lack a clear separation between foreground and background.", "centre_border_contrast", +1),
    ("Least memorized images contain green, plant-like areas.", "green_share", -1),
]


def memorized_section(result: AuditResult, gallery: Gallery) -> dict[str, Any] | None:
    memorized = result.memorized
    if memorized is None:
        return None
    points = memorized.points
    order = np.argsort(-points.score, kind="stable")
    return {
        "highest": [_point(result, gallery, i) for i in order[:EXTREMES_SHOWN]],
        "lowest": [_point(result, gallery, i) for i in order[::-1][:EXTREMES_SHOWN]],
        "hypotheses": hypotheses(memorized.correlations, memorized.classes is not None),
        "characteristics": [
            {"name": name, "meaning": CHARACTERISTICS[name], "members": _correlation(c),
             "holdout": _correlation(memorized.correlations_holdout.get(name))}
            for name, c in memorized.correlations.items()
        ],
        "has_holdout": bool(memorized.correlations_holdout),
        "scatter": scatter(result),
        "clusters": clusters(result, gallery),
        "classes": classes(result, gallery),
    }


def _point(result: AuditResult, gallery: Gallery, index: int) -> tuple[Any, str]:
    points = result.memorized.points
    label = result.labels[index] if result.labels else "member"
    return gallery.point(int(index)), f"{points.score[index]:.2f} ({points.argmax_units[index]} units, {label})"


def _correlation(c: CorrelationResult | None) -> dict[str, str] | None:
    if c is None:
        return None
    return {"rho": fmt(c.rho, "+.2f"), "ci": f"[{fmt(c.ci_low, '+.2f')}, {fmt(c.ci_high, '+.2f')}]",
            "p": fmt_p(c.p_value), "n": c.n, "dropped": c.dropped}


def hypotheses(correlations: dict[str, CorrelationResult], has_classes: bool) -> list[dict[str, str]]:
    """Each observation with its measured answer: supported when the members' 95% interval of rho
    lies wholly on its side of 0, contradicted when wholly on the other, else not shown."""
    rows = []
    for statement, name, sign in HYPOTHESES:
        c = correlations.get(name)
        if c is None or math.isnan(c.ci_low) or math.isnan(c.ci_high):
            answer, css, detail = "not measurable here", "muted", ""
        else:
            low, high = sorted((sign * c.ci_low, sign * c.ci_high))  # oriented: above 0 supports it
            if low > 0:
                answer, css = "supported", "yes"
            elif high < 0:
                answer, css = "contradicted", "no"
            else:
                answer, css = "not shown: the interval includes 0", "muted"
            detail = (f"{name}: Spearman rho with the score {fmt(c.rho, '+.2f')} [{fmt(c.ci_low, '+.2f')}, "
                      f"{fmt(c.ci_high, '+.2f')}], p = {fmt_p(c.p_value)}, n = {c.n}")
        rows.append({"statement": statement, "answer": answer, "css": css, "detail": detail})
    rows.append({
        "statement": "Highly memorized images frequently contain insects.",
        "answer": "see the per-class table" if has_classes else "not testable without class labels",
        "css": "muted",
        "detail": "Images in class folders (ImageFolder's layout) give a score per class." if not has_classes else "",
    })
    return rows


def scatter(result: AuditResult) -> figures.ScatterGrid | None:
    memorized = result.memorized
    members = np.array([label == "member" for label in result.labels]) if result.labels else None
    rows = np.flatnonzero(members) if members is not None else np.arange(memorized.points.score.size)
    if not memorized.correlations or rows.size < 3:
        return None
    rows = rows[np.argsort(-memorized.points.score[rows], kind="stable")]
    if rows.size > SCATTER_POINTS:
        rows = rows[np.linspace(0, rows.size - 1, SCATTER_POINTS).astype(int)]
    panels = []
    for name, c in memorized.correlations.items():
        panels.append((name, memorized.points.characteristics[name][rows], memorized.points.score[rows],
                       f"rho {fmt(c.rho, '+.2f')} [{fmt(c.ci_low, '+.2f')}, {fmt(c.ci_high, '+.2f')}]"))
    return figures.scatter_grid(panels, columns=3, y_label="memorization score")


def clusters(result: AuditResult, gallery: Gallery) -> dict[str, Any] | None:
    found = result.memorized.clusters
    if found is None:
        return None
    rows = []
    for k in range(found.sizes.size):
        members = found.index[found.labels == k]
        members = members[np.argsort(-result.memorized.points.score[members], kind="stable")]
        rows.append({"cluster": k, "size": int(found.sizes[k]), "mean": fmt(found.mean_score[k], ".2f"),
                     "images": [_point(result, gallery, i) for i in members[:CLUSTER_IMAGES_SHOWN]]})
    return {"layer": found.layer, "count": int(found.index.size), "silhouette": fmt(found.silhouette, ".2f"),
            "rows": rows}


def classes(result: AuditResult, gallery: Gallery) -> dict[str, Any] | None:
    found = result.memorized.classes
    if found is None:
        return None
    points = result.memorized.points
    order = np.argsort(-found.mean_score, kind="stable")
    shown = {found.names[k] for k in order[:CLASSES_SHOWN]}
    best: dict[str, int] = {}  # the highest-scoring member of each shown class (the first of ties)
    for i, sample in enumerate(result.samples):
        name = sample.split("/", 1)[0]
        if name in shown and (not result.labels or result.labels[i] == "member") and (
                name not in best or points.score[i] > points.score[best[name]]):
            best[name] = i
    rows = []
    for k in order:
        name = found.names[k]
        rows.append({"name": name, "images": int(found.images[k]), "mean": fmt(found.mean_score[k], ".2f"),
                     "share": fmt(found.unit_share[k], ".1%"),
                     "point": gallery.point(best[name]) if name in best else None})
    return {"rows": rows, "h": fmt(found.kruskal_h, ".2f"), "p": fmt_p(found.kruskal_p), "count": len(found.names)}
