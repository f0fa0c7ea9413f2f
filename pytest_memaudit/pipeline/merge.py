"""The merge stage: every process's data points and measurements, gathered and indexed alike."""

from __future__ import annotations

import time

import numpy as np

from .overlap import check_read
from .run import AuditRun, Merged


def merge(run: AuditRun) -> Merged:
    """Every process's progress and states, merged on every process; data point indices become
    positions among the images read, as one process would have numbered them."""
    world, images = run.world, run.images
    clock = time.perf_counter()
    world.wait_for_all("merging the processes' results")
    waited = time.perf_counter() - clock
    mine = {
        "skipped": run.progress.skipped,
        "read": run.progress.read,
        "resumed": run.progress.resumed,
        "notes": run.notes,
        "holdout": None if run.checker is None else run.checker.holdout,
    }
    everyone = world.all_gather_object(mine, "gathering the progress")
    skipped = sorted(pair for theirs in everyone for pair in theirs["skipped"])
    read = np.setdiff1d(np.arange(len(images)), np.array([position for position, _ in skipped], dtype=np.int64))
    skipped_ids = [{"id": images.ids[position], "reason": reason} for position, reason in skipped]
    check_read(images, read, skipped_ids, run.source)
    if run.checker is not None:
        found = run.checker.overlaps([pair for theirs in everyone for pair in theirs["holdout"]])
        run.checker.raise_for(sorted(pair for theirs in world.all_gather_object(found, "checking the held-out set")
                                     for pair in theirs))
    new_index = np.full(len(images), -1, dtype=np.int64)
    new_index[read] = np.arange(read.size)
    for subject in run.subjects:
        states = [subject.states[layer.name] for layer in run.selected]
        world.merge_states(states)
        for state in states:
            state.reindex(new_index)
    characteristics = gather_characteristics(run, new_index, read.size)
    signals = gather_characteristics(run, new_index, read.size, "signals")
    view_means = gather_view_means(run, new_index)
    notes = list(dict.fromkeys(note for theirs in everyone for note in theirs["notes"]))
    resumed = sum(theirs["resumed"] for theirs in everyone)
    if resumed:
        notes.append(f"resumed from the snapshots in {run.settings.state}: {resumed} of {len(images)} data points "
                     "had been streamed before")
    return Merged(read, skipped_ids, [theirs["read"] for theirs in everyone], new_index, notes, waited, characteristics,
                  signals, view_means)


def gather_view_means(run: AuditRun, new_index: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every process's view-means of the sampled data points (``ViewMeans``), by key: (data points (new
    index), their rows). One process's are its stored rows themselves, not a copy."""
    everyone = run.world.all_gather_object(run.measured.view_means.views(), "gathering the view-means")
    merged: dict[str, tuple[list, list]] = {}
    for theirs in everyone:
        rows = new_index[theirs["positions"]]
        kept = rows >= 0
        for key, values in theirs["rows"].items():
            indices, parts = merged.setdefault(key, ([], []))
            indices.append(rows[kept])
            parts.append(values if kept.all() else values[kept])
    return {key: (joined(indices), joined(parts)) for key, (indices, parts) in merged.items()}


def gather_characteristics(run: AuditRun, new_index: np.ndarray, count: int,
                           part: str = "characteristics") -> dict[str, np.ndarray]:
    """Every process's image characteristics (or another ``part`` of what it measured per image,
    ``Measured.PARTS``), as arrays by data point (new index)."""
    everyone = run.world.all_gather_object((run.measured.positions, run.measured.part(part)),
                                           f"gathering the image {part}")
    merged: dict[str, np.ndarray] = {}
    for positions, values in everyone:
        rows = new_index[positions]
        kept = rows >= 0
        for name, column in values.items():
            merged.setdefault(name, np.full((count, *column.shape[1:]), np.nan))[rows[kept]] = column[kept]
    return merged


def joined(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate``, without its copy when there is one array."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
