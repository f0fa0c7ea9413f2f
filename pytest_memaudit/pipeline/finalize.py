"""The finalize stage: each subject's UnitMem, statistics, controls and verdict, assembled into results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ..analysis.datapoints import DataPoints, embedded_rows, what_gets_memorized
from ..controls.planted import default_units, planted_verdict
from ..controls.planted import evaluate as evaluate_planted
from ..errors import AuditError
from ..metric.membership import Contrast, membership_contrast
from ..metric.stats import jackknife_interval, layer_stats, spread_figures
from ..metric.unitmem import LABELS
from ..metric.verdict import Verdict, decide, membership_tests
from ..models import LayerSpec
from ..results.result import AuditResult, LayerResult, SubjectResult
from .forward import layout_name
from .run import ROLE_DESCRIPTIONS, AuditRun, Merged, Subject
from .settings import RunSettings
from .setup import environment


def gather_embedding(run: AuditRun, merged: Merged, points: DataPoints) -> np.ndarray | None:
    """The model's activations at the embedding layer of the data points to cluster (``embedded_rows``,
    in that order), from whichever process streamed each; None when there are none to cluster."""
    wanted = embedded_rows(points)
    if wanted.size == 0:
        return None
    measured = run.measured.part("embedding").get("embedding")
    rows = {}
    if measured is not None:
        slot = np.full(merged.new_index.size, -1, dtype=np.int64)  # by listing position: its place in wanted
        slot[merged.read[wanted]] = np.arange(wanted.size)
        mine = slot[run.measured.positions]
        rows = {int(mine[i]): measured[i].copy() for i in np.flatnonzero(mine >= 0)}
    found: dict[int, np.ndarray] = {}
    for theirs in run.world.all_gather_object(rows, "gathering the images to cluster"):
        found.update(theirs)
    embedding = np.full((wanted.size, next(iter(found.values())).size if found else 0), np.nan)
    for i, row in found.items():
        embedding[i] = row
    return embedding


def planted_units_contrast(run: AuditRun, settings: RunSettings, labels: np.ndarray) -> Contrast | None:
    """The planted control's contrast over its default-strength planted units alone (what its verdict
    tests); None without a planted control."""
    planted = next((subject for subject in run.subjects if subject.role == "planted"), None)
    if planted is None:
        return None
    return membership_contrast({layer.name: planted.states[layer.name] for layer in run.selected}, labels,
                               planted.members, planted.holdout, permutations=settings.permutations,
                               seed=settings.seed, units=default_units(run.plants, settings.planted_strength))


def assemble(run: AuditRun, merged: Merged, finished: dict, points: dict[str, DataPoints],
             signals: dict[str, list], embedding: np.ndarray | None, timing: dict[str, float],
             planted_units: Contrast | None = None) -> list[AuditResult]:
    """The AuditResult of the finished subjects: the model's, then each later checkpoint's;
    ``planted_units``: the planted control's contrast over its planted units alone."""
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
        planted.verdict = planted_verdict(planted_units, settings.permutations)
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
