"""What the controls cost: the default audit (model + random + planted control) against the same
audit without controls (``--memaudit-control none``), as whole ``pytest audits/`` processes.

Run from the repository root::

    python benchmarks/bench_controls.py --repeats 3        # demo (its defaults) and var_d16 at 64x64
    python benchmarks/bench_controls.py --quick            # CI-sized

Both audits of a pair read the same data points (members and held-out images), so the ratio
default / none is what the two controls add. The demo runs on its own data and held-out set; var_d16
(full width, random weights, ``tests/var_checkpoints.py``) on seeded generated PNGs at 64x64,
``--images`` members and as many held-out images. The runs interleave (demo default, demo none,
var_d16 default, var_d16 none, then again), so each ratio compares runs made a minute apart;
medians and per-repeat ratios are printed. "audit s" is the time inside ``run_audit``
(``timing.wall_s`` of the results), the rest of the wall time is start-up, gates and report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench_audit import child_env, machine, pytest_args, run_child, write_checkpoint, write_images

from pytest_memaudit.pipeline.hardware import cpu_flags

CONTROLS = {"default": None, "none": "none"}  # None: the model's default, random and planted
QUICK = {"images": 4, "size": 16, "views": 2, "demo_samples": 24}


def cases(opts, workdir: Path) -> dict[str, dict]:
    """pytest_args' inputs for each audited model (its control aside)."""
    demo = dict(ckpt=None, data=None, size=None, holdout=None, model="demo")
    if opts.demo_samples:  # the demo's own data, sampled (its held-out set too)
        demo["samples"] = opts.demo_samples
    ckpt = write_checkpoint(workdir)
    members = write_images(workdir / f"members-{opts.images}x{opts.size}", opts.images, opts.size, seed=0)
    held_out = write_images(workdir / f"holdout-{opts.images}x{opts.size}", opts.images, opts.size, seed=1)
    var = dict(ckpt=ckpt, data=members, size=opts.size, holdout=held_out, model="var_d16")
    return {"demo": demo, f"var_d16 {opts.size}px": var}


def args_of(case: dict, control: str | None, views: int, out: Path, html: Path) -> list[str]:
    case = dict(case)
    samples = case.pop("samples", None)
    args = pytest_args(views=views, precision="float32", device="cpu", batch_size=None, out=out, control=control,
                       **case)
    return args + ["--memaudit-html", str(html)] + (["--memaudit-samples", str(samples)] if samples else [])


def benchmark(opts) -> dict:
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="memaudit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env()
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {}
    audited = cases(opts, workdir)
    for name, case in audited.items():  # untimed: caches the bytecode, as an installed package has it
        tiny = dict(case, samples=2) if name == "demo" else dict(case, size=16)
        run_child(args_of(tiny, "none", 0, workdir / "warm-up.json", workdir / "warm-up.html"),
                  workdir / "warm-up.log", env)
    for repeat in range(opts.repeats):
        for name, case in audited.items():
            for control, value in CONTROLS.items():
                tag = f"{name.replace(' ', '-')}-{control}-{repeat}"
                out, log = workdir / f"{tag}.json", workdir / f"{tag}.log"
                run = run_child(args_of(case, value, opts.views, out, workdir / f"{tag}.html"), log, env)
                if run["rc"] not in (0, 1) or not out.exists():  # 1: a gate failed, the audit ran
                    sys.exit(f"{tag} failed (exit {run['rc']}); log: {log}\n" + log.read_text()[-3000:])
                result = json.loads(out.read_text())
                run["audit_s"] = result["timing"]["wall_s"]
                run["controls"] = result["settings"]["control"]
                run["data_points"] = len(result["samples"])
                runs.setdefault((name, control), []).append(run)
                print(f"  {name} {control} #{repeat + 1}: {run['wall_s']:.1f} s (audit {run['audit_s']:.1f} s), "
                      f"controls {run['controls']}, {run['data_points']} data points", flush=True)
    rows = []
    for name in audited:
        default, none = runs[(name, "default")], runs[(name, "none")]
        rows.append({
            "model": name,
            "data_points": default[0]["data_points"],
            "controls": default[0]["controls"],
            "default_wall_s": statistics.median(r["wall_s"] for r in default),
            "none_wall_s": statistics.median(r["wall_s"] for r in none),
            "default_audit_s": statistics.median(r["audit_s"] for r in default),
            "none_audit_s": statistics.median(r["audit_s"] for r in none),
            "wall_ratios": [round(d["wall_s"] / n["wall_s"], 2) for d, n in zip(default, none)],
            "audit_ratios": [round(d["audit_s"] / n["audit_s"], 2) for d, n in zip(default, none)],
            "peak_mb": [statistics.median(r["peak_mb"] for r in default), statistics.median(r["peak_mb"] for r in none)],
        })
        rows[-1]["wall_ratio"] = rows[-1]["default_wall_s"] / rows[-1]["none_wall_s"]
        rows[-1]["audit_ratio"] = rows[-1]["default_audit_s"] / rows[-1]["none_audit_s"]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "command": "python benchmarks/bench_controls.py " + " ".join(opts.argv),
        "settings": {k: getattr(opts, k) for k in ("images", "size", "views", "demo_samples", "repeats")},
        "rows": rows,
        "load_average": [round(x, 2) for x in load_before + os.getloadavg()],
    }


def print_report(report: dict) -> None:
    print(f"\n{report['date']}  {report['machine']}  flags {report['cpu_flags']}\n{report['command']}")
    print(f"{'model':<14}{'points':>7}{'default s':>11}{'none s':>9}{'ratio':>7}{'audit s d/n':>15}{'ratio':>7}"
          "  per-repeat wall / audit ratios")
    for row in report["rows"]:
        print(f"{row['model']:<14}{row['data_points']:>7}{row['default_wall_s']:>11.1f}{row['none_wall_s']:>9.1f}"
              f"{row['wall_ratio']:>7.2f}{row['default_audit_s']:>8.1f}/{row['none_audit_s']:<6.1f}"
              f"{row['audit_ratio']:>7.2f}  {row['wall_ratios']} / {row['audit_ratios']}")
    print(f"default controls: {report['rows'][0]['controls']}; load average (1, 5, 15 min) before and after: "
          f"{report['load_average']}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24, help="var_d16: members, and as many held-out images")
    parser.add_argument("--size", type=int, default=64, help="var_d16's image size")
    parser.add_argument("--views", type=int, default=10, help="augmentations per image (0: one plain view)")
    parser.add_argument("--demo-samples", type=int, default=None,
                        help="demo: audit this many of its members and held-out images (default: all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help=f"CI-sized: {QUICK}")
    parser.add_argument("--workdir", help="keep inputs, logs and outputs here (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    opts = parser.parse_args(argv)
    opts.argv = argv
    if opts.quick:
        vars(opts).update(QUICK)
    return opts


def main(argv: list[str]) -> None:
    opts = parse(argv)
    report = benchmark(opts)
    print_report(report)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
