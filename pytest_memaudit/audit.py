"""``run_audit``: the one entry point that wires data, augmentation, model, hooks and UnitMem.

Usable without pytest::

    from pytest_memaudit.audit import run_audit
    from pytest_memaudit.config import make_settings
    result = run_audit(make_settings(model="var_d16", checkpoint="vae.pth", data="imgs/"))
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .augment import augment_views
from .config import RunSettings, control_roles
from .controls import random_weights_copy
from .data import BUILTIN_PREFIX, ImageSet, UnreadableImage
from .datapoints import DataPoints, score_data_points, what_gets_memorized
from .device import ForwardTimer, check_precision, faster_layout, is_out_of_memory, precision_mode, resolve_device, selected_device
from .errors import AuditError, DataError, user_code
from .hardware import precision_notes
from .heap import reuse_freed_memory
from .hooks import LayerRecorder
from .labelled import LabelledImages, labelled_images
from .membership import Contrast, membership_contrast
from .models import InputContract, LayerSpec, ModelSpec, get_model_spec
from .planted import PlantedUnit, choose_plants, planted_copy, thumbnails
from .planted import evaluate as evaluate_planted
from .results import AuditResult, LayerResult, SubjectResult
from .signals import terminate_as_interrupt
from .stats import jackknife_interval, layer_stats, spread_figures
from .unitmem import HOLDOUT, LABELS, MEMBER, PLANTED, LayerState, median_matrix_bytes

ProgressCallback = Callable[[int, int], None]  # (images done, images in all)
# Weights and views in NHWC, the layout oneDNN and cuDNN convolutions run fastest in, for models
# whose input contract says they support it (InputContract.channels_last).
MEMORY_FORMAT = torch.channels_last


ROLE_DESCRIPTIONS = {
    "control": "the same architecture with random weights (seeded), on the same views",
    "planted": "a copy of the model with planted units that memorize chosen held-out images",
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
    recorder: LayerRecorder | None = None
    states: dict[str, LayerState] = field(default_factory=dict)


def run_audit(
    settings: RunSettings,
    model: ModelSpec | None = None,
    layers: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> AuditResult:
    """Audit ``layers`` (display names or module paths; None: all) of the model ``settings`` name."""
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
    device = resolve_device(settings.device)
    precision = settings.precision
    check_precision(precision, device)  # before the models are built
    image_size = settings.image_size or spec.default_image_size
    views = max(settings.augmentations, 1)
    batch_size = settings.batch_size or (256 if device.type == "cuda" else 32)
    controls = control_roles(settings, spec)
    if settings.embedding_layer and spec.layer(settings.embedding_layer) is None:
        raise AuditError(f"--memaudit-embedding-layer {settings.embedding_layer!r}: model {spec.name} has no such "
                         f"layer; its layers: {', '.join(layer.name for layer in spec.layers)}")
    embedding_name = spec.layer(settings.embedding_layer).name if settings.embedding_layer else None
    images = open_images(settings, spec, image_size, planted=settings.planted_units if "planted" in controls else 0)
    notes = list(images.notes) + precision_notes(precision, device)
    source = images.description or ("builtin (generated images)" if images.root is None else str(images.root))

    checkpoint, *later = [spec.locate(given) for given in checkpoints or [settings.checkpoint]]
    layout = memory_format(spec.input_contract)
    with user_code(f"building model {spec.name}"):
        model_net = prepare(spec.build(checkpoint), device, layout)
    if layout == torch.channels_last and device.type == "cuda":
        layout, seconds = probe_layouts(model_net, (min(batch_size, 32), 3, image_size, image_size), device, precision)
        model_net = model_net.to(memory_format=layout)
        notes.append(f"memory layout on {device}: {'NCHW' if layout == torch.contiguous_format else 'channels-last'}, "
                     "the faster for a forward pass: " + ", ".join(f"{name} {1000 * s:.1f} ms"
                                                                    for name, s in seconds.items()))
    subjects = [Subject("model", model_net, (MEMBER,), (MEMBER,), (HOLDOUT, PLANTED))]
    subjects += series_subjects(spec, later, device, layout)
    if "random" in controls:
        control_net = prepare(random_weights_copy(model_net, settings.seed), device, layout)
        subjects.append(Subject("control", control_net, (MEMBER,), (MEMBER,), (HOLDOUT, PLANTED)))
    if "planted" in (settings.control or "") and not images.count(PLANTED):  # asked for, not the default
        notes.append("the planted control needs held-out images (--memaudit-holdout DIR); it was not run")

    workers = settings.workers if settings.workers is not None else default_workers(images, device, views)
    forward = AdaptiveForward(batch_size, device, notes)
    samples: list[str] = []
    read: list[int] = []  # the positions in ``images`` of the data points, in order
    skipped: list[dict[str, str]] = []
    timer = ForwardTimer(device)
    measured: list[dict[str, np.ndarray]] = []  # image characteristics, batch by batch
    embedding: list[np.ndarray] = []  # the model's per-unit activations at the embedding layer
    embedding_layer = embedding_name
    plants: list[PlantedUnit] = []
    checker = OverlapCheck(images) if images.count(HOLDOUT, PLANTED) else None
    try:
        with torch.inference_mode(), selected_device(device), precision_mode(precision, device), \
                reuse_freed_memory(device), terminate_as_interrupt():
            if images.count(PLANTED) and "planted" in controls:
                plants, planted_net = build_planted(model_net, selected, images, settings, spec.input_contract, layout,
                                                    device, forward)
                subjects.append(Subject("planted", planted_net, (MEMBER, PLANTED), (PLANTED,), (HOLDOUT,)))
            for subject in subjects:
                subject.recorder = LayerRecorder(subject.net, selected)
            median_budget = settings.median_memory * 2**20 // len(subjects)
            batches = images.iter_batches(max(1, batch_size // views), workers, pin_memory=device.type == "cuda",
                                          characteristics=True)
            for batch in batches:
                skipped += [{"id": images.ids[pos], "reason": reason} for pos, reason in batch.skipped]
                n = len(batch.positions)
                if n:
                    if checker:
                        checker.add(batch.positions, batch.images)
                    pixels = batch.images.to(device, non_blocking=True).float().div_(255)
                    seeds = [view_seed(settings.seed, images.ids[pos]) for pos in batch.positions]
                    batch_views = model_views(pixels, settings.augmentations, seeds, spec.input_contract, layout)
                    index = torch.arange(len(samples), len(samples) + n, device=device)
                    label = torch.from_numpy(images.labels[batch.positions].astype(np.int64)).to(device)
                    group = torch.from_numpy(images.groups[batch.positions].astype(np.int64)).to(device)
                    for subject in subjects:
                        with timer, user_code(f"the forward pass of {spec.name} ({subject.role}) on views of shape "
                                                   f"{tuple(batch_views.shape)}"):
                            outputs = forward(subject.net, subject.recorder, batch_views)
                        if not subject.states:
                            subject.states = new_states(outputs, settings, len(images), device, median_budget)
                            notes += spill_notes(subject.role, subject.states, settings.median_memory)
                            embedding_layer = embedding_layer or subject.recorder.ordered(selected)[-1].name
                        for name, per_view in outputs.items():
                            values = per_view.view(n, views, -1).mean(dim=1)
                            subject.states[name].update(values, index, label, group)
                            if subject.role == "model" and name == embedding_layer:
                                embedding.append(values.float().cpu().numpy())
                    measured.append(batch.characteristics)
                    samples += [images.ids[pos] for pos in batch.positions]
                    read += batch.positions
                if progress:
                    progress(len(samples) + len(skipped), len(images))
        check_read(images, read, skipped, source)
        selected = subjects[0].recorder.ordered(selected)  # forward order, as the first batch ran it
        point_labels = images.labels[read]
        point_groups = images.groups[read]
        finished = {subject.role: finalize(subject, selected, settings, point_labels, point_groups)
                    for subject in subjects}
        characteristics = {name: np.concatenate([batch[name] for batch in measured]) for name in measured[0]}
        points = {
            subject.role: score_data_points({layer.name: subject.states[layer.name] for layer in selected},
                                            {layer.name: layer.values.unitmem for layer in finished[subject.role][0]},
                                            list(range(len(LABELS))), len(samples), characteristics)
            for subject in subjects if subject.role == "model" or subject.role.startswith("model:")
        }
    finally:
        for subject in subjects:
            if subject.recorder:
                subject.recorder.close()
            for state in subject.states.values():
                state.close()

    wall = time.perf_counter() - started
    n_views = len(samples) * views * len(subjects)
    resolved = settings.as_dict() | {
        "model": spec.name,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(device),
        "workers": workers,
        "control": ",".join(controls) or "none",
        "views_per_image": views,
        "input": spec.input_contract.describe(),
        "memory_format": "NCHW" if layout == torch.contiguous_format else "channels-last",
    }
    planted_ids = set(images.canaries)
    layers_out, model_contrast, model_loo = finished["model"]
    result = AuditResult(
        model=spec.name,
        settings=resolved,
        data_source=source,
        samples=samples,
        layers=layers_out,
        labels=[LABELS[code] for code in point_labels.tolist()],
        skipped=images.unlisted + skipped,
        checkpoint=checkpoint_record(checkpoint),
        timing={
            "wall_s": wall,
            "forward_s": timer.seconds,
            "views": n_views,
            "views_per_s": n_views / wall if wall > 0 else 0.0,
        },
        environment=environment(device),
        notes=notes,
        canaries=[sample for sample in samples if sample in planted_ids],
        holdout_source=images.holdout_description,
        membership=None if model_contrast is None else model_contrast.overall,
        memorized=what_gets_memorized(points["model"], [LABELS[code] for code in point_labels.tolist()], samples,
                                      np.concatenate(embedding) if embedding else None, embedding_layer, settings.seed,
                                      folders=images.root is not None),
    )
    if "control" in finished:
        control_layers, control_contrast, control_loo = finished["control"]
        attach_control(result.layers, model_loo, control_layers, control_loo)
        result.control = SubjectResult("control", ROLE_DESCRIPTIONS["control"], control_layers,
                                       None if control_contrast is None else control_contrast.overall)
    if "planted" in finished:
        planted_layers, planted_contrast, _ = finished["planted"]
        result.planted = evaluate_planted(
            [replace(plant, image=read.index(plant.image)) for plant in plants if plant.image in read],
            {layer.name: layer.values for layer in planted_layers},
            settings.planted_strength,
            None if planted_contrast is None else planted_contrast.overall,
        )
        if result.planted.recall < 0.9:
            notes.append(
                f"the planted control was found in only {result.planted.recall:.0%} of its units at strength "
                f"{settings.planted_strength:g}: this audit may miss memorization of that strength "
                "(audit more views or data points)"
            )
    return [result, *(series_result(result, finished, f"model:{i}", path, given, points[f"model:{i}"], settings.seed)
                      for i, (path, given) in enumerate(zip(later, (checkpoints or [])[1:]), 1))]


def series_subjects(spec: ModelSpec, checkpoints: Sequence[Path | None], device: torch.device,
                    layout: torch.memory_format) -> list[Subject]:
    """One more model subject per later checkpoint of a series: ``model:1``, ``model:2``, ..."""
    subjects = []
    for i, checkpoint in enumerate(checkpoints, 1):
        with user_code(f"building model {spec.name} from {checkpoint}"):
            net = prepare(spec.build(checkpoint), device, layout)
        subjects.append(Subject(f"model:{i}", net, (MEMBER,), (MEMBER,), (HOLDOUT, PLANTED)))
    return subjects


def series_result(first: AuditResult, finished: dict, role: str, checkpoint: Path | None, given: str,
                  points: DataPoints, seed: int) -> AuditResult:
    """The result of a later checkpoint of a series: its own layers, membership and data point scores
    (no clusters), the pass's data, timing and notes, the random control compared with its own layers,
    the planted control shared."""
    layers, contrast, leave_out = finished[role]
    if "control" in finished:
        control_layers, _, control_loo = finished["control"]
        attach_control(layers, leave_out, control_layers, control_loo)
    return replace(
        first, layers=layers, settings=first.settings | {"checkpoint": given}, checkpoint=checkpoint_record(checkpoint),
        membership=None if contrast is None else contrast.overall, notes=list(first.notes),
        memorized=what_gets_memorized(points, first.labels, first.samples, None, "", seed,
                                      folders=first.memorized.classes is not None),
    )


def attach_control(layers: list[LayerResult], leave_out: dict[str, np.ndarray], control_layers: list[LayerResult],
                   control_leave_out: dict[str, np.ndarray]) -> None:
    """Each layer's random-control mean, and its excess over it with the paired jackknife interval."""
    for layer, control_layer in zip(layers, control_layers):
        layer.control_mean = control_layer.stats.mean_unitmem
        layer.control_excess = jackknife_interval(
            layer.stats.mean_unitmem - control_layer.stats.mean_unitmem,
            leave_out[layer.name] - control_leave_out[layer.name],
        )


def finalize(subject: Subject, selected: Sequence[LayerSpec], settings: RunSettings, point_labels: np.ndarray,
             point_groups: np.ndarray) -> tuple[list[LayerResult], Contrast | None, dict[str, np.ndarray]]:
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
        {layer.name: subject.states[layer.name] for layer in selected}, point_labels, point_groups,
        subject.members, subject.holdout, permutations=settings.permutations, seed=settings.seed,
    )
    if contrast is not None:
        for layer in results:
            layer.membership = contrast.layers[layer.name]
    return results, contrast, leave_out_means


def check_read(images: LabelledImages, read: list[int], skipped: list[dict[str, str]], source: str) -> None:
    """The audit needs 2 readable members, and a readable image in a held-out set it was given."""
    if not read:
        first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(
            f"none of the {len(images)} images in {source} could be read ({first}). "
            "Check that the files are images (jpg, png, webp, bmp) and not truncated."
        )
    labels = images.labels[read]
    if images.count(HOLDOUT, PLANTED) and not np.isin(labels, (HOLDOUT, PLANTED)).any():
        raise DataError(
            f"none of the {images.count(HOLDOUT, PLANTED)} held-out images ({images.holdout_description}) could "
            "be read. Check the --memaudit-holdout folder."
        )


class OverlapCheck:
    """Held-out images must not be members: compared by a hash of their decoded pixels, as the
    batches arrive (members come first)."""

    def __init__(self, images: LabelledImages):
        self.images = images
        self.members: dict[str, str] = {}

    def add(self, positions: list[int], pixels: torch.Tensor) -> None:
        overlaps = []
        for position, image in zip(positions, pixels):
            digest = hashlib.sha256(image.numpy().tobytes()).hexdigest()
            image_id = self.images.ids[position]
            if self.images.labels[position] == MEMBER:
                self.members.setdefault(digest, image_id)
            elif digest in self.members:
                overlaps.append(f"{image_id} = {self.members[digest]}")
        if overlaps:
            raise DataError(
                f"the held-out set shares images with the members (same decoded pixels): {', '.join(overlaps[:5])}"
                f"{' (the first found)' if len(overlaps) <= 5 else f' and {len(overlaps) - 5} more'}. Held-out "
                "images must be ones the model never trained on: remove them from --memaudit-holdout."
            )


def build_planted(model_net: torch.nn.Module, selected: Sequence[LayerSpec], images: LabelledImages,
                  settings: RunSettings, contract: InputContract, layout: torch.memory_format, device: torch.device,
                  forward: AdaptiveForward) -> tuple[list[PlantedUnit], torch.nn.Module]:
    """The planted control: the planted images' views (the implants' references), the model's
    mean |activation| per unit over them (the implants' scale), then the planted copy."""
    kept, pixels = [], []
    for position in images.positions(PLANTED).tolist():
        try:
            pixels.append(images.load(position))
            kept.append(position)
        except UnreadableImage:
            continue  # skipped in the stream too, where it is reported
    if not kept:
        return [], model_net
    x = torch.stack(pixels).to(device).float().div_(255)
    seeds = [view_seed(settings.seed, images.ids[position]) for position in kept]
    planted_views = model_views(x, settings.augmentations, seeds, contract, layout)  # what the implants see
    prototypes = thumbnails(planted_views).view(len(kept), max(settings.augmentations, 1), -1)
    with LayerRecorder(model_net, selected) as recorder:
        outputs = forward(model_net, recorder, planted_views)
    scales = {name: values.double().mean(dim=0).cpu().numpy() for name, values in outputs.items()}  # forward order
    plants = choose_plants(scales, kept, settings.planted_strength, settings.seed)
    net = planted_copy(model_net, plants, selected, prototypes, {position: i for i, position in enumerate(kept)},
                       recorder.axes)
    return plants, net


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
    return ImageSet.from_folder(settings.data, image_size, settings.samples, settings.seed)


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
            images = ImageSet.from_folder(choice, image_size, None, settings.seed)
        except DataError as exc:
            raise DataError(f"held-out set (--memaudit-holdout): {exc}") from None
    if settings.samples is not None and len(images) > settings.samples:
        images = images.sample(settings.samples, settings.seed)
    return images


def default_workers(images: ImageSet, device: torch.device, views: int) -> int:
    """Image decoding (or generating) processes. On the CPU the forward passes need the cores, so
    files are decoded by at most half of them (4 at most) and generated images are made in
    process; on a GPU the host only feeds it, so every core but one may decode, as many as the
    views per image call for (fewer views per image: more images per second)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if device.type == "cuda":
        return max(1, min(cpus - 1, max(2, 16 // views)))
    if images.root is None:
        return 0
    return max(1, min(4, cpus // 2))


def memory_format(contract: InputContract) -> torch.memory_format:
    return MEMORY_FORMAT if contract.channels_last else torch.contiguous_format


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


def model_views(pixels: torch.Tensor, augmentations: int, seeds: Sequence[int], contract: InputContract,
                layout: torch.memory_format | None = None) -> torch.Tensor:
    """The views of ``pixels`` (n, 3, H, W) in [0, 1] as the model takes them: augmented (in [-1, 1]),
    mapped to its input range or normalization, in its memory layout (``layout``, default the
    contract's). Every subject (the model and its controls) gets these same tensors."""
    views = augment_views(pixels, augmentations, seeds)
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
        parts = []
        start = 0
        while start < len(views):
            if self._runs(net, views[start : start + self.size]):
                part = recorder.take()
                start += self.size
                parts.append(part if start >= len(views) else {name: out.clone() for name, out in part.items()})
            else:
                recorder.take()  # the layers the failed pass reached
                self._halve()
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

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
    spilled = [state.values for state in states.values() if state.values is not None and state.values.spill_path]
    if not spilled:
        return []
    rows = spilled[0].capacity
    size = median_matrix_bytes(rows, sum(state.units for state in states.values())) / 2**20
    return [
        f"median reduction ({role}): the {rows} x units matrix ({size:,.0f} MB) is over "
        f"--memaudit-median-memory ({limit_mb} MB), so it is kept on disk in "
        f"{os.path.dirname(spilled[0].spill_path)}"
    ]


def view_seed(seed: int, image_id: str) -> int:
    """The seed of an image's views: depends on the audit seed and the image, not on batching."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def checkpoint_record(path: Path | None) -> dict | None:
    if path is None:
        return None
    if path.is_dir():  # a user model's checkpoint folder: its factory reads what it needs
        return {"path": str(path), "sha256": None, "bytes": None}
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


def environment(device: torch.device) -> dict[str, str]:
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
    else:
        env["cpu_threads"] = str(torch.get_num_threads())
    return env
