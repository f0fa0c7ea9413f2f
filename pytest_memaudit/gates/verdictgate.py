"""The verdict gate: the audited model's verdict (metric/verdict.py) against the ``verdict_p_min`` threshold.

One gate for the whole model, beside each layer's gates, and one test item in pytest: it fails
when the verdict is ``detected``, i.e. when the smallest corrected p over every signal and layer
(the loss attack's included) is below its limit. That limit is also the level of every verdict of
the run (the model's, the random and planted controls') and of the answers built on them, so the
gate, the verdicts and the answers cannot disagree. A verdict that has no test (no held-out images,
or a network whose every unit is constant) cannot be gated: the item is skipped, saying why.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..metric.verdict import GATED_AS, VERDICT_LEVEL, Verdict, gate_sentence, smallest_corrected_p
from ..results.outcomes import Check, Gate, GateOutcome

if TYPE_CHECKING:
    from ..results.result import AuditResult

VERDICT_GATE = "verdict_p_min"  # the threshold key (gates.LIMITS); set for the model, never per layer
VERDICT_FIGURE = "verdict_p"
ITEM = GATED_AS  # the test item's name: audits/memaudit.yaml::verdict


def verdict_gate(thresholds: dict[str, dict[str, Gate | float]]) -> Gate | None:
    """The ``verdict_p_min`` gate of the model (the same in every layer's ``thresholds``); None when off."""
    gate = next((limits.get(VERDICT_GATE) for limits in thresholds.values()), None)
    return gate if isinstance(gate, Gate) and gate.limit is not None else None


def level_of(gate: Gate | None) -> float:
    """The verdicts' level: the gate's limit, or VERDICT_LEVEL when the gate is off."""
    return VERDICT_LEVEL if gate is None else float(gate.limit)


def apply_level(result: AuditResult, level: float) -> None:
    """Every verdict of ``result`` (the model's, its random control's, its planted control's) at ``level``."""
    if result.verdict is not None:
        result.verdict = result.verdict.at_level(level)
    for subject in (result.control, result.planted):
        if subject is not None and subject.verdict is not None:
            subject.verdict = subject.verdict.at_level(level)


def not_testable(verdict: Verdict | None) -> str | None:
    """Why ``verdict`` cannot be gated, or None when it can."""
    if verdict is None:
        return (f"not testable: {VERDICT_GATE} needs held-out images to contrast with the members, and this audit "
                "has none (--memaudit-holdout DIR)")
    if verdict.tests == 0 or not math.isfinite(verdict.p_value):
        return f"not testable: {verdict.reason}"
    return None


def evaluate_verdict(verdict: Verdict, gate: Gate) -> GateOutcome:
    """The gate's outcome: crossed when the verdict's corrected p is below the limit (the verdict is detected)."""
    check = Check(VERDICT_GATE, VERDICT_FIGURE, verdict.p_value, float(gate.limit),
                  not verdict.p_value < gate.limit, severity=gate.severity, low=verdict.low, high=verdict.high)
    return GateOutcome(ITEM, (check,))


def smallest_verdict_p(layers: int, has_loss: bool, views: int, permutations: int, method: str) -> tuple[float, int]:
    """(the smallest corrected p the verdict's family can reach, the count of permutations that would
    reach ``1 / (that count + 1)`` per test) for an audit of ``layers`` layers: the argmax membership and
    every per-image signal at each layer (view alignment needs 2 views), and the loss, if any, once."""
    from ..metric.imagesignals import SIGNALS

    per_layer = [s for s in SIGNALS if s != "loss" and (s != "view_alignment" or views >= 2)]
    signals = 1 + len(per_layer) + int(has_loss)
    fewest = 1 if has_loss else layers
    return smallest_corrected_p(fewest, permutations, method, signals), fewest * signals if method == "holm" else 1


def gate_result(result: AuditResult, thresholds: dict[str, dict[str, Gate | float]]) -> GateOutcome | None:
    """Gate ``result``'s verdict without pytest, as the plugin's item does: every verdict of the result
    set to the level of ``thresholds``' verdict_p_min (``AuditFile.thresholds_for``), then the gate's
    outcome, also kept on the result; None when the gate is off or the verdict not testable."""
    gate = verdict_gate(thresholds)
    apply_level(result, level_of(gate))
    if gate is None or not_testable(result.verdict) is not None:
        return None
    result.verdict_gate = evaluate_verdict(result.verdict, gate)
    return result.verdict_gate


def gate_message(verdict: Verdict, outcome: GateOutcome) -> str:
    """The verdict gate's outcome in words, naming the deciding figure, its value and the limit."""
    check = outcome.checks[0]
    return gate_sentence(verdict, VERDICT_GATE, check.limit, not check.passed)
