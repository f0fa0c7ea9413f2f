"""The built-in images: a generated set (``builtin/0007``) that needs no files, and the canaries planted
in the demo's training set; each is a pure function of its index, size and seed."""

from __future__ import annotations

from typing import Callable

import numpy as np


BUILTIN_PREFIX = "builtin/"
CANARY_PREFIX = "canary/"


def builtin_ids(n: int, start: int = 0) -> list[str]:
    """Ids of ``n`` generated images from index ``start``, zero-padded so that they sort by index."""
    width = max(4, len(str(start + n - 1)))
    return [f"{BUILTIN_PREFIX}{i:0{width}d}" for i in range(start, start + n)]


def builtin_image(index: int, size: int, seed: int) -> np.ndarray:
    """Generated image ``index`` of the built-in set: uint8 (size, size, 3).

    The kind (corner gradient, stripes, checkerboard, shapes, smooth noise) cycles with the
    index; colours and geometry come from a generator seeded with (seed, index), so an image
    does not depend on the size of the set it belongs to.
    """
    rng = np.random.default_rng([seed, index])
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = t[:, None, None], t[None, :, None]  # broadcast to (size, size, 1)
    image = _KINDS[index % len(_KINDS)](rng, y, x)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _colors(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0, 255, (n, 3)).astype(np.float32)


def _blend(weight: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return c0 + weight * (c1 - c0)


def _corner_gradient(rng, y, x):
    c = _colors(rng, 4)
    top, bottom = _blend(x, c[0], c[1]), _blend(x, c[2], c[3])
    return _blend(y, top, bottom)


def _stripes(rng, y, x):
    c = _colors(rng, 2)
    angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 16), rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    if rng.random() < 0.5:
        wave = (wave > 0.5).astype(np.float32)
    return _blend(wave, c[0], c[1])


def _checkerboard(rng, y, x):
    c = _colors(rng, 2)
    angle = rng.uniform(0, np.pi / 2)
    rows, cols = rng.integers(2, 12, size=2)
    u = x * np.cos(angle) - y * np.sin(angle)
    v = x * np.sin(angle) + y * np.cos(angle)
    cells = (np.floor(u * cols) + np.floor(v * rows)) % 2
    return _blend(cells.astype(np.float32), c[0], c[1])


def _shapes(rng, y, x):
    count = int(rng.integers(3, 9))
    c = _colors(rng, count + 1)
    image = np.broadcast_to(c[0], (y.shape[0], x.shape[1], 3))
    for color in c[1:]:
        cy, cx = rng.uniform(0, 1, 2)
        if rng.random() < 0.5:
            radius = rng.uniform(0.08, 0.35)
            mask = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        else:
            half_h, half_w = rng.uniform(0.05, 0.3, 2)
            mask = (np.abs(y - cy) < half_h) & (np.abs(x - cx) < half_w)
        image = np.where(mask, color, image)
    return image


def _smooth_noise(rng, y, x):
    """Random colours on a coarse grid, upsampled bilinearly."""
    cells = int(rng.integers(3, 9))
    grid = _colors(rng, cells * cells).reshape(cells, cells, 3)

    def lerp_index(t):
        pos = t.ravel() * (cells - 1)
        low = np.minimum(np.floor(pos).astype(np.intp), cells - 2)
        return low, (pos - low)[:, None, None]

    iy, fy = lerp_index(y)
    ix, fx = lerp_index(x)
    rows = _blend(fy, grid[iy], grid[iy + 1])  # (size, cells, 3)
    return _blend(fx[:, 0][None], rows[:, ix], rows[:, ix + 1])


_KINDS: tuple[Callable[..., np.ndarray], ...] = (
    _corner_gradient,
    _stripes,
    _checkerboard,
    _shapes,
    _smooth_noise,
)


def canary_image(index: int, size: int, seed: int) -> np.ndarray:
    """Canary ``index``: uint8 (size, size, 3), a mosaic of 8x8 random-colour cells.

    Unlike any built-in kind (its nearest, smooth noise, blends 3-8 cells), the colour changes
    sharply at every cell edge. Its generator stream differs from the built-in images', so
    canary k is unrelated to built-in image k.
    """
    rng = np.random.default_rng([seed, index, 0xCA])
    cells = _colors(rng, 64).reshape(8, 8, 3)
    cell = np.minimum((np.arange(size) * 8) // size, 7)
    return np.clip(np.rint(cells[cell[:, None], cell[None, :]]), 0, 255).astype(np.uint8)
