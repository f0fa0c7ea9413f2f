"""A pytest plugin for bench_startup.py: writes the wall-clock time (``time.time()``) at which the
audit's stream of batches starts to the file named by $MEMAUDIT_STARTUP_PROBE. Loaded with
``-p startup_probe`` (benchmarks/ on PYTHONPATH); it imports the audit module when collection is
done, as the plugin itself does a moment later to run the audit."""

import os
import time

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    import pytest_memaudit.pipeline.audit as audit

    stream = audit.stream

    def timed_stream(run, progress):
        with open(os.environ["MEMAUDIT_STARTUP_PROBE"], "w") as out:
            out.write(repr(time.time()))
        return stream(run, progress)

    audit.stream = timed_stream
