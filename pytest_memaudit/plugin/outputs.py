"""The audit's output files: checking their locations up front, and writing them so that a failure
is reported (with the path and the operating system's reason), never a crash that loses the rest.

A file that cannot be replaced must not pass for this run's: an old file at that path is renamed
``<name>.stale`` when possible, and the message says so, or says that the file there is old.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def location_problem(path: Path) -> str | None:
    """Why no file can be written at ``path`` (None: it can, as far as can be told without writing it).

    Nothing is created but a nameless probe file in the nearest existing folder on the way to
    ``path``, removed at once (``os.access`` would not do: it says yes to root on read-only mounts).
    """
    if path.is_dir():
        return f"{path} is a directory"
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot create files in {existing}: {exc.strerror or exc}"
    return None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once links are resolved, or hard links to one file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def failure_reason(exc: BaseException) -> str:
    """The operating system's reason for an OSError, else the exception's type and message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def set_aside(path: Path) -> str:
    """Rename a file this run could not replace to ``<name>.stale``; say what became of it ('' if none)."""
    try:
        if not path.is_file():
            return ""
        modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    except OSError:
        return ""
    stale = path.with_name(path.name + ".stale")
    try:
        os.replace(path, stale)
    except OSError:
        return f"the file at {path} is from an earlier run (modified {modified}), not from this one"
    return f"the file left there by an earlier run (modified {modified}) was renamed to {stale}"


@dataclass
class OutputLog:
    """Lines for the terminal: what was written where, and what could not be (plain strings: they
    travel from an xdist worker to the controller)."""

    written: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def write(self, what: str, path: Path, write: Callable[[], T]) -> T | None:
        """``write()`` the file ``path``; any failure is logged (and an old file set aside), never raised."""
        try:
            value = write()
        except Exception as exc:  # noqa: BLE001 (every output failure is reported, none may crash the session)
            aside = set_aside(path)
            self.errors.append(f"the {what} could not be written to {path}: {failure_reason(exc)}"
                               + (f"; {aside}" if aside else ""))
            return None
        self.written.append(f"{what} written to {path}")
        return value

    def make(self, what: str, source: str, make: Callable[[], T]) -> T | None:
        """``make()`` something an output needs from ``source``; a failure is logged, never raised."""
        try:
            return make()
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"the {what} could not be made from {source}: {failure_reason(exc)}")
            return None
