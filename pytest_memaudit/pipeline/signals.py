"""SIGTERM during an audit: unwind as Ctrl-C does, so that the audit's cleanup runs.

SIGTERM is what CI runners, ``timeout`` and ``kill`` send. Its default action ends the process at
once, leaving the median reduction's temporary N x units files on disk; SIGINT raises
``KeyboardInterrupt`` instead, and every ``finally`` on the way out runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, the first SIGTERM raises ``KeyboardInterrupt`` (a second one gets the
    default action: a way out if the cleanup hangs); the previous handler is restored afterwards.
    Only the main thread may set signal handlers, so in any other thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
