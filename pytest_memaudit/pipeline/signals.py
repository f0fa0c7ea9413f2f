"""SIGTERM during an audit: unwind as Ctrl-C does, so that the audit's cleanup runs.

SIGTERM is what CI runners, ``timeout`` and ``kill`` send. Its default action ends the process at
once, leaving the median reduction's temporary N x units files on disk; SIGINT raises
``KeyboardInterrupt`` instead, and every ``finally`` on the way out runs.

A process of a multi-process audit that lost the others is ending with an error that names them;
its launcher (torchrun) answers the lost process by sending SIGTERM to every other process, and
that signal must not take the error's place (``ignore_terminate``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_ending = False  # set by ignore_terminate: SIGTERM stays ignored for the rest of the process


def ignore_terminate() -> None:
    """From now on this process ignores SIGTERM: it is already ending with an error (it lost the other
    processes of its audit) that a launcher's SIGTERM, sent because of that loss, would cut short
    before the error is shown. SIGKILL (a launcher's last resort) and SIGINT still end it."""
    global _ending
    _ending = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, the first SIGTERM raises ``KeyboardInterrupt`` (a second one gets the
    default action: a way out if the cleanup hangs); the previous handler is restored afterwards.
    Only the main thread may set signal handlers, so in any other thread nothing changes."""
    if _ending or threading.current_thread() is not threading.main_thread():
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
        signal.signal(signal.SIGTERM, signal.SIG_IGN if _ending else signal.SIG_DFL if previous is None else previous)
