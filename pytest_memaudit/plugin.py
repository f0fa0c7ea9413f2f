"""The pytest plugin: options, one test item per audited layer, the session's audit, summary.

No metric code lives here. Importing this module imports neither torch nor numpy, so the
plugin costs nothing to pytest runs that collect no audit file.
"""

from __future__ import annotations

import fnmatch
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import parallel

if TYPE_CHECKING:
    from .compare import Comparison
    from .config import AuditCatalog, AuditFile, RunSettings
    from .gates import GateOutcome
    from .models import LayerSpec, ModelSpec
    from .outputs import OutputLog
    from .results import AuditResult

# (option suffix, type, help). Each is also an ini key memaudit_<suffix with underscores>. The type is what
# make_settings turns the value into (it checks command-line and ini values alike).
OPTIONS: list[tuple[str, Any, str]] = [
    ("model", str, "encoder to audit: demo (default), var_d16, or a model declared in the audit YAML"),
    ("checkpoint", str, "checkpoint file of the model (var_d16: vae_ch160v4096z32.pth); also found via "
     "$MEMAUDIT_CHECKPOINT or the Hugging Face cache. Given several times, or as a quoted glob (ckpts/step-*.pth): "
     "a series of checkpoints audited on the same views, tests named layer[checkpoint]"),
    ("data", str, "directory of images (flat or class subfolders; jpg, png, webp, bmp), or 'builtin' for "
     "the generated set (default: the model's own default set)"),
    ("samples", int, "number of data points: a seeded random subset of the directory (default: all; "
     "64 for the built-in set)"),
    ("image-size", int, "resize images to this square size, a multiple of 16 (default: the model's, 256 for var_d16)"),
    ("augmentations", int, "augmented views per image (default 10; 0 = one plain view)"),
    ("views", str, "how views are made, as the model trained: seed (the seed report's recipe), simclr (the UnitMem "
     "paper's), flip (the image and its mirror image), plain (no augmentation), or package.module:function returning your torchvision transforms v2 "
     "pipeline (default: the model's views: in the audit YAML, else seed)"),
    ("reduce", str, "how the non-maximal activations are summarized: mean (default, streams) or median "
     "(the paper's code; keeps N x units values)"),
    ("batch-size", int, "views per forward pass (default 32 on CPU, 256 on CUDA)"),
    ("device", str, "auto (default: cuda if available), cpu, cuda or cuda:N"),
    ("seed", int, "seed of sample selection, augmentations and the control's weights (default 0)"),
    ("topk", int, "how many top data points to keep per unit for the report (default 10)"),
    ("precision", str, "float32 (default), bfloat16 (autocast, faster, opt-in) or tf32 (CUDA only)"),
    ("workers", int, "image decoding worker processes (default: by source and CPU count)"),
    ("median-memory", int, "MB of memory the median reduction's N x units float32 matrix may take; a larger "
     "one is kept in a temporary file on disk (default 2048)"),
    ("control", str, "controls audited in the same pass: none, or a comma-separated list of random (the same "
     "architecture with random weights) and planted (a copy with units planted to memorize held-out images); "
     "default: random,planted"),
    ("holdout", str, "directory of held-out images (the training distribution, never trained on), audited beside "
     "the members for the membership test; 'builtin' (generated images), or 'none' (default: the model's own, "
     "none for var_d16)"),
    ("planted-units", int, "images (one unit each) planted in the planted control (default 16)"),
    ("planted-strength", float, "a planted image's activation over its unit's mean in the planted control (default 8)"),
    ("groups", int, "data point groups for the jackknife error bars (default 10)"),
    ("permutations", int, "label permutations of the membership test (default 10000)"),
    ("embedding-layer", str, "layer whose per-unit activations embed the most memorized images for clustering "
     "(default: the last audited)"),
    ("state", str, "directory for resumable snapshots of the audit: rerunning the same command continues where it "
     "stopped (default: none)"),
    ("state-every", int, "seconds between snapshots to --memaudit-state (default 300; 0: after every batch)"),
    ("dist-timeout", int, "seconds a process of a multi-process audit (torchrun) waits for the others before it "
     "stops and names them (default 1800)"),
]
CHOICES = {"reduce": ("mean", "median"), "precision": ("float32", "bfloat16", "tf32")}
REPEATABLE = ("checkpoint",)  # given several times (or as a glob), --memaudit-checkpoint audits a checkpoint series
DEFAULT_FILE_PATTERNS = ["memaudit*.yaml", "memaudit*.yml"]
STORE_HINT = ".memaudit/"  # as pytest_memaudit.baselines.STORE, without importing it
DEFAULT_REPORT_DIR = "memaudit-report"  # under the invocation directory: report.html and results.json
OUTPUTS_NOT_WRITTEN = 3  # exit status when every gate passed but an output file could not be written
GALLERY_MODES = ("images", "names", "none")  # as pytest_memaudit.report.thumbnails, without importing it


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


def add_baseline_options(group) -> None:
    """Saved runs, comparison with a baseline, and gating a finished audit (command line only)."""
    group.addoption("--memaudit-from", dest="memaudit_from", metavar="PATH", default=None,
                    help="gate and report a finished audit's results.json instead of computing one (no model, no "
                         "images needed; thumbnails come from the images when they are still there)")
    group.addoption("--memaudit-save", dest="memaudit_save", metavar="NAME", default=None,
                    help=f"save this run's results under {STORE_HINT} in the rootdir, named by model, checkpoint "
                         "sha256 prefix, NAME and date")
    group.addoption("--memaudit-autosave", dest="memaudit_autosave", action="store_true", default=False,
                    help=f"save every run's results under {STORE_HINT} (named 'auto' unless --memaudit-save names it)")
    group.addoption("--memaudit-list-saved", dest="memaudit_list_saved", action="store_true", default=False,
                    help=f"list the runs saved under {STORE_HINT} and exit")
    group.addoption("--memaudit-compare", dest="memaudit_compare", metavar="REF", default=None,
                    help="compare with a baseline: a saved NAME, a results.json PATH, 'latest' (the newest saved run "
                         "of the model) or, in a checkpoint series, 'previous' (each checkpoint with the one before)")
    group.addoption("--memaudit-compare-fail", dest="memaudit_compare_fail", action="append", default=[],
                    metavar="[LAYER:]FIGURE:DELTA[:significant]",
                    help="a compare gate: fail a layer whose FIGURE rose over the baseline's by more than DELTA (e.g. "
                         "mean_unitmem:0.02, or 10%% of the baseline's value: mean_unitmem:10%%); by default on the "
                         "estimated rise; with :significant only on a rise beyond noise, as a YAML compare gate's "
                         "when: significant; repeatable; needs --memaudit-compare")


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

    def load_settings(self) -> "RunSettings":
        if self.settings is None and self.stored is not None:
            from .config import settings_from_record

            self.settings = settings_from_record(next(iter(self.stored.values())).settings)
        if self.settings is None:
            from .config import make_settings

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
        from .config import checkpoint_series

        paths = checkpoint_series([given] if isinstance(given, str) else given, self.config.invocation_params.dir)
        if len(paths) > 1:
            self.series = paths
        return next(iter(paths.values()))

    def load_catalog(self) -> "AuditCatalog":
        """The audit files under the collected paths and the models they declare (read once)."""
        if self.catalog is None:
            from .config import load_catalog

            self.catalog = load_catalog(audit_files(self.config, collected_paths(self.config)))
        return self.catalog

    def audit_file(self, path: Path) -> "AuditFile":
        """The catalog's reading of ``path`` (added to it if the search for audit files missed it)."""
        catalog = self.load_catalog()
        path = path.resolve()
        if path not in catalog.files:
            from .config import load_audit_file

            catalog.add(load_audit_file(path))
        return catalog.files[path]

    def resolve_spec(self) -> "ModelSpec":
        """The audited model: built in, or declared in an audit file under the collected paths, or
        else anywhere under the rootdir (a test file of one's own, run alone). ConfigError if none."""
        if self.spec is None:
            from .config import load_catalog
            from .models import BUILTIN_MODELS

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
            from .errors import AuditError

            try:
                self._user_net = spec.build(spec.locate(self.load_settings().checkpoint))
            except AuditError as exc:
                self.build_error = str(exc)
        return self._user_net

    def threshold_overrides(self) -> dict[str, dict[str, float | None]]:
        from .config import parse_threshold_option

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
            from .gates import adjusted_p_values

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
            from .audit import run_audit, run_series
            from .errors import AuditError

            layers = [layer.name for layer in self.spec.layers if layer.name in self.wanted_layers]
            spec = self.spec
            if self._user_net is not None:  # built at collection, from the (first) checkpoint
                built_from, build = spec.locate(self.settings.checkpoint), spec.build
                spec = replace(spec, build=lambda checkpoint: self._user_net if checkpoint == built_from
                               else build(checkpoint))
            try:
                from .config import check_image_fits

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
                from .compare import compare
                from .errors import AuditError

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
        return any(layer.outcome is not None for result in self.runs.values() for layer in result.layers)

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


def validate_options(config: pytest.Config, state: AuditSession) -> None:
    """Bad option values and unwritable output locations that were asked for are usage errors (exit 4),
    found before any collection or compute. Modules that import numpy load only when an option is given."""
    from .errors import ConfigError

    try:
        load_baseline_inputs(config, state)
        if any(_given(config, "memaudit_" + suffix.replace("-", "_")) for suffix, _, _ in OPTIONS):
            from .config import check_image_fits

            check_image_fits(state.load_settings())
        if config.getoption("memaudit_threshold"):
            state.threshold_overrides()
        if any(_given(config, name) for name in ("memaudit_html", "memaudit_json")):
            check_output_locations(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"memaudit: {exc}") from None


def load_baseline_inputs(config: pytest.Config, state: AuditSession) -> None:
    """--memaudit-from, --memaudit-save, --memaudit-compare(-fail): the finished audit and the baseline
    loaded, names and gates checked; a ConfigError says what is wrong."""
    from .errors import ConfigError

    base = config.invocation_params.dir
    stored = config.getoption("memaudit_from")
    if stored:
        given = [f"--memaudit-{suffix}" for suffix, _, _ in OPTIONS
                 if config.getoption("memaudit_" + suffix.replace("-", "_")) is not None]
        if given:
            raise ConfigError(f"--memaudit-from loads a finished audit, whose settings are fixed: "
                              f"{', '.join(given)} would change nothing; leave {'it' if len(given) == 1 else 'them'} out")
        from .results import read_runs

        state.stored_path = base / stored
        state.stored = read_runs(state.stored_path)
        for result in state.stored.values():
            for layer in result.layers:  # gates are applied again, as the audit file says now
                layer.thresholds = layer.outcome = None
    name = config.getoption("memaudit_save")
    if name:
        from .baselines import check_name

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
        from .baselines import find_baseline
        from .results import read_results

        path = find_baseline(reference, config.rootpath, base, state.load_settings().model)
        state.baseline = read_results(path)
        state.baseline_label = reference if reference.endswith(".json") else f"{reference} ({path})"


def compare_fail_options(config: pytest.Config) -> list[tuple[str, str, dict]]:
    """--memaudit-compare-fail values as (layer or '*', compare gate key, what it sets)."""
    given = config.getoption("memaudit_compare_fail")
    if not given:
        return []  # without importing config (numpy, yaml): the plugin stays free in runs that audit nothing
    from .config import parse_compare_option

    return [parse_compare_option(text) for text in given]


def list_saved(config: pytest.Config) -> int:
    """--memaudit-list-saved: the table of saved runs, then exit 0 (as --fixtures lists fixtures)."""
    from .baselines import format_saved, saved_runs

    sys.stdout.write(format_saved(config.rootpath, saved_runs(config.rootpath)))
    return 0


def _given(config: pytest.Config, name: str) -> bool:
    return bool(config.getoption(name) or config.getini(name))


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if is_audit_file(str(file_path), parent.config):
        return AuditYamlFile.from_parent(parent, path=file_path)
    return None


def is_audit_file(path: str, config: pytest.Config) -> bool:
    """Whether the file at ``path`` is an audit YAML file (its name matches ini memaudit_files)."""
    return any(fnmatch.fnmatch(Path(path).name, pattern) for pattern in config.getini("memaudit_files"))


class AuditYamlFile(pytest.File):
    """An audit YAML file: collects one LayerItem per layer of the audited model, or, when the
    file is about other models (it declares models of its own, not the audited one), one skipped
    item per model it declares."""

    def collect(self):
        from .errors import ConfigError
        from .hardware import passive_openmp_waits

        passive_openmp_waits()  # an audit is asked for: before anything imports torch
        state = self.config.stash[audit_session_key]
        try:
            settings = state.load_settings()
            audit = state.audit_file(self.path)
            spec = (state.load_catalog().model_spec(settings.model) if state.stored is None
                    else stored_model_spec(state.load_catalog(), next(iter(state.stored.values()))))
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        if not audit.applies_to(spec.name):
            for name in audit.user_models:
                reason = (f"memaudit: {self.path.name} is about model {name}; this run audits {spec.name} "
                          f"(--memaudit-model {name} audits it)")
                yield OtherModelItem.from_parent(self, name=name, reason=reason)
            return
        try:
            from .gates import without_rise_gates

            overrides = state.threshold_overrides()
            thresholds = audit.thresholds_for(spec, overrides)
            if state.baseline is None and not state.compare_previous:  # compare gates need something to compare with
                applied = {name: without_rise_gates(limits) for name, limits in thresholds.items()}
                state.unapplied_compare_gates |= applied != thresholds
                thresholds = applied
            if settings.holdout == "none" and state.stored is None:  # asked for explicitly: gate on the rest
                thresholds = {name: self._without_holdout_gates(state, limits) for name, limits in thresholds.items()}
            audit.check_gates(thresholds, overridden=bool(overrides))
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        self._check_gates_can_be_evaluated(state, settings, spec, thresholds)
        self._check_permutations_reach(settings, spec, thresholds, audit.multiple_testing)
        if spec.factory is not None and state.stored is None:
            self._check_user_layers(state, spec)
        state.multiple_testing = audit.multiple_testing
        state.spec = spec
        state.thresholds.update(thresholds)
        for layer in spec.layers:
            for checkpoint in list(state.series or state.stored or [None]):  # [None]: one run
                name = layer.name if checkpoint is None else f"{layer.name}[{checkpoint}]"
                yield LayerItem.from_parent(self, name=name, layer=layer, thresholds=thresholds[layer.name],
                                            checkpoint=checkpoint)

    @staticmethod
    def _without_holdout_gates(state: AuditSession, limits: dict) -> dict:
        """A layer's thresholds without the gates that need held-out images, which ``state`` records."""
        from .gates import holdout_gates

        left_out = holdout_gates(limits)
        state.unevaluated_holdout_gates.update(left_out)
        return {key: value for key, value in limits.items() if key not in left_out}

    def _check_user_layers(self, state: AuditSession, spec: "ModelSpec") -> None:
        """A user model is built now (once) so that a misspelled module path is a collection error;
        a model that cannot be built is a usage error when collection is done."""
        net = state.user_model(spec)
        if net is None:
            return
        from .errors import AuditError
        from .hooks import find_module

        modules = dict(net.named_modules())
        for layer in spec.layers:
            try:
                find_module(net, layer, modules)
            except AuditError as exc:
                where = state.load_catalog().declared_in.get(spec.name, self.path)
                raise self.CollectError(f"memaudit: {where}: models: {spec.name}: audited_layers: {exc}") from None

    def _check_permutations_reach(self, settings, spec, thresholds, method: str) -> None:
        """A p-value gate that the permutations cannot reach after the correction could never fail:
        say so now (a warning), with the count that would."""
        import warnings

        from .errors import MemauditWarning
        from .gates import Gate

        limits = [gate.limit for gate in (thresholds[layer.name].get("membership_p_min") for layer in spec.layers)
                  if isinstance(gate, Gate) and gate.limit is not None]
        tests = len(spec.layers) if method == "holm" else 1
        smallest = tests / (settings.permutations + 1)
        if limits and smallest >= min(limits):
            warnings.warn(MemauditWarning(
                f"membership_p_min = {min(limits):g} cannot fail: with {settings.permutations:,} permutations the "
                f"smallest p-value after the {method} correction over {tests} layer(s) is {smallest:.3g}; use "
                f"--memaudit-permutations {math.ceil(tests / min(limits))} or more"))

    def _check_gates_can_be_evaluated(self, state: AuditSession, settings, spec, thresholds) -> None:
        """A gate whose figure this audit (or the stored one, or the baseline) will not have is an error now,
        not a silent pass later."""
        from .config import audit_has
        from .gates import figures_had, missing_figures, rises_had

        has = audit_has(settings, spec) if state.stored is None else figures_had(next(iter(state.stored.values())))
        if state.baseline is not None or state.compare_previous:
            has |= rises_had(has, has if state.baseline is None else figures_had(state.baseline))
        missing = {key: need for layer in spec.layers for key, need in missing_figures(thresholds[layer.name], has)}
        if missing:
            lines = [f"{key} needs {need}" for key, need in missing.items()]
            audit = "this audit" if state.stored is None else f"the stored audit {state.stored_path}"
            provide = "Provide what they need" if state.stored is None else "Audit again with what they need"
            raise self.CollectError(
                f"memaudit: {self.path}: gates {audit} cannot evaluate: {'; '.join(lines)}. {provide}, or turn them "
                f"off (e.g. --memaudit-threshold {next(iter(missing))}=off)."
            )


class OtherModelItem(pytest.Item):
    """A model that an audit file declares and this run does not audit: skipped, with the reason."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.add_marker(pytest.mark.skip(reason=reason))

    def runtest(self) -> None:  # never runs: skipped
        pass

    def reportinfo(self):
        return self.path, 0, f"memaudit model {self.name}"  # a skip report needs a line


def stored_model_spec(catalog: "AuditCatalog", stored: "AuditResult") -> "ModelSpec":
    """The model of a stored audit, with the layers it audited: as the audit files or the built-in registry
    declare it, or (a model declared nowhere now) as the stored layers say. ConfigError when a stored
    layer is not the declared model's."""
    from dataclasses import replace

    from .errors import ConfigError
    from .models import LayerSpec, ModelSpec

    audited = [(layer.name, layer.module) for layer in stored.layers]
    try:
        spec = catalog.model_spec(stored.model)
    except ConfigError:
        return ModelSpec(stored.model, tuple(LayerSpec(name, module) for name, module in audited), build=None)
    declared = {(layer.name, layer.module) for layer in spec.layers}
    foreign = [f"{name} ({module})" for name, module in audited if (name, module) not in declared]
    if foreign:
        raise ConfigError(f"the stored audit's layer(s) {', '.join(foreign)} are not layers of model {spec.name} as "
                          f"declared now ({', '.join(layer.name for layer in spec.layers)})")
    return replace(spec, layers=tuple(layer for layer in spec.layers if (layer.name, layer.module) in audited))


class LayerGateFailure(Exception):
    """A layer's figures crossed a threshold."""


class LayerItem(pytest.Item):
    """One audited layer: passes when every figure is within its thresholds."""

    def __init__(self, *, layer: "LayerSpec", thresholds: dict, checkpoint: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.thresholds = thresholds
        self.checkpoint = checkpoint  # its label in a checkpoint series; None: the one audited checkpoint

    def runtest(self) -> None:
        import math
        import warnings

        from .errors import MemauditWarning
        from .gates import evaluate_layer

        state = self.config.stash[audit_session_key]
        result = state.result_for(self.checkpoint)
        layer = result.layer(self.layer.name)
        outcome, figures = evaluate_layer(layer, self.thresholds, state.adjusted_p(self.checkpoint)[layer.name],
                                          state.rise_figures(layer.name, self.checkpoint))
        self.user_properties += [(f"memaudit_{name}", round(figure.value, 6))
                                 for name, figure in figures.items() if math.isfinite(figure.value)]
        if outcome.warnings:
            warnings.warn(MemauditWarning(outcome.warning_message()))
        if not outcome.passed:
            raise LayerGateFailure(outcome)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, LayerGateFailure):
            outcome: GateOutcome = excinfo.value.args[0]
            return outcome.failure_message()
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        where = "" if self.checkpoint is None else f" of checkpoint {self.checkpoint}"
        return self.path, None, f"memaudit layer {self.layer.name} ({self.layer.module}){where}"


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
    for_fixture = any(FIXTURE in getattr(item, "fixturenames", ()) for item in session.items)
    if session.config.option.collectonly or not (items or for_fixture):
        return
    if for_fixture:
        from .errors import ConfigError

        try:
            spec = state.resolve_spec()
        except ConfigError:
            return  # the fixture skips, saying why
        state.wanted_layers = {layer.name for layer in spec.layers}
    else:
        state.wanted_layers = {item.layer.name for item in items}
    state.wanted_checkpoints = {item.checkpoint for item in items if item.checkpoint is not None}
    check_baseline_architecture(state)
    if not parallel.is_worker(session.config):  # a worker audits when its first layer test runs, if one does
        state.run()


def check_baseline_architecture(state: AuditSession) -> None:
    """A baseline of another model or without the selected layers is a usage error, found before compute."""
    if state.baseline is None:
        return
    from .compare import check_architecture
    from .errors import AuditError

    layers = [(layer.name, layer.module) for layer in state.spec.layers if layer.name in state.wanted_layers]
    try:
        check_architecture(state.spec.name, layers, state.baseline, state.baseline_label)
        if state.stored is None:
            from .compare import check_views
            from .views import recipe_for

            check_views(recipe_for(state.load_settings(), state.spec).record(), state.baseline, state.baseline_label)
    except AuditError as exc:
        raise pytest.UsageError(f"memaudit: cannot compare with the baseline: {exc}") from None


FIXTURE = "memaudit_result"


@pytest.fixture(scope="session")
def memaudit_result(pytestconfig: pytest.Config) -> "AuditResult":
    """The session's AuditResult, of every layer of the audited model (computed once, when
    collection is done). Skips when no audited model can be found; errors (without a traceback)
    when its audit cannot run."""
    state = pytestconfig.stash[audit_session_key]
    if state.result is None:
        from .errors import ConfigError

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
    from .errors import AuditError

    state = AuditSession(config)
    try:
        spec = state.resolve_spec()
        sys.stdout.write(layer_table(spec, state.load_settings()))
    except AuditError as exc:
        raise pytest.UsageError(f"memaudit: {exc}") from None
    return 0


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
    from .launch import launch_rank  # not .distributed: that imports torch, and this runs in every pytest run

    return launch_rank() == 0


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


def report_paths(config: pytest.Config) -> tuple[Path | None, Path | None]:
    """Absolute paths of the HTML report and the JSON: (None, ...) when the report is off ('none').

    Relative paths, and the default folder, are under the directory pytest was run from, never the
    rootdir (which, without an ini file, is the common ancestor of every path on the command line)."""
    base = config.invocation_params.dir
    html = config.getoption("memaudit_html")
    html = html if html is not None else config.getini("memaudit_html")
    if not html:
        html_path = base / DEFAULT_REPORT_DIR / "report.html"
    else:
        html_path = None if html.strip().lower() == "none" else base / html
    json_path = config.getoption("memaudit_json") or config.getini("memaudit_json")
    if json_path:
        return html_path, base / json_path
    return html_path, None if html_path is None else html_path.parent / "results.json"


def check_output_locations(config: pytest.Config) -> None:
    """ConfigError when the report or the JSON cannot be written where they go, or one would replace
    the other (or the report the finished audit or baseline it reads)."""
    from .errors import ConfigError
    from .outputs import location_problem, same_file

    html_path, json_path = report_paths(config)
    base = config.invocation_params.dir
    if html_path is not None and json_path is not None and same_file(html_path, json_path):
        raise ConfigError(f"the report and the results would both be written to {json_path}, and the report would "
                          "replace the results: give --memaudit-html and --memaudit-json different paths")
    reference = config.getoption("memaudit_compare") or ""
    for option, read in (("--memaudit-from", config.getoption("memaudit_from")),
                         ("--memaudit-compare", reference if reference.endswith(".json") else None)):
        if html_path is not None and read and same_file(html_path, base / read):
            raise ConfigError(f"the report would be written to {html_path}, over the results that {option} reads: "
                              "give --memaudit-html another path")
    for what, option, path in (("report", "--memaudit-html", html_path), ("results", "--memaudit-json", json_path)):
        problem = None if path is None else location_problem(path)
        if problem:
            raise ConfigError(f"the {what} cannot be written to {path}: {problem}. Pass {option} PATH with a writable "
                              "location" + (", or --memaudit-html none for no report" if what == "report" else ""))


def gallery_mode(config: pytest.Config) -> str:
    return config.getoption("memaudit_gallery") or config.getini("memaudit_gallery") or "images"


def write_outputs(state: AuditSession) -> "OutputLog":
    """Write the JSON, then the report; each failure is logged and the other output still written."""
    from .outputs import OutputLog
    from .results import write_json_atomic

    log = OutputLog()
    html_path, json_path = report_paths(state.config)
    document = results_document(state)
    if json_path:
        log.write("results", json_path, lambda: write_json_atomic(json_path, document))
    if html_path:
        log.write("report", html_path, lambda: write_report(state, html_path, log))
    save_run(state, document, log)
    return log


def results_document(state: AuditSession) -> dict[str, Any]:
    """The results JSON: the result and, when compared with a baseline, the comparison; for a checkpoint
    series, each checkpoint's, in series order."""
    documents = run_documents(state)
    if list(documents) == [None]:
        return documents[None]
    from .results import series_document

    return series_document(list(documents.items()))


def run_documents(state: AuditSession) -> dict[str | None, dict[str, Any]]:
    documents = {}
    for checkpoint, comparison in state.compared().items():
        documents[checkpoint] = state.runs[checkpoint].to_json()
        if comparison is not None:
            documents[checkpoint]["comparison"] = comparison.to_json()
    return documents


def save_run(state: AuditSession, document: dict[str, Any], log: "OutputLog") -> None:
    """--memaudit-save NAME / --memaudit-autosave: the results as a new entry under .memaudit/ in the rootdir;
    each checkpoint of a series as its own entry, NAME.<checkpoint>."""
    name = state.config.getoption("memaudit_save")
    if not name and not state.config.getoption("memaudit_autosave"):
        return
    from .baselines import AUTOSAVE_NAME, STORE, new_entry
    from .results import write_json_atomic

    root, name = state.config.rootpath, name or AUTOSAVE_NAME
    runs = zip(document["series"], document["runs"]) if "series" in document else [(None, document)]
    for checkpoint, run in runs:
        entry = name if checkpoint is None else f"{name}.{checkpoint}"
        try:
            path = new_entry(root, run, entry)
        except OSError:  # the store cannot even be looked into: the write below says why
            path = root / STORE / f"{entry}.json"
        log.write("saved run", path, lambda: write_json_atomic(path, run))


def write_report(state: AuditSession, path: Path, log: "OutputLog") -> Path:
    """Render the session's result; thumbnails are decoded again from the audited images (without
    them, when the images cannot be opened again: ``log`` says why)."""
    from .report import ImageSetThumbnails, write_html

    gallery = gallery_mode(state.config)
    images = None
    if gallery == "images" and state.stored is not None:
        images = stored_thumbnails(state, log)
    elif gallery == "images":
        from .audit import open_images

        images = log.make("thumbnails", state.result.data_source, lambda: ImageSetThumbnails(
            open_images(state.settings, state.spec, state.result.settings["image_size"])))
    series = list(state.runs.items()) if state.series or (state.stored and None not in state.stored) else None
    return write_html(path, state.result, images, gallery, state.compared().get(list(state.runs)[-1]), series)


def stored_thumbnails(state: AuditSession, log: "OutputLog"):
    """Thumbnails of a stored audit's images, decoded again where they still are; else None (names only,
    which the log says: a job that gates stored results often has no copy of the images)."""
    from .audit import open_images
    from .outputs import failure_reason
    from .report import ImageSetThumbnails

    try:
        return ImageSetThumbnails(open_images(state.settings, state.spec, state.result.settings["image_size"]))
    except Exception as exc:  # noqa: BLE001 (any reason the images cannot be had leaves names only)
        log.written.append(f"the report shows image names only: the audited images ({state.result.data_source}) "
                           f"cannot be read here: {failure_reason(exc)}")
        return None


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
            from .progress import ProgressLines

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
