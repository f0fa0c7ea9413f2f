"""pytest-xdist support: the audit runs once, on one worker, and the controller reports it.

Under ``-n N`` every worker collects every test, and the controller deals the tests out. Left to
itself, ``--dist load`` spreads the layer tests over the workers and each worker audits (and
writes the same files). Here the scheduler sends every test of an audit file to one worker, which
computes the audit when its first layer test runs and writes the outputs; it passes the summary,
the output lines and any error to the controller, whose terminal and exit status show them.

Nothing here imports xdist: its hooks are registered only when pytest-xdist is installed.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

REPORT_KEY = "memaudit"  # in an xdist worker's workeroutput
GROUPED_MODES = ("load", "loadgroup", "worksteal")  # modes that would split the audit's tests
AUDIT_SCOPE = "memaudit"  # the work unit that holds every audit test


def is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def send_to_controller(config: pytest.Config, report: dict[str, Any] | None) -> None:
    """In a worker: what the controller should show (plain data: it travels through execnet)."""
    if report is not None:
        config.workeroutput[REPORT_KEY] = report


def register(config: pytest.Config, is_audit_test: Callable[[str], bool],
             receive: Callable[[dict[str, Any]], None]) -> None:
    """Register the xdist hooks, when pytest-xdist is installed. ``is_audit_test(nodeid)`` says which
    tests belong to the audit; ``receive(report)`` gets each worker's report, in the controller."""
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(is_audit_test, receive), "memaudit-xdist")


class XdistHooks:
    def __init__(self, is_audit_test: Callable[[str], bool], receive: Callable[[dict[str, Any]], None]):
        self.is_audit_test = is_audit_test
        self.receive = receive

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getvalue("dist") not in GROUPED_MODES:
            return None  # loadscope and loadfile keep a file's tests together already; each runs all
        return audit_scheduling(config, log, self.is_audit_test)

    @pytest.hookimpl
    def pytest_testnodedown(self, node, error) -> None:
        report = (getattr(node, "workeroutput", None) or {}).get(REPORT_KEY)
        if report is not None:
            self.receive(report)


def audit_scheduling(config: pytest.Config, log, is_audit_test: Callable[[str], bool]):
    """xdist's load-group scheduling with every audit test in one group: other tests are dealt out
    one by one as ``--dist load`` deals them (or by their ``xdist_group`` under ``loadgroup``)."""
    from xdist.scheduler import LoadGroupScheduling

    class AuditScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return AUDIT_SCOPE if is_audit_test(nodeid) else super()._split_scope(nodeid)

    return AuditScheduling(config, log)
