"""A tiny encoder for audits in subprocesses (torchrun): an audit YAML names it as
``tiny_encoder:build`` with this folder on PYTHONPATH. ``TINY_ENCODER_SLEEP`` (seconds) slows
each forward pass down, for tests that stop an audit halfway; ``TINY_ENCODER_CRASH=R:K`` makes
the process of rank R die (exit 9, no cleanup) at its K-th forward pass."""

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = ["conv1", "conv2", "conv3"]
YAML = """\
thresholds:
  mean_unitmem_max: 1.0
models:
  tiny:
    factory: tiny_encoder:build
    audited_layers: [conv1, conv2, conv3]
    image_size: 16
"""


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.sleep = float(os.environ.get("TINY_ENCODER_SLEEP", "0"))
        rank, _, passes = os.environ.get("TINY_ENCODER_CRASH", "-1:0").partition(":")
        self.crash_at = int(passes) if rank == os.environ.get("RANK", "0") else 0
        self.passes = 0

    def forward(self, x):
        self.passes += 1
        if self.passes == self.crash_at:
            os._exit(9)
        if self.sleep:
            time.sleep(self.sleep)
        return self.conv3(F.silu(self.conv2(F.silu(self.conv1(x)))))


def build(checkpoint):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyEncoder()
