"""Synthetic VAR VQVAE checkpoints for tests, built from the released checkpoint's key manifest.

The encoder weights are random but scaled like a trained network (conv weights with variance
1/fan_in, GroupNorm weights near 1, small biases) so activations stay finite and varied through
all 22 audited layers. Non-encoder tensors of the whole-VQVAE form are zero-stride views of one
zero: they have the manifest's shapes but take almost no space on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

import pytest_memaudit.models

MANIFEST = Path(pytest_memaudit.models.__file__).with_name("var_d16_checkpoint_keys.tsv")
RELEASED_CH = 160
FORMS = ("vqvae", "encoder", "bare")


def _manifest(ch: int) -> dict[str, tuple[int, ...]]:
    """Every key of the released checkpoint with its shape; widths scaled from 160 to ``ch``.

    Every dimension that is a multiple of 160 is a width (160, 320, 640, 1920); the others
    (3 image channels, 32 latent channels, kernel sizes, 4096 codes) do not change with ``ch``.
    """
    shapes = {}
    for line in MANIFEST.read_text().splitlines()[1:]:
        key, shape, _dtype = line.split("\t")
        dims = (int(d) for d in shape.split("x"))
        shapes[key] = tuple(d // RELEASED_CH * ch if d % RELEASED_CH == 0 else d for d in dims)
    return shapes


def manifest_encoder_shapes(ch: int = RELEASED_CH) -> dict[str, tuple[int, ...]]:
    """The encoder's keys (without the ``encoder.`` prefix) and shapes, in manifest order."""
    return {k[len("encoder."):]: s for k, s in _manifest(ch).items() if k.startswith("encoder.")}


def _encoder_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if len(shape) == 4:  # conv weight
        fan_in = shape[1] * shape[2] * shape[3]
        return noise / fan_in**0.5
    if key.endswith(".weight"):  # GroupNorm scale
        return 1 + 0.1 * noise
    return 0.1 * noise  # bias


def write_var_checkpoint(path, form: str, seed: int = 0, ch: int = RELEASED_CH) -> Path:
    """Write a seeded checkpoint in one of the forms a user may have; return its path.

    ``form``: ``"vqvae"`` (the whole VQVAE, every key of the manifest), ``"encoder"`` (only the
    ``encoder.*`` keys) or ``"bare"`` (encoder keys without the prefix). The encoder weights
    depend only on ``seed`` and ``ch``, not on the form.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _manifest(ch).items():
        if key.startswith("encoder."):
            name = key if form != "bare" else key[len("encoder."):]
            state[name] = _encoder_tensor(key, shape, gen)
        elif form == "vqvae":
            state[key] = torch.zeros(()).expand(shape)
    path = Path(path)
    torch.save(state, path)
    return path
