"""Device choice, precision settings, out-of-memory detection and forward timing, on the CPU.

The CUDA paths run here with ``torch.cuda`` functions patched: what they check is which
settings and calls the audit makes, not what a GPU does with them.
"""

import pytest
import torch

from pytest_memaudit.pipeline import device as device_module
from pytest_memaudit.pipeline.device import (
    ForwardTimer,
    is_out_of_memory,
    precision_mode,
    resolve_device,
    selected_device,
)
from pytest_memaudit.errors import AuditError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
BACKENDS = torch.backends
# The per-operation float32 settings (the current API) that the audit may change.
FLAGS = {
    "cudnn.conv": BACKENDS.cudnn.conv,
    "cuda.matmul": BACKENDS.cuda.matmul,
    "mkldnn.conv": BACKENDS.mkldnn.conv,
    "mkldnn.matmul": BACKENDS.mkldnn.matmul,
}


def flag_values() -> dict[str, str]:
    return {name: flag.fp32_precision for name, flag in FLAGS.items()} | {"benchmark": BACKENDS.cudnn.benchmark}


# Every level of the float32 settings, parents first (setting a parent overwrites its children).
# The fixture uses torch._C directly: torch.backends.mkldnn.fp32_precision's setter writes the
# generic level, not oneDNN's.
LEVELS = [("generic", "all"), ("cuda", "all"), ("mkldnn", "all")] + [
    (backend, op) for backend in ("cuda", "mkldnn") for op in ("matmul", "conv", "rnn")
]


@pytest.fixture(autouse=True)
def restore_backend_flags():
    """Tests set flags as a user would; put them all back so later tests see PyTorch's defaults."""
    saved = [torch._C._get_fp32_precision_getter(*level) for level in LEVELS]
    benchmark = BACKENDS.cudnn.benchmark
    yield
    for level, value in zip(LEVELS, saved):
        torch._C._set_fp32_precision_setter(*level, value)
    BACKENDS.cudnn.benchmark = benchmark


@pytest.fixture
def two_gpus(monkeypatch):
    """A process that sees two CUDA devices, the current one being cuda:1."""
    current = [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.__setitem__(0, torch.device(device).index))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return current


# --- resolve_device and selected_device ------------------------------------------------------


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == CPU
    with pytest.raises(AuditError, match=r"cuda:1: CUDA is not available.*Use --memaudit-device cpu or auto"):
        resolve_device("cuda:1")


def test_cuda_names_get_the_current_device_index(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == CPU
    assert two_gpus == [1]  # resolving changes nothing


def test_an_ordinal_past_the_device_count_is_a_clear_error(two_gpus, monkeypatch):
    with pytest.raises(AuditError, match=r"cuda:2: this process sees 2 CUDA device\(s\), numbered cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(AuditError, match=r"CUDA_VISIBLE_DEVICES='3,5' limits which GPUs"):
        resolve_device("cuda:7")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "mps", "meta", ""])
def test_a_name_that_is_no_audit_device_is_a_clear_error(name, two_gpus):
    with pytest.raises(AuditError, match="is not a device: use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_selected_device_is_current_inside_and_the_previous_one_after(two_gpus):
    two_gpus[0] = 0
    with selected_device(torch.device("cuda", 1)):
        assert torch.cuda.current_device() == 1
    assert two_gpus == [0]
    with pytest.raises(ValueError), selected_device(torch.device("cuda", 1)):
        raise ValueError
    assert two_gpus == [0]


def test_selected_device_leaves_cuda_alone_for_the_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("CUDA touched for a CPU audit")

    monkeypatch.setattr(torch.cuda, "set_device", fail)
    monkeypatch.setattr(torch.cuda, "current_device", fail)
    with selected_device(CPU):
        pass


# --- precision_mode --------------------------------------------------------------------------

DEFAULTS = flag_values()  # PyTorch's, read at import: cuDNN convolutions are TF32 unless told


def test_pytorch_lets_cudnn_convolutions_use_tf32_by_default():
    assert DEFAULTS["cudnn.conv"] == "tf32" and DEFAULTS["benchmark"] is False


def test_float32_on_cuda_is_ieee_with_benchmark_and_restores_the_defaults():
    with precision_mode("float32", CUDA):
        inside = flag_values()
    assert inside == DEFAULTS | {"cudnn.conv": "ieee", "cuda.matmul": "ieee", "benchmark": True}
    assert flag_values() == DEFAULTS


def test_float32_on_the_cpu_is_ieee_for_onednn_and_leaves_cuda_alone():
    with precision_mode("float32", CPU):
        inside = flag_values()
    assert inside == DEFAULTS | {"mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"}
    assert flag_values() == DEFAULTS


def test_tf32_on_cuda_sets_convolutions_and_matrix_products():
    with precision_mode("tf32", CUDA):
        inside = flag_values()
    assert inside == DEFAULTS | {"cudnn.conv": "tf32", "cuda.matmul": "tf32", "benchmark": True}
    assert flag_values() == DEFAULTS


def test_tf32_needs_cuda_and_unknown_precisions_are_errors():
    with pytest.raises(AuditError, match="tf32 needs a CUDA device"), precision_mode("tf32", CPU):
        pass
    with pytest.raises(AuditError, match="'float16' is not one of float32, bfloat16, tf32"):
        with precision_mode("float16", CPU):
            pass
    assert flag_values() == DEFAULTS


def test_bfloat16_autocasts_and_float32_turns_a_callers_autocast_off():
    a = torch.ones(2, 2)
    with precision_mode("bfloat16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16), precision_mode("float32", CPU):
        assert (a @ a).dtype == torch.float32


def test_restored_on_error():
    with pytest.raises(ValueError), precision_mode("tf32", CUDA):
        raise ValueError
    assert flag_values() == DEFAULTS


def legacy_flags() -> tuple:
    return BACKENDS.cudnn.allow_tf32, BACKENDS.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()


def test_settings_the_user_made_with_the_legacy_api_still_read_the_same_after():
    BACKENDS.cudnn.allow_tf32 = False
    BACKENDS.cuda.matmul.allow_tf32 = True
    before = legacy_flags()
    for precision, device in (("float32", CUDA), ("tf32", CUDA), ("float32", CPU)):
        with precision_mode(precision, device):
            pass
        assert legacy_flags() == before == (False, True, "high"), (precision, device)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # bfloat16 autocast for CUDA, on this CPU
def test_settings_the_user_made_with_the_current_api_are_kept_and_nothing_raises():
    # The state that crashed the old tf32 mode: reading a legacy allow_tf32 flag now raises.
    BACKENDS.cuda.matmul.fp32_precision = "tf32"
    BACKENDS.cudnn.conv.fp32_precision = "ieee"
    BACKENDS.mkldnn.matmul.fp32_precision = "bf16"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        BACKENDS.cudnn.allow_tf32
    user = flag_values()
    expected = {
        ("float32", CUDA): {"cudnn.conv": "ieee", "cuda.matmul": "ieee", "benchmark": True},
        ("tf32", CUDA): {"cudnn.conv": "tf32", "cuda.matmul": "tf32", "benchmark": True},
        ("bfloat16", CUDA): {"cudnn.conv": "ieee", "cuda.matmul": "ieee", "benchmark": True},
        ("float32", CPU): {"mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"},
        ("bfloat16", CPU): {"mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"},
    }
    for (precision, device), changed in expected.items():
        with precision_mode(precision, device):
            assert flag_values() == user | changed, (precision, device)
        assert flag_values() == user, (precision, device)


# --- is_out_of_memory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("GET was unable to find an engine to execute this computation; cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    ],
)
def test_device_memory_failures_are_out_of_memory(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        RuntimeError("CUDA error: device-side assert triggered"),
        ValueError("CUDA out of memory"),  # not an error torch raises
        MemoryError(),
    ],
)
def test_other_errors_are_not(exc):
    assert not is_out_of_memory(exc)


# --- ForwardTimer ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, events, readings):
        self.events, self.readings = events, iter(readings)

    def __call__(self):
        self.events.append("clock")
        return next(self.readings)


def test_timer_adds_up_the_blocks_on_the_cpu_without_touching_cuda(monkeypatch):
    events = []
    monkeypatch.setattr(device_module.time, "perf_counter", FakeClock(events, [10.0, 10.5, 20.0, 20.25]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: pytest.fail("synchronized on the CPU"))
    timer = ForwardTimer(CPU)
    with timer:
        events.append("forward")
    with timer:
        events.append("forward")
    assert timer.seconds == 0.75
    assert events == ["clock", "forward", "clock"] * 2


def test_timer_waits_for_the_gpu_at_both_ends(monkeypatch):
    events = []
    monkeypatch.setattr(device_module.time, "perf_counter", FakeClock(events, [1.0, 3.0, 5.0, 6.0]))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    timer = ForwardTimer(CUDA)
    with timer:
        events.append("forward")
    assert timer.seconds == 2.0
    assert events == [("sync", CUDA), "clock", "forward", ("sync", CUDA), "clock"]
    events.clear()
    with pytest.raises(RuntimeError), timer:  # a failed block: counted, its device work not awaited
        raise RuntimeError("CUDA error: device-side assert triggered")
    assert events == [("sync", CUDA), "clock", "clock"] and timer.seconds == 3.0


def test_faster_layout_picks_the_faster_and_reports_both(monkeypatch):
    import time as clock

    from pytest_memaudit.pipeline.device import faster_layout

    calls = []

    def run(layout):
        calls.append(layout)
        clock.sleep(0.02 if layout == torch.channels_last else 0.002)

    layout, seconds = faster_layout(run, torch.device("cpu"), repeats=2)
    assert layout == torch.contiguous_format
    assert seconds["channels-last"] > seconds["NCHW"] > 0.001
    assert calls == [torch.contiguous_format] * 3 + [torch.channels_last] * 3  # a warm-up, then the timed passes
