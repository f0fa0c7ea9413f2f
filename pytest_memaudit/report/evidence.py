"""The report's memorization evidence: the membership contrast, the planted and the random
control, side by side ("would this audit have seen memorization if it were there, and does it
stay quiet where there is none").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..metric.membership import Membership
from ..metric.verdict import MEMBERSHIP_SIGNAL, MembershipTest, Verdict, decide
from ..results.result import AuditResult
from . import figures
from .format import fmt, fmt_interval, fmt_p
from .thumbnails import Gallery

HELD_OUT_SHOWN = 12  # held-out images shown that units pick most


def evidence(result: AuditResult) -> list[dict[str, str]]:
    """Three answers, each with its figures and the rule that gave it: the planted control, the
    random control, the model. Each answer is its subject's verdict (verdict.py), worded as measured."""
    if result.membership is None:
        return []
    answers = []
    planted = result.planted
    if planted is not None and planted.membership is not None:
        verdict = planted.verdict or _overall_verdict(planted.membership)
        answers.append({
            "question": "Would this audit see memorization if it were there?",
            "answer": {"detected": "yes: the planted control was detected",
                       "inconclusive": "not reliably: the planted control was inconclusive",
                       "none": "no: the planted control was not detected"}[verdict.memorization],
            "css": {"detected": "yes", "inconclusive": "signal", "none": "no"}[verdict.memorization],
            "detail": (
                f"{sum(u.found for u in planted.default_units)} of {len(planted.default_units)} planted units at "
                f"strength {planted.strength:g} are in the top {planted.top_share:.0%} of UnitMem; "
                f"{planted.argmax_hits} pick their planted image as argmax"
                + (f"; lowest strength found in 90% of its units: {planted.detection_strength:g}"
                   if planted.detection_strength else "; no strength tried was found in 90% of its units")
                + f". Planted images against the other held-out images: {_verdict_sentence(verdict)}"
            ),
        })
    if result.control is not None and result.control.membership is not None:
        verdict = result.control.verdict or _overall_verdict(result.control.membership)
        answers.append({
            "question": "Does it stay quiet where there is no memorization?",
            "answer": {"none": "yes: the random-weights control's verdict is none",
                       "inconclusive": "not clearly: the random-weights control is inconclusive",
                       "detected": "no: memorization detected in the random-weights control (a false alarm, "
                                   "or a flaw in the test)"}[verdict.memorization],
            "css": {"none": "yes", "inconclusive": "signal", "detected": "no"}[verdict.memorization],
            "detail": _verdict_sentence(verdict),
        })
    verdict = result.verdict or _overall_verdict(result.membership)
    answers.append({
        "question": f"Does {result.model} single out its training images?",
        "answer": {"detected": f"yes: memorization detected ({_what_told_members_apart(verdict.signal)})",
                   "inconclusive": "inconclusive: a weak signal, not enough for a verdict",
                   "none": "no evidence: no test tells members from held-out images"}[verdict.memorization],
        "css": {"detected": "signal", "inconclusive": "signal", "none": "yes"}[verdict.memorization],
        "detail": _verdict_sentence(verdict),
    })
    return answers


def _what_told_members_apart(signal: str | None) -> str:
    """The deciding test in words: the verdict may come from any signal of its family."""
    if signal in (None, MEMBERSHIP_SIGNAL):
        return "members are picked by units more than held-out images"
    if signal == "loss":
        return "the model's own loss is lower on members than on held-out images: the reference attack"
    return f"members stand apart from held-out images in the per-image signal {signal}"


def _overall_verdict(m: Membership) -> Verdict:
    """For a stored result without a verdict: the rule applied to its one overall test."""
    interval = m.excess_interval
    return decide([MembershipTest(MEMBERSHIP_SIGNAL, "all layers", m.excess,
                                  math.nan if interval is None else interval.low,
                                  math.nan if interval is None else interval.high, m.p_value)],
                  permutations=m.permutations)


def _verdict_sentence(v: Verdict) -> str:
    if v.layer is None:
        return f"verdict {v.memorization}: {v.reason}"
    return (f"verdict {v.memorization}: the strongest test, {v.signal} at {v.layer}, estimate {v.estimate:+.3f} "
            f"[{v.low:+.3f}, {v.high:+.3f}] (95%), p = {fmt_p(v.raw_p_value)}, {fmt_p(v.p_value)} corrected "
            f"({v.correction}); {v.reason}")


def _membership_sentence(m: Membership, members: str = "a member") -> str:
    left_out = f"; {m.excluded_units} dead or constant units left out" if m.excluded_units else ""
    return (
        f"{m.member_share:.1%} of {'the' if m.units is None else m.units} units have {members} as argmax against {m.expected_share:.1%} "
        f"expected (excess {fmt_interval(m.excess, m.excess_interval, '+.3f')}); p = {fmt_p(m.p_value)} "
        f"({m.permutations:,} permutations over {m.members + m.holdout} data points; "
        f"{m.distinct_argmax} distinct argmax images{left_out})."
    )


def membership_section(result: AuditResult, gallery: Gallery, adjusted: dict[str, dict[str, float]]) -> dict | None:
    """Per-layer membership table and plot, and the held-out images that units pick most."""
    if result.membership is None:
        return None
    control = {layer.name: layer for layer in result.control.layers} if result.control else {}
    rows = []
    for layer in result.layers:
        m = layer.membership
        other = control.get(layer.name)
        rows.append({
            "name": layer.name,
            "share": fmt(m.member_share),
            "expected": fmt(m.expected_share),
            "excess": fmt_interval(m.excess, m.excess_interval, "+.3f"),
            "topk": fmt(m.topk_member_share),
            "distinct": m.distinct_argmax,
            "units": "n/a" if m.units is None else f"{m.units} ({m.excluded_units})",
            "p": fmt_p(m.p_value),
            "p_adjusted": fmt_p(adjusted[layer.name].get("membership_p", math.nan)),
            "control_share": fmt(other.membership.member_share) if other and other.membership else None,
            "control_p": fmt_p(other.membership.p_value) if other and other.membership else None,
        })
    names = [layer.name for layer in result.layers]
    shares = [layer.membership.member_share for layer in result.layers]
    expected = [layer.membership.expected_share for layer in result.layers]
    lows = [layer.membership.excess_interval.low + e if layer.membership.excess_interval else math.nan
            for layer, e in zip(result.layers, expected)]
    highs = [layer.membership.excess_interval.high + e if layer.membership.excess_interval else math.nan
             for layer, e in zip(result.layers, expected)]
    lines = [figures.Line("model", "trained", shares, lows, highs)]
    if control:
        lines.append(figures.Line("random control", "control",
                                  [control[n].membership.member_share if control[n].membership else math.nan
                                   for n in names]))
    lines.append(figures.Line("expected (members' share of the data)", "expected", expected))
    return {
        "overall": _membership_sentence(result.membership),
        "rows": rows,
        "has_control": bool(control),
        "plot": figures.depth_plot(names, lines, y_label="share of units: argmax is a member"),
        "held_out_picks": held_out_picks(result, gallery),
        "permutations": result.membership.permutations,
        "multiple_testing": result.multiple_testing,
    }


def held_out_picks(result: AuditResult, gallery: Gallery) -> list[tuple[Any, int]]:
    """The held-out images that the most units pick as their argmax (pooled with the members)."""
    if result.memorized is None:
        return []
    counts = result.memorized.points.argmax_units
    held = np.array([label != "member" for label in result.labels])
    order = [i for i in np.argsort(-counts, kind="stable") if held[i] and counts[i] > 0][:HELD_OUT_SHOWN]
    return [(gallery.point(i), int(counts[i])) for i in order]


def planted_section(result: AuditResult, gallery: Gallery) -> dict | None:
    planted = result.planted
    if planted is None:
        return None
    units = sorted(planted.units, key=lambda u: (-u.plant.strength, u.rank))
    return {
        "strength": f"{planted.strength:g}",
        "top_share": f"{planted.top_share:.0%}",
        "recall": fmt(planted.recall, ".0%"),
        "hits": f"{planted.argmax_hits} of {len(planted.default_units)}",
        "membership": None if planted.membership is None else _membership_sentence(planted.membership,
                                                                                    "a planted image"),
        "verdict": None if planted.verdict is None else _verdict_sentence(planted.verdict),
        "detection": "none of the strengths tried" if planted.detection_strength is None
        else f"{planted.detection_strength:g}",
        "curve": [{"strength": f"{point['strength']:g}", "units": point["units"], "recall": f"{point['recall']:.0%}",
                   "hits": point["argmax_hits"], "measured": fmt(point["measured_strength"], ".2f")}
                  for point in planted.curve],
        "units": [{"layer": u.plant.layer, "unit": u.plant.unit, "point": gallery.point(u.plant.image),
                   "strength": f"{u.plant.strength:g}", "measured": fmt(u.measured_strength, ".2f"),
                   "unitmem": fmt(u.unitmem), "rank": u.rank, "found": u.found, "hit": u.argmax_hit}
                  for u in units],
    }
