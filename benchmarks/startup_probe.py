"""A pytest plugin for bench_startup.py: writes the wall-clock time (``time.time()``) at which the
audit's stream of batches starts to the file named by $MEMAUDIT_STARTUP_PROBE. Loaded with
``-p startup_probe`` (benchmarks/ on PYTHONPATH); it imports the audit module only when the first
test runs, as the audit itself does a moment later."""

import os
import time

import pytest

_patched = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    global _patched
    if _patched:
        return
    _patched = True
    import pytest_memaudit.audit as audit

    stream = audit.stream

    def timed_stream(run, progress):
        with open(os.environ["MEMAUDIT_STARTUP_PROBE"], "w") as out:
            out.write(repr(time.time()))
        return stream(run, progress)

    audit.stream = timed_stream
