"""Peak memory against the number of images, and the decode rate of the data loader.

Run from the repository root::

    python benchmarks/bench_memory.py                # 500 and 20,000 images, 32x32, 0 augmentations
    python benchmarks/bench_memory.py --counts 20 200 --decode-images 64
    python benchmarks/bench_memory.py --cases mean --holdout --workers   # + held-out images: both controls

1. Peak RSS of ``run_audit`` (each in a child process of its own; full-width var_d16, random
   weights, float32, on the CPU, the default controls: the random control, and the planted one when
   ``--holdout`` adds as many generated held-out images) for each image count, for the mean
   reduction (which should not grow with N), the median reduction in memory (its law: N x units x 4 bytes, 8,192 units), and
   the median kept on disk (``median_memory`` below the matrix). A matrix kept on disk is an
   ``np.memmap``: the pages it touches count in RSS, but they are file-backed, so the kernel can
   write them out and drop them instead of running out of memory.
2. Decode rate of ``ImageSet.iter_batches``: ImageNet-like JPEGs (500x375) decoded and resized to
   256x256, in process and with worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_audit import child_args, child_env, machine, run_child, write_checkpoint, write_images

UNITS = 8192  # var_d16's 22 audited layers
CASES = [("mean", {"reduce": "mean"}), ("median, in memory", {"reduce": "median"}),
         ("median, on disk", {"reduce": "median", "median_memory": 1})]


def rss_runs(opts, ckpt: Path, workdir: Path) -> list[dict]:
    cases = [case for case in CASES if case[0].split(",")[0] in opts.cases]
    held_out = {"holdout": "builtin"} if opts.holdout else {}
    peaks: dict[tuple[str, int], list[float]] = {}
    for _ in range(opts.repeats):
        for count in opts.counts:
            data = write_images(workdir / f"images-{count}x{opts.size}", count, opts.size)
            for name, extra in cases:
                out, log = workdir / f"rss-{count}.json", workdir / f"rss-{count}.log"
                args = child_args("run_audit", ckpt, data, opts.size, opts.views, "float32", "cpu", None, out)
                run = run_child(args + ["--extra", json.dumps(extra | held_out)], log, child_env())
                if run["rc"] != 0:
                    sys.exit(f"run_audit failed: {log.read_text()[-3000:]}")
                result = json.loads(out.read_text())
                on_disk = any("kept on disk" in note for note in result["notes"])
                assert on_disk == (name == "median, on disk"), name
                peaks.setdefault((name, count), []).append(run["peak_mb"])
                print(f"  {name:<18} {count:>6} images: peak {run['peak_mb']:.0f} MB ({run['wall_s']:.0f} s), "
                      f"controls {result['settings']['control']}, {len(result['samples'])} data points", flush=True)
    return [{"case": name, "images": count, "peak_mb": statistics.median(values), "peaks_mb": values}
            for (name, count), values in peaks.items()]


def decode_rates(opts, workdir: Path) -> list[dict]:
    from pytest_memaudit.data.images import ImageSet

    folder = write_images(workdir / f"jpeg-{opts.decode_images}", opts.decode_images, 0, suffix=".jpg",
                          shape=(375, 500))
    images = ImageSet.from_folder(folder, opts.decode_size, None, 0)
    rows = []
    for workers in opts.workers:
        started = time.perf_counter()
        decoded = sum(len(batch.positions) for batch in images.iter_batches(32, workers))
        seconds = time.perf_counter() - started
        rows.append({"workers": workers, "images": decoded, "images_per_s": decoded / seconds})
        print(f"  decode with {workers} worker(s): {decoded / seconds:.0f} images/s", flush=True)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 20000])
    parser.add_argument("--cases", nargs="+", choices=("mean", "median"), default=["mean", "median"],
                        help="reductions to measure (median: in memory and on disk)")
    parser.add_argument("--holdout", action="store_true",
                        help="add as many generated held-out images as members, so that the planted control runs too")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--views", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; medians are reported")
    parser.add_argument("--decode-images", type=int, default=256)
    parser.add_argument("--decode-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="worker counts to time decoding with (none: skip)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--workdir", help="keep inputs and logs here (default: a new temporary folder)")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="memaudit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    report = {"machine": machine(), "command": "python benchmarks/bench_memory.py " + " ".join(argv)}
    if not opts.skip_rss:
        rows = rss_runs(opts, write_checkpoint(workdir), workdir)
        report["rss"] = rows
        low, high = min(opts.counts), max(opts.counts)
        for case in dict.fromkeys(row["case"] for row in rows):
            peak = {row["images"]: row["peak_mb"] for row in rows if row["case"] == case}
            growth = peak[high] - peak[low]
            print(f"{case} (median peak RSS): {peak[low]:.0f} MB at {low} images, {peak[high]:.0f} MB at {high}: "
                  f"+{growth:.0f} MB ({growth / peak[low]:+.1%})")
        law = (high - low) * UNITS * 4 / 2**20
        print(f"median law N x units x 4 bytes: +{law:.0f} MB from {low} to {high} images ({UNITS} units)")
    if opts.workers:
        report["decode"] = decode_rates(opts, workdir)
    report["load_average"] = os.getloadavg()
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
