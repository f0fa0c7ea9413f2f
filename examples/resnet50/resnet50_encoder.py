"""Factory of the resnet50 example: torchvision's ResNet-50 with the weights you point it at."""

from __future__ import annotations

import torch
from torchvision.models import resnet50


def build(checkpoint: str | None) -> torch.nn.Module:
    """ResNet-50 with the state dict in ``checkpoint`` (e.g. torchvision's resnet50-11ad3fa6.pth, or
    your own fine-tuned weights); random weights when there is none (to try the recipe)."""
    model = resnet50(weights=None)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model
