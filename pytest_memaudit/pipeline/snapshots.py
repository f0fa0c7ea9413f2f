"""Resumable audits: each process's accumulator states and progress, saved atomically.

With ``--memaudit-state DIR`` every process saves its snapshot to
``DIR/process-RRRRR-of-WWWWW.pt`` every ``--memaudit-state-every`` seconds (between batches) and
when its shard is done. Running the same command again loads them and goes on from there. A
snapshot carries the audit's fingerprint: the settings that decide the numbers, the audited
layers, the checkpoint's sha256, a digest of the data listing, the number of processes, the
package version and the snapshot format. A snapshot with another fingerprint is refused with an
error that names what differs, never silently mixed in.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import AuditError

STATE_FORMAT = 2  # 2: the per-image signals in "measured"
# Settings that change rounding, speed or memory only: a run may resume with other values.
RESUMABLE_CHANGES = ("batch_size", "device", "workers", "median_memory", "state", "state_every", "dist_timeout")
_NAME = re.compile(r"process-(\d+)-of-(\d+)\.pt")


class Snapshots:
    """The snapshots of process ``rank`` of ``size`` in ``directory``."""

    def __init__(self, directory: str | os.PathLike, rank: int, size: int, fingerprint: dict[str, Any],
                 every_s: float):
        self.directory = Path(directory)
        self.rank, self.size = rank, size
        self.fingerprint = fingerprint
        self.every_s = every_s
        self.path = self.directory / f"process-{rank:05d}-of-{size:05d}.pt"
        self._saved_at = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        """This process's saved payload, or None when there is none yet (a fresh start)."""
        if self.directory.exists() and not self.directory.is_dir():
            raise AuditError(f"--memaudit-state {self.directory} is a file; give a directory (it is created if missing)")
        if not self.directory.exists():
            return None
        sizes = sorted({int(m.group(2)) for p in self.directory.iterdir() if (m := _NAME.fullmatch(p.name))})
        if any(size != self.size for size in sizes):
            raise AuditError(
                f"--memaudit-state {self.directory} holds the snapshots of an audit run by "
                f"{' and '.join(map(str, sizes))} processes; this one runs {self.size}. The data points are split by "
                "the number of processes: resume with as many as before, or use another directory to start over."
            )
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, weights_only=True, mmap=True)
            then = json.loads(saved["fingerprint"])
            payload = saved["payload"]
        except Exception as exc:  # noqa: BLE001 (any unreadable file is the same problem for the user)
            raise AuditError(
                f"cannot read the snapshot {self.path} ({type(exc).__name__}: {exc}); it was not written by this "
                "version, or is damaged. Delete it to start this process's share over."
            ) from None
        differences = describe_differences(then, self.fingerprint)
        if differences:
            raise AuditError(
                f"the snapshot {self.path} was written by another audit: {differences}. Rerun the same command to "
                "resume it, or use another --memaudit-state directory (or empty this one) to start over."
            )
        return payload

    def due(self) -> bool:
        return time.monotonic() - self._saved_at >= self.every_s

    def save(self, payload: dict[str, Any]) -> None:
        """Replace this process's snapshot with ``payload``: readers see the old one or the new one."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.directory)
        except OSError as exc:
            raise AuditError(f"cannot write snapshots to --memaudit-state {self.directory}: {exc}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"fingerprint": json.dumps(self.fingerprint, sort_keys=True), "payload": payload}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise AuditError(f"cannot write the snapshot {self.path}: {exc}") from None
            raise
        self._saved_at = time.monotonic()


def describe_differences(then: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between two fingerprints, in words ('' when nothing does)."""
    parts = []
    for key in dict.fromkeys([*then, *now]):
        old, new = then.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed = [f"{name} {old.get(name)!r} then, {new.get(name)!r} now"
                       for name in dict.fromkeys([*old, *new]) if old.get(name) != new.get(name)]
            parts.append(f"{key}: {'; '.join(changed)}")
        else:
            parts.append(f"{key}: {_short(old)} then, {_short(new)} now")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
