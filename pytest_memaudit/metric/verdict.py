"""One verdict on memorization from a family of tests: detected, inconclusive or none.

A test is any object with ``signal, layer, estimate, low, high, p_value`` (its figure, the figure's
95% interval and its one-sided p-value; ``MembershipTest`` is the argmax-membership test of one
layer; ``imagesignals.SignalResult`` is a per-image signal's). The tests of one audited model form
one family, corrected together in two stages: Holm across the layers of each signal (a signal's
p-value is its smallest adjusted one: a valid test of "this signal sees nothing at any layer"),
then Holm across the signals. With one signal this is Holm across its layers. A signal measured
once for the whole model (the loss of the reference attack) then pays for the number of signals,
not for every layer of the others. The verdict says:

- ``detected``: some test's corrected p-value is below ``level`` (VERDICT_LEVEL, the level of the
  default ``membership_p_min`` gate, so that the verdict and the default gates agree);
- ``inconclusive``: none is, but one is below ``SUGGESTIVE_FACTOR`` times ``level`` (0.05), or the
  permutations could not even reach that after the correction; the verdict then gives the estimate,
  its interval, its p before and after the correction, and why there is no verdict;
- ``none``: no corrected p-value is below that. A family with no test that could
  run (every unit dead or constant: a network blind to its input) also gives none, saying so.

Both levels are family-wise: without memorization, an audit says detected at most 1% of the time
and inconclusive or detected at most 5% (a signal in one of 22 layers before the correction is
what chance gives, and is not reported as a signal).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .stats import holm

VERDICT_LEVEL = 0.01
SUGGESTIVE_FACTOR = 5  # inconclusive below SUGGESTIVE_FACTOR x level (0.05 for 0.01), corrected
MEMBERSHIP_SIGNAL = "argmax_membership"  # the membership test's name among signals
OUTCOMES = ("detected", "inconclusive", "none")


@dataclass(frozen=True)
class MembershipTest:
    """One layer's argmax-membership test (``membership.Membership``) as a test of the family."""

    signal: str
    layer: str
    estimate: float  # the member-share excess
    low: float
    high: float
    p_value: float


@dataclass(frozen=True)
class Verdict:
    memorization: str  # detected / inconclusive / none
    p_value: float  # the deciding test's corrected p-value (NaN: no test could run)
    signal: str | None  # the deciding test
    layer: str | None
    estimate: float
    low: float
    high: float
    raw_p_value: float  # its p-value before the correction
    tests: int  # tests in the family (with a p-value)
    correction: str  # how the family was corrected, in words
    level: float
    reason: str  # why this verdict, in words, with the rule

    def as_dict(self) -> dict[str, Any]:
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        values = {key: (math.nan if data.get(key) is None and key in _FLOATS else data.get(key)) for key in _FIELDS}
        return cls(**values)


_FIELDS = tuple(Verdict.__dataclass_fields__)
_FLOATS = ("p_value", "estimate", "low", "high", "raw_p_value", "level")


def membership_tests(layers: Iterable[Any]) -> list[MembershipTest]:
    """The argmax-membership test of every layer that has one (objects with ``name`` and
    ``membership``, as ``results.LayerResult``)."""
    tests = []
    for layer in layers:
        m = layer.membership
        if m is None:
            continue
        interval = m.excess_interval
        tests.append(MembershipTest(MEMBERSHIP_SIGNAL, layer.name, m.excess,
                                    math.nan if interval is None else interval.low,
                                    math.nan if interval is None else interval.high, m.p_value))
    return tests


def smallest_corrected_p(tests: int, permutations: int, method: str = "holm", signals: int = 1) -> float:
    """The smallest corrected p-value a signal of ``tests`` permutation tests of ``permutations``
    relabellings can give among ``signals`` signals: 1 / (permutations + 1) each, times the
    signal's tests and the number of signals under Holm (the first step of each stage)."""
    return (tests * signals if method == "holm" else 1) / (permutations + 1)


def corrected(tests: Sequence[Any]) -> list[float]:
    """Each test's p-value corrected in the two stages of the module's docstring: Holm within its
    signal, then Holm across the signals' smallest adjusted p-values; a test's corrected p is the
    larger of its two stages, so a signal's best test carries its signal's corrected p."""
    by_signal: dict[str, list[int]] = {}
    for i, t in enumerate(tests):
        by_signal.setdefault(t.signal, []).append(i)
    within = [0.0] * len(tests)
    for members in by_signal.values():
        for i, q in zip(members, holm([tests[i].p_value for i in members])):
            within[i] = q
    names = list(by_signal)
    across = dict(zip(names, holm([min(within[i] for i in by_signal[name]) for name in names])))
    return [max(within[i], across[t.signal]) for i, t in enumerate(tests)]


def decide(tests: Sequence[Any], level: float = VERDICT_LEVEL, method: str = "holm",
           permutations: int | None = None) -> Verdict:
    """The verdict of a family of tests (see the module's docstring); ``permutations``: how many
    relabellings the p-values came from, to tell when ``level`` is out of reach."""
    usable = [t for t in tests if t.p_value is not None and math.isfinite(t.p_value)]
    m = len(usable)
    signals = sorted({t.signal for t in usable})
    if method != "holm":
        correction = f"none: {m} test(s) uncorrected"
    elif len(signals) == 1:
        correction = f"Holm across {m} test(s): {signals[0]} x {len({t.layer for t in usable})} layer(s)"
    else:
        correction = (f"Holm across {m} test(s) in two stages: across the layers of each signal, then across "
                      f"{len(signals)} signals ({', '.join(signals)})")
    if not usable:
        return Verdict("none", math.nan, None, None, math.nan, math.nan, math.nan, math.nan, 0, correction, level,
                       "no test could run: every unit responds alike to every image (dead or constant units, "
                       "e.g. a network blind to its input), so nothing tells members from held-out images")
    adjusted = corrected(usable) if method == "holm" else [t.p_value for t in usable]
    order = sorted(range(m), key=lambda i: (adjusted[i], usable[i].p_value, -_finite(usable[i].estimate)))
    best = order[0]
    fewest = min(sum(t.signal == name for t in usable) for name in signals)  # the signal with fewest tests
    smallest = 0.0 if permutations is None else smallest_corrected_p(fewest, permutations, method, len(signals))
    suggestive = SUGGESTIVE_FACTOR * level
    rule = (f"detected when a test's corrected p is below {level:g}, inconclusive when it is below {suggestive:g}, "
            "none otherwise")
    chosen, t = best, usable[best]
    if adjusted[best] < level:
        outcome, why = "detected", f"the smallest corrected p is {_p(adjusted[best])}"
    elif adjusted[best] < suggestive or smallest >= suggestive:  # a signal, or no test could show one
        outcome = "inconclusive"
        if smallest >= level:
            why = (f"{permutations:,} permutations cannot give a corrected p below {level:g} for {m} tests "
                   f"(the smallest is {smallest:.3g}): use at least "
                   f"{math.ceil(fewest * len(signals) / level) if method == 'holm' else math.ceil(1 / level)} "
                   "permutations")
        else:
            why = (f"the smallest corrected p, {_p(adjusted[best])} ({_p(t.p_value)} before the correction), is "
                   f"below {suggestive:g} but not below {level:g}")
    else:
        outcome = "none"
        why = f"the smallest corrected p is {_p(adjusted[best])} ({_p(t.p_value)} before the correction)"
    return Verdict(outcome, float(adjusted[chosen]), t.signal, t.layer, float(t.estimate), float(t.low),
                   float(t.high), float(t.p_value), m, correction, level, f"{why}. Rule: {rule}.")


def _finite(value: float) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"
