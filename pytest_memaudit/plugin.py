"""The pytest plugin: options, one test item per audited layer, the session's audit, summary.

No metric code lives here. Importing this module imports neither torch nor numpy, so the
plugin costs nothing to pytest runs that collect no audit file.
"""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import parallel

if TYPE_CHECKING:
    from .config import AuditCatalog, AuditFile, RunSettings
    from .gates import GateOutcome
    from .models import LayerSpec, ModelSpec
    from .outputs import OutputLog
    from .results import AuditResult

# (option suffix, type, help). Each is also an ini key memaudit_<suffix with underscores>.
OPTIONS: list[tuple[str, Any, str]] = [
    ("model", str, "encoder to audit: demo (default), var_d16, or a model declared in the audit YAML"),
    ("checkpoint", str, "checkpoint file of the model (var_d16: vae_ch160v4096z32.pth); also found via "
     "$MEMAUDIT_CHECKPOINT or the Hugging Face cache"),
    ("data", str, "directory of images (flat or class subfolders; jpg, png, webp, bmp), or 'builtin' for "
     "the generated set (default: the model's own default set)"),
    ("samples", int, "number of data points: a seeded random subset of the directory (default: all; "
     "64 for the built-in set)"),
    ("image-size", int, "resize images to this square size, a multiple of 16 (default: the model's, 256 for var_d16)"),
    ("augmentations", int, "augmented views per image, the seed's recipe (default 10; 0 = one plain view)"),
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
]
CHOICES = {"reduce": ("mean", "median"), "precision": ("float32", "bfloat16", "tf32")}
DEFAULT_FILE_PATTERNS = ["memaudit*.yaml", "memaudit*.yml"]
DEFAULT_REPORT_DIR = "memaudit-report"  # under the invocation directory: report.html and results.json
OUTPUTS_NOT_WRITTEN = 3  # exit status when every gate passed but an output file could not be written
GALLERY_MODES = ("images", "names", "none")  # as pytest_memaudit.report.thumbnails, without importing it


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memaudit", "memorization audit (UnitMem) of vision encoders")
    for suffix, kind, help_text in OPTIONS:
        dest = "memaudit_" + suffix.replace("-", "_")
        group.addoption(f"--memaudit-{suffix}", dest=dest, type=kind, default=None,
                        choices=CHOICES.get(suffix), metavar=None if suffix in CHOICES else suffix.split("-")[-1].upper(),
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


@dataclass
class AuditSession:
    """The session's audit, stashed on the config: settings once, the result once."""

    config: pytest.Config
    settings: "RunSettings | None" = None
    spec: "ModelSpec | None" = None
    result: "AuditResult | None" = None
    wanted_layers: set[str] = field(default_factory=set)
    multiple_testing: str = "holm"
    _adjusted_p: dict | None = None
    outputs: "OutputLog | None" = None  # what the session's end wrote, and what it could not
    session: pytest.Session | None = None
    error: str | None = None  # why the audit cannot run, in an xdist worker (elsewhere: a UsageError)
    worker_reports: list[dict[str, Any]] = field(default_factory=list)  # in the xdist controller
    catalog: "AuditCatalog | None" = None
    _user_net: Any = None  # a user model, built at collection to check its layer names; the audit reuses it
    build_error: str | None = None  # why that build failed (a usage error once collection is done)

    def load_settings(self) -> "RunSettings":
        if self.settings is None:
            from .config import make_settings

            values = {}
            for suffix, kind, _ in OPTIONS:
                dest = "memaudit_" + suffix.replace("-", "_")
                value = self.config.getoption(dest)
                if value is None:
                    value = self.config.getini(dest)
                values[dest.removeprefix("memaudit_")] = value if value not in ("", None) else None
            self.settings = make_settings(**values)
        return self.settings

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
        return overrides

    def adjusted_p(self) -> dict[str, dict[str, float]]:
        """The result's p-value figures per layer, corrected across its layers (once)."""
        if self._adjusted_p is None:
            from .gates import adjusted_p_values

            self._adjusted_p = adjusted_p_values(self.run(), self.multiple_testing)
        return self._adjusted_p

    def run(self) -> "AuditResult":
        """Compute the audit for every wanted layer (once); AuditError -> pytest.UsageError.

        In an xdist worker a UsageError would only fail the test that asked: instead the test fails
        with the message, the worker stops, and the controller reports the error (exit status 4).
        """
        if self.result is None and self.error is None:
            from .audit import run_audit
            from .errors import AuditError

            layers = [layer.name for layer in self.spec.layers if layer.name in self.wanted_layers]
            spec = self.spec
            if self._user_net is not None:
                spec = replace(spec, build=lambda checkpoint: self._user_net)
            try:
                from .config import check_image_fits

                check_image_fits(self.settings)
                check_output_locations(self.config)
                with _progress(self.config) as progress:
                    self.result = run_audit(self.settings, spec, layers, progress)
                self.result.multiple_testing = self.multiple_testing
            except AuditError as exc:
                message = f"memaudit: the audit cannot run: {exc}"
                if not parallel.is_worker(self.config):
                    raise pytest.UsageError(message) from None
                self.error = message
        if self.error is not None:
            if self.session is not None:
                self.session.shouldstop = self.error
            pytest.fail(self.error, pytrace=False)
        return self.result

    def writes_outputs(self) -> bool:
        """Whether this process writes the outputs: it has a result and, in an xdist worker, ran the
        layer tests (a worker that computed it only for the memaudit_result fixture leaves them)."""
        if self.result is None:
            return False
        if not parallel.is_worker(self.config) or not self.wanted_layers:
            return True
        return any(layer.outcome is not None for layer in self.result.layers)

    def report(self, markup: bool) -> dict[str, Any] | None:
        """What this process has to show at the end: the summary, the output lines, the error."""
        if self.outputs is None and self.error is None:
            return None
        from .terminal import render_summary

        return {"summary": None if self.outputs is None else render_summary(self.result, markup=markup),
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
        if any(config.getoption("memaudit_" + suffix.replace("-", "_")) is not None for suffix, _, _ in OPTIONS):
            from .config import check_image_fits

            check_image_fits(state.load_settings())
        if config.getoption("memaudit_threshold"):
            state.threshold_overrides()
        if any(_given(config, name) for name in ("memaudit_html", "memaudit_json")):
            check_output_locations(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"memaudit: {exc}") from None


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

        state = self.config.stash[audit_session_key]
        try:
            settings = state.load_settings()
            audit = state.audit_file(self.path)
            spec = state.load_catalog().model_spec(settings.model)
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        if not audit.applies_to(spec.name):
            for name in audit.user_models:
                reason = (f"memaudit: {self.path.name} is about model {name}; this run audits {spec.name} "
                          f"(--memaudit-model {name} audits it)")
                yield OtherModelItem.from_parent(self, name=name, reason=reason)
            return
        try:
            overrides = state.threshold_overrides()
            thresholds = audit.thresholds_for(spec, overrides)
            audit.check_gates(thresholds, overridden=bool(overrides))
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        self._check_gates_can_be_evaluated(settings, spec, thresholds)
        if spec.factory is not None:
            self._check_user_layers(state, spec)
        state.multiple_testing = audit.multiple_testing
        state.spec = spec
        for layer in spec.layers:
            yield LayerItem.from_parent(self, name=layer.name, layer=layer, thresholds=thresholds[layer.name])

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

    def _check_gates_can_be_evaluated(self, settings, spec, thresholds) -> None:
        """A gate whose figure this audit will not have is an error now, not a silent pass later."""
        from .config import audit_has
        from .gates import missing_figures

        has = audit_has(settings, spec)
        missing = {key: need for layer in spec.layers for key, need in missing_figures(thresholds[layer.name], has)}
        if missing:
            lines = [f"{key} needs {need}" for key, need in missing.items()]
            raise self.CollectError(
                f"memaudit: {self.path}: gates this audit cannot evaluate: {'; '.join(lines)}. Provide what they "
                f"need, or turn them off (e.g. --memaudit-threshold {next(iter(missing))}=off)."
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


class LayerGateFailure(Exception):
    """A layer's figures crossed a threshold."""


class LayerItem(pytest.Item):
    """One audited layer: passes when every figure is within its thresholds."""

    def __init__(self, *, layer: "LayerSpec", thresholds: dict, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer
        self.thresholds = thresholds

    def runtest(self) -> None:
        import math
        import warnings

        from .errors import MemauditWarning
        from .gates import evaluate_layer

        state = self.config.stash[audit_session_key]
        result = state.run()
        layer = result.layer(self.layer.name)
        outcome, figures = evaluate_layer(layer, self.thresholds, state.adjusted_p()[layer.name])
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
        return self.path, None, f"memaudit layer {self.layer.name} ({self.layer.module})"


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
    """``--memaudit-list-layers``: print the audited model's modules and exit, like ``--fixtures``."""
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


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(audit_session_key, None)
    if state is None:
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
    """ConfigError when the report or the JSON cannot be written where they go."""
    from .errors import ConfigError
    from .outputs import location_problem

    html_path, json_path = report_paths(config)
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
    if json_path:
        log.write("results", json_path, lambda: write_json_atomic(json_path, state.result.to_json()))
    if html_path:
        log.write("report", html_path, lambda: write_report(state, html_path, log))
    return log


def write_report(state: AuditSession, path: Path, log: "OutputLog") -> Path:
    """Render the session's result; thumbnails are decoded again from the audited images (without
    them, when the images cannot be opened again: ``log`` says why)."""
    from .report import ImageSetThumbnails, write_html

    gallery = gallery_mode(state.config)
    images = None
    if gallery == "images":
        from .audit import open_images

        images = log.make("thumbnails", state.result.data_source, lambda: ImageSetThumbnails(
            open_images(state.settings, state.spec, state.result.settings["image_size"])))
    return write_html(path, state.result, images, gallery)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = config.stash.get(audit_session_key, None)
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
    """A rich progress bar on a terminal, out of pytest's capture; silent elsewhere."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.bar = None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        capman = self.config.pluginmanager.getplugin("capturemanager")
        self._capture = capman.global_and_fixture_disabled() if capman else None
        if self._capture:
            self._capture.__enter__()
        console = Console(file=sys.stderr)
        if console.is_terminal and self.config.get_verbosity() >= 0:
            self.bar = Progress(TextColumn("memaudit"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("audit", total=None)
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        if self._capture:
            self._capture.__exit__(*exc)
