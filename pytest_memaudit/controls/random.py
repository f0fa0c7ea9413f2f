"""The controls that change the network: the random control (the audited architecture with
fresh, seeded weights) and the blind control (the model fed one fixed image whatever the view).

The blind control is the test of a test: a network that cannot see its input cannot memorize
anything about it, so every figure of an audit must read "none" on it (no layer fails, the planted
control is not found, the verdict is none).

A control's UnitMem shows what an untrained network of the same shape scores on the same
views, so it must not keep any trained tensor, and it must be the same whatever device the
audit runs on. It is therefore built on the CPU, with only the CPU's random generator, seeded
for the occasion and put back afterwards.

Which tensors are re-initialized, and how:

- every module with ``reset_parameters()`` (convolutions, linear layers, norms: their weights,
  biases and running statistics) or ``_reset_parameters()`` (``nn.MultiheadAttention``'s packed
  input projection), children before their parents, as when the network is built;
- every parameter that no such call wrote (bare ``nn.Parameter``s such as a ViT's class token
  and position embedding) is drawn from a normal distribution with the tensor's own mean and
  standard deviation: the scale stays, the trained arrangement goes. A tensor whose standard
  deviation is 0 (a constant, or a single number) has no arrangement, so it keeps its value.

Buffers that no reset writes (masks, fixed position tables) are not learned and stay as they
are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def random_weights_copy(net: nn.Module, seed: int) -> nn.Module:
    """A copy of ``net`` on the CPU with re-initialized weights; ``net`` and the global random
    state (CPU and CUDA) are left as they were. The same seed gives the same control."""
    control = _cpu_copy(net)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)  # the CPU's only (torch.manual_seed seeds CUDA too)
        tensors = dict(control.named_parameters())
        versions = {name: tensor._version for name, tensor in tensors.items()}
        for module in reversed(list(control.modules())):
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if callable(reset):
                reset()
        for name, tensor in control.named_parameters():
            if tensor is tensors.get(name) and tensor._version == versions[name]:  # no reset wrote it
                _redraw(tensor)
    return control


def blind_copy(net: nn.Module, image: torch.Tensor) -> nn.Module:
    """A copy of ``net`` that replaces every view it is given by ``image`` (3, H, W) before its own
    forward; module paths stay the same, so the same layers are audited."""
    blind = copy.deepcopy(net)

    def replace_views(module, args):
        views = args[0]
        fixed = image.to(device=views.device, dtype=views.dtype).expand_as(views).contiguous()
        return (fixed, *args[1:])

    blind.register_forward_pre_hook(replace_views)
    return blind


def _cpu_copy(net: nn.Module) -> nn.Module:
    """``copy.deepcopy(net)`` with every parameter and buffer copied straight to the CPU (no
    second copy on the GPU), in the default layout: what the CPU's random in-place fills draw
    depends on the memory layout, so a channels-last copy would get other numbers."""
    memo = {}
    with torch.inference_mode(False):
        for tensor in [*net.parameters(), *net.buffers()]:
            copied = tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            if isinstance(tensor, nn.Parameter):
                copied = nn.Parameter(copied, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = copied
        return copy.deepcopy(net, memo)


def _redraw(tensor: torch.Tensor) -> None:
    values = tensor.double()
    std = values.std(correction=0).item() if tensor.numel() else 0.0
    if std > 0:
        tensor.normal_(values.mean().item(), std)
