"""How the report writes numbers: once, here, so every table and caption agrees (``n/a`` for
undefined figures)."""

from __future__ import annotations

import math

from ..metric.stats import Interval


def fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def fmt_p(value: float | None) -> str:
    """A p-value to two significant figures."""
    return fmt(value, ".2g")


def fmt_interval(value: float | None, interval: Interval | None, spec: str = ".3f") -> str:
    """``value [low, high]``, or the value alone when there is no finite interval."""
    text = fmt(value, spec)
    if interval is None or not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return text
    return f"{text} [{format(interval.low, spec)}, {format(interval.high, spec)}]"
