"""The plugin's options and ini keys, their checks, and the output paths they name."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest


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

STORE_HINT = ".memaudit/"  # as pytest_memaudit.gates.baselines.STORE, without importing it

DEFAULT_REPORT_DIR = "memaudit-report"  # under the invocation directory: report.html and results.json

OUTPUTS_NOT_WRITTEN = 3  # exit status when every gate passed but an output file could not be written

GALLERY_MODES = ("images", "names", "none")  # as pytest_memaudit.report.thumbnails, without importing it


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


def compare_fail_options(config: pytest.Config) -> list[tuple[str, str, dict]]:
    """--memaudit-compare-fail values as (layer or '*', compare gate key, what it sets)."""
    given = config.getoption("memaudit_compare_fail")
    if not given:
        return []  # without importing config (numpy, yaml): the plugin stays free in runs that audit nothing
    from ..gates.limits import parse_compare_option

    return [parse_compare_option(text) for text in given]


def list_saved(config: pytest.Config) -> int:
    """--memaudit-list-saved: the table of saved runs, then exit 0 (as --fixtures lists fixtures)."""
    from ..gates.baselines import format_saved, saved_runs

    sys.stdout.write(format_saved(config.rootpath, saved_runs(config.rootpath)))
    return 0


def is_given(config: pytest.Config, name: str) -> bool:
    return bool(config.getoption(name) or config.getini(name))


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
    from ..errors import ConfigError
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
