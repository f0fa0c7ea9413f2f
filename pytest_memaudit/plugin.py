"""The pytest plugin: options, one test item per audited layer, the session's audit, summary.

No metric code lives here. Importing this module imports neither torch nor numpy, so the
plugin costs nothing to pytest runs that collect no audit file.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .config import AuditFile, RunSettings
    from .gates import GateOutcome
    from .models import LayerSpec, ModelSpec
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
    ("state", str, "directory for resumable snapshots of the audit: rerunning the same command continues where it "
     "stopped (default: none)"),
    ("state-every", int, "seconds between snapshots to --memaudit-state (default 300; 0: after every batch)"),
    ("dist-timeout", int, "seconds a process of a multi-process audit (torchrun) waits for the others before it "
     "stops and names them (default 1800)"),
]
CHOICES = {"reduce": ("mean", "median"), "precision": ("float32", "bfloat16", "tf32")}
DEFAULT_FILE_PATTERNS = ["memaudit*.yaml", "memaudit*.yml"]
DEFAULT_REPORT_DIR = "memaudit-report"  # under the rootdir: report.html and results.json
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
                    help=f"write the HTML audit report to PATH (default: {DEFAULT_REPORT_DIR}/report.html under the "
                         "rootdir; the JSON goes beside it as results.json unless --memaudit-json is given); "
                         "'none': no report")
    parser.addini("memaudit_html", "default for --memaudit-html ('none': no report)", default=None)
    group.addoption("--memaudit-gallery", dest="memaudit_gallery", choices=GALLERY_MODES, default=None,
                    help="what the report shows of the audited images: images (thumbnails and file names, default), "
                         "names (file names only) or none (neither: a report that leaks no training data)")
    parser.addini("memaudit_gallery", "default for --memaudit-gallery", default=None)
    parser.addini("memaudit_files", "glob patterns of audit YAML files", type="args",
                  default=DEFAULT_FILE_PATTERNS)


@dataclass
class AuditSession:
    """The session's audit, stashed on the config: settings once, the result once."""

    config: pytest.Config
    settings: "RunSettings | None" = None
    spec: "ModelSpec | None" = None
    result: "AuditResult | None" = None
    wanted_layers: set[str] = field(default_factory=set)
    json_path: Path | None = None
    html_path: Path | None = None
    report_error: str | None = None  # why the HTML report could not be written
    multiple_testing: str = "holm"
    _adjusted_p: dict | None = None

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
        """Compute the audit for every wanted layer (once); AuditError -> pytest.UsageError."""
        if self.result is None:
            from .audit import run_audit
            from .errors import AuditError

            layers = [layer.name for layer in self.spec.layers if layer.name in self.wanted_layers]
            try:
                with _progress(self.config) as progress:
                    self.result = run_audit(self.settings, self.spec, layers, progress)
            except AuditError as exc:
                raise pytest.UsageError(f"memaudit: the audit cannot run: {exc}") from None
        return self.result


audit_session_key = pytest.StashKey[AuditSession]()


def pytest_configure(config: pytest.Config) -> None:
    state = config.stash[audit_session_key] = AuditSession(config)
    if gallery_mode(config) not in GALLERY_MODES:
        raise pytest.UsageError(f"memaudit: memaudit_gallery must be one of {', '.join(GALLERY_MODES)}, "
                                f"got {gallery_mode(config)!r}")
    if config.pluginmanager.hasplugin("html"):
        config.pluginmanager.register(HtmlReportExtras(), "memaudit-html-extras")
    given = [suffix for suffix, _, _ in OPTIONS if config.getoption("memaudit_" + suffix.replace("-", "_")) is not None]
    if given:  # bad option values are usage errors, found before any collection
        from .errors import ConfigError

        try:
            state.load_settings()
        except ConfigError as exc:
            raise pytest.UsageError(f"memaudit: {exc}") from None


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    patterns = parent.config.getini("memaudit_files")
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in patterns):
        return AuditYamlFile.from_parent(parent, path=file_path)
    return None


class AuditYamlFile(pytest.File):
    """An audit YAML file: collects one LayerItem per layer of the audited model."""

    def collect(self):
        from .errors import ConfigError

        state = self.config.stash[audit_session_key]
        try:
            settings = state.load_settings()
            from .config import load_audit_file

            audit = load_audit_file(self.path)
            spec = audit.model_spec(settings.model)
            thresholds = audit.thresholds_for(spec, state.threshold_overrides())
        except ConfigError as exc:
            raise self.CollectError(f"memaudit: {exc}") from None
        self._check_gates_can_be_evaluated(settings, spec, thresholds)
        state.multiple_testing = audit.multiple_testing
        if state.spec is None:
            state.spec = spec
        elif state.spec != spec:
            raise self.CollectError(f"memaudit: {self.path} declares model {spec.name} differently from another audit file")
        for layer in spec.layers:
            yield LayerItem.from_parent(self, name=layer.name, layer=layer, thresholds=thresholds[layer.name])

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
        from .gates import evaluate, fraction_above_level, layer_figures

        state = self.config.stash[audit_session_key]
        result = state.run()
        layer = result.layer(self.layer.name)
        figures = layer_figures(layer, fraction_above_level(self.thresholds), state.adjusted_p()[layer.name])
        outcome = evaluate(layer.name, figures, self.thresholds)
        layer.thresholds, layer.outcome = self.thresholds, outcome
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
    """Run the audit once, after -k/-m deselection, for exactly the selected layers."""
    state = session.config.stash[audit_session_key]
    items = [item for item in session.items if isinstance(item, LayerItem)]
    if not items or session.config.option.collectonly:
        return
    state.wanted_layers = {item.layer.name for item in items}
    state.run()


@pytest.fixture(scope="session")
def memaudit_result(pytestconfig: pytest.Config) -> "AuditResult":
    """The session's AuditResult (computed for every layer if no layer test asked first)."""
    state = pytestconfig.stash[audit_session_key]
    if state.result is None:
        state.load_settings()
        if state.spec is None:
            from .models import get_model_spec

            state.spec = get_model_spec(state.settings.model)
        state.wanted_layers = {layer.name for layer in state.spec.layers}
    return state.run()


def is_rank_zero() -> bool:
    """Whether this process prints and writes: the only one, or rank 0 of a torchrun launch."""
    from .distributed import launch_rank

    return launch_rank() == 0


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(audit_session_key, None)
    if state is None or state.result is None or not is_rank_zero():
        return
    html_path, json_path = report_paths(session.config)
    if json_path:
        from .results import write_json_atomic

        state.json_path = write_json_atomic(json_path, state.result.to_json())
    if html_path:
        try:
            state.html_path = write_report(state, html_path)
        except Exception as exc:  # the JSON and the gates' outcomes stand; the run must not pass silently
            state.report_error = f"{type(exc).__name__}: {exc}"
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR


def report_paths(config: pytest.Config) -> tuple[Path | None, Path | None]:
    """Where the HTML report and the JSON go: (None, ...) when the report is off ('none')."""
    html = config.getoption("memaudit_html")
    html = html if html is not None else config.getini("memaudit_html")
    if not html:
        html_path = config.rootpath / DEFAULT_REPORT_DIR / "report.html"
    else:
        html_path = None if html.strip().lower() == "none" else Path(html)
    json_path = config.getoption("memaudit_json") or config.getini("memaudit_json")
    if json_path:
        return html_path, Path(json_path)
    return html_path, None if html_path is None else html_path.parent / "results.json"


def gallery_mode(config: pytest.Config) -> str:
    return config.getoption("memaudit_gallery") or config.getini("memaudit_gallery") or "images"


def write_report(state: AuditSession, path: Path) -> Path:
    """Render the session's result; thumbnails are decoded again from the audited images."""
    from .report import ImageSetThumbnails, write_html

    gallery = gallery_mode(state.config)
    images = None
    if gallery == "images":
        from .audit import open_images

        images = ImageSetThumbnails(open_images(state.settings, state.spec, state.result.settings["image_size"]))
    return write_html(path, state.result, images, gallery)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = config.stash.get(audit_session_key, None)
    if state is None or state.result is None or not is_rank_zero():
        return
    from .terminal import render_summary

    terminalreporter.section("memaudit summary")
    terminalreporter.write(render_summary(state.result, markup=terminalreporter.hasmarkup))
    if state.json_path:
        terminalreporter.write_line(f"memaudit: results written to {state.json_path}")
    if state.html_path:
        terminalreporter.write_line(f"memaudit: report written to {state.html_path}")
    if state.report_error:
        terminalreporter.write_line(f"memaudit: ERROR: the HTML report could not be written: {state.report_error}",
                                    red=True, bold=True)


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
        if console.is_terminal and self.config.get_verbosity() >= 0 and is_rank_zero():
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
