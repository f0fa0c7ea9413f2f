"""Saved runs: audit results kept under ``.memaudit/`` in the rootdir, a folder to commit or cache
in CI (as pytest-benchmark keeps ``.benchmarks/``), and finding the baseline a run compares with.

An entry is ``.memaudit/<model>/<date>_<checkpoint sha256 prefix>_<NAME>.json`` (the date in UTC,
so names sort in the order the runs were saved); its content is the run's results file.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, quote
from ..results.result import write_json_atomic

STORE = ".memaudit"
AUTOSAVE_NAME = "auto"  # the NAME of --memaudit-autosave entries
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA_CHARS = 12
_TIME = "%Y%m%dT%H%M%SZ"
_ENTRY = re.compile(r"(?P<date>\d{8}T\d{6}Z)_(?P<sha>[0-9a-f]+|none)_(?P<name>.+)")


@dataclass(frozen=True)
class SavedRun:
    path: Path
    model: str  # the folder: the model's name, made safe for a file name
    saved: datetime  # UTC
    sha: str  # checkpoint sha256 prefix, "none" without a checkpoint
    name: str

    @property
    def entry(self) -> str:
        """The entry as --memaudit-compare accepts it besides its NAME: ``<model>/<file stem>``."""
        return f"{self.model}/{self.path.stem}"


def check_name(name: str) -> str:
    """A valid NAME for --memaudit-save, or a ConfigError that says what one looks like."""
    if not NAME_PATTERN.fullmatch(name) or name.endswith(".json") or name in ("latest", "previous"):
        raise ConfigError(f"--memaudit-save {quote(name)}: a saved run's NAME is 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit, not ending in .json, and not 'latest' or 'previous' "
                          "(e.g. release-1.2)")
    return name


def new_entry(root: Path, document: dict[str, Any], name: str, now: datetime | None = None) -> Path:
    """Where a results document is saved as NAME (checked by ``check_name``): a new entry under
    ``root/.memaudit``, dated after every entry of the same model (a run saved within the same second
    as the last one takes the next second), so that the dates order a model's entries and 'latest' is
    the last one saved."""
    when = (now or datetime.now(timezone.utc)).replace(microsecond=0)
    model = _safe(document["model"])
    last = max((run.saved for run in saved_runs(root) if run.model == model), default=None)
    if last is not None and when <= last:
        when = last + timedelta(seconds=1)
    sha = ((document.get("checkpoint") or {}).get("sha256") or "none")[:SHA_CHARS]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # a checkpoint's label in NAME.<checkpoint> may hold others
    return root / STORE / model / f"{when:{_TIME}}_{sha}_{name}.json"


def save_run(root: Path, document: dict[str, Any], name: str, now: datetime | None = None) -> Path:
    """Save a results document as NAME (``new_entry``) and return its path."""
    return write_json_atomic(new_entry(root, document, name, now), document)


def saved_runs(root: Path) -> list[SavedRun]:
    """Every entry under ``root/.memaudit``, oldest first (other files there are not entries)."""
    runs = []
    for path in sorted((root / STORE).glob("*/*.json")):
        match = _ENTRY.fullmatch(path.stem)
        if match:
            saved = datetime.strptime(match["date"], _TIME).replace(tzinfo=timezone.utc)
            runs.append(SavedRun(path, path.parent.name, saved, match["sha"], match["name"]))
    return sorted(runs, key=lambda run: (run.saved, run.path.name))


def find_baseline(reference: str, root: Path, base: Path, model: str) -> Path:
    """The results file ``--memaudit-compare`` names: a path (ending in .json or holding a '/', relative
    to ``base``, the invocation directory), ``latest`` (the newest entry of ``model``), or a NAME (its
    newest entry, of ``model`` where there is one) or entry. ConfigError when there is none."""
    if reference.endswith(".json") or (("/" in reference or "\\" in reference) and not _is_entry(reference, root)):
        path = base / reference
        if not path.is_file():
            raise ConfigError(f"--memaudit-compare {quote(reference)}: no such results file ({path})")
        return path
    runs = saved_runs(root)
    store = root / STORE
    if reference == "latest":
        own = [run for run in runs if run.model == _safe(model)]
        if not own:
            raise ConfigError(f"--memaudit-compare latest: no saved run of model {model} in {store}; save one with "
                              "--memaudit-save NAME or --memaudit-autosave")
        return own[-1].path
    named = [run for run in runs if reference in (run.name, run.path.stem, run.entry)]
    if not named:
        names = sorted({run.name for run in runs})
        close = difflib.get_close_matches(reference, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        listing = f"Saved names: {', '.join(names)}." if names else f"Nothing is saved in {store} yet."
        raise ConfigError(f"--memaudit-compare {quote(reference)}: no saved run of that name.{hint} {listing} "
                          "(pytest --memaudit-list-saved lists them; a path to a results.json works too.)")
    own = [run for run in named if run.model == _safe(model)]
    return (own or named)[-1].path


def format_saved(root: Path, runs: list[SavedRun]) -> str:
    """The table --memaudit-list-saved prints."""
    store = root / STORE
    if not runs:
        return f"no saved runs in {store} (save one with --memaudit-save NAME or --memaudit-autosave)\n"
    rows = [("saved (UTC)", "model", "checkpoint", "name", "file")]
    rows += [(f"{run.saved:%Y-%m-%d %H:%M:%S}", run.model, run.sha, run.name, str(run.path.relative_to(store)))
             for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return f"saved runs in {store} ({len(runs)}), oldest first:\n" + "\n".join(lines) + "\n"


def _is_entry(reference: str, root: Path) -> bool:
    return any(run.entry == reference for run in saved_runs(root))


def _safe(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model) or "_"
