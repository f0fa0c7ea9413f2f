"""Factory of the swin_t example: torchvision's Swin-T with the weights you point it at."""

from __future__ import annotations

import torch
from torchvision.models import swin_t


def build(checkpoint: str | None) -> torch.nn.Module:
    """Swin-T with the state dict in ``checkpoint`` (e.g. torchvision's swin_t-704ceda3.pth); random
    weights when there is none (to try the recipe). It takes any image size that is a multiple of 32."""
    model = swin_t(weights=None)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model
