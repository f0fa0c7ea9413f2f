"""The seed report's augmentation recipe as a batched, seeded transform.

Each image becomes V views. A view, applied to an image tensor in [0, 1], is:

1. ``RandomApply([RandomHorizontalFlip()], p=0.5)``: two coins, so a flip with probability 0.25
   overall (kept as the seed wrote it);
2. ``RandomApply([ColorJitter(0.9, 0.9, 0.9, 0.1)], p=0.9)``: brightness, contrast and
   saturation factors uniform in [0.1, 1.9], a hue shift uniform in [-0.1, 0.1], the four ops in
   a random order, each as torchvision's tensor implementation (clamped to [0, 1]);
3. ``RandomGrayscale(p=0.1)`` with ITU-R 601 luma weights, replicated to 3 channels;
4. (resize: done at decode time, before this module);
5. ``x * 2 - 1``.

All views of a batch are computed together on the images' device. The random parameters are
drawn on the CPU, per image, from a ``torch.Generator`` seeded with that image's seed, so a
view depends only on its image and its seed, never on how the images were batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

FLIP_P = 0.5
JITTER_P = 0.9
GRAYSCALE_P = 0.1
BRIGHTNESS = CONTRAST = SATURATION = 0.9
HUE = 0.1
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

# Column of each uniform draw in a view's row of draws (see ``sample_view_params``).
_FLIP_OUTER, _FLIP_INNER, _JITTER = 0, 1, 2
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 3, 4, 5, 6
_ORDER_KEYS = slice(7, 11)
_GRAYSCALE = 11
_DRAWS_PER_VIEW = 12


@dataclass
class ViewParams:
    """Random parameters of n views, one row per view.

    ``order[v]`` is the permutation of the jitter ops for view v, applied left to right, with
    0 = brightness, 1 = contrast, 2 = saturation, 3 = hue. Factors are stored for every view;
    they only act where ``jitter`` is set.
    """

    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor

    def __len__(self) -> int:
        return self.flip.shape[0]

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def sample_view_params(image_seeds: Sequence[int], views: int) -> ViewParams:
    """Draw the parameters of ``views`` views of each image, image-major.

    Per image: ``g = torch.Generator().manual_seed(seed)``, then one
    ``torch.rand((views, 12), dtype=torch.float64, generator=g)``. Row v holds view v's draws:
    column 0 and 1 the two flip coins, 2 the jitter coin, 3-6 the brightness, contrast,
    saturation and hue draws (scaled linearly to their ranges, then cast to float32), 7-10
    the keys whose ascending stable argsort is the op order (a uniform permutation), 11 the
    grayscale coin. A coin of probability p fires when its draw is < p. Since the draws are
    row-major, the first k views of an image are the same whatever ``views`` is.
    """
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    draws = [
        torch.rand(
            (views, _DRAWS_PER_VIEW),
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(int(seed)),
        )
        for seed in image_seeds
    ]
    u = torch.cat(draws) if draws else torch.empty((0, _DRAWS_PER_VIEW), dtype=torch.float64)

    def uniform(column: int, low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * u[:, column]).to(torch.float32)

    return ViewParams(
        flip=(u[:, _FLIP_OUTER] < FLIP_P) & (u[:, _FLIP_INNER] < FLIP_P),
        jitter=u[:, _JITTER] < JITTER_P,
        order=torch.argsort(u[:, _ORDER_KEYS], dim=1, stable=True),
        brightness=uniform(_BRIGHTNESS, 1 - BRIGHTNESS, 1 + BRIGHTNESS),
        contrast=uniform(_CONTRAST, 1 - CONTRAST, 1 + CONTRAST),
        saturation=uniform(_SATURATION, 1 - SATURATION, 1 + SATURATION),
        hue=uniform(_HUE, -HUE, HUE),
        grayscale=u[:, _GRAYSCALE] < GRAYSCALE_P,
    )


def augment_views(images: torch.Tensor, views: int, image_seeds: Sequence[int]) -> torch.Tensor:
    """Make the views of a batch of images, image-major, scaled to [-1, 1].

    ``images`` is (n, 3, H, W), floating point, in [0, 1], on any device; the result is
    (n * max(views, 1), 3, H, W) on the same device and in the same dtype. ``views == 0`` means
    one plain view per image: ``images * 2 - 1``.
    """
    _check_images(images)
    if views < 0:
        raise ValueError(f"views must be non-negative, got {views}")
    if len(image_seeds) != images.shape[0]:
        raise ValueError(f"got {len(image_seeds)} seeds for {images.shape[0]} images")
    if views == 0:
        return images * 2 - 1
    return apply_views(images, sample_view_params(image_seeds, views))


def apply_views(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Apply explicit view parameters: row r of ``params`` makes view r of the result.

    ``len(params)`` must be a multiple V of the number of images; image i's views are rows
    i*V ... i*V + V - 1. The pixel math runs in float32 whatever the input dtype (so float16
    and bfloat16 inputs work), and the result is cast back to the input dtype. Each op runs only
    on the rows it applies to, so a view an op skips is left bit-exactly unchanged.
    """
    _check_images(images)
    n = images.shape[0]
    views = len(params) // n if n else 0
    if len(params) != n * views:
        raise ValueError(f"{len(params)} view parameters do not divide among {n} images")

    # Plan on the CPU (nonzero on a CUDA tensor would wait for the device), then move all row
    # indices in one transfer and all jitter factors in another.
    params = params.to("cpu")
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    jitter_steps = [
        (op, (params.jitter & (params.order[:, position] == op)).nonzero().squeeze(1))
        for position in range(4)
        for op in range(4)
    ]
    all_rows = [
        params.flip.nonzero().squeeze(1),
        *(rows for _, rows in jitter_steps),
        params.grayscale.nonzero().squeeze(1),
    ]
    sizes = [len(rows) for rows in all_rows]
    rows_on_device = _to_device(torch.cat(all_rows), images.device).split(sizes)
    factors_on_device = _to_device(
        torch.cat([factors[op][rows] for op, rows in jitter_steps]), images.device
    ).split(sizes[1:-1])

    x = images.to(torch.float32).repeat_interleave(views, dim=0)
    _on_rows(x, rows_on_device[0], torch.flip, [-1])
    for (op, _), rows, factor in zip(jitter_steps, rows_on_device[1:-1], factors_on_device):
        _on_rows(x, rows, _JITTER_OPS[op], factor)
    _on_rows(x, rows_on_device[-1], rgb_to_grayscale)
    return x.mul_(2).sub_(1).to(images.dtype)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale each view (m, 3, H, W) by its factor (m,), clamped to [0, 1]."""
    return (x * _per_view(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each view with the mean of its grayscale image, as torchvision does."""
    return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each view with its grayscale image, pixel by pixel."""
    return _blend(x, _luma(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate each view's hue by its factor (a fraction of a turn), in HSV, per pixel.

    RGB to HSV follows the usual hexcone definition (hue 0 where all channels are equal);
    HSV to RGB uses the closed form ``c_n = v - v * s * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 * hue) mod 6`` and n = 5, 3, 1 for red, green, blue, which equals the
    six-sector table torchvision gathers from.
    """
    r, g, b = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    spread = maxc - minc
    saturation = spread / torch.where(maxc > 0, maxc, 1.0)
    # spread is 0 only where r = g = b, and then every numerator below is 0 too.
    divisor = spread.masked_fill_(spread == 0, 1.0)
    # Hue in sixths of a turn, in [-1, 5): red, then green, then blue wins a tie for the max.
    sixths = torch.where(
        maxc == r,
        (g - b).div_(divisor),
        torch.where(maxc == g, (b - r).div_(divisor).add_(2), (r - g).div_(divisor).add_(4)),
    )
    sixths.add_(6 * factor.view(-1, 1, 1))
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # no host copy
    k = (sixths.unsqueeze(1) + offsets).remainder_(6.0)
    ramp = k.sub_(2).abs_().neg_().add_(2).clamp_(0, 1)  # min(k, 4 - k), in place
    value = maxc.unsqueeze(1)
    return ramp.mul_(value * saturation.unsqueeze(1)).neg_().add_(value).clamp_(0, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of each view, replicated to 3 channels."""
    return _luma(x).expand(-1, 3, -1, -1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point (n, 3, H, W) tensor, got {tuple(images.shape)} "
            f"{images.dtype}"
        )


def _on_rows(x: torch.Tensor, rows: torch.Tensor, op: Callable, *args) -> None:
    """Replace the given rows of x, in place, by ``op(those rows, *args)``."""
    if len(rows):
        # x[rows], not index_select: on the CPU the latter is about 10x slower for whole views.
        x.index_copy_(0, rows, op(x[rows], *args))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device`` without waiting for it: a plain copy to a GPU waits for all queued work."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _per_view(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(m, 3, H, W) -> (m, 1, H, W)."""
    r, g, b = x.unbind(1)
    wr, wg, wb = LUMA_WEIGHTS
    return r.mul(wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_view(factor)
    return (x * f).add_(other * (1 - f)).clamp_(0, 1)
