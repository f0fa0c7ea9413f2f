"""The GPU path, checked in one command that fits a 10-minute device run.

    python benchmarks/gpu_check.py              # on a CUDA machine: the full check
    python benchmarks/gpu_check.py --dry-run    # anywhere: the same steps at a tiny size, on the CPU

On a generated var_d16 checkpoint (random weights, the released shapes) and generated images
(2,000 at 256x256 by default), with nothing installed beyond the project and a CUDA torch:

1. the device's measured bf16 matrix-multiply rate (the peak the audits are compared with);
2. a float32 and a bfloat16 audit at 10 views, each in both memory layouts (NCHW and
   channels-last): views/s, the fraction of the bf16 peak at 215 GFLOP per 256x256 view, peak GPU
   memory, and the layout the audit itself would choose;
3. accuracy: UnitMem of a 16-image, 0-augmentation audit on the device in float32 against an
   independent float64 computation on the CPU (``tests/var_reference.py``): the largest absolute
   difference (docs/statistics.md promises 1e-4 for float32, which is why TF32 is off in float32 audits).

It prints a table and writes ``--json``. Put the figures in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the independent float64 reference lives with the tests

from var_reference import reference_forward  # noqa: E402

from pytest_memaudit.pipeline.setup import open_images  # noqa: E402
from pytest_memaudit.pipeline.audit import run_audit  # noqa: E402
from pytest_memaudit.pipeline.settings import make_settings  # noqa: E402
from pytest_memaudit.pipeline.hardware import cpu_flags  # noqa: E402
from pytest_memaudit.models import get_model_spec  # noqa: E402
from pytest_memaudit.models.var import VAREncoder  # noqa: E402

GFLOP_PER_VIEW_256 = 215.0  # var_d16 at 256x256 (107.6 GMACs): scales with the image's area


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A whole-encoder checkpoint with random weights in the released layout (``encoder.*`` keys)."""
    torch.manual_seed(seed)
    state = {f"encoder.{key}": value for key, value in VAREncoder().state_dict().items()}
    torch.save(state, path)
    return path


def bf16_matmul_rate(device: torch.device, size: int, repeats: int) -> float:
    """Measured bf16 matrix-multiply rate in TFLOP/s (2 n^3 per product)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def audit(checkpoint: Path, device: str, precision: str, images: int, size: int, views: int, layout: str | None):
    """One var_d16 audit, the model alone; ``layout`` forces the memory layout (None: the audit's choice)."""
    settings = make_settings(model="var_d16", checkpoint=str(checkpoint), data="builtin", samples=images,
                             image_size=size, augmentations=views, precision=precision, device=device,
                             control="none", holdout="none", permutations=100)
    spec = get_model_spec("var_d16")
    if layout is not None:
        from dataclasses import replace

        spec = replace(spec, input_contract=replace(spec.input_contract, channels_last=layout == "channels-last"))
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_audit(settings, spec)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else math.nan
    return result, peak


def reference_error(checkpoint: Path, device: str, images: int, size: int) -> float:
    """Largest |UnitMem(device, float32) - UnitMem(float64 CPU reference)| over every unit."""
    result, _ = audit(checkpoint, device, "float32", images, size, 0, None)
    settings = make_settings(model="var_d16", data="builtin", samples=images, image_size=size, holdout="none")
    pixels = open_images(settings, get_model_spec("var_d16"), size)
    x = torch.stack([pixels.load(i) for i in range(len(pixels))]).double() / 255 * 2 - 1
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with torch.no_grad():
        _, layers = reference_forward(state, x)
    worst = 0.0
    for layer in result.layers:
        a = layers[layer.module].abs().mean(dim=(2, 3)).numpy()  # (images, units), float64
        mu_max = a.max(axis=0)
        rest = (a.sum(axis=0) - mu_max) / (a.shape[0] - 1)
        expected = np.where(mu_max + rest == 0, 0.0, (mu_max - rest) / np.where(mu_max + rest == 0, 1, mu_max + rest))
        worst = max(worst, float(np.max(np.abs(layer.values.unitmem - expected))))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny size on the CPU: proves the steps run")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    if opts.dry_run:
        device, images, size, views, accuracy_images, matmul = "cpu", 4, 32, 1, 4, (256, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device here; run with --dry-run to check the script on the CPU")
        device, images, size, views, accuracy_images, matmul = "cuda", opts.images, opts.size, opts.views, 16, (8192, 20)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "cpu": cpu_flags(),
                    "torch": torch.__version__, "images": images, "size": size, "views": views, "runs": []}
    peak = bf16_matmul_rate(torch.device(device), *matmul)
    report["bf16_matmul_tflops"] = peak
    gflop = GFLOP_PER_VIEW_256 * (size / 256) ** 2
    with tempfile.TemporaryDirectory(prefix="memaudit-gpu-check-") as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "vae_ch160v4096z32.pth")
        for precision in ("float32", "bfloat16"):
            for layout in ("NCHW", "channels-last", None):
                result, memory = audit(checkpoint, device, precision, images, size, views, layout)
                rate = result.timing["views"] / result.timing["wall_s"]
                forward_rate = result.timing["views"] / result.timing["forward_s"]
                report["runs"].append({
                    "precision": precision, "layout": layout or f"chosen: {result.settings['memory_format']}",
                    "views_per_s": rate, "forward_views_per_s": forward_rate,
                    "peak_fraction": forward_rate * gflop / 1e3 / peak, "peak_gpu_gib": memory,
                    "wall_s": result.timing["wall_s"], "notes": [n for n in result.notes if "layout" in n],
                })
        report["max_abs_unitmem_vs_float64"] = reference_error(checkpoint, device, accuracy_images, size)
    print(f"{report['device']}: bf16 matmul {peak:.1f} TFLOP/s; {images} images x {views} views at {size}px")
    print(f"{'precision':10s} {'layout':26s} {'views/s':>9s} {'fwd views/s':>12s} {'of peak':>8s} {'GPU GiB':>8s}")
    for run in report["runs"]:
        print(f"{run['precision']:10s} {run['layout']:26s} {run['views_per_s']:9.1f} {run['forward_views_per_s']:12.1f} "
              f"{run['peak_fraction']:8.1%} {run['peak_gpu_gib']:8.2f}")
    print(f"float32 UnitMem against the float64 CPU reference ({accuracy_images} images): "
          f"max |d| = {report['max_abs_unitmem_vs_float64']:.2e}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
