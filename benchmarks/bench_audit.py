"""Throughput of the project's audit against the seed's naive way, on the same model and images.

Run from the repository root::

    python benchmarks/bench_audit.py                 # var_d16, 48 images, 64x64, 10 views, CPU
    python benchmarks/bench_audit.py --quick         # CI-sized
    python benchmarks/bench_audit.py --target run_audit --device cuda --size 256 --precisions bfloat16

Every timed run is a child process of its own, so its wall time includes start-up (imports,
checkpoint loading) and its peak RSS (``os.wait4``: the largest of the process and its reaped
children, e.g. data-loader workers) is clean. The project is timed as a whole ``pytest audits/``
run (``--target pytest``) or as a bare ``run_audit`` call (``--target run_audit``). The naive
audit is written here, the seed's way: batch size 1, hooks that keep whole activation maps (all
views of an image, reduced per image in numpy), torchvision's transforms on the CPU per image and
view, numpy UnitMem at the end. The checkpoint is a full-width var_d16 encoder with random
weights (``tests/var_checkpoints.py``) and the images are seeded PNGs at the audited size, so
nothing is downloaded. Several repeats run interleaved; medians are reported. Children run with
Python's bytecode cache on, after one untimed warm-up run each (see ``child_env``), unless
``--no-bytecode-cache``; the bare forward passes are timed in a child too, under the same ``--isa``.

Augmentations are random in both, so the exact UnitMem difference is measured with 0
augmentations (in this process, untimed); the difference of the timed runs with augmentations is
a statistic of two independent draws. Fast precisions are compared with float32 on the same
views (the project's views are seeded per image).
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

import numpy as np

from pytest_memaudit.pipeline.hardware import cpu_flags

REPO = Path(__file__).resolve().parents[1]
QUICK = {"images": 4, "size": 16, "views": 2}


# --- inputs ---------------------------------------------------------------------------------


MEMORIZATION_GATES = ("membership_p_min", "membership_excess_max", "excess_over_control_max")


def write_checkpoint(workdir: Path) -> Path:
    """A full-width var_d16 encoder checkpoint with seeded random weights (cached in workdir)."""
    path = workdir / "vae_ch160v4096z32.pth"
    if not path.exists():
        sys.path.insert(0, str(REPO / "tests"))
        from var_checkpoints import write_var_checkpoint

        write_var_checkpoint(path, "encoder", seed=0)
    return path


def write_images(directory: Path, count: int, size: int, seed: int = 0, suffix: str = ".png",
                 shape: tuple[int, int] | None = None) -> Path:
    """``count`` seeded smooth-noise images, ``size`` x ``size`` or ``shape`` (height, width);
    cached by directory name."""
    from PIL import Image

    if directory.exists() and len(list(directory.iterdir())) == count:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    height, width = shape or (size, size)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        image.save(directory / f"img_{i:05d}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return directory


# --- child processes ------------------------------------------------------------------------


# Environment that makes PyTorch's own kernels and oneDNN's use at most this instruction set.
ISA_CAPS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def child_env(isa: str = "native", bytecode_cache: bool = True) -> dict[str, str]:
    """The children's environment: ``isa``'s caps, and Python's bytecode cache on unless told not to.

    Installed packages have their bytecode compiled and pytest caches its rewritten modules, so
    a user's run does not parse them again; a machine that sets PYTHONDONTWRITEBYTECODE (CI
    images often do) makes every run of ``pytest audits/`` parse and rewrite about 140 modules
    again (about 1.3 s here), a cost of that machine, not of the audit."""
    env = dict(os.environ) | ISA_CAPS[isa]
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_child(args: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> dict:
    """Run ``args`` to completion: wall and CPU seconds, peak RSS (MB) and exit status.

    The peak is ``ru_maxrss``, which Linux starts at this process's RSS when the child is spawned:
    a child's peak reads at least that (this process stays under 100 MB; bench_memory.py makes
    its model in a child for that reason)."""
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    return {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_mb": usage.ru_maxrss / 1024, "rc": process.returncode}


def pytest_args(ckpt, data, size, views, precision, device, batch_size, out, model="var_d16", control="none",
                holdout="none") -> list[str]:
    """A whole ``pytest audits/`` run. By default the work the naive pipeline does: the model alone (no
    control), on the members alone (no held-out set); ``None`` for ``ckpt``, ``data``, ``size``,
    ``control`` or ``holdout`` leaves that option to the model's default."""
    given = {"checkpoint": ckpt, "data": data, "image-size": size, "control": control, "holdout": holdout}
    args = [sys.executable, "-m", "pytest", "audits/", "-q", "-p", "no:cacheprovider", "--memaudit-model", model,
            *[arg for key, value in given.items() if value is not None for arg in (f"--memaudit-{key}", str(value))],
            "--memaudit-augmentations", str(views),
            "--memaudit-precision", precision, "--memaudit-device", device, "--memaudit-json", str(out),
            *[f"--memaudit-threshold={key}=off" for key in MEMORIZATION_GATES]]
    return args + (["--memaudit-batch-size", str(batch_size)] if batch_size else [])


def child_args(mode, ckpt, data, size, views, precision, device, batch_size, out) -> list[str]:
    args = [sys.executable, __file__, "--child", mode, "--checkpoint", str(ckpt), "--data", str(data),
            "--size", str(size), "--views", str(views), "--precision", precision, "--device", device,
            "--out", str(out)]
    return args + (["--batch-size", str(batch_size)] if batch_size else [])


def child_run_audit(ckpt, data, size, views, precision, device, batch_size, out, **extra) -> None:
    from pytest_memaudit.pipeline.audit import run_audit
    from pytest_memaudit.pipeline.settings import make_settings
    from pytest_memaudit.results.result import write_json_atomic

    settings = make_settings(model="var_d16", checkpoint=str(ckpt), data=str(data), image_size=size,
                             augmentations=views, precision=precision, device=device, batch_size=batch_size,
                             **extra)
    write_json_atomic(out, run_audit(settings).to_json())


def child_naive(ckpt, data, size, views, device, out, **_) -> None:
    started = time.perf_counter()
    values = naive_audit(ckpt, data, size, views, device)
    Path(out).write_text(json.dumps({"audit_s": time.perf_counter() - started, "layers": values}))


# --- the naive audit ------------------------------------------------------------------------


def naive_audit(ckpt, data, size: int, views: int, device: str = "cpu", seed: int = 0) -> dict:
    """The seed's way: {layer name: {"unitmem": [...], "max_sample": [...]}} (mean reduction)."""
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from pytest_memaudit.models import var_layer_specs
    from pytest_memaudit.models.var import build_var_d16

    torch.manual_seed(seed)
    model = build_var_d16(ckpt).eval().to(device)
    modules = dict(model.named_modules())
    kept: dict[str, list[np.ndarray]] = {}

    def keep(name):
        def hook(module, inputs, output):
            # A copy: norm_out's output is overwritten by the in-place SiLU after the hook.
            kept[name].append(output.detach().cpu().numpy().copy())

        return hook

    for layer in var_layer_specs():
        kept[layer.name] = []
        modules[layer.module].register_forward_hook(keep(layer.name))
    augment = T.Compose([
        T.RandomApply([T.RandomHorizontalFlip()], p=0.5),
        T.RandomApply([T.ColorJitter(0.9, 0.9, 0.9, 0.1)], p=0.9),
        T.RandomGrayscale(p=0.1),
        T.Resize((size, size)),
        T.Lambda(lambda x: x * 2 - 1),
    ])
    plain = T.Compose([T.Resize((size, size)), T.Lambda(lambda x: x * 2 - 1)])
    rows: dict[str, list[np.ndarray]] = {name: [] for name in kept}
    for path in sorted(Path(data).iterdir()):
        with Image.open(path) as file:
            image = T.ToTensor()(file.convert("RGB"))
        for _ in range(max(views, 1)):
            x = (augment if views else plain)(image).unsqueeze(0).to(device)
            with torch.no_grad():
                model(x)
        for name, maps in kept.items():
            rows[name].append(np.abs(np.concatenate(maps)).mean(axis=(2, 3)).mean(axis=0))
            maps.clear()
    return {name: naive_unitmem(np.array(r, dtype=np.float64)) for name, r in rows.items()}


def naive_unitmem(a: np.ndarray) -> dict:
    """UnitMem (mean reduction) of an (images, units) matrix, straight from the spec."""
    top = a.argmax(axis=0)
    mu_max = a.max(axis=0)
    mu_rest = (a.sum(axis=0) - mu_max) / (len(a) - 1)
    total = mu_max + mu_rest
    unitmem = np.where(total == 0, 0.0, (mu_max - mu_rest) / np.where(total == 0, 1.0, total))
    return {"unitmem": unitmem.tolist(), "max_sample": top.tolist()}


# --- comparisons ----------------------------------------------------------------------------


def layer_values(document: dict) -> dict:
    """{layer: (unitmem, max_sample)} of a project JSON or a naive child's output."""
    if isinstance(document["layers"], dict):
        items = document["layers"].items()
    else:
        items = ((layer["name"], layer) for layer in document["layers"])
    return {name: (np.array(v["unitmem"], dtype=np.float64), np.array(v["max_sample"])) for name, v in items}


def compare(a: dict, b: dict) -> dict:
    """Largest and mean |dUnitMem| over all units, and the fraction of units with the same argmax."""
    diffs = np.concatenate([np.abs(a[name][0] - b[name][0]) for name in a])
    agree = np.concatenate([a[name][1] == b[name][1] for name in a])
    return {"max_abs_d": float(diffs.max()), "mean_abs_d": float(diffs.mean()), "argmax_agree": float(agree.mean())}


def exact_difference(ckpt, data, size, device, batch_size) -> dict:
    """Project against naive with 0 augmentations (the same views in both), in this process."""
    from pytest_memaudit.pipeline.audit import run_audit
    from pytest_memaudit.pipeline.settings import make_settings

    settings = make_settings(model="var_d16", checkpoint=str(ckpt), data=str(data), image_size=size,
                             augmentations=0, device=device, batch_size=batch_size)
    project = layer_values(run_audit(settings).to_json())
    return compare(project, layer_values({"layers": naive_audit(ckpt, data, size, 0, device)}))


def child_bare_forward(ckpt, size, device, out, configs, **_) -> None:
    Path(out).write_text(json.dumps(bare_forward_ms(ckpt, size, device, configs)))


def bare_forward_ms(ckpt, size, device, configs, passes=3) -> dict:
    """Median ms per view of the encoder's forward alone (no hooks), after one warm-up pass, for
    each {label: (batch, precision, channels_last)}. Run in a child (``--child bare``), so that it
    runs under the same ``--isa`` as the audits."""
    import torch

    from pytest_memaudit.pipeline.device import precision_mode
    from pytest_memaudit.models.var import build_var_d16

    dev = torch.device(device)
    model = build_var_d16(ckpt).eval().requires_grad_(False).to(dev)
    results = {}
    for label, (batch, precision, channels_last) in configs.items():
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=layout)
        x = (torch.rand(batch, 3, size, size, device=dev) * 2 - 1).contiguous(memory_format=layout)
        times = []
        with torch.inference_mode(), precision_mode(precision, dev):
            for _ in range(passes + 1):
                started = time.perf_counter()
                model(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - started)
        results[label] = statistics.median(times[1:]) / batch * 1000
    return results


# --- the benchmark --------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def benchmark(opts) -> dict:
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="memaudit-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Path(opts.checkpoint) if opts.checkpoint else write_checkpoint(workdir)
    data = write_images(workdir / f"images-{opts.images}x{opts.size}", opts.images, opts.size)
    common = dict(ckpt=ckpt, data=data, size=opts.size, views=opts.views, device=opts.device,
                  batch_size=opts.batch_size)
    load_before = os.getloadavg()

    env = child_env(opts.isa, not opts.no_bytecode_cache)

    def args_of(name: str, out: Path, **inputs) -> list[str]:
        if name == "naive":
            return child_args("naive", precision="float32", out=out, **inputs)
        if opts.target == "pytest":
            return pytest_args(precision=name, out=out, **inputs)
        return child_args("run_audit", precision=name, out=out, **inputs)

    runs = {"naive": []} | {p: [] for p in opts.precisions}
    if not opts.no_bytecode_cache:  # untimed: caches the bytecode, as an installed package has it
        tiny = write_images(workdir / "images-2x16", 2, 16)
        for name in runs:
            run_child(args_of(name, workdir / f"warm-up-{name}.json", **(common | {"data": tiny, "size": 16, "views": 0})),
                      workdir / f"warm-up-{name}.log", env)
    outputs = {}
    for repeat in range(opts.repeats):
        for name in runs:
            out = workdir / f"{name}-{repeat}.json"
            run = run_child(args_of(name, out, **common), workdir / f"{name}-{repeat}.log", env)
            if run["rc"] not in (0, 1) or not out.exists():  # 1: a layer crossed a threshold
                sys.exit(f"{name} run failed (exit {run['rc']}); log: {workdir / f'{name}-{repeat}.log'}\n"
                         + (workdir / f"{name}-{repeat}.log").read_text()[-3000:])
            runs[name].append(run)
            outputs[name] = json.loads(out.read_text())
            print(f"  {name} #{repeat + 1}: {run['wall_s']:.1f} s, peak {run['peak_mb']:.0f} MB", flush=True)

    views = opts.images * max(opts.views, 1)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "isa": opts.isa,  # "avx2": the children ran as on an AVX2-only CPU
        "bytecode_cache": not opts.no_bytecode_cache,
        "command": "python benchmarks/bench_audit.py " + " ".join(opts.argv),
        "settings": {k: getattr(opts, k) for k in ("images", "size", "views", "device", "target", "repeats",
                                                    "batch_size")},
        "views": views,
        "runs": {},
    }
    naive_s = statistics.median(r["wall_s"] for r in runs["naive"])
    for name, measured in runs.items():
        wall = statistics.median(r["wall_s"] for r in measured)
        entry = {
            "wall_s": wall,
            "walls_s": [round(r["wall_s"], 2) for r in measured],
            "views_per_s": views / wall,
            "ratio_vs_naive": naive_s / wall,
            # each repeat against the naive run just before it: less exposed to load that comes and goes
            "ratios_per_repeat": [round(n["wall_s"] / r["wall_s"], 3) for n, r in zip(runs["naive"], measured)],
            "cpu_s": statistics.median(r["cpu_s"] for r in measured),
            "peak_mb": statistics.median(r["peak_mb"] for r in measured),
        }
        if name == "naive":
            entry["audit_s"] = outputs[name]["audit_s"]
        else:
            entry["audit_s"] = outputs[name]["timing"]["wall_s"]
            entry["settings_precision"] = outputs[name]["settings"]["precision"]
        report["runs"][name] = entry

    naive = layer_values(outputs["naive"])
    base = layer_values(outputs[opts.precisions[0]])
    report["augmented_vs_naive"] = compare(base, naive)  # independent random views: a statistic
    report["exact_vs_naive"] = exact_difference(ckpt, data, opts.size, opts.device, opts.batch_size)
    report["precision_vs_" + opts.precisions[0]] = {
        p: compare(layer_values(outputs[p]), base) for p in opts.precisions[1:]
    }
    per_image = max(opts.views, 1)  # the project's views per forward pass: whole images' views
    batch = max(1, (opts.batch_size or (256 if opts.device.startswith("cuda") else 32)) // per_image) * per_image
    configs = {"naive (batch 1, float32)": (1, "float32", False),
               **{f"project (batch {batch}, {p})": (batch, p, True) for p in opts.precisions}}
    bare = workdir / "bare-forward.json"
    run_child([sys.executable, __file__, "--child", "bare", "--checkpoint", str(ckpt), "--size", str(opts.size),
               "--device", opts.device, "--out", str(bare), "--extra", json.dumps({"configs": configs})],
              workdir / "bare-forward.log", env)
    report["bare_forward_ms_per_view"] = json.loads(bare.read_text())
    report["load_average"] = [round(x, 2) for x in load_before + os.getloadavg()]
    return report


def print_report(report: dict) -> None:
    print(f"\n{report['date']}  {report['machine']}  flags {report['cpu_flags']}  isa {report['isa']}  "
          f"bytecode cache {report['bytecode_cache']}\n"
          f"{report['command']}")
    print(f"{report['views']} views per run; medians of {report['settings']['repeats']} interleaved repeat(s)")
    print(f"{'run':<10}{'wall s':>9}{'views/s':>10}{'vs naive':>10}{'CPU s':>9}{'peak MB':>10}{'audit s':>9}"
          "  per-repeat ratios")
    for name, run in report["runs"].items():
        print(f"{name:<10}{run['wall_s']:>9.1f}{run['views_per_s']:>10.2f}{run['ratio_vs_naive']:>9.2f}x"
              f"{run['cpu_s']:>9.1f}{run['peak_mb']:>10.0f}{run['audit_s']:>9.1f}  {run['ratios_per_repeat']}")
    print("bare forward, ms per view: "
          + ", ".join(f"{k}: {v:.1f}" for k, v in report["bare_forward_ms_per_view"].items()))
    exact, aug = report["exact_vs_naive"], report["augmented_vs_naive"]
    print(f"|dUnitMem| project vs naive, 0 augmentations: max {exact['max_abs_d']:.2e}, "
          f"argmax agreement {exact['argmax_agree']:.4f}")
    print(f"|dUnitMem| project vs naive, independent augmented views: max {aug['max_abs_d']:.3f}, "
          f"mean {aug['mean_abs_d']:.4f}, argmax agreement {aug['argmax_agree']:.3f}")
    for key, modes in report.items():
        if key.startswith("precision_vs_"):
            for mode, c in modes.items():
                print(f"{mode} vs {key.removeprefix('precision_vs_')} (same views): max |dUnitMem| "
                      f"{c['max_abs_d']:.2e}, mean {c['mean_abs_d']:.2e}, argmax agreement {c['argmax_agree']:.4f}")
    print(f"load average (1, 5, 15 min) before and after: {report['load_average']}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", type=int, default=10, help="augmentations per image (0: one plain view)")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="float32 first, then the fast modes to compare (default: float32 bfloat16, "
                             "plus tf32 on CUDA)")
    parser.add_argument("--target", choices=("pytest", "run_audit"), default="pytest")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="views per forward pass (default: the project's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), default="native",
                        help="run every child as on a CPU with at most this instruction set (avx2: an AVX2-only "
                             "CPU, through ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep the environment's PYTHONDONTWRITEBYTECODE and skip the warm-up runs: every "
                             "child parses (and pytest rewrites) its modules again")
    parser.add_argument("--quick", action="store_true", help=f"CI-sized: {QUICK}")
    parser.add_argument("--workdir", help="keep inputs and logs here (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--checkpoint", help="var_d16 checkpoint (default: a generated one, random weights)")
    # child mode (internal)
    parser.add_argument("--child", choices=("naive", "run_audit", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.argv = argv
    if opts.quick:
        vars(opts).update(QUICK)
    if opts.precisions is None:
        opts.precisions = ["float32", "bfloat16"] + (["tf32"] if opts.device.startswith("cuda") else [])
    return opts


def main(argv: list[str]) -> None:
    opts = parse(argv)
    if opts.child == "bare":
        child_bare_forward(ckpt=opts.checkpoint, size=opts.size, device=opts.device, out=opts.out,
                           **json.loads(opts.extra))
        return
    if opts.child:
        child = child_naive if opts.child == "naive" else child_run_audit
        child(ckpt=opts.checkpoint, data=opts.data, size=opts.size, views=opts.views, precision=opts.precision,
              device=opts.device, batch_size=opts.batch_size, out=opts.out, **json.loads(opts.extra))
        return
    report = benchmark(opts)
    print_report(report)
    if opts.json:
        opts.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
