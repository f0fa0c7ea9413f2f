"""The same audit with 1 and with N processes (torchrun): wall time, the merge's share of it, views/s
per process and the scaling.

Run from the repository root::

    python benchmarks/bench_distributed.py                  # CPU: var_d16, 48 images, 64x64, 10 views, 1 and 2 processes
    python benchmarks/bench_distributed.py --quick          # CI-sized
    python benchmarks/bench_distributed.py --device cuda    # a GPU machine: 1 GPU and every GPU, 256x256, bfloat16

Each configuration is one ``torchrun --standalone --nproc_per_node P -m pytest audits/ ...`` child
process; its wall time includes start-up. The figures come from the results JSON that process 0
writes: ``timing.wall_s`` (inside ``run_audit``), ``wait_s`` (waiting at the merge for the
slowest process), ``merge_s`` (the collective merge of the layer states), ``finalize_s`` (the
statistics, with the median's selection rounds over every process), ``views`` (all processes).

On the CPU the processes share the machine's cores (one process uses them all as threads, two
processes one thread each), so the figure to read is the speedup of the whole machine. On GPUs
each process has a device of its own: views/s per GPU and the scaling efficiency,
throughput(N) / (N x throughput(1)). The checkpoint is a full-width var_d16 encoder with random
weights and the images are seeded PNGs, so nothing is downloaded (``bench_audit.py``'s inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_audit import write_checkpoint, write_images  # noqa: E402

QUICK = {"images": 6, "size": 16, "views": 2}


def audit_command(processes: int, args, ckpt: Path, data: Path, reduce: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "pytest", "audits/", "-q", "-p", "no:cacheprovider", "--memaudit-model", "var_d16",
            "--memaudit-checkpoint", str(ckpt), "--memaudit-data", str(data), "--memaudit-image-size", str(args.size),
            "--memaudit-augmentations", str(args.views), "--memaudit-reduce", reduce, "--memaudit-device", args.device,
            "--memaudit-precision", args.precision, "--memaudit-control", "none", "--memaudit-html", "none",
            "--memaudit-json", str(out), *(["--memaudit-batch-size", str(args.batch_size)] if args.batch_size else [])]


def run(processes: int, args, ckpt: Path, data: Path, reduce: str, workdir: Path) -> dict:
    out = workdir / f"results-{reduce}-{processes}.json"
    out.unlink(missing_ok=True)
    started = time.perf_counter()
    log = workdir / f"log-{reduce}-{processes}.txt"
    with open(log, "wb") as handle:
        code = subprocess.run(audit_command(processes, args, ckpt, data, reduce, out), cwd=REPO, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code not in (0, 1) or not out.exists():
        raise SystemExit(f"{processes} processes ({reduce}) failed with exit {code}; see {log}")
    result = json.loads(out.read_text())
    timing = result["timing"]
    return {
        "processes": processes,
        "reduce": reduce,
        "process_wall_s": wall,
        "audit_wall_s": timing["wall_s"],
        "wait_s": timing.get("wait_s", 0.0),
        "merge_s": timing["merge_s"],
        "finalize_s": timing["finalize_s"],
        "views": timing["views"],
        "views_per_s": timing["views"] / timing["wall_s"],
        "shards": result["distributed"]["shards"],
        "backend": result["distributed"]["backend"],
        "unitmem": [layer["unitmem"] for layer in result["layers"]],
    }


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--processes", type=int, nargs="+", help="process counts (default: 1 and 2 on the CPU, "
                        "1 and every GPU on CUDA)")
    parser.add_argument("--images", type=int, help="images (default 48 on the CPU, 2048 on CUDA)")
    parser.add_argument("--size", type=int, help="image size (default 64 on the CPU, 256 on CUDA)")
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--precision", help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--reduce", nargs="+", default=["mean", "median"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="CI-sized: 6 images, 16x16, 2 views")
    parser.add_argument("--workdir", type=Path, help="where inputs and outputs go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        gpus = torch.cuda.device_count()
        args.processes = args.processes or sorted({1, gpus})
        print(f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}")
    args.processes = args.processes or [1, 2]
    args.images = args.images or (QUICK["images"] if args.quick else 2048 if cuda else 48)
    args.size = args.size or (QUICK["size"] if args.quick else 256 if cuda else 64)
    args.views = QUICK["views"] if args.quick else args.views
    args.precision = args.precision or ("bfloat16" if cuda else "float32")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="memaudit-bench-distributed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = write_checkpoint(workdir)
    data = write_images(workdir / f"images-{args.images}-{args.size}", args.images, args.size)

    before = load_average()
    runs = []
    for _ in range(args.repeats):  # interleaved, so that repeats a minute apart are compared
        for reduce in args.reduce:
            for processes in args.processes:
                runs.append(run(processes, args, ckpt, data, reduce, workdir))
                print(f"  {reduce} x{processes}: {runs[-1]['audit_wall_s']:.1f} s", flush=True)
    after = load_average()

    print(f"\nvar_d16, {args.images} images, {args.size}x{args.size}, {args.views} views, {args.precision}, "
          f"{args.device}; medians of {args.repeats}; load average {before:.1f} before, {after:.1f} after")
    print("reduce  procs  process s  audit s  views/s  views/s/proc  speedup  efficiency  wait %  merge %  finalize %"
          "  max |dUnitMem| vs 1")
    table = []
    for reduce in args.reduce:
        single = [r for r in runs if r["reduce"] == reduce and r["processes"] == args.processes[0]]
        base = statistics.median(r["views_per_s"] for r in single)
        for processes in args.processes:
            mine = [r for r in runs if r["reduce"] == reduce and r["processes"] == processes]
            rate = statistics.median(r["views_per_s"] for r in mine)
            share = {key: statistics.median(100 * r[key] / r["audit_wall_s"] for r in mine)
                     for key in ("wait_s", "merge_s", "finalize_s")}
            diff = max(abs(a - b) for r in mine for la, lb in zip(r["unitmem"], single[0]["unitmem"])
                       for a, b in zip(la, lb))
            row = {"reduce": reduce, "processes": processes, "shards": mine[0]["shards"],
                   "process_wall_s": statistics.median(r["process_wall_s"] for r in mine),
                   "audit_wall_s": statistics.median(r["audit_wall_s"] for r in mine), "views_per_s": rate,
                   "views_per_s_per_process": rate / processes, "speedup": rate / base,
                   "efficiency": rate / (base * processes / args.processes[0]),
                   **{f"{key[:-2]}_share_pct": value for key, value in share.items()}, "max_abs_d_unitmem": diff}
            table.append(row)
            print(f"{reduce:<7} {processes:>5} {row['process_wall_s']:>10.1f} {row['audit_wall_s']:>8.1f} "
                  f"{rate:>8.1f} {rate / processes:>13.1f} {row['speedup']:>8.2f} {row['efficiency']:>11.2f} "
                  f"{share['wait_s']:>7.1f} {share['merge_s']:>8.2f} {share['finalize_s']:>11.2f} {diff:>21.1e}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "device": args.device, "images": args.images, "size": args.size,
            "views": args.views, "precision": args.precision, "repeats": args.repeats,
            "load_before": before, "load_after": after, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
