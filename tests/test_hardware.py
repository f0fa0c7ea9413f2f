"""bfloat16 detection from CPU flags and GPU compute capability, and the note a run gets when bfloat16 measures slower."""

import json

import pytest
import torch

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from pytest_memaudit.pipeline import hardware

pytest_plugins = ["pytester"]

AVX2_ONLY = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2

processor\t: 1
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_flags_summary(monkeypatch):
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: AVX2_ONLY)
    assert hardware.cpu_flags() == {"model": "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "avx2": True,
                                    "avx512f": False, "avx512_bf16": False, "amx": False}
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: SAPPHIRE_RAPIDS)
    assert hardware.cpu_flags() == {"model": "Intel(R) Xeon(R) Platinum 8480+", "avx2": True, "avx512f": True,
                                    "avx512_bf16": True, "amx": True}
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: None)
    assert hardware.cpu_flags() == {"model": None, "avx2": None, "avx512f": None, "avx512_bf16": None, "amx": None}


@pytest.mark.parametrize("cpuinfo, native, why", [
    (AVX2_ONLY, False, "the CPU (Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz) has no bfloat16 instructions "
                       "(AVX512_BF16, AMX or Arm BF16)"),
    (SAPPHIRE_RAPIDS, True, "the CPU (Intel(R) Xeon(R) Platinum 8480+) has AVX512_BF16, AMX"),
    (GRAVITON3, True, "the CPU (unknown model) has Arm BF16"),
])
def test_bf16_native_on_the_cpu(monkeypatch, cpuinfo, native, why):
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: cpuinfo)
    assert hardware.bf16_native(torch.device("cpu")) == (native, why)


def test_bf16_without_cpu_flags_asks_torch(monkeypatch):
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: None)
    native, why = hardware.bf16_native("cpu")
    assert native == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert why.startswith("torch's oneDNN says the CPU ")


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_native_on_a_gpu(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert hardware.bf16_native(torch.device("cuda:0")) == (
        native, f"the GPU (Some GPU) has compute capability {capability[0]}.{capability[1]}"
        + (" (bfloat16 needs 8.0)" if not native else ""))


def test_bf16_measured_slower_gets_a_note(pytester, var_checkpoint, monkeypatch):
    """Timings injected: the audit's own measurement decides, and the note says by how much."""
    import pytest_memaudit.pipeline.forward as forward_module

    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: AVX2_ONLY)
    timed = []
    monkeypatch.setattr(forward_module, "time_precisions",
                        lambda run, device: timed.append(run) or {"float32": 0.100, "bfloat16": 0.137})
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    args = ["audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint), "--memaudit-data",
            "builtin", "--memaudit-samples", "3", "--memaudit-image-size", "32", "--memaudit-augmentations", "0",
            "--memaudit-device", "cpu", "-k", "conv.out", "--memaudit-json", "out.json", "-p", "no:cacheprovider"]
    result = pytester.runpytest(*args, "--memaudit-precision", "bfloat16")
    assert result.ret == 0 and len(timed) == 1
    note = ("--memaudit-precision bfloat16: bfloat16 is slower than float32 here: a forward pass of the audit's views "
            "took 137 ms in bfloat16 against 100 ms in float32 (37% slower; the CPU (Intel(R) Xeon(R) CPU E5-2680 v4 "
            "@ 2.40GHz) has no bfloat16 instructions (AVX512_BF16, AMX or Arm BF16)); use --memaudit-precision float32")
    result.stdout.fnmatch_lines([f"note: {note}"])
    assert note in json.loads((pytester.path / "out.json").read_text())["notes"]
    assert "37% slower" in (pytester.path / "memaudit-report" / "report.html").read_text()
    result = pytester.runpytest(*args)  # float32: nothing timed, no note
    assert len(timed) == 1 and "slower than float32" not in result.stdout.str()


@pytest.mark.parametrize("float32, bfloat16, slower", [
    (0.100, 0.137, "37% slower"),
    (0.100, 0.104, None),  # within a single pass's noise (5%)
    (0.100, 0.050, None),  # faster: what it was asked for
])
def test_precision_note_from_injected_timings(monkeypatch, float32, bfloat16, slower):
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: SAPPHIRE_RAPIDS)
    notes = hardware.precision_notes("bfloat16", "cpu", {"float32": float32, "bfloat16": bfloat16})
    assert [slower in note for note in notes] == ([True] if slower else [])
    if slower:  # the flags say native: the measurement overrules them
        assert "the CPU (Intel(R) Xeon(R) Platinum 8480+) has AVX512_BF16, AMX" in notes[0]
    assert hardware.precision_notes("float32", "cpu", None) == []


def test_time_precisions_warms_up_both_then_times_each(monkeypatch):
    """A fake clock (no wall-clock): each precision's pass is timed after a warm-up pass in both."""
    from pytest_memaudit.pipeline import device as device_module

    clock = iter([0.0, 0.25, 1.0, 1.5])  # float32 timed 0.25 s, bfloat16 0.5 s
    monkeypatch.setattr(device_module.time, "perf_counter", lambda: next(clock))
    passes = []
    seconds = device_module.time_precisions(lambda: passes.append(torch.is_autocast_enabled("cpu")), torch.device("cpu"))
    assert passes == [False, True, False, True]  # warm-up float32, bfloat16; then timed float32, bfloat16
    assert seconds == {"float32": 0.25, "bfloat16": 0.5}


def test_an_instruction_set_cap_makes_bf16_emulated(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below bf16 (how benchmarks run as on an AVX2-only CPU) means emulated bf16."""
    monkeypatch.setattr(hardware, "_read_cpuinfo", lambda: "model name : Test CPU\nflags : avx2 avx512f avx512_bf16\n")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, why = hardware.bf16_native("cpu")
    assert not native and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware.bf16_native("cpu")[0]
