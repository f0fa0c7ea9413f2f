"""What the machine offers: physical memory, the CPUs this process may use, CPU features, and
whether bfloat16 runs natively.

Imports no torch until a question needs it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def physical_memory_bytes() -> int | None:
    """The machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, str]:
    """The CPUs this process may keep busy, and where that number comes from: its affinity mask (what
    taskset or a job scheduler sets), lowered to its cgroup's CPU quota rounded up (what a container's
    ``--cpus`` or a Kubernetes CPU limit sets). A container on a 64-core host with a 2-CPU quota sees
    64 cores; 64 threads there are throttled to 2 CPUs' worth of time and mostly wait."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is None:
        return affinity, f"{affinity} CPU(s) in this process's affinity mask, no cgroup CPU quota"
    cpus = max(1, math.ceil(quota))
    if cpus >= affinity:
        return affinity, f"{affinity} CPU(s) in this process's affinity mask (cgroup CPU quota {quota:g})"
    return cpus, f"{cpus} CPU(s): the cgroup's CPU quota is {quota:g} CPUs (affinity mask: {affinity})"


def passive_openmp_waits() -> bool:
    """Let torch's OpenMP threads sleep while they wait for each other, unless the user chose how
    (``OMP_WAIT_POLICY``). By default they spin first; on a machine busy with other jobs the spinning
    threads take the CPU from the ones with work, and a forward pass with 2 threads took 6-8 times
    longer than with sleeping threads (benchmarks/RESULTS.md, "Busy machines"). OpenMP reads the
    setting when torch is first imported, so it works only before that; returns whether it did."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The smallest CPU quota, in CPUs, of this process's cgroup and the cgroups above it (a limit
    applies to everything below it): cgroup v2's ``cpu.max``, or v1's ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``. None when no quota is set or none can be read. Inside a container the
    path in /proc/self/cgroup may be the host's; walking up to the mount point finds its own."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        relative = Path(path.lstrip("/"))
        if controllers == "":  # v2: one hierarchy, controllers inside it
            bases, read = [cgroup_root], _v2_quota
        elif "cpu" in controllers.split(","):
            bases, read = [cgroup_root / controllers, cgroup_root / "cpu"], _v1_quota
        else:
            continue
        for base in bases:
            for folder in [base / relative, *(base / relative).parents]:
                quota = read(folder)
                if quota is not None:
                    quotas.append(quota)
                if folder == base:
                    break
    return min(quotas, default=None)


def _read_numbers(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_quota(folder: Path) -> float | None:
    fields = _read_numbers(folder / "cpu.max")  # "max 100000" or "150000 100000"
    try:
        return int(fields[0]) / int(fields[1]) if fields and fields[0] != "max" and int(fields[1]) > 0 else None
    except (ValueError, IndexError):
        return None


def _v1_quota(folder: Path) -> float | None:
    quota, period = _read_numbers(folder / "cpu.cfs_quota_us"), _read_numbers(folder / "cpu.cfs_period_us")
    try:
        return int(quota[0]) / int(period[0]) if quota and period and int(quota[0]) > 0 and int(period[0]) > 0 \
            else None  # -1: no quota
    except (ValueError, IndexError):
        return None


def _read_cpuinfo() -> str | None:
    """Linux's /proc/cpuinfo (None elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _first_field(cpuinfo: str, *names: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return None


def _cpu_model_and_flags() -> tuple[str | None, set[str] | None]:
    cpuinfo = _read_cpuinfo()
    if cpuinfo is None:
        return None, None
    flags = _first_field(cpuinfo, "flags", "Features")  # x86, Arm
    return _first_field(cpuinfo, "model name"), set(flags.split()) if flags is not None else None


def cpu_flags() -> dict[str, object]:
    """The CPU for benchmark records: its model name and whether it has AVX2, AVX-512F, AVX512_BF16 and
    AMX (None where /proc/cpuinfo cannot tell)."""
    model, flags = _cpu_model_and_flags()
    has = (lambda *names: any(name in flags for name in names)) if flags is not None else (lambda *names: None)
    return {"model": model, "avx2": has("avx2"), "avx512f": has("avx512f"), "avx512_bf16": has("avx512_bf16"),
            "amx": has("amx_bf16", "amx_tile")}


_BF16_FLAGS = {"avx512_bf16": "AVX512_BF16", "amx_bf16": "AMX", "bf16": "Arm BF16"}


def bf16_native(device) -> tuple[bool, str]:
    """Whether ``device`` (a torch.device or its name) computes in bfloat16 natively, and why.

    Without native support torch emulates bfloat16 through float32 conversions, which on a CPU with
    AVX2 only is several times slower than plain float32. A CPU is native with AVX512_BF16, AMX or
    Arm's BF16 (from /proc/cpuinfo; elsewhere torch's oneDNN check), a GPU from compute capability 8.0.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        why = f"the GPU ({torch.cuda.get_device_name(device)}) has compute capability {major}.{minor}"
        return (major, minor) >= (8, 0), why + ("" if major >= 8 else " (bfloat16 needs 8.0)")
    model, flags = _cpu_model_and_flags()
    if flags is None:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return native, f"torch's oneDNN says the CPU {'supports' if native else 'does not support'} bfloat16"
    found = [label for flag, label in _BF16_FLAGS.items() if flag in flags]
    cpu = f"the CPU ({model or 'unknown model'})"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if found and cap and cap not in ("ALL", "DEFAULT") and "BF16" not in cap and "AMX" not in cap:
        return False, f"{cpu} has {', '.join(found)}, but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from using it"
    if found:
        return True, f"{cpu} has {', '.join(found)}"
    return False, f"{cpu} has no bfloat16 instructions (AVX512_BF16, AMX or Arm BF16)"


BF16_NOISE = 0.05  # a single timed pass: bfloat16 within 5% of float32 is not called slower


def precision_notes(precision: str, device, seconds: dict[str, float] | None) -> list[str]:
    """A note for the results when bfloat16 was asked for and measured slower than float32 on
    ``device``, and by how much. ``seconds``: a forward pass of the same views in each precision
    (``device.time_precisions``). Measured, not judged from the CPU's flags: a CPU whose flags say
    bfloat16 is native (AVX512_BF16 without AMX) can still run a model slower in it than in float32."""
    if precision != "bfloat16":
        return []
    float32, bfloat16 = seconds["float32"], seconds["bfloat16"]
    if bfloat16 <= float32 * (1 + BF16_NOISE):
        return []
    _, why = bf16_native(device)
    return [f"--memaudit-precision bfloat16: bfloat16 is slower than float32 here: a forward pass of the audit's "
            f"views took {1000 * bfloat16:.0f} ms in bfloat16 against {1000 * float32:.0f} ms in float32 "
            f"({bfloat16 / float32 - 1:.0%} slower; {why}); use --memaudit-precision float32"]
