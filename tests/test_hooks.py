"""Hooks: attach to the audited layers, reduce at once, detach cleanly."""

import pytest
import torch
import torch.nn.functional as F

from pytest_memaudit.models import hooks
from pytest_memaudit.errors import AuditError
from pytest_memaudit.models.hooks import LayerRecorder, _mean_abs_one_pass, unit_means
from pytest_memaudit.models import LayerSpec, var_layer_specs
from pytest_memaudit.models.var import VAREncoder


@pytest.fixture(scope="module")
def small_var():
    torch.manual_seed(0)
    return VAREncoder(ch=32).eval()


def test_all_22_layers_reduce_to_one_value_per_unit(small_var):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with LayerRecorder(small_var, var_layer_specs()) as recorder, torch.no_grad():
        small_var(x)
        outputs = recorder.take()
    assert list(outputs) == [layer.name for layer in var_layer_specs()]  # forward order
    assert [v.shape[1] for v in outputs.values()] == [32] * 7 + [64] * 6 + [128] * 8 + [32]
    assert all(v.shape[0] == 3 and v.dtype == torch.float32 for v in outputs.values())
    assert recorder.take() == {}


def test_norm_out_is_measured_before_the_inplace_silu(small_var):
    captured = {}
    handle = small_var.mid.block_2.register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o.clone()))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with LayerRecorder(small_var, [LayerSpec("norm.out", "norm_out")]) as recorder, torch.no_grad():
        small_var(x)
        measured = recorder.take()["norm.out"]
    handle.remove()
    norm = small_var.norm_out
    before_silu = F.group_norm(captured["mid"], 32, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(measured, before_silu.abs().mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    after_silu = F.silu(before_silu).abs().mean(dim=(2, 3))
    assert (measured - after_silu).abs().max() > 1e-2  # SiLU changes what would be seen


def test_hooks_are_removed(small_var):
    with LayerRecorder(small_var, var_layer_specs()) as recorder:
        pass
    assert all(not module._forward_hooks for module in small_var.modules())
    assert recorder.take() == {}


def test_unknown_module_is_a_clear_error(small_var):
    with pytest.raises(AuditError, match=r"no module 'down.3.blok.1'. Did you mean 'down.3.block.1'"):
        LayerRecorder(small_var, [LayerSpec("conv.in", "conv_in"), LayerSpec("x", "down.3.blok.1")])
    assert all(not module._forward_hooks for module in small_var.modules())


def test_unit_means_shapes():
    nchw = torch.tensor([[[[1.0, -3.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    assert unit_means(nchw, 1).tolist() == [[2.0, 1.0]]
    assert unit_means(nchw, 3).tolist() == [[0.5, 2.5]]  # units on the last axis: the mean over channels and rows
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])  # (1, tokens 2, units 2)
    assert unit_means(tokens, 2).tolist() == [[2.0, 1.0]]
    assert unit_means(torch.tensor([[-1.5, 2.0]]), 1).tolist() == [[1.5, 2.0]]
    for axis in (0, 4):
        with pytest.raises(AuditError, match="axis"):
            unit_means(nchw, axis)


def test_results_are_reused_across_passes_and_right_for_a_smaller_batch(small_var):
    layers = [layer for layer in var_layer_specs() if layer.name in ("conv.in", "mid.attn.1")]
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with LayerRecorder(small_var, layers) as recorder, torch.no_grad():
        small_var(x)
        first = recorder.take()
        small_var(x[:2])
        second = recorder.take()
        expected = {"conv.in": small_var.conv_in(x[:2]).abs().mean(dim=(2, 3))}
    for name in first:
        assert second[name].shape[0] == 2 and second[name].data_ptr() == first[name].data_ptr()
    torch.testing.assert_close(second["conv.in"], expected["conv.in"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_means_into_a_given_tensor(dtype):
    for output, axis in ((torch.randn(3, 2, 4, 4), 1), (torch.randn(3, 5, 2), 2), (torch.randn(3, 2), 1),
                         (torch.randn(3, 4, 4, 2), 3)):
        output = output.to(dtype)
        out = torch.full((3, 2), float("nan"))
        assert unit_means(output, axis, out=out) is out
        torch.testing.assert_close(out, unit_means(output, axis), rtol=0, atol=0)


def test_an_output_of_unsupported_shape_is_a_clear_error_through_the_recorder():
    class Sums(torch.nn.Module):
        def forward(self, x):
            return x.sum(dim=(1, 2, 3))

    model = torch.nn.Sequential(Sums())
    with LayerRecorder(model, [LayerSpec("sums", "0")]), pytest.raises(AuditError, match=r"shape \(batch,\)"):
        model(torch.zeros(2, 3, 4, 4))


def one_pass_cases():
    generator = torch.Generator().manual_seed(0)
    nchw = torch.randn(4, 16, 64, 64, generator=generator) + 0.3
    tokens = torch.randn(4, 1024, 16, generator=generator) - 0.2
    for dtype, short in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        yield pytest.param(nchw.to(dtype), id=f"nchw-{short}")
        yield pytest.param(nchw.to(dtype).contiguous(memory_format=torch.channels_last), id=f"channels_last-{short}")
        yield pytest.param(tokens.to(dtype), id=f"tokens-{short}")


@pytest.mark.parametrize("output", list(one_pass_cases()))
def test_the_one_pass_reduction_matches_float64(output):
    """The GPU's reduction, run here with the CPU's L1 norm: that one adds its terms in sequence,
    hence 2e-5 (measured: 4e-6 over 64x64 positions); on a GPU the sum is a tree."""
    dims = (2, 3) if output.dim() == 4 else (1,)
    expected = output.double().abs().mean(dim=dims)
    result = _mean_abs_one_pass(output, dims, None)
    assert result.dtype == torch.float32 and result.shape == expected.shape
    torch.testing.assert_close(result.double(), expected, rtol=2e-5, atol=0)
    out = torch.full(expected.shape, float("nan"))
    assert _mean_abs_one_pass(output, dims, out) is out
    torch.testing.assert_close(out, result, rtol=0, atol=0)


def test_off_the_cpu_unit_means_takes_the_one_pass_reduction(monkeypatch):
    calls = []
    monkeypatch.setattr(hooks, "_mean_abs_one_pass", lambda *args: calls.append(args[1]) or "one pass")
    for output, axis in ((torch.empty(3, 8, 4, 4, device="meta"), 1), (torch.empty(3, 5, 8, device="meta"), 2)):
        assert unit_means(output, axis) == "one pass"
    assert calls == [(2, 3), (1,)]
    unit_means(torch.randn(3, 8, 4, 4), 1)
    assert len(calls) == 2  # the CPU keeps abs().mean()
