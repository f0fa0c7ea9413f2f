"""``run_audit``: the one entry point that wires data, augmentation, model, hooks and UnitMem.

Usable without pytest::

    from .audit import run_audit
    from .settings import make_settings
    result = run_audit(make_settings(model="var_d16", checkpoint="vae.pth", data="imgs/"))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from ..analysis.datapoints import score_data_points
from ..metric.imagesignals import image_signals
from ..metric.unitmem import LABELS
from ..models import ModelSpec, get_model_spec
from ..results.result import AuditResult
from .device import cpu_threads, precision_mode, selected_device
from .distributed import join
from .finalize import assemble, finalize, gather_embedding
from .heap import reuse_freed_memory
from .merge import merge
from .run import ProgressCallback, is_model
from .settings import RunSettings
from .setup import add_subjects, select_layers, set_up
from .signals import terminate_as_interrupt
from .stream import stream


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
                                               settings.seed)
                   for subject in run.subjects if is_model(subject.role)}
        embedding = gather_embedding(run, merged, points["model"])
        timing["finalize_s"] = time.perf_counter() - clock
    finally:
        if run is not None:
            run.close()
        world.close()
    return assemble(run, merged, finished, points, signals, embedding,
                    timing | {"wall_s": time.perf_counter() - started})
