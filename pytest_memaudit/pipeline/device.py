"""Where and how an audit computes: the device, its float32 math, its memory failures, its clock.

- ``resolve_device`` turns ``--memaudit-device`` into a ``torch.device`` (or a clear error), and
  ``selected_device`` makes a CUDA device the current one while an audit runs on it.
- ``precision_mode`` sets what ``--memaudit-precision`` means on that device, and puts the
  user's settings back afterwards.
- ``is_out_of_memory`` tells a batch that is too large from any other failure.
- ``ForwardTimer`` adds up the seconds the forward passes take.
- ``faster_layout`` times a forward pass in both memory layouts and picks the faster;
  ``time_precisions`` times one in float32 and in bfloat16.
- ``intra_op_threads`` sizes torch's CPU thread pool from the CPUs the process may use, and
  ``cpu_threads`` holds it there while an audit runs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import torch

from ..errors import AuditError
from .settings import PRECISIONS

# How convolutions and matrix products on float32 tensors compute, per precision: "ieee" is
# float32 itself; "tf32" rounds their inputs to 10 mantissa bits (NVIDIA tensor cores).
# bfloat16 autocasts both to bfloat16, and what autocast leaves in float32 stays float32.
_FP32_MATH = {"float32": "ieee", "bfloat16": "ieee", "tf32": "tf32"}

# Messages of plain RuntimeErrors that mean a CUDA library could not allocate device memory.
_OUT_OF_MEMORY_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; CUDA devices always carry an index.

    ``auto`` and ``cuda`` mean the current CUDA device (``torch.cuda.current_device()``). Nothing
    global changes here: run the audit inside ``selected_device``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise AuditError(f"--memaudit-device {name!r} is not a device: use auto, cpu, cuda or cuda:N (N from 0)")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AuditError(
            f"--memaudit-device {name}: CUDA is not available here (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Use --memaudit-device cpu or auto."
        )
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if device.index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        restricted = f" (CUDA_VISIBLE_DEVICES={visible!r} limits which GPUs this process sees)" if visible else ""
        raise AuditError(
            f"--memaudit-device {name}: this process sees {count} CUDA device(s){restricted}, "
            f"numbered cuda:0 to cuda:{count - 1}. Use one of those, or cuda for the current one."
        )
    return device


def process_device(name: str, local_rank: int = 0, local_size: int = 1) -> torch.device:
    """The device of process ``local_rank`` of the ``local_size`` processes an audit runs on one
    machine (a torchrun launch). Alone, as ``resolve_device``. Several: ``auto`` and ``cuda`` give
    process i the GPU cuda:i, or cuda:0 when each process sees a single GPU (its own, as a
    launcher that binds one GPU per task sets it up); ``cpu`` is the CPU for all of them."""
    if local_size == 1:
        return resolve_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise AuditError(
            f"--memaudit-device {name} names one GPU, but {local_size} processes of the audit run on this machine: "
            "use --memaudit-device cuda (process i of a machine takes cuda:i)"
        )
    resolve_device("cuda")  # CUDA must work at all
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if count < local_size:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        restricted = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible else ""
        raise AuditError(
            f"--memaudit-device {name}: {local_size} processes run on this machine and each needs a GPU of its own, "
            f"but process {local_rank} sees {count} GPUs{restricted}. Start at most {count} processes per machine "
            f"(torchrun --nproc_per_node {count})."
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def selected_device(device: torch.device) -> Iterator[None]:
    """Make a CUDA ``device`` the current CUDA device for the block; restore the previous one.

    Work that names no device goes to the current one: the data loader's pinning thread, new
    streams, ``torch.cuda.empty_cache``. Without this, a ``cuda:1`` audit would also create a
    context (and allocate memory) on GPU 0. On the CPU this does nothing.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.current_device()
    torch.cuda.set_device(device)
    try:
        yield
    finally:
        torch.cuda.set_device(previous)


def _fp32_math_flags(device: torch.device) -> tuple:
    """The settings of float32 convolutions and matrix products on ``device``'s backend."""
    backends = torch.backends
    if device.type == "cuda":
        return backends.cudnn.conv, backends.cuda.matmul
    return backends.mkldnn.conv, backends.mkldnn.matmul


def check_precision(precision: str, device: torch.device) -> None:
    """An AuditError if ``precision`` cannot run on ``device``."""
    if precision not in PRECISIONS:
        raise AuditError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise AuditError("--memaudit-precision tf32 needs a CUDA device; on the CPU use float32 or bfloat16")


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """Compute the block's forward passes in ``precision`` on ``device``.

    ``float32`` is IEEE float32 on every device: PyTorch lets cuDNN convolutions use TF32 (10
    of float32's 23 mantissa bits) by default, and a user may have let matrix products use
    TF32 or bfloat16. ``tf32`` (CUDA only) allows TF32 for both; ``bfloat16`` autocasts to
    bfloat16, and the other two turn off an autocast the caller may have on. On CUDA,
    ``cudnn.benchmark`` is on (the shapes repeat, so the search for the fastest convolution
    pays off). Only the per-operation ``fp32_precision`` settings are read and written:
    reading the legacy ``allow_tf32`` flags raises once anything in the process has used the
    new ones. Everything is restored on exit.
    """
    check_precision(precision, device)
    flags = _fp32_math_flags(device)
    saved_math = [flag.fp32_precision for flag in flags]
    saved_benchmark = torch.backends.cudnn.benchmark
    try:
        for flag in flags:
            flag.fp32_precision = _FP32_MATH[precision]
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            yield
    finally:
        for flag, value in zip(flags, saved_math):
            flag.fp32_precision = value
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = saved_benchmark


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory, so that a smaller batch may fit.

    PyTorch's allocator raises ``torch.cuda.OutOfMemoryError``; cuDNN and cuBLAS failing to
    allocate their workspace, and CUDA calls outside the allocator, raise plain RuntimeErrors.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(message in str(exc) for message in _OUT_OF_MEMORY_MESSAGES)


class ForwardTimer:
    """Seconds spent inside ``with timer:`` blocks, added up in ``seconds``.

    CUDA runs kernels after the host queued them, so on a CUDA device the block is timed
    between two ``torch.cuda.synchronize`` calls: the work queued before it is not counted, and
    the work it queued is. A block that raises is counted without waiting for its device work.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> "ForwardTimer":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._started


def time_precisions(run: Callable[[], None], device: torch.device,
                    precisions: tuple[str, ...] = ("float32", "bfloat16")) -> dict[str, float]:
    """Seconds of one forward pass (``run``) in each of ``precisions`` on ``device``, each timed
    after a warm-up pass in every precision (the first pass creates the kernels)."""
    for precision in precisions:
        with precision_mode(precision, device):
            run()
    seconds = {}
    for precision in precisions:
        timer = ForwardTimer(device)
        with precision_mode(precision, device), timer:
            run()
        seconds[precision] = timer.seconds
    return seconds


def intra_op_threads(cpus: int, processes_here: int, current: int,
                     environment: dict[str, str] | None = None) -> tuple[int, str]:
    """torch's intra-op threads for an audit, and why: ``current`` (torch's own choice, by default
    the cores it sees) at most, and at most this process's share of the ``cpus`` it may use
    (``hardware.usable_cpus``), shared by the ``processes_here`` processes of a launch on this
    machine. More threads than CPUs never compute faster: they wait for each other at every
    operation, which on a throttled or busy machine makes an audit many times slower. An
    ``OMP_NUM_THREADS`` in the environment (torchrun sets 1) is the user's choice and is kept."""
    environment = os.environ if environment is None else environment
    if environment.get("OMP_NUM_THREADS"):
        return current, f"OMP_NUM_THREADS={environment['OMP_NUM_THREADS']}"
    share = max(1, cpus // processes_here)
    if current <= share:
        return current, f"torch's default, within {cpus} usable CPU(s)" + (
            f" shared by {processes_here} processes" if processes_here > 1 else "")
    return share, f"{cpus} usable CPU(s)" + (f" shared by {processes_here} processes" if processes_here > 1 else "") \
        + f" (torch would use {current})"


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block, and put back afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}


def faster_layout(run: Callable[[torch.memory_format], None], device: torch.device,
                  repeats: int = 3) -> tuple[torch.memory_format, dict[str, float]]:
    """The faster memory layout for ``run`` (one forward pass with its inputs and weights in the
    layout it is given) on ``device``, and the seconds per pass of each, timed after a warm-up pass
    (on CUDA the warm-up is when cuDNN searches its algorithms). Channels-last is faster for
    convolutions on the CPU, but on CUDA GroupNorm computes in NCHW and may copy each input to
    NCHW and back, so which one wins depends on the model and the device."""
    seconds = {}
    for name, layout in LAYOUTS.items():
        run(layout)
        timer = ForwardTimer(device)
        for _ in range(repeats):
            with timer:
                run(layout)
        seconds[name] = timer.seconds / repeats
    return LAYOUTS[min(seconds, key=seconds.get)], seconds
