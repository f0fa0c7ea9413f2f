"""The random control: every trained tensor replaced, seeded, independent of the source's device."""

import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

from pytest_memaudit.controls.random import random_weights_copy


def trained(net: nn.Module, seed: int = 1) -> nn.Module:
    """``net`` with every parameter moved off its initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in net.parameters():
            tensor.add_(torch.randn(tensor.shape, generator=generator))
    return net


def tiny_vit() -> nn.Module:
    return trained(VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.register_buffer("mask", torch.arange(8.0))  # not learned: no reset writes it
        self.scale = nn.Parameter(torch.tensor(2.5))  # a single number: standard deviation 0
        self.token = nn.Parameter(torch.zeros(1, 8))  # a constant: standard deviation 0
        # bare, not constant; 4-D, so that a channels-last copy lays it out differently
        self.table = nn.Parameter(torch.randn(16, 25, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1)

    def forward(self, x):
        return self.norm(self.conv(x)) * self.mask[:, None, None] * self.scale


def conv_bn() -> nn.Module:
    net = trained(ConvBN())
    with torch.no_grad():
        net.token.zero_()
        net.norm.running_mean.uniform_(1, 2)
        net.norm.running_var.uniform_(3, 4)
        net.norm.num_batches_tracked.fill_(7)
    return net


def tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return dict(net.named_parameters()) | dict(net.named_buffers())


def assert_same(a: nn.Module, b: nn.Module) -> None:
    ta, tb = tensors(a), tensors(b)
    assert list(ta) == list(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_every_parameter_of_a_vit_is_replaced():
    source = tiny_vit()
    before = {name: p.detach().clone() for name, p in source.named_parameters()}
    control = random_weights_copy(source, seed=0)
    params = dict(control.named_parameters())
    assert len(params) == 32  # 6 of them (class token, position embedding, in_proj_*) need more than reset_parameters
    changed = [name for name, p in params.items() if not torch.equal(p, before[name])]
    assert len(changed) == len(params)
    for name, p in source.named_parameters():
        assert torch.equal(p, before[name]), f"{name} of the source changed"
    # The packed attention projection is re-initialized by nn.MultiheadAttention._reset_parameters.
    assert (params["encoder.layers.encoder_layer_0.self_attention.in_proj_bias"] == 0).all()
    # The position embedding is redrawn with the trained tensor's mean and standard deviation.
    pos, trained_pos = params["encoder.pos_embedding"].double(), before["encoder.pos_embedding"].double()
    assert abs(pos.std().item() / trained_pos.std().item() - 1) < 0.2
    assert abs(pos.mean().item() - trained_pos.mean().item()) < 0.2 * trained_pos.std().item()


def test_batchnorm_statistics_are_reset_and_the_fallback_keeps_constants():
    source = conv_bn()
    control = random_weights_copy(source, seed=0)
    assert torch.equal(control.norm.running_mean, torch.zeros(8))
    assert torch.equal(control.norm.running_var, torch.ones(8))
    assert control.norm.num_batches_tracked.item() == 0
    assert torch.equal(control.norm.weight, torch.ones(8)) and torch.equal(control.norm.bias, torch.zeros(8))
    assert torch.equal(control.mask, source.mask)  # a buffer no reset covers
    assert torch.equal(control.scale, source.scale) and torch.equal(control.token, torch.zeros(1, 8))
    table, trained_table = control.table.double(), source.table.detach().double()
    assert not torch.equal(table, trained_table)
    # 10,000 draws: mean and standard deviation within a few standard errors of the source's.
    assert abs(table.mean() - trained_table.mean()) < 4 * trained_table.std() / 100
    assert abs(table.std() / trained_table.std() - 1) < 0.03


@pytest.mark.parametrize("build", [tiny_vit, conv_bn])
def test_the_seed_decides_the_control(build):
    source = build()
    assert_same(random_weights_copy(source, seed=3), random_weights_copy(source, seed=3))
    a, b = tensors(random_weights_copy(source, seed=3)), tensors(random_weights_copy(source, seed=4))
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert "conv.weight" in differing or "conv_proj.weight" in differing
    assert len(differing) >= len(list(source.parameters())) // 2  # reset to constants: equal either way


def test_the_global_random_state_is_untouched_and_cuda_never_seeded(monkeypatch):
    def seeding_cuda(*args):
        raise AssertionError("the control seeded a CUDA generator")

    source = tiny_vit()
    torch.manual_seed(1234)
    torch.rand(5)  # somewhere in the user's stream
    state = torch.random.get_rng_state()
    monkeypatch.setattr(torch.cuda, "manual_seed", seeding_cuda)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeding_cuda)
    random_weights_copy(source, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_the_control_does_not_depend_on_where_the_source_is(monkeypatch):
    """On a GPU the audited model differs from a CPU one only in where its tensors are and in
    their layout (``audit.prepare`` makes them channels-last). The copy brings every tensor to
    the CPU in the default layout before any initializer runs, which the first half checks by
    watching the in-place initializers; the second half shows that the layout of the source
    then leaves no trace, with a channels-last source (``normal_`` draws other numbers for a
    channels-last tensor). What a CPU initializer does next depends only on the CPU
    generator, seeded by the control."""
    seen = []
    for method in ("uniform_", "normal_", "fill_", "zero_"):
        original = getattr(torch.Tensor, method)

        def record(tensor, *args, _original=original, **kwargs):
            seen.append((tensor.device.type, tensor.is_contiguous()))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, record)
    source = conv_bn()
    control = random_weights_copy(source, seed=0)
    assert len(seen) >= 7 and set(seen) == {("cpu", True)}
    monkeypatch.undo()

    channels_last = conv_bn().to(memory_format=torch.channels_last)
    assert not channels_last.conv.weight.is_contiguous() and not channels_last.table.is_contiguous()
    from_channels_last = random_weights_copy(channels_last, seed=0)
    assert_same(from_channels_last, control)


def test_the_control_is_a_separate_cpu_module_with_the_sources_flags():
    source = conv_bn().requires_grad_(False).eval()
    control = random_weights_copy(source, seed=0)
    assert not control.training and not any(p.requires_grad for p in control.parameters())
    assert all(t.device.type == "cpu" for t in tensors(control).values())
    shared = {t.data_ptr() for t in tensors(source).values()} & {t.data_ptr() for t in tensors(control).values()}
    assert not shared
    with torch.inference_mode():  # built while the caller is in inference mode: still ordinary tensors
        assert_same(random_weights_copy(source, seed=0), control)
