"""Peak memory against the number of images, and the decode rate of the data loader.

Run from the repository root::

    python benchmarks/bench_memory.py                # 500 and 20,000 images, 32x32, 0 augmentations
    python benchmarks/bench_memory.py --counts 20 200 --decode-images 64
    python benchmarks/bench_memory.py --cases mean --holdout --workers   # + held-out images: both controls
    python benchmarks/bench_memory.py --cases mean --holdout --workers --stand-in   # minutes, on a busy machine
    python benchmarks/bench_memory.py --cases mean --holdout --workers --stand-in --stages --repeats 1

1. Peak RSS of ``run_audit`` (each in a child process of its own; full-width var_d16, random
   weights, float32, on the CPU, the default controls: the random control, and the planted one when
   ``--holdout`` adds as many generated held-out images) for each image count, for the mean
   reduction (which should not grow with N), the median reduction in memory (its law: N x units x 4 bytes, 8,192 units), and
   the median kept on disk (``median_memory`` below the matrix). A matrix kept on disk is an
   ``np.memmap``: the pages it touches count in RSS, but they are file-backed, so the kernel can
   write them out and drop them instead of running out of memory.
   ``--stand-in`` audits, instead of var_d16, a network with var_d16's 22 audited layers and their
   unit counts (8,192 units) but almost no compute (each layer a 1x1 convolution of the image's
   mean colour): what an audit keeps per data point depends on the units and N, not on the
   convolutions, so its growth with N in MB is var_d16's, measured in minutes instead of hours; its
   base is smaller (no var_d16 weights or activations), so read the growth in MB.
   ``--stages`` (with ``--stand-in``, Linux) also prints each stage's own peak RSS: which stage
   sets the peak, and what each keeps (benchmarks/RESULTS.md, "Memory flat in N").
2. Decode rate of ``ImageSet.iter_batches``: ImageNet-like JPEGs (500x375) decoded and resized to
   256x256, in process and with worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_audit import child_args, child_env, machine, run_child, write_checkpoint, write_images

UNITS = 8192  # var_d16's 22 audited layers
CASES = [("mean", {"reduce": "mean"}), ("median, in memory", {"reduce": "median"}),
         ("median, on disk", {"reduce": "median", "median_memory": 1})]


class StandIn:
    """A network with the given layer widths and almost no compute (built in the child process)."""

    @staticmethod
    def spec(widths: list[int]):
        import torch
        from torch import nn

        from pytest_memaudit.models import LayerSpec, ModelSpec

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.layers = nn.ModuleList(nn.Conv2d(3 if i == 0 else widths[i - 1], width, 1)
                                            for i, width in enumerate(widths))

            def forward(self, x):
                x = x.mean(dim=(2, 3), keepdim=True)
                for layer in self.layers:
                    x = torch.relu(layer(x)) + 0.1
                return x

        layers = tuple(LayerSpec(f"layer{i}", f"layers.{i}") for i in range(len(widths)))
        return ModelSpec(name="stand_in", layers=layers, build=lambda checkpoint: Net(), default_image_size=32)


def var_widths(ckpt: Path) -> list[int]:
    """var_d16's audited layers' unit counts, in forward order."""
    import torch

    from pytest_memaudit.models.hooks import LayerRecorder
    from pytest_memaudit.models import get_model_spec

    spec = get_model_spec("var_d16")
    net = spec.build(ckpt).eval()
    with torch.inference_mode(), LayerRecorder(net, spec.layers) as recorder:
        net(torch.zeros(1, 3, 32, 32))
        outputs = recorder.take()
    return [values.shape[1] for values in outputs.values()]


# run_audit's stages, as pipeline/audit.py calls them
STAGES = ("set_up", "add_subjects", "stream", "merge", "finalize", "score_data_points", "image_signals", "gather_embedding",
          "planted_units_contrast", "assemble")


def profile_stages() -> None:
    """From now on, each of run_audit's ``STAGES`` prints its own peak RSS (Linux: ``VmHWM``, reset
    before the stage by writing 5 to /proc/self/clear_refs), the RSS it started from and the RSS it
    left, its seconds, and the peak between the previous stage and it: which stage sets the
    audit's peak, and what it keeps."""
    from pytest_memaudit.pipeline import audit

    def megabytes(key: str) -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024

    def staged(name, stage):
        def run(*args, **kwargs):
            before, between = megabytes("VmRSS"), megabytes("VmHWM")  # the peak since the last stage ended
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            started = time.perf_counter()
            out = stage(*args, **kwargs)
            print(f"stage {name:<24} from {before:6.0f} MB  peak {megabytes('VmHWM'):6.0f} MB  left "
                  f"{megabytes('VmRSS'):6.0f} MB  {time.perf_counter() - started:6.1f} s  (peak before it: "
                  f"{between:.0f} MB)", flush=True)
            return out
        return run

    for name in STAGES:
        setattr(audit, name, staged(name, getattr(audit, name)))


def child_stand_in(config: dict) -> None:
    from pytest_memaudit.pipeline.audit import run_audit
    from pytest_memaudit.pipeline.settings import make_settings
    from pytest_memaudit.results.result import write_json_atomic

    if config["stages"]:
        profile_stages()
    settings = make_settings(model="stand_in", data=config["data"], image_size=config["size"],
                             augmentations=config["views"], device="cpu", **config["extra"])
    write_json_atomic(config["out"], run_audit(settings, StandIn.spec(config["widths"])).to_json())
    if config["stages"]:  # a forked worker's RSS counts the parent's pages it shares: it can be the larger
        import resource

        hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"stage (the result's JSON)      peak {hwm:6.0f} MB; (decode workers) peak {workers:6.0f} MB", flush=True)


def prepared(workdir: Path) -> tuple[Path, list[int]]:
    """The var_d16 checkpoint and its layers' widths, made in a child process: Linux starts a
    child's peak RSS (``ru_maxrss``, what ``run_child`` reads) at the RSS its parent had when it
    spawned it, so this process must stay small (about 30 MB) or every peak measured reads at
    least its own."""
    made = subprocess.run([sys.executable, __file__, "--child-prepare", str(workdir)], capture_output=True, text=True,
                          check=True)
    ckpt, widths = json.loads(made.stdout.splitlines()[-1])
    return Path(ckpt), widths


def child_prepare(workdir: Path) -> None:
    ckpt = write_checkpoint(workdir)
    print(json.dumps([str(ckpt), var_widths(ckpt)]))


def rss_runs(opts, ckpt: Path, widths: list[int], workdir: Path) -> list[dict]:
    cases = [case for case in CASES if case[0].split(",")[0] in opts.cases]
    held_out = {"holdout": "builtin"} if opts.holdout else {}
    widths = widths if opts.stand_in else None
    peaks: dict[tuple[str, int], list[float]] = {}
    for _ in range(opts.repeats):
        for count in opts.counts:
            data = write_images(workdir / f"images-{count}x{opts.size}", count, opts.size)
            for name, extra in cases:
                out, log = workdir / f"rss-{count}.json", workdir / f"rss-{count}.log"
                if widths:
                    config = {"data": str(data), "size": opts.size, "views": opts.views, "out": str(out),
                              "widths": widths, "extra": extra | held_out, "stages": opts.stages}
                    args = [sys.executable, __file__, "--child-stand-in", json.dumps(config)]
                else:
                    args = child_args("run_audit", ckpt, data, opts.size, opts.views, "float32", "cpu", None, out)
                    args += ["--extra", json.dumps(extra | held_out)]
                run = run_child(args, log, child_env())
                if run["rc"] != 0:
                    sys.exit(f"run_audit failed: {log.read_text()[-3000:]}")
                result = json.loads(out.read_text())
                on_disk = any("kept on disk" in note for note in result["notes"])
                assert on_disk == (name == "median, on disk"), name
                peaks.setdefault((name, count), []).append(run["peak_mb"])
                print(f"  {name:<18} {count:>6} images: peak {run['peak_mb']:.0f} MB ({run['wall_s']:.0f} s), "
                      f"controls {result['settings']['control']}, {len(result['samples'])} data points", flush=True)
                for line in log.read_text().splitlines():
                    if line.startswith("stage "):
                        print(f"    {line}", flush=True)
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
    parser.add_argument("--stand-in", action="store_true",
                        help="audit a network with var_d16's layer widths and almost no compute (see above)")
    parser.add_argument("--stages", action="store_true",
                        help="with --stand-in, on Linux: each stage's own peak RSS (see profile_stages)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--workdir", help="keep inputs and logs here (default: a new temporary folder)")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    if opts.stages and not opts.stand_in:
        parser.error("--stages profiles the stand-in's stages in process: add --stand-in")
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="memaudit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    report = {"machine": machine(), "command": "python benchmarks/bench_memory.py " + " ".join(argv),
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": os.getloadavg()}
    if not opts.skip_rss:
        rows = rss_runs(opts, *prepared(workdir), workdir)
        report["rss"] = rows
        report["parent_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"(this process's own peak: {report['parent_peak_mb']:.0f} MB, below which no child's peak can read)")
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
    if sys.argv[1:2] == ["--child-stand-in"]:
        child_stand_in(json.loads(sys.argv[2]))
    elif sys.argv[1:2] == ["--child-prepare"]:
        child_prepare(Path(sys.argv[2]))
    else:
        main(sys.argv[1:])
