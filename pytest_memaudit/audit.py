"""``run_audit``: the one entry point that wires data, augmentation, model, hooks and UnitMem.

Usable without pytest::

    from pytest_memaudit.audit import run_audit
    from pytest_memaudit.config import make_settings
    result = run_audit(make_settings(model="var_d16", checkpoint="vae.pth", data="imgs/"))
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .augment import augment_views
from .config import RunSettings
from .data import ImageSet
from .errors import AuditError, DataError, user_code
from .hardware import precision_notes
from .heap import reuse_freed_memory
from .hooks import LayerRecorder
from .models import LayerSpec, ModelSpec, get_model_spec
from .results import AuditResult, LayerResult
from .signals import terminate_as_interrupt
from .stats import layer_stats
from .unitmem import UnitMemAccumulator, median_matrix_bytes

ProgressCallback = Callable[[int, int], None]  # (images done, images in all)
# Weights and views in NHWC, the layout oneDNN and cuDNN convolutions run fastest in.
MEMORY_FORMAT = torch.channels_last


def run_audit(
    settings: RunSettings,
    model: ModelSpec | None = None,
    layers: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> AuditResult:
    """Audit ``layers`` (display names or module paths; None: all) of the model ``settings`` name."""
    started = time.perf_counter()
    spec = model or get_model_spec(settings.model)
    selected = select_layers(spec, layers)
    device = resolve_device(settings.device)
    precision = settings.precision
    if precision == "tf32" and device.type != "cuda":
        raise AuditError("--memaudit-precision tf32 needs a CUDA device; on the CPU use float32 or bfloat16")
    image_size = settings.image_size or spec.default_image_size
    views = max(settings.augmentations, 1)
    batch_size = settings.batch_size or (256 if device.type == "cuda" else 32)
    images = open_images(settings, spec, image_size)
    source = images.description or ("builtin (generated images)" if images.root is None else str(images.root))

    checkpoint = spec.locate(settings.checkpoint)
    with user_code(f"building model {spec.name}"):
        subject = prepare(spec.build(checkpoint), device)
    subjects = {"model": subject}
    control = settings.control or spec.default_control
    if control == "random":
        subjects["control"] = prepare(random_weights_copy(subject, settings.seed), device)

    workers = settings.workers if settings.workers is not None else default_workers(images)
    accumulators: dict[str, dict[str, UnitMemAccumulator]] = {role: {} for role in subjects}
    recorders = {role: LayerRecorder(net, selected) for role, net in subjects.items()}
    samples: list[str] = []
    skipped: list[dict[str, str]] = []
    notes = [images.warning] if images.warning else []
    notes += precision_notes(precision, device)
    forward = AdaptiveForward(batch_size, device, notes)
    median_budget = settings.median_memory * 2**20 // len(subjects)
    forward_seconds = 0.0
    try:
        with torch.inference_mode(), precision_mode(precision, device), reuse_freed_memory(device), \
                terminate_as_interrupt():
            batches = images.iter_batches(max(1, batch_size // views), workers, pin_memory=device.type == "cuda")
            for batch in batches:
                skipped += [{"id": images.ids[pos], "reason": reason} for pos, reason in batch.skipped]
                n = len(batch.positions)
                if n:
                    pixels = batch.images.to(device, non_blocking=True).float().div_(255)
                    seeds = [view_seed(settings.seed, images.ids[pos]) for pos in batch.positions]
                    batch_views = augment_views(pixels, settings.augmentations, seeds).contiguous(
                        memory_format=MEMORY_FORMAT
                    )
                    indices = torch.arange(len(samples), len(samples) + n, device=device)
                    for role, net in subjects.items():
                        tick = time.perf_counter()
                        with user_code(f"the forward pass of {spec.name} ({role})"):
                            outputs = forward(net, recorders[role], batch_views)
                        forward_seconds += time.perf_counter() - tick
                        if not accumulators[role]:
                            accumulators[role] = new_accumulators(outputs, settings, len(images), device, median_budget)
                            notes += spill_notes(role, accumulators[role], settings.median_memory)
                        for name, per_view in outputs.items():
                            accumulators[role][name].update(per_view.view(n, views, -1).mean(dim=1), indices)
                    samples += [images.ids[pos] for pos in batch.positions]
                if progress:
                    progress(len(samples) + len(skipped), len(images))
        if not samples:
            first = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
            raise DataError(
                f"none of the {len(images)} images in {source} could be read ({first}). "
                "Check that the files are images (jpg, png, webp, bmp) and not truncated."
            )
        results = {role: finalize(accs, selected) for role, accs in accumulators.items()}
    finally:
        for recorder in recorders.values():
            recorder.close()
        for accs in accumulators.values():
            for acc in accs.values():
                acc.close()

    wall = time.perf_counter() - started
    n_views = len(samples) * views * len(subjects)
    resolved = settings.as_dict() | {
        "model": spec.name,
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(device),
        "workers": workers,
        "control": control,
        "views_per_image": views,
    }
    planted = set(images.canaries)
    result = AuditResult(
        model=spec.name,
        settings=resolved,
        data_source=source,
        samples=samples,
        layers=results["model"],
        skipped=images.unlisted + skipped,
        checkpoint=checkpoint_record(checkpoint),
        timing={
            "wall_s": wall,
            "forward_s": forward_seconds,
            "views": n_views,
            "views_per_s": n_views / wall if wall > 0 else 0.0,
        },
        environment=environment(device),
        notes=notes,
        canaries=[sample for sample in samples if sample in planted],
    )
    if "control" in results:
        for layer, control_layer in zip(result.layers, results["control"]):
            layer.control_mean = control_layer.stats.mean_unitmem
        result.control = AuditResult(
            model=f"{spec.name} (random weights)",
            settings=resolved,
            data_source=result.data_source,
            samples=samples,
            layers=results["control"],
        )
    return result


def select_layers(spec: ModelSpec, names: Sequence[str] | None) -> list[LayerSpec]:
    if names is None:
        return list(spec.layers)
    wanted = set(names)
    unknown = [n for n in names if spec.layer(n) is None]
    if unknown:
        raise AuditError(f"model {spec.name} has no layer(s) {', '.join(map(repr, unknown))}")
    return [layer for layer in spec.layers if {layer.name, layer.module} & wanted]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AuditError(
            f"--memaudit-device {name}: CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Use --memaudit-device cpu or auto."
        )
    return device


def open_images(settings: RunSettings, spec: ModelSpec, image_size: int) -> ImageSet:
    if settings.data is None and spec.default_data is not None:
        images = spec.default_data(image_size, settings.seed)
        return images if settings.samples is None else images.sample(settings.samples, settings.seed)
    if settings.data in (None, "builtin"):
        return ImageSet.builtin(settings.samples or spec.default_samples, image_size, settings.seed)
    return ImageSet.from_folder(settings.data, image_size, settings.samples, settings.seed)


def default_workers(images: ImageSet) -> int:
    """Decode in worker processes for files on disk; generated images are made in process."""
    if images.root is None:
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def prepare(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return net.eval().requires_grad_(False).to(device, memory_format=MEMORY_FORMAT)


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
        except torch.cuda.OutOfMemoryError:
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


def new_accumulators(
    outputs: dict[str, torch.Tensor], settings: RunSettings, capacity: int, device: torch.device, budget: int
) -> dict[str, UnitMemAccumulator]:
    """One accumulator per layer; the median's in-memory budget is shared by units, so either all
    layers keep their matrix in memory or all keep it on disk."""
    total = sum(values.shape[1] for values in outputs.values())
    return {
        name: UnitMemAccumulator(
            units=values.shape[1],
            capacity=capacity,
            reduce=settings.reduce,
            topk=settings.topk,
            device=device,
            memory_limit_bytes=budget * values.shape[1] // total,
        )
        for name, values in outputs.items()
    }


def spill_notes(role: str, accumulators: dict[str, UnitMemAccumulator], limit_mb: int) -> list[str]:
    spilled = [acc for acc in accumulators.values() if acc.spill_path]
    if not spilled:
        return []
    rows = spilled[0].capacity
    size = median_matrix_bytes(rows, sum(acc.units for acc in accumulators.values())) / 2**20
    return [
        f"median reduction ({role}): the {rows} x units matrix ({size:,.0f} MB) is over "
        f"--memaudit-median-memory ({limit_mb} MB), so it is kept on disk in "
        f"{os.path.dirname(spilled[0].spill_path)}"
    ]


def random_weights_copy(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The same architecture with freshly initialized (seeded) weights: the audit's control."""
    control = copy.deepcopy(net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in control.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return control


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    if precision == "bfloat16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield


def view_seed(seed: int, image_id: str) -> int:
    """The seed of an image's views: depends on the audit seed and the image, not on batching."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def finalize(accumulators: dict[str, UnitMemAccumulator], selected: Sequence[LayerSpec]) -> list[LayerResult]:
    results = []
    for layer in selected:
        if layer.name not in accumulators:
            raise AuditError(
                f"layer {layer.name} ({layer.module}) never ran in the forward pass; "
                "is it part of the model's forward()?"
            )
        values = accumulators[layer.name].finalize(layer.name)
        results.append(LayerResult(layer.name, layer.module, values, layer_stats(values.unitmem, values.dead)))
    return results


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
