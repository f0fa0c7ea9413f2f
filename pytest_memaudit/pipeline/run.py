"""The state of one process's audit: the subjects (the model and its controls), the shard's progress,
what was measured besides the layer states, and the merged data points; a snapshot of it and its check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..controls.planted import PlantedRecorder, PlantedUnit
from ..data.labelled import LabelledImages
from ..errors import AuditError
from ..metric.imagesignals import ViewMeans
from ..metric.rows import RowStore
from ..metric.unitmem import LayerState
from ..models import LayerSpec, ModelSpec
from ..models.hooks import LayerRecorder
from .device import ForwardTimer
from .distributed import World
from .forward import AdaptiveForward
from .overlap import OverlapCheck
from .settings import RunSettings, control_roles
from .snapshots import Snapshots
from .views import ViewRecipe

ProgressCallback = Callable[[int, int], None]  # (data points done, in all) of this process's share

ROLE_DESCRIPTIONS = {
    "control": "the same architecture with random weights (seeded), on the same views",
    "planted": "the model with planted units that memorize chosen held-out images, keyed on each planted layer's "
               "own input, measured in the model's forward pass",
}


@dataclass
class Subject:
    """One network audited in the pass: the model, or a control. UnitMem is computed over the
    data points with ``unitmem_labels``; the membership contrast pits ``members`` against
    ``holdout``."""

    role: str
    net: torch.nn.Module
    unitmem_labels: tuple[int, ...]
    members: tuple[int, ...]
    holdout: tuple[int, ...]
    recorder: LayerRecorder | PlantedRecorder | None = None
    states: dict[str, LayerState] = field(default_factory=dict)

    @property
    def rides(self) -> bool:
        """Measured in the model's forward pass (the planted control), not in a pass of its own."""
        return isinstance(self.recorder, PlantedRecorder)


@dataclass
class ShardProgress:
    """How far this process got through its shard: the first ``done`` of ``positions``, of which
    ``skipped`` (position, reason) could not be read."""

    positions: range
    done: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    resumed: int = 0  # ``done`` when this run started (from a snapshot)

    def remaining(self) -> range:
        return self.positions[self.done :]

    @property
    def read(self) -> int:
        return self.done - len(self.skipped)

    def state_dict(self) -> dict:
        return {"done": self.done, "skipped": [[position, reason] for position, reason in self.skipped]}

    def load_state_dict(self, state: dict) -> None:
        self.done = self.resumed = int(state["done"])
        self.skipped = [(int(position), str(reason)) for position, reason in state["skipped"]]


class Measured:
    """What this process measured of its images besides the states, by position in the listing: each
    image's characteristics (``characteristics.py``), the model's per-image signals (by
    ``signal_key``), its per-unit activations at the embedding layer, and a sample's view-means.
    ``capacity``: the data points this process streams; the rows are kept in arrays of that many
    (``RowStore``), so a long stream leaves nothing behind in the heap batch by batch."""

    PARTS = ("characteristics", "signals", "embedding")

    def __init__(self, capacity: int = 0, view_means: ViewMeans | None = None):
        self._positions = RowStore(capacity)
        self._parts = {part: RowStore(capacity) for part in self.PARTS}
        self.view_means = view_means or ViewMeans(np.zeros(0, dtype=bool))

    def add(self, positions: list[int], characteristics: dict[str, np.ndarray], embedding: np.ndarray | None,
            signals: dict[str, np.ndarray], view_means: dict[str, np.ndarray]) -> None:
        self._positions.add({"positions": np.asarray(positions, dtype=np.int64)})
        for part, columns in zip(self.PARTS, (characteristics, signals, _embedding_part(embedding))):
            self._parts[part].add(columns)
        if view_means:
            self.view_means.add(positions, view_means)

    @property
    def positions(self) -> np.ndarray:
        return self._positions.arrays().get("positions", np.zeros(0, dtype=np.int64))

    def part(self, part: str) -> dict[str, np.ndarray]:
        """One of ``PARTS`` by name, as arrays by data point (in the order of ``positions``): views, not copies."""
        return self._parts[part].arrays()

    def state_dict(self) -> dict:
        """Copies of what was measured (for a snapshot)."""
        embedding = self.part("embedding").get("embedding")
        means = self.view_means.state_dict()
        return {
            "positions": torch.from_numpy(self.positions.copy()),
            "characteristics": {name: torch.from_numpy(values.copy())
                                for name, values in self.part("characteristics").items()},
            "embedding": None if embedding is None else torch.from_numpy(embedding.copy()),
            "signals": {key: torch.from_numpy(values.copy()) for key, values in self.part("signals").items()},
            "view_means": {"positions": torch.from_numpy(means["positions"]),
                           "rows": {key: torch.from_numpy(rows) for key, rows in means["rows"].items()}},
        }

    def load_state_dict(self, state: dict) -> None:
        parts = dict(zip(self.PARTS, (state["characteristics"], state["signals"], _embedding_part(state["embedding"]))))
        sizes = sorted({len(values) for columns in parts.values() for values in columns.values()})
        if sizes and sizes != [len(state["positions"])]:
            raise AuditError(f"it lists {len(state['positions'])} data points measured, but its image "
                             f"characteristics, signals and embedding cover {sizes}")
        self._positions.load({"positions": state["positions"].numpy()})
        for part, columns in parts.items():
            self._parts[part].load({name: values.numpy() for name, values in columns.items()})
        self.view_means.load_state_dict({"positions": state["view_means"]["positions"].numpy(),
                                         "rows": {key: rows.numpy() for key, rows in state["view_means"]["rows"].items()}})


def _embedding_part(embedding):
    return {} if embedding is None else {"embedding": embedding}


@dataclass
class AuditRun:
    """What one process of an audit works with, set up alike on every process."""

    settings: RunSettings
    spec: ModelSpec
    selected: list[LayerSpec]
    world: World
    device: torch.device
    images: LabelledImages
    image_size: int
    checkpoints: list[Path | None]  # one, or a series
    checkpoint_info: list[dict | None]
    given: list[str | None]  # the checkpoints as the user named them
    model_net: torch.nn.Module
    layout: torch.memory_format
    recipe: ViewRecipe
    fingerprint: dict
    progress: ShardProgress
    workers: int
    forward: AdaptiveForward
    notes: list[str]
    subjects: list[Subject] = field(default_factory=list)
    plants: list[PlantedUnit] = field(default_factory=list)
    checker: OverlapCheck | None = None
    snapshots: Snapshots | None = None
    timer: ForwardTimer | None = None
    measured: Measured = field(default_factory=Measured)
    embedding_layer: str | None = None  # whose activations embed images for clustering
    threads: int = 1  # torch's intra-op threads during the audit
    cpus: str = ""  # the CPUs this process may use, and why (hardware.usable_cpus)
    losses: dict[str, Callable] = field(default_factory=dict)  # by model role: its ``loss:`` function

    @property
    def views(self) -> int:
        return self.recipe.views_per_image(self.settings.augmentations)

    @property
    def batch_size(self) -> int:
        """Views per forward pass, as asked (the forward halves its own on out-of-memory)."""
        return views_per_pass(self.settings, self.device)

    @property
    def controls(self) -> tuple[str, ...]:
        return control_roles(self.settings, self.spec)

    @property
    def source(self) -> str:
        images = self.images
        return images.description or ("builtin (generated images)" if images.root is None else str(images.root))

    def snapshot(self) -> dict:
        """This process's resumable state: its subjects' layer states and its progress."""
        return {
            "progress": self.progress.state_dict(),
            "states": {s.role: {name: state.state_dict() for name, state in s.states.items()} for s in self.subjects},
            "overlap": None if self.checker is None else self.checker.state_dict(),
            "measured": self.measured.state_dict(),
        }

    def restore(self, saved: dict) -> None:
        """Load a snapshot, then check it: a damaged one is refused, never resumed into wrong figures."""
        try:
            for subject in self.subjects:
                for name, state in subject.states.items():
                    state.load_state_dict(saved["states"][subject.role][name])
            self.progress.load_state_dict(saved["progress"])
            if self.checker is not None:
                self.checker.load_state_dict(saved["overlap"])
            self.measured.load_state_dict(saved["measured"])
            problem = self.restored_problem()
        except KeyError as exc:
            problem = f"it lacks part of this audit's state ({exc})"
        except AuditError as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 (a snapshot is read from disk: any malformed field is damage)
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise AuditError(f"the snapshot {self.snapshots.path} is damaged: {problem}. Delete it to start this "
                             "process's share over.")

    def restored_problem(self) -> str | None:
        """What in a loaded snapshot disagrees with this audit or with itself (None: nothing).

        Its progress must lie within this process's share and its skipped data points among those
        streamed; every layer state, the stored values, the measured characteristics and the
        held-out digests must hold exactly the data points streamed and read, with their labels
        and groups. A wrong counter would otherwise stream data twice or leave some out, silently."""
        progress, positions = self.progress, self.progress.positions
        if not 0 <= progress.done <= len(positions):
            return f"its progress counter says {progress.done} data points, this process's share has {len(positions)}"
        streamed = np.asarray(positions[: progress.done], dtype=np.int64)
        skipped = np.array([position for position, _ in progress.skipped], dtype=np.int64)
        if np.unique(skipped).size != skipped.size or not np.isin(skipped, streamed).all():
            return (f"its {skipped.size} skipped data points are not distinct data points among the {streamed.size} "
                    "it has streamed")
        read = np.setdiff1d(streamed, skipped)
        labels, groups = self.images.labels[read].astype(np.int64), self.images.groups[read].astype(np.int64)
        for subject in self.subjects:
            for name, state in subject.states.items():
                expected = torch.zeros_like(state.counts, device="cpu")
                expected.view(-1).index_add_(0, torch.from_numpy(labels * state.groups + groups),
                                             torch.ones(read.size, dtype=torch.int64))
                if not torch.equal(state.counts.cpu(), expected):
                    return (f"the {subject.role} state of layer {name} holds {int(state.counts.sum())} data points, "
                            f"not the {read.size} its progress says were read")
                if state.values is not None and not np.array_equal(np.sort(state.values.index[: state.values.count]), read):
                    return f"the stored values of layer {name} ({subject.role}) are not those of the data points read"
        measured = self.measured.state_dict()
        if not np.array_equal(measured["positions"].numpy(), read):
            return f"it lists {measured['positions'].numel()} data points measured, not the {read.size} read"
        sizes = [len(values) for values in measured["characteristics"].values()]
        if measured["embedding"] is not None:
            sizes.append(measured["embedding"].shape[0])
        if any(size != read.size for size in sizes):
            return f"its image characteristics or embedding cover {sizes} data points, not the {read.size} read"
        sampled = read[self.measured.view_means.sample[read]]
        if not np.array_equal(np.sort(measured["view_means"]["positions"].numpy()), sampled):
            return f"its view-means (neighbour_distance) are not those of the {sampled.size} sampled data points read"
        if self.checker is not None:
            digested = [position for _, position in [*self.checker.members.items(), *self.checker.holdout]]
            if not np.isin(np.array(digested, dtype=np.int64), read).all():
                return "its held-out check lists data points it has not read"
        return None

    def close(self) -> None:
        for subject in self.subjects:
            if subject.recorder:
                subject.recorder.close()
            for state in subject.states.values():
                state.close()


@dataclass
class Merged:
    """The data points of every process, after the merge."""

    read: np.ndarray  # positions in the listing of the data points read, increasing
    skipped: list[dict[str, str]]  # unreadable images, in listing order
    shards: list[int]  # data points read per process
    new_index: np.ndarray  # (positions,) data point index of each position read, -1 for the skipped
    notes: list[str]
    waited_s: float  # of the merge's time, spent waiting for the other processes to finish their shards
    characteristics: dict[str, np.ndarray]  # per data point (new index)
    signals: dict[str, np.ndarray]  # per data point (new index), by imagesignals.signal_key
    view_means: dict[str, tuple[np.ndarray, np.ndarray]]  # by signal_key: (data points (new index), view-means)


def is_model(role: str) -> bool:
    """The audited model, or a later checkpoint of a series (``model:1``, ...): not a control."""
    return role == "model" or role.startswith("model:")


def views_per_pass(settings: RunSettings, device: torch.device) -> int:
    return settings.batch_size or (256 if device.type == "cuda" else 32)
