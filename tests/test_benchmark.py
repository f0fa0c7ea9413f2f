"""The benchmark's quick mode, the out-of-memory fallback, precision modes and the median's memory limit."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.errors import AuditError
from pytest_memaudit.models import LayerSpec, ModelSpec
from pytest_memaudit.metric.unitmem import MEMBER, LayerState

REPO = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(F.silu(self.conv1(x)))


def build_tiny(checkpoint):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tiny()


TINY = ModelSpec(name="tiny", layers=(LayerSpec("conv1", "conv1"), LayerSpec("conv2", "conv2")),
                 build=build_tiny, default_image_size=16)


def audit(**settings):
    values = dict(model="tiny", data="builtin", samples=6, augmentations=3, batch_size=12, device="cpu",
                  control="none") | settings
    return run_audit(make_settings(**values), TINY)


def assert_same_numbers(a, b):
    for layer_a, layer_b in zip(a.layers, b.layers):
        np.testing.assert_allclose(layer_a.values.unitmem, layer_b.values.unitmem, rtol=0, atol=1e-7)
        assert layer_a.values.max_sample.tolist() == layer_b.values.max_sample.tolist()


def test_quick_benchmark_runs_and_its_numbers_are_sane(tmp_path, var_checkpoint):
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, "benchmarks/bench_audit.py", "--quick", "--checkpoint", str(var_checkpoint),
                    "--workdir", str(tmp_path), "--json", str(out)], cwd=REPO, check=True, capture_output=True)
    report = json.loads(out.read_text())
    assert report["views"] == 4 * 2
    assert set(report["runs"]) == {"naive", "float32", "bfloat16"}
    for name, run in report["runs"].items():
        assert run["views_per_s"] > 0 and run["ratio_vs_naive"] > 0 and run["peak_mb"] > 0, name
    assert report["runs"]["bfloat16"]["settings_precision"] == "bfloat16"
    exact = report["exact_vs_naive"]
    assert exact["max_abs_d"] < 1e-4 and exact["argmax_agree"] == 1.0
    bf16 = report["precision_vs_float32"]["bfloat16"]
    assert 0 < bf16["max_abs_d"] < 0.2 and bf16["argmax_agree"] > 0.9
    assert all(ms > 0 for ms in report["bare_forward_ms_per_view"].values())


OUT_OF_MEMORY = [
    torch.cuda.OutOfMemoryError("CUDA out of memory (injected)"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED (injected)"),  # cuDNN's workspace, not the allocator
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["allocator", "cudnn"])
def test_out_of_memory_halves_the_batch_and_keeps_the_numbers(monkeypatch, error):
    reference = audit()
    passes = []

    def forward(self, x):  # out of memory above 4 views, after the first hooked layer ran
        passes.append(len(x))
        h = self.conv1(x)
        if len(x) > 4:
            raise error
        return self.conv2(F.silu(h))

    monkeypatch.setattr(Tiny, "forward", forward)
    result = audit()
    assert passes[0] == 1  # the one-view pass that sizes the layer states
    assert passes[1:4] == [12, 6, 3] and max(passes[4:]) == 3  # halved twice, then kept at 3
    assert_same_numbers(result, reference)
    halvings = [note for note in result.notes if "out of memory" in note]
    assert len(halvings) == 2
    assert "at 12 views per forward pass: halved to 6" in halvings[0]
    assert "at 6 views per forward pass: halved to 3" in halvings[1]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["allocator", "cudnn"])
def test_out_of_memory_with_one_view_is_an_error(monkeypatch, error):
    def forward(self, x):
        raise error

    monkeypatch.setattr(Tiny, "forward", forward)
    with pytest.raises(AuditError, match="single view per forward pass"):
        audit()


def test_other_runtime_errors_are_not_retried(monkeypatch):
    passes = []

    def forward(self, x):
        passes.append(len(x))
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED (injected)")

    monkeypatch.setattr(Tiny, "forward", forward)
    with pytest.raises(AuditError, match="forward pass of tiny .* RuntimeError: .*EXECUTION_FAILED") as info:
        audit()
    assert passes == [1]  # the first pass (one view, sizing the layer states) raised, and was not retried
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, kept as the cause


def test_bfloat16_on_the_cpu_is_close_to_float32_and_recorded():
    fast, exact = audit(precision="bfloat16"), audit()
    assert fast.settings["precision"] == "bfloat16" and exact.settings["precision"] == "float32"
    for a, b in zip(fast.layers, exact.layers):
        assert a.values.unitmem.dtype == np.float64
        np.testing.assert_allclose(a.values.unitmem, b.values.unitmem, atol=0.05)
        assert not np.array_equal(a.values.unitmem, b.values.unitmem)  # autocast did run in bfloat16


def test_tf32_needs_cuda():
    with pytest.raises(AuditError, match="tf32 needs a CUDA device"):
        audit(precision="tf32")


def test_median_over_its_memory_limit_is_kept_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    in_memory = audit(reduce="median")
    on_disk = audit(reduce="median", median_memory=0)
    assert not any("kept on disk" in note for note in in_memory.notes)
    [note] = [note for note in on_disk.notes if "kept on disk" in note]
    assert f"in {tmp_path}" in note and "--memaudit-median-memory (0 MB)" in note
    assert on_disk.settings["median_memory"] == 0
    assert_same_numbers(on_disk, in_memory)
    assert list(tmp_path.iterdir()) == []  # the temporary matrix is gone


def test_median_rows_moved_in_blocks_as_on_a_gpu_are_the_same():
    rng = np.random.default_rng(0)
    matrix = rng.random((50, 7)).astype(np.float32)
    results = []
    for flush_bytes in (0, 3 * 7 * 4):  # every batch (the CPU); every third row or more (as on a GPU)
        state = LayerState(7, keep_values=True, capacity=50)
        state.values._flush_bytes = flush_bytes
        for start in range(0, 50, 2):
            rows = torch.arange(start, start + 2)
            state.update(torch.from_numpy(matrix[start : start + 2]), rows, torch.full((2,), MEMBER), rows % 10)
        results.append(state.unitmem((MEMBER,), "median")[0].mu_rest)
        state.close()
    expected = [np.median(np.delete(column, np.argmax(column))) for column in matrix.T.astype(np.float64)]
    np.testing.assert_allclose(results[0], expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(results[1], results[0])


def test_the_cpu_keeps_the_contracts_layout_and_sizes_workers_by_device(monkeypatch):
    from pytest_memaudit.pipeline import setup as setup_module
    from pytest_memaudit.data.images import ImageSet

    assert audit().settings["memory_format"] == "NCHW"  # Tiny declares no channels-last support
    monkeypatch.setattr(setup_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    generated, files = ImageSet.builtin(4, 16, 0), ImageSet(["a.png"], Path("."), 16, 0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert setup_module.default_workers(generated, cpu, 10) == 0  # generated in process, beside the compute
    assert setup_module.default_workers(files, cpu, 10) == 8  # half the cores, 8 at most
    assert setup_module.default_workers(files, cpu, 10, processes_here=4) == 2  # shared by 4 processes
    assert setup_module.default_workers(generated, cuda, 10) == 2  # the GPU needs images, not views
    assert setup_module.default_workers(files, cuda, 1) == 15  # one view per image: every core but one


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --dry-run: every step of the device check, at a tiny size, on the CPU."""
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["precision"], r["layout"]) for r in report["runs"]] == [
        (p, layout) for p in ("float32", "bfloat16") for layout in ("NCHW", "channels-last", "chosen: channels-last")]
    assert all(r["views_per_s"] > 0 and 0 < r["peak_fraction"] for r in report["runs"])
    assert report["max_abs_unitmem_vs_float64"] < 1e-4  # float32 against the independent float64 reference
