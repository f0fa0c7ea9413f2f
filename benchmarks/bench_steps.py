"""What each step of the project's audit buys: ``run_audit`` with one step undone at a time.

Run from the repository root::

    python benchmarks/bench_steps.py                       # var_d16, 48 images, 64x64, 10 views, CPU
    python benchmarks/bench_steps.py --images 6 --repeats 1 --precisions float32

Loop steps are undone by patching ``pytest_memaudit.pipeline`` modules in this process (NCHW instead of
channels_last; glibc's default malloc instead of reusing freed activation memory) or by a setting
(views per forward pass). Configurations run interleaved, ``--repeats`` times; the report gives
median audit seconds and each one's time relative to the project's defaults. Start-up costs are
timed in fresh processes: the imports the audit avoids, and a whole ``pytest audits/`` run on two
16x16 images (almost nothing but start-up, collection, reports and exit).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_audit import REPO, pytest_args, write_checkpoint, write_images


def loop_steps(opts, ckpt: Path, data: Path) -> dict:
    import torch

    from pytest_memaudit.pipeline import audit, forward
    from pytest_memaudit.pipeline.settings import make_settings

    undo = {
        "defaults": {},
        "NCHW instead of channels_last": {(forward, "MEMORY_FORMAT"): torch.contiguous_format},
        "glibc malloc defaults (no reuse of freed memory)": {(audit, "reuse_freed_memory"): lambda device: contextlib.nullcontext()},
        **{f"{size} views per forward pass": {"batch_size": size} for size in opts.batch_sizes},
    }
    times: dict[tuple[str, str], list[float]] = {}
    page_faults: dict[tuple[str, str], int] = {}  # minor faults: new pages touched, not disturbed by load
    for _ in range(opts.repeats):
        for precision in opts.precisions:
            for name, change in undo.items():
                batch_size = change.get("batch_size")
                patches = {k: v for k, v in change.items() if k != "batch_size"}
                saved = {(module, k): getattr(module, k) for module, k in patches}
                for (module, k), value in patches.items():
                    setattr(module, k, value)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                try:
                    settings = make_settings(model="var_d16", checkpoint=str(ckpt), data=str(data),
                                             image_size=opts.size, augmentations=opts.views, precision=precision,
                                             device="cpu", batch_size=batch_size)
                    wall = audit.run_audit(settings).timing["wall_s"]
                finally:
                    for (module, k), value in saved.items():
                        setattr(module, k, value)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                times.setdefault((precision, name), []).append(wall)
                page_faults[(precision, name)] = faults
                print(f"  {precision:<9} {name:<50} {wall:6.1f} s, {faults:>9,} page faults", flush=True)
    report = {}
    for precision in opts.precisions:
        base = statistics.median(times[(precision, "defaults")])
        for name in undo:
            median = statistics.median(times[(precision, name)])
            report[f"{precision}: {name}"] = {"median_s": median, "vs_defaults": median / base,
                                              "page_faults": page_faults[(precision, name)]}
    return report


def timed(args: list[str], repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def startup(opts, ckpt: Path, workdir: Path) -> dict:
    tiny = write_images(workdir / "images-2x16", 2, 16)
    python = [sys.executable, "-c"]
    return {
        "import torch": timed(python + ["import torch"], opts.repeats),
        "import torch, torchvision.transforms.v2 (what data.py imported)":
            timed(python + ["import torch, torchvision.transforms.v2"], opts.repeats),
        "import torch, scipy.special": timed(python + ["import torch, scipy.special"], opts.repeats),
        "import torch, scipy.stats (what stats.py imports)": timed(python + ["import torch, scipy.stats"], opts.repeats),
        "pytest audits/ on 2 images, 16x16, 0 augmentations":
            timed(pytest_args(ckpt, tiny, 16, 0, "float32", "cpu", None, workdir / "tiny.json"), opts.repeats),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[10, 60])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir")
    opts = parser.parse_args(argv)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="memaudit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(workdir)
    data = write_images(workdir / f"images-{opts.images}x{opts.size}", opts.images, opts.size)

    print("start-up, median seconds of a fresh process:")
    for name, seconds in startup(opts, ckpt, workdir).items():
        print(f"  {name:<62} {seconds:5.2f} s")
    print(f"audit loop ({opts.images} images, {opts.size}x{opts.size}, {opts.views} views, in process):")
    for name, row in loop_steps(opts, ckpt, data).items():
        print(f"  {name:<62} {row['median_s']:6.1f} s  {row['vs_defaults']:5.2f}x the defaults' time, "
              f"{row['page_faults']:>9,} page faults")


if __name__ == "__main__":
    main(sys.argv[1:])
