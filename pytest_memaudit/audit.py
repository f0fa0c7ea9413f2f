"""``run_audit``: the one entry point that wires data, augmentation, model, hooks and UnitMem.

Usable without pytest::

    from pytest_memaudit.audit import run_audit
    from pytest_memaudit.config import make_settings
    result = run_audit(make_settings(model="var_d16", checkpoint="vae.pth", data="imgs/"))
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import RunSettings, control_roles
from .controls import random_weights_copy
from .data import BUILTIN_PREFIX, ImageBatch, ImageSet, UnreadableImage, lost_worker
from .datapoints import DataPoints, embedded_rows, score_data_points, what_gets_memorized
from .device import (ForwardTimer, check_precision, cpu_threads, faster_layout, intra_op_threads, is_out_of_memory,
                     precision_mode, process_device, selected_device, time_precisions)
from .distributed import World, join
from .errors import AuditError, DataError, user_code
from .hardware import precision_notes, usable_cpus
from .heap import reuse_freed_memory
from .hooks import LayerRecorder
from .imagesignals import LOSS_LAYER, ViewMeans, check_loss, image_signals, neighbour_sample, signal_key, view_scalars
from .labelled import LabelledImages, labelled_images
from .membership import Contrast, membership_contrast
from .models import InputContract, LayerSpec, ModelSpec, get_model_spec
from .planted import InputSketches, PlantedRecorder, PlantedUnit, choose_plants, plantable
from .planted import evaluate as evaluate_planted
from .results import AuditResult, LayerResult, SubjectResult
from .signals import terminate_as_interrupt
from .snapshots import RESUMABLE_CHANGES, STATE_FORMAT, Snapshots
from .stats import jackknife_interval, layer_stats, spread_figures
from .tarshards import open_image_folder
from .unitmem import HOLDOUT, LABELS, MEMBER, PLANTED, LayerState, median_matrix_bytes
from .verdict import Verdict, decide, membership_tests
from .views import PipelineViews, ViewRecipe, recipe_for, view_seed

ProgressCallback = Callable[[int, int], None]  # (data points done, in all) of this process's share
# Weights and views in NHWC, the layout oneDNN and cuDNN convolutions run fastest in, for models
# whose input contract says they support it (InputContract.channels_last).
MEMORY_FORMAT = torch.channels_last


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


@dataclass
class Measured:
    """What this process measured of its images besides the states: each image's characteristics
    (``characteristics.py``) and the model's per-unit activations at the embedding layer, by
    position in the listing."""

    positions: list[np.ndarray] = field(default_factory=list)
    characteristics: list[dict[str, np.ndarray]] = field(default_factory=list)
    embedding: list[np.ndarray] = field(default_factory=list)  # (images, units) per batch
    # per batch, the per-image signal values of the model's subjects, by signal_key (imagesignals.py)
    signals: list[dict[str, np.ndarray]] = field(default_factory=list)
    view_means: ViewMeans = field(default_factory=lambda: ViewMeans(np.zeros(0, dtype=bool)))  # a sample's

    def add(self, positions: list[int], characteristics: dict[str, np.ndarray], embedding: np.ndarray | None,
            signals: dict[str, np.ndarray], view_means: dict[str, np.ndarray]) -> None:
        self.positions.append(np.asarray(positions, dtype=np.int64))
        self.characteristics.append(characteristics)
        self.signals.append(signals)
        if view_means:
            self.view_means.add(positions, view_means)
        if embedding is not None:
            self.embedding.append(embedding)

    def state_dict(self) -> dict:
        positions = np.concatenate(self.positions) if self.positions else np.zeros(0, dtype=np.int64)
        names = self.characteristics[0] if self.characteristics else {}
        means = self.view_means.state_dict()
        return {
            "positions": torch.from_numpy(positions),
            "characteristics": {name: torch.from_numpy(np.concatenate([c[name] for c in self.characteristics]))
                                for name in names},
            "embedding": torch.from_numpy(np.concatenate(self.embedding)) if self.embedding else None,
            "signals": {key: torch.from_numpy(np.concatenate([s[key] for s in self.signals if key in s]))
                        for key in dict.fromkeys(key for s in self.signals for key in s)},
            "view_means": {"positions": torch.from_numpy(means["positions"]),
                           "rows": {key: torch.from_numpy(rows) for key, rows in means["rows"].items()}},
        }

    def load_state_dict(self, state: dict) -> None:
        self.positions = [state["positions"].numpy()]
        self.characteristics = [{name: values.numpy() for name, values in state["characteristics"].items()}]
        self.signals = [{key: values.numpy() for key, values in state["signals"].items()}]
        self.embedding = [] if state["embedding"] is None else [state["embedding"].numpy()]
        self.view_means.load_state_dict({"positions": state["view_means"]["positions"].numpy(),
                                         "rows": {key: rows.numpy() for key, rows in state["view_means"]["rows"].items()}})


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


def run_audit(
    settings: RunSettings,
    model: ModelSpec | None = None,
    layers: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> AuditResult:
    """Audit ``layers`` (display names or module paths; None: all) of the model ``settings`` name.

    Launched as several processes (torchrun), each streams its shard of the data points and
    every process returns the same result: shard, stream, merge, finalize.
    """
    return _audit(settings, model, layers, progress)[0]


def run_series(
    settings: RunSettings,
    checkpoints: Sequence[str],
    model: ModelSpec | None = None,
    layers: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> list[AuditResult]:
    """Audit several checkpoints of one model in one pass, one result each, in the order given: every
    checkpoint is one more subject fed the same decoded and augmented views. The random control
    (which does not depend on the weights) and the planted control (built on the first checkpoint:
    it says what this data and these views can detect) are audited once and shared."""
    return _audit(settings, model, layers, progress, checkpoints)


def _audit(
    settings: RunSettings,
    model: ModelSpec | None = None,
    layers: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    checkpoints: Sequence[str] | None = None,
) -> list[AuditResult]:
    started = time.perf_counter()
    settings = replace(settings, checkpoint=checkpoints[0]) if checkpoints else settings
    spec = model or get_model_spec(settings.model)
    selected = select_layers(spec, layers)
    world = join(settings.dist_timeout)
    run = None
    timing: dict[str, float] = {}
    try:
        run = set_up(settings, spec, selected, world, list(checkpoints or [settings.checkpoint]))
        with torch.inference_mode(), selected_device(run.device), precision_mode(settings.precision, run.device), \
                reuse_freed_memory(run.device), cpu_threads(run.threads), terminate_as_interrupt():
            add_subjects(run)
            stream(run, progress)
            clock = time.perf_counter()
            merged = merge(run)
            timing["merge_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        run.selected = run.subjects[0].recorder.ordered(run.selected)  # forward order, as the first pass ran it
        labels = run.images.labels[merged.read]
        finished = {subject.role: finalize(subject, run.selected, settings, labels)
                    for subject in run.subjects}
        points = {
            subject.role: score_data_points({layer.name: subject.states[layer.name] for layer in run.selected},
                                            {layer.name: layer.values.unitmem for layer in finished[subject.role][0]},
                                            list(range(len(LABELS))), merged.read.size, merged.characteristics)
            for subject in run.subjects if is_model(subject.role)
        }
        signals = {subject.role: image_signals(subject.role, finished[subject.role][1], merged.signals,
                                               [layer.name for layer in run.selected], settings.permutations,
                                               settings.seed, merged.view_means)
                   for subject in run.subjects if is_model(subject.role)}
        embedding = gather_embedding(run, merged, points["model"])
        timing["finalize_s"] = time.perf_counter() - clock
    finally:
        if run is not None:
            run.close()
        world.close()
    return assemble(run, merged, finished, points, signals, embedding,
                    timing | {"wall_s": time.perf_counter() - started})


def is_model(role: str) -> bool:
    """The audited model, or a later checkpoint of a series (``model:1``, ...): not a control."""
    return role == "model" or role.startswith("model:")


def set_up(settings: RunSettings, spec: ModelSpec, selected: list[LayerSpec], world: World,
           checkpoints: list[str | None]) -> AuditRun:
    """Device, data, model and snapshots, agreed on by every process: a problem on one stops all."""
    problem, precision_s = None, None
    cpus, cpus_why = usable_cpus()
    threads, threads_why = intra_op_threads(cpus, world.launch.local_size, torch.get_num_threads())
    try:
        device = process_device(settings.device, world.launch.local_rank, world.launch.local_size)
        check_precision(settings.precision, device)  # before the models are built
        if settings.embedding_layer and spec.layer(settings.embedding_layer) is None:
            raise AuditError(f"--memaudit-embedding-layer {settings.embedding_layer!r}: model {spec.name} has no "
                             f"such layer; its layers: {', '.join(layer.name for layer in spec.layers)}")
        image_size = settings.image_size or spec.default_image_size
        planted = settings.planted_units if "planted" in control_roles(settings, spec) else 0
        images = open_images(settings, spec, image_size, planted=planted)
        recipe = recipe_for(settings, spec)
        views = recipe.views_per_image(settings.augmentations)
        paths = [spec.locate(given) for given in checkpoints]
        checkpoint_info = [checkpoint_record(path) for path in paths]
        layout = memory_format(spec.input_contract)
        with user_code(f"building model {spec.name}"):
            model_net = prepare(spec.build(paths[0]), device, layout)
        if layout == torch.channels_last and device.type == "cuda":
            layout, seconds = probe_layouts(model_net, (min(views_per_pass(settings, device), 32),
                                                        spec.input_contract.channels, image_size, image_size),
                                            device, settings.precision)
            model_net = model_net.to(memory_format=layout)
        if settings.precision == "bfloat16":
            batch = max(1, min(views_per_pass(settings, device), 32) // views) * views  # whole images' views
            with cpu_threads(threads):
                precision_s = precision_seconds(model_net, (batch, spec.input_contract.channels, image_size, image_size),
                                                device, layout)
    except Exception as exc:  # noqa: BLE001 (shared with the other processes, then raised)
        problem = exc
    world.agree(problem, "setting up the audit")
    fingerprint = audit_fingerprint(settings, selected, images, checkpoint_info, world.size, recipe)
    world.agree_on(fingerprint | {"device type": device.type}, "what to audit")
    world.check_devices(device)
    notes = list(images.notes) + precision_notes(settings.precision, device, precision_s)  # the forward adds halvings
    notes += what_is_not_tested(spec, paths[0], images)
    if device.type == "cuda" and memory_format(spec.input_contract) == torch.channels_last:
        notes.append(f"memory layout on {device}: {layout_name(layout)}, the faster for a forward pass: "
                     + ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in seconds.items()))
    run = AuditRun(
        settings, spec, selected, world, device, images, image_size, paths, checkpoint_info, checkpoints, model_net,
        layout, recipe, fingerprint, ShardProgress(world.shard(len(images))),
        settings.workers if settings.workers is not None else default_workers(images, device, views,
                                                                             world.launch.local_size, cpus),
        AdaptiveForward(views_per_pass(settings, device), device, notes), notes, timer=ForwardTimer(device),
        checker=OverlapCheck(images) if images.count(HOLDOUT, PLANTED) else None,
        threads=threads, cpus=f"{cpus_why}; {threads} intra-op thread(s): {threads_why}",
        measured=Measured(view_means=ViewMeans(neighbour_sample(len(images), settings.seed))),
    )
    if settings.state:
        run.snapshots = Snapshots(settings.state, world.rank, world.size, fingerprint, settings.state_every)
    return run


def what_is_not_tested(spec: ModelSpec, checkpoint: Path | None, images: ImageSet) -> list[str]:
    """Notes on what a run cannot show: a user model built without a checkpoint (the shipped examples' factories
    then give random weights, which learned nothing), and no held-out images (no membership test)."""
    notes = []
    if checkpoint is None and spec.factory is not None:
        notes.append(f"no checkpoint given: {spec.name} was built by its factory as build(None), which in the shipped "
                     "examples means random weights: a model that learned nothing, so nothing it could memorize. Give "
                     "--memaudit-checkpoint PATH (or checkpoint: in the audit YAML) to audit trained weights")
    if not images.count(HOLDOUT):
        notes.append("no held-out images: whether the model singles out its training images is not tested. Give "
                     "--memaudit-holdout DIR (images of the training distribution it never trained on)")
    return notes


def add_subjects(run: AuditRun) -> None:
    """The model, the later checkpoints of a series and the controls, each with a recorder and a
    layer state per audited layer; the states and progress of a snapshot, if there is one."""
    settings, images = run.settings, run.images
    run.subjects = [Subject("model", run.model_net, (MEMBER,), (MEMBER,), (HOLDOUT, PLANTED))]
    for i, checkpoint in enumerate(run.checkpoints[1:], 1):
        with user_code(f"building model {run.spec.name} from {checkpoint}"):
            net = prepare(run.spec.build(checkpoint), run.device, run.layout)
        run.subjects.append(Subject(f"model:{i}", net, (MEMBER,), (MEMBER,), (HOLDOUT, PLANTED)))
    if run.spec.loss is not None:
        for i, checkpoint in enumerate(run.checkpoints):
            with user_code(f"building the loss of model {run.spec.name}"):
                run.losses["model" if i == 0 else f"model:{i}"] = run.spec.loss(checkpoint)
    if "random" in run.controls:
        control_net = prepare(random_weights_copy(run.model_net, settings.seed), run.device, run.layout)
        run.subjects.append(Subject("control", control_net, (MEMBER,), (MEMBER,), (HOLDOUT, PLANTED)))
    if "planted" in (settings.control or "") and not images.count(PLANTED):  # asked for, not the default
        run.notes.append("the planted control needs held-out images (--memaudit-holdout DIR); it was not run")
    if images.count(PLANTED) and "planted" in run.controls:
        run.plants, planted = build_planted(run.model_net, run.selected, images, settings, run.recipe,
                                            run.spec.input_contract, run.layout, run.device, run.forward, run.world)
        if planted is not None:  # the model's net: it rides on the model's pass
            run.subjects.append(Subject("planted", run.model_net, (MEMBER, PLANTED), (PLANTED,), (HOLDOUT,), planted))
    probe = torch.zeros(1, run.spec.input_contract.channels, run.image_size, run.image_size, device=run.device)
    probe = probe.contiguous(memory_format=run.layout)
    budget = settings.median_memory * 2**20 // len(run.subjects)
    units = {}
    for subject in run.subjects:  # the model first: a rider measures the model's layers
        if not subject.rides:
            subject.recorder = LayerRecorder(subject.net, run.selected)
            with user_code(f"the forward pass of {run.spec.name} ({subject.role}) on views of shape "
                           f"{tuple(probe.shape)}"):
                units[subject.role] = run.forward.with_riders(  # every layer's unit count
                    subject.net, subject.recorder, probe,
                    [other.recorder for other in run.subjects if other.rides and subject.role == "model"])[0]
        subject.states = new_states(units["model" if subject.rides else subject.role], settings,
                                    len(run.progress.positions), run.device, budget)
        run.notes += spill_notes(subject.role, subject.states, settings.median_memory)
    run.embedding_layer = (run.spec.layer(settings.embedding_layer).name if settings.embedding_layer
                           else run.subjects[0].recorder.ordered(run.selected)[-1].name)
    if run.embedding_layer not in {layer.name for layer in run.selected}:
        run.notes.append(f"the memorized images were not clustered: the embedding layer {run.embedding_layer} "
                         "(--memaudit-embedding-layer) is not audited in this run (deselected, e.g. by -k); select "
                         "its test, or name an audited layer")
    problem, saved = None, None
    try:
        saved = run.snapshots.load() if run.snapshots else None
        if saved is not None:
            run.restore(saved)
    except AuditError as exc:
        problem = exc
    run.world.agree(problem, "reading the snapshots")


def stream(run: AuditRun, progress: ProgressCallback | None) -> None:
    """Stream this process's remaining shard through every subject, in batches of data points;
    a snapshot now and then and at the end. A decoding worker that dies is named as such."""
    settings, recipe = run.settings, run.recipe
    # A user pipeline makes its views one image at a time, in the decode workers; the others, batched here.
    in_workers = None if recipe.pipeline is None else PipelineViews(recipe.pipeline, settings.augmentations,
                                                                    settings.seed)
    batches = run.images.iter_batches(max(1, run.batch_size // run.views), run.workers,
                                      pin_memory=run.device.type == "cuda", positions=run.progress.remaining(),
                                      characteristics=True, views=in_workers)
    try:
        with contextlib.closing(batches):  # the decoding workers and their files go however the stream ends
            stream_batches(run, batches, progress)
    except (AuditError, RuntimeError) as exc:
        lost = lost_worker(exc)  # torch raises it wherever the main process is, the model's forward pass too
        if lost is None:
            raise
        raise DataError(f"{lost} while the audit read {run.source}; the model's forward pass is not at fault. "
                        "Rerun the audit (with --memaudit-state DIR a rerun resumes), with fewer --memaudit-workers if "
                        "memory ran short") from None
    if run.snapshots:
        run.snapshots.save(run.snapshot())


def stream_batches(run: AuditRun, batches: Iterable[ImageBatch], progress: ProgressCallback | None) -> None:
    settings, images, device, views, recipe = run.settings, run.images, run.device, run.views, run.recipe
    for batch in batches:
        run.progress.skipped += batch.skipped
        n = len(batch.positions)
        if n:
            if run.checker:
                run.checker.add(batch.positions, batch.images)
            if batch.problem:
                raise AuditError(batch.problem)
            if batch.views is not None:
                made = batch.views.to(device, non_blocking=True).float().mul_(2).sub_(1)
            else:
                pixels = batch.images.to(device, non_blocking=True).float().div_(255)
                seeds = [view_seed(settings.seed, images.ids[pos]) for pos in batch.positions]
                made = recipe.make(pixels, settings.augmentations, seeds)
            batch_views = model_input(made, run.spec.input_contract, run.layout)
            index = torch.tensor(batch.positions, dtype=torch.int64, device=device)
            label = torch.from_numpy(images.labels[batch.positions].astype(np.int64)).to(device)
            group = torch.from_numpy(images.groups[batch.positions].astype(np.int64)).to(device)
            embedding, signals, view_means = None, {}, {}
            riders = [subject for subject in run.subjects if subject.rides]
            for subject in run.subjects:
                if subject.rides:
                    continue  # measured in the model's pass
                with run.timer, user_code(f"the forward pass of {run.spec.name} ({subject.role}) on views of shape "
                                          f"{tuple(batch_views.shape)}"):
                    outputs, taken = reusing_pass(
                        run.forward, subject.net, subject.recorder, batch_views, run.layout,
                        batch.positions if batch.views is None else [],  # views made here, as the set-up pass made them
                        [rider.recorder for rider in riders] if subject.role == "model" else [])
                measured = [(subject, outputs)] + [(rider, rider.recorder.combine(outputs, part))
                                                   for rider, part in zip(riders, taken)]
                for who, per_layer in measured:
                    for name, per_view in per_layer.items():
                        values = per_view.view(n, views, -1).mean(dim=1)
                        who.states[name].update(values, index, label, group)
                        if who.role == "model" and name == run.embedding_layer:
                            embedding = values.float().cpu().numpy()
                        if is_model(who.role):
                            for signal, scalars in view_scalars(per_view.view(n, views, -1)).items():
                                kept = view_means if signal == "mean" else signals  # the view-means: a sample's
                                kept[signal_key(who.role, name, signal)] = scalars.cpu().numpy()
                if subject.role in run.losses:
                    plain = model_input(batch.images.to(device).float().div_(127.5).sub_(1), run.spec.input_contract,
                                        run.layout)
                    with run.timer, user_code(f"the loss of {run.spec.name} ({subject.role}) on images of shape "
                                              f"{tuple(plain.shape)}"):
                        loss = run.losses[subject.role](plain)
                    signals[signal_key(subject.role, LOSS_LAYER, "loss")] = check_loss(loss, n, run.spec.name)
            run.measured.add(batch.positions, batch.characteristics, embedding, signals, view_means)
        run.progress.done += n + len(batch.skipped)
        if progress:
            progress(run.progress.done, len(run.progress.positions))
        if run.snapshots and run.snapshots.due():
            run.snapshots.save(run.snapshot())


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


def gather_characteristics(run: AuditRun, new_index: np.ndarray, count: int,
                           part: str = "characteristics") -> dict[str, np.ndarray]:
    """Every process's image characteristics (or another ``part`` of what it measured per image),
    as arrays by data point (new index)."""
    mine = run.measured.state_dict()
    everyone = run.world.all_gather_object(
        (mine["positions"].numpy(), {name: values.numpy() for name, values in mine[part].items()}),
        f"gathering the image {part}")
    merged: dict[str, np.ndarray] = {}
    for positions, values in everyone:
        rows = new_index[positions]
        kept = rows >= 0
        for name, column in values.items():
            merged.setdefault(name, np.full((count, *column.shape[1:]), np.nan))[rows[kept]] = column[kept]
    return merged


def gather_view_means(run: AuditRun, new_index: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every process's view-means of the sampled data points (``ViewMeans``), by key: (data points (new
    index), their rows)."""
    everyone = run.world.all_gather_object(run.measured.view_means.state_dict(), "gathering the view-means")
    merged: dict[str, tuple[list, list]] = {}
    for theirs in everyone:
        rows = new_index[theirs["positions"]]
        kept = rows >= 0
        for key, values in theirs["rows"].items():
            indices, parts = merged.setdefault(key, ([], []))
            indices.append(rows[kept])
            parts.append(values[kept])
    return {key: (np.concatenate(indices), np.concatenate(parts)) for key, (indices, parts) in merged.items()}


def gather_embedding(run: AuditRun, merged: Merged, points: DataPoints) -> np.ndarray | None:
    """The model's activations at the embedding layer for the data points to cluster (the
    highest-scoring), from whichever process streamed each; None when there are none to cluster."""
    wanted = embedded_rows(points)
    if wanted.size == 0:
        return None
    state = run.measured.state_dict()
    rows = {}
    if state["embedding"] is not None:
        index = merged.new_index[state["positions"].numpy()]
        wanted_set = set(wanted.tolist())
        rows = {int(i): row for i, row in zip(index, state["embedding"].numpy()) if int(i) in wanted_set}
    found: dict[int, np.ndarray] = {}
    for theirs in run.world.all_gather_object(rows, "gathering the images to cluster"):
        found.update(theirs)
    embedding = np.full((points.score.size, next(iter(found.values())).size if found else 0), np.nan)
    for i, row in found.items():
        embedding[i] = row
    return embedding


def assemble(run: AuditRun, merged: Merged, finished: dict, points: dict[str, DataPoints],
             signals: dict[str, list], embedding: np.ndarray | None, timing: dict[str, float]) -> list[AuditResult]:
    """The AuditResult of the finished subjects: the model's, then each later checkpoint's."""
    settings, images = run.settings, run.images
    samples = [images.ids[position] for position in merged.read.tolist()]
    labels = [LABELS[code] for code in images.labels[merged.read].tolist()]
    n_views = len(samples) * run.views * len(run.subjects)
    resolved = settings.as_dict() | {
        "model": run.spec.name,
        "image_size": run.image_size,
        "batch_size": run.batch_size,
        "device": str(run.device),
        "workers": run.workers,
        "control": ",".join(run.controls) or "none",
        "views": run.recipe.name,
        "views_recipe": run.recipe.record(),
        "views_per_image": run.views,
        "input": run.spec.input_contract.describe(),
        "memory_format": layout_name(run.layout),
    }
    planted_ids = set(images.canaries)
    notes = merged.notes
    folders = images.root is not None
    planted = None
    if "planted" in finished:
        planted_layers, planted_contrast, _ = finished["planted"]
        planted = evaluate_planted(
            [replace(plant, image=int(merged.new_index[plant.image])) for plant in run.plants
             if merged.new_index[plant.image] >= 0],
            {layer.name: layer.values for layer in planted_layers},
            settings.planted_strength,
            None if planted_contrast is None else planted_contrast.overall,
        )
        planted.verdict = subject_verdict(planted_layers, settings)
        if planted.recall < 0.9:
            notes.append(
                f"the planted control was found in only {planted.recall:.0%} of its units at strength "
                f"{settings.planted_strength:g}: this audit may miss memorization of that strength "
                "(audit more views or data points)"
            )
    control = None
    if "control" in finished:
        control_layers, control_contrast, _ = finished["control"]
        control = SubjectResult("control", ROLE_DESCRIPTIONS["control"], control_layers,
                                None if control_contrast is None else control_contrast.overall,
                                subject_verdict(control_layers, settings))

    def result_of(role: str, checkpoint: int) -> AuditResult:
        layers_out, contrast, leave_out = finished[role]
        if control is not None:
            attach_control(layers_out, leave_out, control.layers, finished["control"][2])
        return AuditResult(
            model=run.spec.name,
            settings=resolved | ({"checkpoint": run.given[checkpoint]} if len(run.given) > 1 else {}),
            data_source=run.source,
            samples=samples,
            layers=layers_out,
            labels=labels,
            skipped=images.unlisted + merged.skipped,
            checkpoint=run.checkpoint_info[checkpoint],
            timing={
                "wall_s": timing["wall_s"],
                "forward_s": run.timer.seconds,
                "wait_s": merged.waited_s,
                "merge_s": timing["merge_s"] - merged.waited_s,
                "finalize_s": timing["finalize_s"],
                "views": n_views,
                "views_per_s": n_views / timing["wall_s"] if timing["wall_s"] > 0 else 0.0,
            },
            environment=environment(run.device, run.threads, run.cpus),
            notes=list(notes),
            canaries=[sample for sample in samples if sample in planted_ids],
            holdout_source=images.holdout_description,
            membership=None if contrast is None else contrast.overall,
            memorized=what_gets_memorized(points[role], labels, samples, embedding if role == "model" else None,
                                          run.embedding_layer, settings.seed, folders=folders),
            control=control,
            planted=planted,
            verdict=subject_verdict(layers_out, settings, signals[role]),
            distributed={"world_size": run.world.size, "backend": run.world.backend(run.device),
                         "shards": merged.shards},
            signals=signals[role],
        )

    return [result_of("model", 0)] + [result_of(f"model:{i}", i) for i in range(1, len(run.checkpoints))]


def subject_verdict(layers: list[LayerResult], settings: RunSettings, signals: Sequence[Any] = ()) -> Verdict | None:
    """The verdict (verdict.py) of one audited subject's tests: its layers' membership tests and its
    per-image signals (imagesignals.py), one family; None without held-out images."""
    tests = membership_tests(layers) + list(signals)
    return decide(tests, permutations=settings.permutations) if tests else None


def attach_control(layers: list[LayerResult], leave_out: dict[str, np.ndarray], control_layers: list[LayerResult],
                   control_leave_out: dict[str, np.ndarray]) -> None:
    """Each layer's random-control mean, and its excess over it with the paired jackknife interval."""
    for layer, control_layer in zip(layers, control_layers):
        layer.control_mean = control_layer.stats.mean_unitmem
        layer.control_excess = jackknife_interval(
            layer.stats.mean_unitmem - control_layer.stats.mean_unitmem,
            leave_out[layer.name] - control_leave_out[layer.name],
        )


def views_per_pass(settings: RunSettings, device: torch.device) -> int:
    return settings.batch_size or (256 if device.type == "cuda" else 32)


def audit_fingerprint(settings: RunSettings, selected: Sequence[LayerSpec], images: LabelledImages,
                      checkpoints: list[dict | None], processes: int, recipe: ViewRecipe) -> dict:
    """What decides an audit's numbers: processes must agree on it, and a snapshot must match it."""
    sha256s = [None if checkpoint is None else checkpoint["sha256"] for checkpoint in checkpoints]
    listing = hashlib.sha256()
    for image_id, label in zip(images.ids, images.labels.tolist()):
        listing.update(f"{label}:{image_id}\n".encode("utf-8", "surrogateescape"))
    return {
        "pytest-memaudit version": __version__,
        "snapshot format": STATE_FORMAT,
        # the checkpoint file's sha256 and the views' recipe (however it was named) are below
        "settings": {key: value for key, value in settings.as_dict().items()
                     if key not in RESUMABLE_CHANGES and key not in ("checkpoint", "views")},
        "views": f"{recipe.name}, sha256 {recipe.sha256}",  # a user pipeline's transforms are in the hash
        "layers": [layer.name for layer in selected],
        "checkpoint sha256": sha256s[0] if len(sha256s) == 1 else sha256s,  # one, or a series
        "data listing": f"{len(images)} data points, sha256 {listing.hexdigest()[:16]}",
        "processes": processes,
    }


def finalize(subject: Subject, selected: Sequence[LayerSpec], settings: RunSettings,
             point_labels: np.ndarray) -> tuple[list[LayerResult], Contrast | None, dict[str, np.ndarray]]:
    """A subject's per-layer results with jackknife intervals, its membership contrast, and each
    layer's mean UnitMem with each group left out (for paired comparisons between subjects)."""
    results, leave_out_means = [], {}
    for layer in selected:
        state = subject.states.get(layer.name)
        if state is None:
            raise AuditError(
                f"layer {layer.name} ({layer.module}) never ran in the forward pass; "
                "is it part of the model's forward()?"
            )
        values, leave_out = state.unitmem(subject.unitmem_labels, settings.reduce, layer.name)
        estimates = spread_figures(values.unitmem)
        rows = [spread_figures(row) if np.all(np.isfinite(row)) else None for row in leave_out]
        intervals = {
            figure: jackknife_interval(estimate, np.array([row[figure] if row else np.nan for row in rows]))
            for figure, estimate in estimates.items()
        }
        leave_out_means[layer.name] = np.array([row["mean_unitmem"] if row else np.nan for row in rows])
        results.append(LayerResult(layer.name, layer.module, values, layer_stats(values.unitmem, values.dead),
                                   intervals, unit_axis=subject.recorder.axes.get(layer.name)))
    contrast = membership_contrast(
        {layer.name: subject.states[layer.name] for layer in selected}, point_labels,
        subject.members, subject.holdout, permutations=settings.permutations, seed=settings.seed,
    )
    if contrast is not None:
        for layer in results:
            layer.membership = contrast.layers[layer.name]
    return results, contrast, leave_out_means


def check_read(images: LabelledImages, read: np.ndarray, skipped: list[dict[str, str]], source: str) -> None:
    """The audit needs 2 readable members, and a readable image in a held-out set it was given."""
    if read.size == 0:
        first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(
            f"none of the {len(images)} images in {source} could be read ({first}). "
            "Check that the files are images (jpg, png, webp, bmp) and not truncated."
        )
    labels = images.labels[read]
    members = int(np.count_nonzero(labels == MEMBER))
    if members < 2:  # else every layer would stop later, saying only that it saw fewer than 2
        first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(
            f"only {members} of the {images.count(MEMBER)} member images in {source} could be read ({first}); "
            "UnitMem needs at least 2. Check that the files are images (jpg, png, webp, bmp) and not truncated."
        )
    if images.count(HOLDOUT, PLANTED) and not np.isin(labels, (HOLDOUT, PLANTED)).any():
        raise DataError(
            f"none of the {images.count(HOLDOUT, PLANTED)} held-out images ({images.holdout_description}) could "
            "be read. Check the --memaudit-holdout folder."
        )


class OverlapCheck:
    """Held-out images must not be members: compared by a digest of their decoded pixels. Within a
    process's stream as the batches arrive (its members come first), and across processes at the
    merge, where each process looks up every process's held-out digests among its own members."""

    def __init__(self, images: LabelledImages):
        self.images = images
        self.members: dict[bytes, int] = {}  # pixel digest -> position of the first member with it
        self.holdout: list[tuple[bytes, int]] = []  # (pixel digest, position) of the held-out images read

    def add(self, positions: list[int], pixels: torch.Tensor) -> None:
        found = []
        for position, image in zip(positions, pixels):
            digest = hashlib.sha256(image.numpy().tobytes()).digest()[:16]
            if self.images.labels[position] == MEMBER:
                self.members.setdefault(digest, position)
            else:
                self.holdout.append((digest, position))
                if digest in self.members:
                    found.append((position, self.members[digest]))
        self.raise_for(found)

    def overlaps(self, holdout: list[tuple[bytes, int]]) -> list[tuple[int, int]]:
        """(held-out position, member position) for the held-out digests among this process's members."""
        return [(position, self.members[digest]) for digest, position in holdout if digest in self.members]

    def raise_for(self, found: list[tuple[int, int]]) -> None:
        first: dict[int, int] = {}
        for held, member in found:
            first[held] = min(member, first.get(held, member))
        if not first:
            return
        ids = self.images.ids
        overlaps = [f"{ids[held]} = {ids[member]}" for held, member in first.items()]
        raise DataError(
            f"the held-out set shares images with the members (same decoded pixels): {', '.join(overlaps[:5])}"
            f"{' (the first found)' if len(overlaps) <= 5 else f' and {len(overlaps) - 5} more'}. Held-out "
            "images must be ones the model never trained on: remove them from --memaudit-holdout."
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"members": _digest_table(list(self.members.items())), "holdout": _digest_table(self.holdout)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.members = dict(_digest_pairs(state["members"]))
        self.holdout = _digest_pairs(state["holdout"])


def _digest_table(pairs: list[tuple[bytes, int]]) -> dict[str, torch.Tensor]:
    """(digest, position) pairs as tensors a snapshot can hold: (n, 16) uint8 and (n,) int64."""
    return {"digests": torch.tensor([list(digest) for digest, _ in pairs], dtype=torch.uint8).view(-1, 16),
            "positions": torch.tensor([position for _, position in pairs], dtype=torch.int64)}


def _digest_pairs(table: dict[str, torch.Tensor]) -> list[tuple[bytes, int]]:
    return [(bytes(digest), position) for digest, position in zip(table["digests"].tolist(), table["positions"].tolist())]


def build_planted(model_net: torch.nn.Module, selected: Sequence[LayerSpec], images: LabelledImages,
                  settings: RunSettings, recipe: ViewRecipe, contract: InputContract, layout: torch.memory_format,
                  device: torch.device, forward: AdaptiveForward,
                  world: World) -> tuple[list[PlantedUnit], PlantedRecorder | None]:
    """The planted control: one forward pass over the planted images' views gives the sketches of
    each plantable layer's input (the implants' references) and the model's mean |activation| per
    unit (the implants' scale); then the units, and the recorder that plants them in the model's
    pass. Every process computes this alike; process 0's choice of units is the one all use."""
    kept, pixels = [], []
    for position in images.positions(PLANTED).tolist():
        try:
            pixels.append(images.load(position))
            kept.append(position)
        except UnreadableImage:
            continue  # skipped in the stream too, where it is reported
    if not kept:
        return [], None
    x = torch.stack(pixels).to(device).float().div_(255)
    seeds = [view_seed(settings.seed, images.ids[position]) for position in kept]
    made = recipe.make(x, settings.augmentations, seeds, [images.ids[position] for position in kept])
    planted_views = model_input(made, contract, layout)
    layers = plantable(selected)
    sketches = InputSketches(model_net, layers)
    try:
        with LayerRecorder(model_net, selected) as recorder:
            outputs = forward(model_net, recorder, planted_views)
        found = sketches.take()
    finally:
        sketches.close()
    views = recipe.views_per_image(settings.augmentations)
    prototypes = {name: found[name].view(len(kept), views, -1) for name in found}
    scales = {name: values.double().mean(dim=0).cpu().numpy() for name, values in outputs.items()  # forward order
              if name in prototypes}
    plants = world.broadcast_object(choose_plants(scales, kept, settings.planted_strength, settings.seed),
                                    "choosing the planted units")
    if not plants:
        return [], None
    rider = PlantedRecorder(model_net, plants, selected, prototypes, {position: i for i, position in enumerate(kept)},
                            recorder.axes)
    for i, position in enumerate(kept):  # this pass's measurements of the planted images, for the stream to reuse
        rows = slice(i * views, (i + 1) * views)
        rider.known[position] = ({name: values[rows].clone() for name, values in outputs.items()},
                                 {name: rider.implants(name, found[name][rows]) for name in rider.units})
    return plants, rider


def select_layers(spec: ModelSpec, names: Sequence[str] | None) -> list[LayerSpec]:
    if names is None:
        return list(spec.layers)
    wanted = set(names)
    unknown = [n for n in names if spec.layer(n) is None]
    if unknown:
        raise AuditError(f"model {spec.name} has no layer(s) {', '.join(map(repr, unknown))}")
    return [layer for layer in spec.layers if {layer.name, layer.module} & wanted]


def open_images(settings: RunSettings, spec: ModelSpec, image_size: int, planted: int = 0) -> LabelledImages:
    """The audit's data points: the members, then the held-out images, if any."""
    members = member_images(settings, spec, image_size)
    return labelled_images(members, holdout_images(settings, spec, image_size, members), planted=planted,
                           seed=settings.seed, groups=settings.groups)


def member_images(settings: RunSettings, spec: ModelSpec, image_size: int) -> ImageSet:
    if settings.data is None and spec.requires_data:
        raise DataError(
            f"model {spec.name} is audited on images of its training data: give them with --memaudit-data DIR "
            "(or --memaudit-data builtin to audit it on generated images, which says nothing about what it "
            "memorized of its own training set)"
        )
    if settings.data is None and spec.default_data is not None:
        images = spec.default_data(image_size, settings.seed)
        return images if settings.samples is None else images.sample(settings.samples, settings.seed)
    if settings.data in (None, "builtin"):
        return ImageSet.builtin(settings.samples or spec.default_samples, image_size, settings.seed)
    return open_image_folder(settings.data, image_size, settings.samples, settings.seed)


def holdout_images(settings: RunSettings, spec: ModelSpec, image_size: int, members: ImageSet) -> ImageSet | None:
    """``--memaudit-holdout``: a folder, ``builtin``, ``none``, or (not given) the model's own."""
    choice = settings.holdout
    if choice == "none" or (choice is None and spec.default_holdout is None):
        return None
    if choice is None or (choice == "builtin" and settings.data is None and spec.default_holdout is not None):
        images = spec.default_holdout(image_size)  # the model's own held-out set, beside its own members
    elif choice == "builtin":
        taken = {int(i.removeprefix(BUILTIN_PREFIX)) for i in members.ids if i.startswith(BUILTIN_PREFIX)}
        start = max(taken, default=-1) + 1
        images = ImageSet.builtin(settings.samples or len(members), image_size, settings.seed, start=start)
    else:
        try:
            images = open_image_folder(choice, image_size, None, settings.seed)
        except DataError as exc:
            raise DataError(f"held-out set (--memaudit-holdout): {exc}") from None
    if settings.samples is not None and len(images) > settings.samples:
        images = images.sample(settings.samples, settings.seed)
    return images


def default_workers(images: ImageSet, device: torch.device, views: int, processes_here: int = 1,
                    cpus: int | None = None) -> int:
    """Image decoding (or generating) processes, from the ``cpus`` this process may use (default
    ``hardware.usable_cpus``), shared with the audit's other ``processes_here`` processes on this
    machine. On the CPU the forward passes need the cores, so files are decoded by at most half of
    them (8 at most) and generated images are made in process; on a GPU the host only feeds it, so
    every core but one may decode, as many as the views per image call for (fewer views per image:
    more images per second)."""
    cpus = max(1, (usable_cpus()[0] if cpus is None else cpus) // processes_here)
    if device.type == "cuda":
        return max(1, min(cpus - 1, max(2, 16 // views)))
    if images.root is None:
        return 0
    return max(1, min(8, cpus // 2))


def memory_format(contract: InputContract) -> torch.memory_format:
    return MEMORY_FORMAT if contract.channels_last else torch.contiguous_format


def layout_name(layout: torch.memory_format) -> str:
    return "NCHW" if layout == torch.contiguous_format else "channels-last"


def prepare(net: torch.nn.Module, device: torch.device, layout: torch.memory_format) -> torch.nn.Module:
    with user_code("moving the model to its device"):
        return net.eval().requires_grad_(False).to(device, memory_format=layout)


def probe_layouts(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
                  precision: str) -> tuple[torch.memory_format, dict[str, float]]:
    """Which memory layout runs ``net`` faster on ``device`` for inputs of ``shape``."""
    probe = torch.zeros(shape, device=device)

    def run(layout: torch.memory_format) -> None:
        net.to(memory_format=layout)(probe.contiguous(memory_format=layout))

    with torch.inference_mode(), precision_mode(precision, device):
        return faster_layout(run, device)


def precision_seconds(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
                      layout: torch.memory_format) -> dict[str, float]:
    """A forward pass of ``net`` on random views of ``shape`` (a batch as the audit runs them) in float32
    and in bfloat16: bfloat16 is asked for because it should be faster, and on some CPUs it is not."""
    views = torch.rand(shape, generator=torch.Generator(device).manual_seed(0), device=device)
    views = views.mul_(2).sub_(1).contiguous(memory_format=layout)
    with torch.inference_mode(), user_code(f"the forward pass of the model on views of shape {tuple(shape)}"):
        return time_precisions(lambda: net(views), device)


def model_input(views: torch.Tensor, contract: InputContract,
                layout: torch.memory_format | None = None) -> torch.Tensor:
    """Views (n, 3, H, W) in [-1, 1], RGB, as the model takes them: its channels (luma for one) in its
    order, mapped to its input range or normalization, in its memory layout (``layout``, default the
    contract's). Every subject (the model and its controls) gets these same tensors."""
    views = contract.arrange(views)
    affine = contract.affine()
    if affine is not None:
        scale, shift = (torch.tensor(values, dtype=views.dtype, device=views.device).view(1, -1, 1, 1)
                        for values in affine)
        views = views.mul_(scale).add_(shift)
    return views.contiguous(memory_format=layout or memory_format(contract))


class AdaptiveForward:
    """Forward passes of at most ``size`` views, each layer's output reduced by the recorder's hooks.

    On out-of-memory the pass is retried with half as many views, and ``size`` stays halved for
    the batches after it; each halving is written to ``notes``. Every view goes through the
    encoder on its own (no layer mixes views), so the grouping changes nothing but rounding.
    """

    def __init__(self, size: int, device: torch.device, notes: list[str]):
        self.size = size
        self.device = device
        self.notes = notes

    def __call__(self, net: torch.nn.Module, recorder: LayerRecorder, views: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.with_riders(net, recorder, views, [])[0]

    def with_riders(self, net: torch.nn.Module, recorder: LayerRecorder, views: torch.Tensor,
                    riders: Sequence[PlantedRecorder]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        """The pass, and what each of ``riders`` (recorders on the same net) measured in it."""
        parts, rider_parts = [], [[] for _ in riders]
        start = 0
        while start < len(views):
            if self._runs(net, views[start : start + self.size]):
                part = recorder.take()
                start += self.size
                parts.append(part if start >= len(views) else {name: out.clone() for name, out in part.items()})
                for rider, kept in zip(riders, rider_parts):
                    kept.append(rider.take())
            else:
                recorder.take()  # the layers the failed pass reached
                for rider in riders:
                    rider.take()
                self._halve()
        return _joined(parts), [_joined(kept) for kept in rider_parts]

    @staticmethod
    def _runs(net: torch.nn.Module, views: torch.Tensor) -> bool:
        try:
            net(views)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return False  # handled outside the except block, once the failed pass's tensors are freed
        return True

    def _halve(self) -> None:
        if self.size == 1:
            raise AuditError(
                f"out of memory on {self.device} with a single view per forward pass; audit at a smaller "
                "--memaudit-image-size, with --memaudit-precision bfloat16, or on a device with more memory"
            )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.notes.append(
            f"out of memory on {self.device} at {self.size} views per forward pass: "
            f"halved to {self.size // 2} and retried (set --memaudit-batch-size to start there)"
        )
        self.size //= 2


def reusing_pass(forward: AdaptiveForward, net: torch.nn.Module, recorder: LayerRecorder, views: torch.Tensor,
                 layout: torch.memory_format, positions: Sequence[int],
                 riders: Sequence[PlantedRecorder]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``forward.with_riders`` over a batch's views (image-major, of the data points at ``positions``), but
    the data points whose views the rider (the planted control) measured in its set-up pass
    (``PlantedRecorder.known``: the planted images) are not passed again: their measurements are
    taken from there and put in their place."""
    known = [i for i, position in enumerate(positions) if len(riders) == 1 and position in riders[0].known]
    if not known:
        return forward.with_riders(net, recorder, views, riders)
    rows = torch.arange(len(views), device=views.device).view(len(positions), -1)
    fresh = rows[[i for i in range(len(positions)) if i not in known]].flatten()
    stored = [riders[0].known.pop(positions[i]) for i in known]
    outputs = {name: torch.cat([model[name] for model, _ in stored]) for name in stored[0][0]}
    implants = {name: torch.cat([part[name] for _, part in stored]) for name in stored[0][1]}
    if len(fresh):
        measured, (added,) = forward.with_riders(net, recorder, views[fresh].contiguous(memory_format=layout), riders)
        order = torch.argsort(torch.cat([rows[known].flatten(), fresh]))  # back to the batch's order
        outputs = {name: torch.cat([values, measured[name]])[order] for name, values in outputs.items()}
        implants = {name: torch.cat([values, added[name]])[order] for name, values in implants.items()}
    return outputs, [implants]


def _joined(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def new_states(
    outputs: dict[str, torch.Tensor], settings: RunSettings, capacity: int, device: torch.device, budget: int
) -> dict[str, LayerState]:
    """One state per layer; the median's in-memory budget is shared by units, so either all
    layers keep their values in memory or all keep them on disk."""
    total = sum(values.shape[1] for values in outputs.values())
    return {
        name: LayerState(
            values.shape[1],
            groups=settings.groups,
            topk=settings.topk,
            device=device,
            keep_values=settings.reduce == "median",
            capacity=capacity,
            memory_limit_bytes=budget * values.shape[1] // total,
        )
        for name, values in outputs.items()
    }


def spill_notes(role: str, states: dict[str, LayerState], limit_mb: int) -> list[str]:
    spilled = [state.values for state in states.values() if state.values is not None and state.values.spill_dir]
    if not spilled:
        return []
    rows = spilled[0].capacity
    size = median_matrix_bytes(rows, sum(state.units for state in states.values())) / 2**20
    return [
        f"median reduction ({role}): the {rows} x units matrix ({size:,.0f} MB) is over "
        f"--memaudit-median-memory ({limit_mb} MB), so it is kept on disk in "
        f"{spilled[0].spill_dir}"
    ]


def checkpoint_record(path: Path | None) -> dict | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _version(package: str) -> str:
    """An installed package's version without importing it (torchvision takes seconds to import)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, threads: int, cpus: str) -> dict[str, str]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": np.__version__,
        "pytest_memaudit": __version__,
        "platform": platform.platform(),
        "executable": sys.executable,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    env["cpu_threads"] = str(threads)
    env["cpus"] = cpus
    env["openmp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "not set")
    return env
