"""The stream stage: this process's shard of the data points, decoded, augmented and fed to every subject."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch

from ..data.images import ImageBatch, lost_worker
from ..errors import AuditError, DataError, user_code
from ..metric.imagesignals import LOSS_LAYER, check_loss, signal_key, view_scalars
from .forward import model_input
from .run import AuditRun, ProgressCallback, is_model
from .views import PipelineViews, view_seed


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
            embedding, signals = None, {}
            riders = [subject for subject in run.subjects if subject.rides]
            for subject in run.subjects:
                if subject.rides:
                    continue  # measured in the model's pass
                with run.timer, user_code(f"the forward pass of {run.spec.name} ({subject.role}) on views of shape "
                                          f"{tuple(batch_views.shape)}"):
                    outputs, taken = run.forward.with_riders(
                        subject.net, subject.recorder, batch_views,
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
                                signals[signal_key(who.role, name, signal)] = scalars.cpu().numpy()
                if subject.role in run.losses:
                    plain = model_input(batch.images.to(device).float().div_(127.5).sub_(1), run.spec.input_contract,
                                        run.layout)
                    with run.timer, user_code(f"the loss of {run.spec.name} ({subject.role}) on images of shape "
                                              f"{tuple(plain.shape)}"):
                        loss = run.losses[subject.role](plain)
                    signals[signal_key(subject.role, LOSS_LAYER, "loss")] = check_loss(loss, n, run.spec.name)
            run.measured.add(batch.positions, batch.characteristics, embedding, signals)
        run.progress.done += n + len(batch.skipped)
        if progress:
            progress(run.progress.done, len(run.progress.positions))
        if run.snapshots and run.snapshots.due():
            run.snapshots.save(run.snapshot())
