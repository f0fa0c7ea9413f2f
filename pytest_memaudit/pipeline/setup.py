"""The audit's set-up, alike on every process: images, layers, checkpoints, device, workers, the subjects
(the model, the random control, the planted control) and their layer states."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..controls.planted import InputSketches, PlantedRecorder, PlantedUnit, choose_plants, plantable
from ..controls.random import random_weights_copy
from ..data.builtin import BUILTIN_PREFIX
from ..data.images import ImageSet, UnreadableImage
from ..data.labelled import LabelledImages, labelled_images
from ..data.tarshards import open_image_folder
from ..errors import AuditError, DataError, user_code
from ..metric.imagesignals import ViewMeans, neighbour_sample
from ..metric.unitmem import HOLDOUT, MEMBER, PLANTED, LayerState, median_matrix_bytes
from ..models import InputContract, LayerSpec, ModelSpec
from ..models.hooks import LayerRecorder
from .device import ForwardTimer, check_precision, cpu_threads, intra_op_threads, process_device
from .distributed import World
from .forward import AdaptiveForward, layout_name, memory_format, model_input, precision_seconds, prepare, probe_layouts
from .hardware import precision_notes, usable_cpus
from .overlap import OverlapCheck
from .run import AuditRun, Measured, ShardProgress, Subject, views_per_pass
from .settings import RunSettings, control_roles
from .snapshots import RESUMABLE_CHANGES, STATE_FORMAT, Snapshots
from .views import ViewRecipe, recipe_for, view_seed


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
    shard, sample = world.shard(len(images)), neighbour_sample(len(images), settings.seed)
    run = AuditRun(
        settings, spec, selected, world, device, images, image_size, paths, checkpoint_info, checkpoints, model_net,
        layout, recipe, fingerprint, ShardProgress(shard),
        settings.workers if settings.workers is not None else default_workers(images, device, views,
                                                                             world.launch.local_size, cpus),
        AdaptiveForward(views_per_pass(settings, device), device, notes), notes, timer=ForwardTimer(device),
        checker=OverlapCheck(images) if images.count(HOLDOUT, PLANTED) else None,
        threads=threads, cpus=f"{cpus_why}; {threads} intra-op thread(s): {threads_why}",
        measured=Measured(len(shard), ViewMeans(sample, int(sample[shard.start : shard.stop].sum()))),
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
