"""The pytest layer: the plugin's hooks (this module), options, items, the session's audit, files (and the output
log that writes them), terminal summary.
May import: every other layer (lazily: a run that audits nothing imports no torch).

No metric code lives here. Importing this module imports neither torch nor numpy, so the
plugin costs nothing to pytest runs that collect no audit file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from . import parallel
from .files import write_outputs
from .items import AuditYamlFile, LayerItem, VerdictItem, check_baseline_architecture, is_audit_file
from .options import (CHOICES, DEFAULT_FILE_PATTERNS, DEFAULT_REPORT_DIR, GALLERY_MODES, OPTIONS, OUTPUTS_NOT_WRITTEN,
                      REPEATABLE, add_baseline_options, gallery_mode, list_saved)
from .session import AuditSession, audit_session_key, is_rank_zero, validate_options

if TYPE_CHECKING:
    from ..results.result import AuditResult


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memaudit", "memorization audit (UnitMem) of vision encoders")
    for suffix, kind, help_text in OPTIONS:
        dest = "memaudit_" + suffix.replace("-", "_")
        # No type or choices here: a value is checked by make_settings alone, from the command line
        # and from the ini file alike (one message, one exit status).
        group.addoption(f"--memaudit-{suffix}", dest=dest, default=None,
                        action="append" if suffix in REPEATABLE else "store",
                        metavar="{" + ",".join(CHOICES[suffix]) + "}" if suffix in CHOICES
                        else suffix.split("-")[-1].upper(),
                        help=help_text)
        parser.addini(dest, f"default for --memaudit-{suffix}", default=None)
    group.addoption("--memaudit-threshold", dest="memaudit_threshold", action="append", default=[],
                    metavar="[LAYER:]KEY=VALUE",
                    help="override a threshold for every layer (or one layer), e.g. ttest_p_max=0.01; repeatable")
    group.addoption("--memaudit-json", dest="memaudit_json", metavar="PATH", default=None,
                    help="write the audit's results as JSON to PATH (atomically)")
    parser.addini("memaudit_json", "default for --memaudit-json", default=None)
    group.addoption("--memaudit-html", dest="memaudit_html", metavar="PATH", default=None,
                    help=f"write the HTML audit report to PATH (default: {DEFAULT_REPORT_DIR}/report.html in the "
                         "directory pytest is run from; the JSON goes beside it as results.json unless --memaudit-json "
                         "is given); 'none': no report")
    parser.addini("memaudit_html", "default for --memaudit-html ('none': no report)", default=None)
    group.addoption("--memaudit-gallery", dest="memaudit_gallery", choices=GALLERY_MODES, default=None,
                    help="what the report shows of the audited images: images (thumbnails and file names, default), "
                         "names (file names only) or none (neither: a report that leaks no training data)")
    parser.addini("memaudit_gallery", "default for --memaudit-gallery", default=None)
    parser.addini("memaudit_files", "glob patterns of audit YAML files", type="args",
                  default=DEFAULT_FILE_PATTERNS)
    group.addoption("--memaudit-list-layers", dest="memaudit_list_layers", action="store_true", default=False,
                    help="print the audited model's modules in forward order (output shape, unit axis, units, calls) "
                         "from one forward pass, and exit")
    add_baseline_options(group)


def pytest_configure(config: pytest.Config) -> None:
    state = config.stash[audit_session_key] = AuditSession(config)
    if gallery_mode(config) not in GALLERY_MODES:
        raise pytest.UsageError(f"memaudit: memaudit_gallery must be one of {', '.join(GALLERY_MODES)}, "
                                f"got {gallery_mode(config)!r}")
    if config.pluginmanager.hasplugin("html"):
        config.pluginmanager.register(HtmlReportExtras(), "memaudit-html-extras")
    parallel.register(config, lambda nodeid: is_audit_file(nodeid.split("::", 1)[0], config),
                      state.worker_reports.append)
    validate_options(config, state)


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if is_audit_file(str(file_path), parent.config):
        return AuditYamlFile.from_parent(parent, path=file_path)
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Run the audit once, after -k/-m deselection: for exactly the selected layers, or for every
    layer when a selected test uses the ``memaudit_result`` fixture."""
    state = session.config.stash[audit_session_key]
    state.session = session
    if state.build_error is not None:
        message = f"memaudit: the audit cannot run: {state.build_error}"
        if not parallel.is_worker(session.config):
            raise pytest.UsageError(message)
        state.error = message  # the worker's first layer test fails with it; the controller exits 4
        return
    items = [item for item in session.items if isinstance(item, LayerItem)]
    verdicts = [item for item in session.items if isinstance(item, VerdictItem)]
    for_fixture = any(FIXTURE in getattr(item, "fixturenames", ()) for item in session.items)
    if session.config.option.collectonly or not (items or verdicts or for_fixture):
        return
    if verdicts:  # the verdict is over every layer
        state.wanted_layers = {layer.name for layer in state.spec.layers}
    elif for_fixture:
        from ..errors import ConfigError

        try:
            spec = state.resolve_spec()
        except ConfigError:
            return  # the fixture skips, saying why
        state.wanted_layers = {layer.name for layer in spec.layers}
    else:
        state.wanted_layers = {item.layer.name for item in items}
    state.wanted_checkpoints = {item.checkpoint for item in items + verdicts if item.checkpoint is not None}
    check_baseline_architecture(state)
    if not parallel.is_worker(session.config):  # a worker audits when its first layer test runs, if one does
        state.run()


FIXTURE = "memaudit_result"


@pytest.fixture(scope="session")
def memaudit_result(pytestconfig: pytest.Config) -> "AuditResult":
    """The session's AuditResult, of every layer of the audited model (computed once, when
    collection is done). Skips when no audited model can be found; errors (without a traceback)
    when its audit cannot run."""
    state = pytestconfig.stash[audit_session_key]
    if state.result is None:
        from ..errors import ConfigError

        try:
            state.resolve_spec()
        except ConfigError as exc:
            pytest.skip(f"memaudit: {exc}")
        state.wanted_layers = {layer.name for layer in state.spec.layers}
        try:
            state.run()
        except pytest.UsageError as exc:
            pytest.fail(str(exc), pytrace=False)
    return state.result


def pytest_cmdline_main(config: pytest.Config):
    """``--memaudit-list-layers``: print the audited model's modules and exit, like ``--fixtures``;
    ``--memaudit-list-saved``: the same with the saved runs (``list_saved``)."""
    if config.getoption("memaudit_list_saved"):
        return list_saved(config)
    if not config.getoption("memaudit_list_layers"):
        return None
    from .discovery import layer_table
    from ..errors import AuditError

    state = AuditSession(config)
    try:
        spec = state.resolve_spec()
        sys.stdout.write(layer_table(spec, state.load_settings()))
    except AuditError as exc:
        raise pytest.UsageError(f"memaudit: {exc}") from None
    return 0


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(audit_session_key, None)
    if state is None or not is_rank_zero():  # every process has the result; process 0 writes it
        return
    if state.writes_outputs():
        state.outputs = write_outputs(state)
    if parallel.is_worker(session.config):
        parallel.send_to_controller(session.config, state.report(markup=False))
        return
    could_not_run, unwritten = state.problems()
    if could_not_run:
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
    elif unwritten and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = OUTPUTS_NOT_WRITTEN


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = config.stash.get(audit_session_key, None)
    if not is_rank_zero():
        return
    shown_errors = set()  # xdist workers that could not audit report the same error: say it once
    for report in state.reports(markup=terminalreporter.hasmarkup) if state else ():
        if report["summary"] is not None:
            terminalreporter.section("memaudit summary")
            terminalreporter.write(report["summary"])
        for line in report["written"]:
            terminalreporter.write_line(f"memaudit: {line}")
        for line in report["errors"]:
            terminalreporter.write_line(f"memaudit: ERROR: {line}", red=True, bold=True)
        if report["error"] and report["error"] not in shown_errors:
            shown_errors.add(report["error"])
            terminalreporter.write_line(f"ERROR: {report['error']}", red=True, bold=True)


class HtmlReportExtras:
    """Adds each layer's figures to its row of a pytest-html report; registered only with pytest-html."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        if call.when != "call" or not isinstance(item, LayerItem) or not item.user_properties:
            return
        from html import escape

        from pytest_html import extras

        report = outcome.get_result()
        rows = "".join(f"<tr><td>{escape(str(name))}</td><td>{escape(str(value))}</td></tr>"
                       for name, value in item.user_properties)
        report.extras = [*getattr(report, "extras", []), extras.html(f"<table>{rows}</table>")]
