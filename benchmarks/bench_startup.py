"""Seconds from launching ``pytest`` to the audit's first batch, for a user model, in whole processes.

Run from the repository root::

    python benchmarks/bench_startup.py --repeats 3
    python benchmarks/bench_startup.py --trees /tmp/old-checkout . --repeats 3   # before / after

Audits the resnet50 example (``examples/resnet50``: torchvision's ResNet-50, random weights) on 4
generated images with no augmentation, the default controls, on the CPU: nearly all of the time
before the first batch is start-up (imports, building the model and its controls), the case where
a user waits longest for nothing. Each tree (a checkout of the project) is put first on
PYTHONPATH, so one run compares two versions of the code, interleaved. ``startup_probe.py`` (a
pytest plugin) writes when the audit's stream starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_audit import child_env, machine, run_child

from pytest_memaudit.pipeline.hardware import cpu_flags

BENCHMARKS = Path(__file__).resolve().parent
ARGS = ["-m", "pytest", "examples/resnet50", "-q", "-p", "no:cacheprovider", "-p", "startup_probe",
        "--memaudit-model", "resnet50", "--memaudit-data", "builtin", "--memaudit-samples", "4",
        "--memaudit-augmentations", "0", "--memaudit-device", "cpu", "--memaudit-html", "none"]


def one_run(tree: Path, workdir: Path, tag: str) -> dict:
    probe, log = workdir / f"{tag}.probe", workdir / f"{tag}.log"
    probe.unlink(missing_ok=True)
    env = child_env() | {"PYTHONPATH": os.pathsep.join([str(tree), str(BENCHMARKS)]),
                         "MEMAUDIT_STARTUP_PROBE": str(probe)}
    launched = time.time()
    run = run_child([sys.executable, *ARGS, "--memaudit-json", str(workdir / f"{tag}.json")], log, env, cwd=tree)
    if run["rc"] not in (0, 1) or not probe.exists():
        sys.exit(f"{tag} failed (exit {run['rc']}): {log}\n{log.read_text()[-3000:]}")
    run["first_batch_s"] = float(probe.read_text()) - launched
    return run


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", nargs="+", type=Path, default=[BENCHMARKS.parent],
                        help="checkouts of the project to compare (default: this one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="keep logs here (default: a new temporary folder)")
    opts = parser.parse_args(argv)
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="memaudit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    for i, tree in enumerate(opts.trees):  # untimed: caches the bytecode, as an installed package has it
        one_run(tree.resolve(), workdir, f"warm-up-{i}")
    runs: dict[Path, list[dict]] = {tree: [] for tree in opts.trees}
    for repeat in range(opts.repeats):
        for i, tree in enumerate(opts.trees):
            run = one_run(tree.resolve(), workdir, f"tree{i}-{repeat}")
            runs[tree].append(run)
            print(f"  {tree} #{repeat + 1}: first batch at {run['first_batch_s']:.2f} s, whole run {run['wall_s']:.1f} s",
                  flush=True)
    print(f"\n{machine()}  flags {cpu_flags()}\npython benchmarks/bench_startup.py {' '.join(argv)}")
    for tree, measured in runs.items():
        print(f"{str(tree):<30} first batch at {statistics.median(r['first_batch_s'] for r in measured):.2f} s "
              f"(runs {[round(r['first_batch_s'], 2) for r in measured]}), whole run "
              f"{statistics.median(r['wall_s'] for r in measured):.1f} s")
    print(f"load average (1, 5, 15 min) before and after: {[round(x, 2) for x in load + os.getloadavg()]}")


if __name__ == "__main__":
    main(sys.argv[1:])
