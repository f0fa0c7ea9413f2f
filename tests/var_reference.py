"""An independent float64 forward pass of the VAR VQVAE encoder, written from the spec.

Plain functional code over a state dict (no ``nn.Module``, no fused attention), used to check
``VAREncoder`` and the values an audit records. The structure (levels, blocks, where attention
is) is read from the state dict's keys, so reduced-width encoders work too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv(w: dict, name: str, x: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
    return F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride=stride, padding=padding)


def _norm(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, 32, w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)


def _resnet(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    h = _conv(w, f"{name}.conv1", F.silu(_norm(w, f"{name}.norm1", x)))
    h = _conv(w, f"{name}.conv2", F.silu(_norm(w, f"{name}.norm2", h)))
    shortcut = _conv(w, f"{name}.nin_shortcut", x, padding=0) if f"{name}.nin_shortcut.weight" in w else x
    return shortcut + h


def _attn(w: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    b, c, hgt, wid = x.shape
    qkv = _conv(w, f"{name}.qkv", _norm(w, f"{name}.norm", x), padding=0).reshape(b, 3 * c, hgt * wid)
    q, k, v = qkv[:, :c], qkv[:, c : 2 * c], qkv[:, 2 * c :]  # each (b, c, positions)
    logits = torch.einsum("bci,bcj->bij", q, k) * c**-0.5  # query position i, key position j
    weights = torch.exp(logits - logits.amax(dim=2, keepdim=True))
    weights = weights / weights.sum(dim=2, keepdim=True)
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, hgt, wid)
    return x + _conv(w, f"{name}.proj_out", attended, padding=0)


def reference_forward(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The encoder's output and the 22 audited layers' outputs, all float64.

    ``state`` holds encoder weights with or without the ``encoder.`` prefix. The layer dict is
    keyed by module path in forward order; ``norm_out`` is its own output, before the SiLU.
    """
    w = {k.removeprefix("encoder."): v.to(torch.float64) for k, v in state.items()}
    levels = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("down."))
    blocks = 1 + max(int(k.split(".")[3]) for k in w if k.startswith("down.0.block."))
    layers = {}

    def record(path: str, value: torch.Tensor) -> torch.Tensor:
        layers[path] = value
        return value

    h = record("conv_in", _conv(w, "conv_in", x.to(torch.float64)))
    for i in range(levels):
        for j in range(blocks):
            h = record(f"down.{i}.block.{j}", _resnet(w, f"down.{i}.block.{j}", h))
            if f"down.{i}.attn.{j}.qkv.weight" in w:
                h = record(f"down.{i}.attn.{j}", _attn(w, f"down.{i}.attn.{j}", h))
        if f"down.{i}.downsample.conv.weight" in w:
            padded = F.pad(h, (0, 1, 0, 1))
            h = record(f"down.{i}.downsample", _conv(w, f"down.{i}.downsample.conv", padded, stride=2, padding=0))
    h = record("mid.block_1", _resnet(w, "mid.block_1", h))
    h = record("mid.attn_1", _attn(w, "mid.attn_1", h))
    h = record("mid.block_2", _resnet(w, "mid.block_2", h))
    h = record("norm_out", _norm(w, "norm_out", h))
    out = record("conv_out", _conv(w, "conv_out", F.silu(h)))
    return out, layers
