"""Factory of the vit_b_16 example: torchvision's ViT-B/16 with the weights you point it at."""

from __future__ import annotations

import torch
from torchvision.models import vit_b_16


def build(checkpoint: str | None) -> torch.nn.Module:
    """ViT-B/16 for 224x224 images with the state dict in ``checkpoint`` (e.g. torchvision's
    vit_b_16-c867db91.pth); random weights when there is none (to try the recipe)."""
    model = vit_b_16(weights=None)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model
