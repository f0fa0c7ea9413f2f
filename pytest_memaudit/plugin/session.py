"""The session's audit (``AuditSession``, stashed on the config): settings, model and result, computed once,
and the progress shown while it runs."""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import parallel
from .options import OPTIONS, is_given, check_output_locations, compare_fail_options

if TYPE_CHECKING:
    from ..gates.compare import Comparison
    from ..gates.config import AuditCatalog, AuditFile
    from ..pipeline.settings import RunSettings
    from ..models import ModelSpec
    from .outputs import OutputLog
    from ..results.result import AuditResult


@dataclass
class AuditSession:
    """The session's audit, stashed on the config: settings once, the result once."""

    config: pytest.Config
    settings: "RunSettings | None" = None
    spec: "ModelSpec | None" = None
    result: "AuditResult | None" = None
    wanted_layers: set[str] = field(default_factory=set)
    multiple_testing: str = "holm"
    unapplied_compare_gates: bool = False  # the audit files have compare gates, and nothing to compare with
    unevaluated_holdout_gates: set[str] = field(default_factory=set)  # --memaudit-holdout none: gates left out
    _adjusted_p: dict = field(default_factory=dict)
    outputs: "OutputLog | None" = None  # what the session's end wrote, and what it could not
    session: pytest.Session | None = None
    error: str | None = None  # why the audit cannot run, in an xdist worker (elsewhere: a UsageError)
    worker_reports: list[dict[str, Any]] = field(default_factory=list)  # in the xdist controller
    stored: "dict[str | None, AuditResult] | None" = None  # --memaudit-from: the finished audit(s) to gate
    stored_path: Path | None = None
    baseline: "AuditResult | None" = None  # --memaudit-compare: the run to compare with
    baseline_label: str | None = None
    compare_previous: bool = False  # --memaudit-compare previous: each checkpoint of a series with the one before
    thresholds: dict[str, dict] = field(default_factory=dict)  # each collected layer's
    series: dict[str, str] | None = None  # a checkpoint series: label -> checkpoint path, in series order
    wanted_checkpoints: set[str] = field(default_factory=set)
    runs: "dict[str | None, AuditResult]" = field(default_factory=dict)  # results by checkpoint label (None: one run)
    _comparisons: dict = field(default_factory=dict)
    catalog: "AuditCatalog | None" = None
    _user_net: Any = None  # a user model, built at collection to check its layer names; the audit reuses it
    build_error: str | None = None  # why that build failed (a usage error once collection is done)
    verdict_level: float | None = None  # the verdicts' level, the audit files' verdict_p_min (None: the default's)

    def load_settings(self) -> "RunSettings":
        if self.settings is None and self.stored is not None:
            from ..pipeline.settings import settings_from_record

            self.settings = settings_from_record(next(iter(self.stored.values())).settings)
        if self.settings is None:
            from ..pipeline.settings import make_settings

            values = {}
            for suffix, kind, _ in OPTIONS:
                dest = "memaudit_" + suffix.replace("-", "_")
                value = self.config.getoption(dest)
                if value is None:
                    value = self.config.getini(dest)
                values[dest.removeprefix("memaudit_")] = value if value not in ("", None) else None
            values["checkpoint"] = self.load_checkpoints(values["checkpoint"])
            self.settings = make_settings(**values)
        return self.settings

    def load_checkpoints(self, given: "list[str] | str | None") -> str | None:
        """--memaudit-checkpoint, given several times or as a glob: a series of two or more checkpoints sets
        ``series``; the first (or only) checkpoint is returned."""
        if not given:
            return None
        from ..pipeline.settings import checkpoint_series

        paths = checkpoint_series([given] if isinstance(given, str) else given, self.config.invocation_params.dir)
        if len(paths) > 1:
            self.series = paths
        return next(iter(paths.values()))

    def load_catalog(self) -> "AuditCatalog":
        """The audit files under the collected paths and the models they declare (read once)."""
        if self.catalog is None:
            from ..gates.config import load_catalog

            self.catalog = load_catalog(audit_files(self.config, collected_paths(self.config)))
        return self.catalog

    def audit_file(self, path: Path) -> "AuditFile":
        """The catalog's reading of ``path`` (added to it if the search for audit files missed it)."""
        catalog = self.load_catalog()
        path = path.resolve()
        if path not in catalog.files:
            from ..gates.config import load_audit_file

            catalog.add(load_audit_file(path))
        return catalog.files[path]

    def resolve_spec(self) -> "ModelSpec":
        """The audited model: built in, or declared in an audit file under the collected paths, or
        else anywhere under the rootdir (a test file of one's own, run alone). ConfigError if none."""
        if self.spec is None:
            from ..gates.config import load_catalog
            from ..models import BUILTIN_MODELS

            name = self.load_settings().model
            catalog = self.load_catalog()
            if name not in catalog.models and name not in BUILTIN_MODELS:
                found = [path for path in audit_files(self.config, [self.config.rootpath])
                         if path not in catalog.files]
                declaring = load_catalog(found)
                if name in declaring.models:
                    catalog = declaring
            self.spec = catalog.model_spec(name)
        return self.spec

    def user_model(self, spec: "ModelSpec"):
        """A user model, built once (None when that failed: ``build_error`` says why)."""
        if self._user_net is None and self.build_error is None:
            from ..errors import AuditError

            try:
                self._user_net = spec.build(spec.locate(self.load_settings().checkpoint))
            except AuditError as exc:
                self.build_error = str(exc)
        return self._user_net

    def threshold_overrides(self) -> dict[str, dict[str, float | None]]:
        from ..gates.limits import parse_threshold_option

        overrides: dict[str, dict[str, float | None]] = {}
        for text in self.config.getoption("memaudit_threshold"):
            layer, key, value = parse_threshold_option(text)
            overrides.setdefault(layer, {})[key] = value
        for layer, key, value in compare_fail_options(self.config):
            overrides.setdefault(layer, {})[key] = value
        return overrides

    def adjusted_p(self, checkpoint: str | None = None) -> dict[str, dict[str, float]]:
        """A result's p-value figures per layer, corrected across its layers (once)."""
        if checkpoint not in self._adjusted_p:
            from ..gates.thresholds import adjusted_p_values

            self._adjusted_p[checkpoint] = adjusted_p_values(self.result_for(checkpoint), self.multiple_testing)
        return self._adjusted_p[checkpoint]

    def result_for(self, checkpoint: str | None = None) -> "AuditResult":
        """The result of one checkpoint of a series (None: of the one run)."""
        self.run()
        return self.runs[checkpoint]

    def run(self) -> "AuditResult":
        """Compute the audit for every wanted layer (once); AuditError -> pytest.UsageError.

        In an xdist worker a UsageError would only fail the test that asked: instead the test fails
        with the message, the worker stops, and the controller reports the error (exit status 4).
        """
        if self.result is None and self.error is None and self.stored is not None:
            self._set_runs({label: stored.select_layers(self.wanted_layers) for label, stored in self.stored.items()
                            if label in self.audited_checkpoints()})
        if self.result is None and self.error is None:
            from ..pipeline.audit import run_audit, run_series
            from ..errors import AuditError

            layers = [layer.name for layer in self.spec.layers if layer.name in self.wanted_layers]
            spec = self.spec
            if self._user_net is not None:  # built at collection, from the (first) checkpoint
                built_from, build = spec.locate(self.settings.checkpoint), spec.build
                spec = replace(spec, build=lambda checkpoint: self._user_net if checkpoint == built_from
                               else build(checkpoint))
            try:
                from ..pipeline.settings import check_image_fits

                check_image_fits(self.settings)
                check_output_locations(self.config)
                labels = self.audited_checkpoints()
                with _progress(self.config, max(1, self.settings.augmentations)) as progress:
                    if self.series:
                        paths = [self.series[label] for label in labels]
                        self._set_runs(dict(zip(labels, run_series(self.settings, paths, spec, layers, progress))))
                    else:
                        self._set_runs({None: run_audit(self.settings, spec, layers, progress)})
            except AuditError as exc:
                self._cannot_run(f"memaudit: the audit cannot run: {exc}")
        if self.error is not None:
            if self.session is not None:
                self.session.shouldstop = self.error
            pytest.fail(self.error, pytrace=False)
        return self.result

    def audited_checkpoints(self) -> list[str | None]:
        """The checkpoints of the series with a selected test (all of them for the memaudit_result fixture),
        in series order; [None] for one run."""
        labels = list(self.series or self.stored or [None])
        if labels == [None]:
            return labels
        return [label for label in labels if label in self.wanted_checkpoints] or labels

    def _set_runs(self, runs: "dict[str | None, AuditResult]") -> None:
        for result in runs.values():
            result.multiple_testing = self.multiple_testing
            from ..gates.verdictgate import apply_level, level_of

            apply_level(result, level_of(None) if self.verdict_level is None else self.verdict_level)
            if self.unapplied_compare_gates:
                result.notes.append("the audit files' compare gates (compare:) were not applied: there was no "
                                    "baseline to compare with (--memaudit-compare NAME|PATH|latest)")
            if self.unevaluated_holdout_gates:
                result.notes.append(f"not evaluated: {', '.join(sorted(self.unevaluated_holdout_gates))}: these gates "
                                    "need held-out images and this run has none (--memaudit-holdout none); the layers "
                                    "were gated on the rest")
        self.runs = runs
        self.result = list(runs.values())[-1]  # what the summary and report show in full: the last checkpoint

    def _cannot_run(self, message: str) -> None:
        """A usage error; in an xdist worker, the error the controller reports (see ``run``)."""
        if not parallel.is_worker(self.config):
            raise pytest.UsageError(message) from None
        self.error = message

    def comparison(self, checkpoint: str | None = None) -> "Comparison | None":
        """A result compared with its baseline (once): the one --memaudit-compare names, or with
        ``previous`` the checkpoint before it in the series. None when it has none."""
        self.run()
        if checkpoint not in self._comparisons and self.error is None:
            self._comparisons[checkpoint] = None
            baseline, label = self.baseline, self.baseline_label
            if self.compare_previous:
                labels = list(self.runs)
                before = labels.index(checkpoint) - 1
                baseline = self.runs[labels[before]] if before >= 0 else None
                label = f"the previous checkpoint, {labels[before]}"
            if baseline is not None:
                from ..gates.compare import compare
                from ..errors import AuditError

                try:
                    self._comparisons[checkpoint] = compare(self.runs[checkpoint], baseline, label, self.thresholds)
                except AuditError as exc:
                    self._cannot_run(f"memaudit: cannot compare with the baseline: {exc}")
        if self.error is not None:
            pytest.fail(self.error, pytrace=False)
        return self._comparisons[checkpoint]

    def compared(self) -> "dict[str | None, Comparison | None]":
        """The comparisons made so far (by the layer tests), by checkpoint, without failing."""
        return {checkpoint: self._comparisons.get(checkpoint) for checkpoint in self.runs}

    def rise_figures(self, layer: str, checkpoint: str | None = None) -> dict:
        """The layer's ``<figure>_rise`` figures for the compare gates (none without a baseline)."""
        comparison = self.comparison(checkpoint) if self.baseline is not None or self.compare_previous else None
        change = None if comparison is None else comparison.layer(layer)
        return {} if change is None else change.rise_figures()

    def writes_outputs(self) -> bool:
        """Whether this process writes the outputs: it has a result and, in an xdist worker, ran the
        layer tests (a worker that computed it only for the memaudit_result fixture leaves them)."""
        if self.result is None:
            return False
        if not parallel.is_worker(self.config) or not self.wanted_layers:
            return True
        return any(layer.outcome is not None or result.verdict_gate is not None
                   for result in self.runs.values() for layer in result.layers)

    def report(self, markup: bool) -> dict[str, Any] | None:
        """What this process has to show at the end: the summary, the output lines, the error."""
        if self.outputs is None and self.error is None:
            return None
        from .terminal import render_series_summary

        summary = None if self.outputs is None else render_series_summary(self.runs, self.compared(), markup)
        return {"summary": summary,
                "written": [] if self.outputs is None else self.outputs.written,
                "errors": [] if self.outputs is None else self.outputs.errors, "error": self.error}

    def reports(self, markup: bool) -> list[dict[str, Any]]:
        """This process's report, and in the xdist controller those its workers sent."""
        own = self.report(markup)
        return ([own] if own else []) + self.worker_reports

    def problems(self) -> tuple[bool, bool]:
        """(the audit could not run, an output could not be written), here or in an xdist worker."""
        could_not_run = self.error is not None or any(report["error"] for report in self.worker_reports)
        unwritten = bool(self.outputs and self.outputs.errors) or any(
            report["errors"] for report in self.worker_reports)
        return could_not_run, unwritten


audit_session_key = pytest.StashKey[AuditSession]()


def validate_options(config: pytest.Config, state: AuditSession) -> None:
    """Bad option values and unwritable output locations that were asked for are usage errors (exit 4),
    found before any collection or compute. Modules that import numpy load only when an option is given."""
    from ..errors import ConfigError

    try:
        load_baseline_inputs(config, state)
        if any(is_given(config, "memaudit_" + suffix.replace("-", "_")) for suffix, _, _ in OPTIONS):
            from ..pipeline.settings import check_image_fits

            check_image_fits(state.load_settings())
        if config.getoption("memaudit_threshold"):
            state.threshold_overrides()
        if any(is_given(config, name) for name in ("memaudit_html", "memaudit_json")):
            check_output_locations(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"memaudit: {exc}") from None


def load_baseline_inputs(config: pytest.Config, state: AuditSession) -> None:
    """--memaudit-from, --memaudit-save, --memaudit-compare(-fail): the finished audit and the baseline
    loaded, names and gates checked; a ConfigError says what is wrong."""
    from ..errors import ConfigError

    base = config.invocation_params.dir
    stored = config.getoption("memaudit_from")
    if stored:
        given = [f"--memaudit-{suffix}" for suffix, _, _ in OPTIONS
                 if config.getoption("memaudit_" + suffix.replace("-", "_")) is not None]
        if given:
            raise ConfigError(f"--memaudit-from loads a finished audit, whose settings are fixed: "
                              f"{', '.join(given)} would change nothing; leave {'it' if len(given) == 1 else 'them'} out")
        from ..results.result import read_runs

        state.stored_path = base / stored
        state.stored = read_runs(state.stored_path)
        for result in state.stored.values():
            for layer in result.layers:  # gates are applied again, as the audit file says now
                layer.thresholds = layer.outcome = None
    name = config.getoption("memaudit_save")
    if name:
        from ..gates.baselines import check_name

        check_name(name)
    reference = config.getoption("memaudit_compare")
    if compare_fail_options(config) and not reference:
        raise ConfigError("--memaudit-compare-fail gates the rise over a baseline: name one with --memaudit-compare "
                          "NAME|PATH|latest")
    if reference == "previous":
        state.load_settings()
        if not state.series and None in (state.stored or {None: None}):
            raise ConfigError("--memaudit-compare previous compares each checkpoint of a series with the one before it: "
                              "give --memaudit-checkpoint several times or as a glob (to compare with the newest saved "
                              "run, use --memaudit-compare latest)")
        state.compare_previous = True
    elif reference:
        from ..gates.baselines import find_baseline
        from ..results.result import read_results

        path = find_baseline(reference, config.rootpath, base, state.load_settings().model)
        state.baseline = read_results(path)
        state.baseline_label = reference if reference.endswith(".json") else f"{reference} ({path})"


def collected_paths(config: pytest.Config) -> list[Path]:
    """The paths given on the command line (or testpaths), without ``::`` selections."""
    paths = []
    for arg in config.args:
        path = Path(arg.split("::")[0])
        path = path if path.is_absolute() else config.invocation_params.dir / path
        if path.exists():
            paths.append(path.resolve())
    return paths


def audit_files(config: pytest.Config, roots: list[Path]) -> list[Path]:
    """Every audit file (``memaudit_files`` patterns) at or under ``roots``, skipping the folders
    pytest does not recurse into (``norecursedirs``, ``--ignore``)."""
    patterns = config.getini("memaudit_files")
    skip_dirs = config.getini("norecursedirs")
    ignored = {(config.invocation_params.dir / path).resolve() for path in config.getoption("ignore") or ()}

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)

    found: dict[Path, None] = {}
    for root in roots:
        if root.is_file():
            if wanted(root.name):
                found[root] = None
            continue
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in skip_dirs)
                             and (Path(folder) / d).resolve() not in ignored)
            found.update((Path(folder, name).resolve(), None) for name in sorted(files) if wanted(name))
    return list(found)


def is_rank_zero() -> bool:
    """Whether this process prints and writes: the only one, or rank 0 of a torchrun launch."""
    from ..pipeline.launch import launch_rank  # not .distributed: that imports torch, and this runs in every pytest run

    return launch_rank() == 0


class _progress:
    """A rich progress bar on a terminal, out of pytest's capture; elsewhere (a CI log) a line every
    ``progress.EVERY_S`` seconds. Silent under -q, and in processes that do not print."""

    def __init__(self, config: pytest.Config, views_per_image: int):
        self.config = config
        self.views_per_image = views_per_image
        self.bar = None
        self.lines = None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        capman = self.config.pluginmanager.getplugin("capturemanager")
        self._capture = capman.global_and_fixture_disabled() if capman else None
        if self._capture:
            self._capture.__enter__()
        console = Console(file=sys.stderr)
        shown = self.config.get_verbosity() >= 0 and is_rank_zero() and not parallel.is_worker(self.config)
        if shown and console.is_terminal:
            self.bar = Progress(TextColumn("memaudit"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("audit", total=None)
        elif shown:
            from ..pipeline.progress import ProgressLines

            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            self.lines = ProgressLines(reporter.write_line if reporter else print, self.views_per_image)
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
        elif self.lines is not None:
            self.lines(done, total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        if self._capture:
            self._capture.__exit__(*exc)
