"""Progress as plain lines, for output that is not a terminal (a CI log, a file), where a progress
bar cannot draw and a long audit would otherwise print nothing between collection and its summary."""

from __future__ import annotations

import time
from collections.abc import Callable

EVERY_S = 30.0  # seconds between progress lines


class ProgressLines:
    """A ``(done, total)`` progress callback (data points of this process's share) that writes a line
    every ``every_s`` seconds: images and views done, views per second since the first batch, and
    the time left at that rate. ``clock`` is injectable (tests do not wait)."""

    def __init__(self, write: Callable[[str], None], views_per_image: int, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        every_s = EVERY_S if every_s is None else every_s
        self.write, self.views, self.every_s, self.clock = write, views_per_image, every_s, clock
        self.start: tuple[float, int] | None = None  # (time, data points done) at the first batch seen
        self.due = clock() + every_s

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if self.start is None or done < self.start[1]:  # the first batch, or the next run of a checkpoint series
            self.start = (now, done)
        if now < self.due:
            return
        self.due = now + self.every_s
        elapsed, streamed = now - self.start[0], done - self.start[1]
        rate = streamed * self.views / elapsed if elapsed > 0 and streamed > 0 else None
        left = "time left unknown" if rate is None else f"about {duration((total - done) * self.views / rate)} left"
        speed = "" if rate is None else f", {rate:.1f} views/s"
        self.write(f"memaudit: {done:,}/{total:,} images ({done * self.views:,}/{total * self.views:,} views)"
                   f"{speed}, {left}")


def duration(seconds: float) -> str:
    """``seconds`` as h/min/s, to the precision a person reads (2 h 05 min, 4 min 10 s, 12 s)."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
