"""Cheap per-image characteristics, to relate what an image looks like to how memorized it is.

The seed report described its most memorized images as showing high-frequency patterns such as
grids, and its least memorized ones as green, plant-like, without a clear foreground. Each
characteristic here turns one such word into a number per image, with fixed constants, so that
it can be correlated with a per-image memorization score.

Input: the images exactly as the model saw them before augmentation (resized RGB, uint8,
(n, 3, H, W)); the pixels are not converted or re-decoded. Everything is computed on the CPU
in float64 (saturation per pixel in float32), vectorized over chunks of images; only the PNG
size loops over images. Luma uses the augmentations' ITU-R 601 weights. Cost at 64x64 on one
core: about 0.5 to 0.7 ms per image, half of it the PNG encoding; linear in n.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .augment import LUMA_WEIGHTS

HF_CUTOFF = 0.25  # cycles per pixel
PNG_COMPRESS_LEVEL = 6  # zlib level; Pillow's default, no ``optimize``
EDGE_THRESHOLD = 0.05  # Sobel gradient magnitude, luma (0 to 1) per pixel
GREEN_HUE = (75, 165)  # degrees, inclusive; must lie within 60-180 (see _green_share)
GREEN_SATURATION_MIN = 0.2
GREEN_VALUE_MIN = 0.2
HISTOGRAM_LEVELS = 4  # per RGB channel, for centre_border_contrast: 64 colour bins
MIN_SIDE = 16
_CHUNK = 128  # images per vectorized step: bounds memory at large sizes, keeps the cost linear

CHARACTERISTICS: dict[str, str] = {
    "hf_energy_share": (
        f"Share of the luma's 2-D FFT power (mean removed, no window) at radial frequencies strictly above "
        f"{HF_CUTOFF} cycles/pixel; 1 for a one-pixel grid, 0 for smooth shading; undefined for a constant luma."
    ),
    "spectral_slope": (
        "Slope of a least-squares line through log radially averaged FFT power of the luma against log radial "
        "frequency (rings of width 1/min(H, W) cycles/pixel, from the first ring to 0.5, rings without power "
        "left out); about -2 for natural images, closer to 0 for noise and fine texture; undefined for a "
        "constant luma or fewer than two rings with power."
    ),
    "compressibility": (
        f"Size of the RGB image as PNG (Pillow, zlib level {PNG_COMPRESS_LEVEL}, no optimize, header included) in "
        "bytes per pixel: a complexity proxy, lowest for a flat image."
    ),
    "edge_density": (
        f"Share of pixels whose Sobel gradient magnitude of the luma (kernels divided by 8: luma per pixel) is above "
        f"{EDGE_THRESHOLD}, i.e. a clean step of more than {2 * EDGE_THRESHOLD:g} in luma; only pixels with a full 3x3 "
        "neighbourhood count (the one-pixel frame is left out). 1 for a checkerboard of 2-pixel squares; Sobel does "
        "not see the Nyquist frequency, so one-pixel stripes or checkerboards score 0 (hf_energy_share sees them)."
    ),
    "colourfulness": (
        "Hasler and Suesstrunk's colourfulness on 0-255 values: with rg = R - G and yb = (R + G)/2 - B over the "
        "pixels, sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2) (population std); 0 for greys."
    ),
    "saturation": "Mean HSV saturation, (max - min)/max of R, G, B (0 for black), in [0, 1].",
    "brightness": "Mean HSV value, max(R, G, B)/255, in [0, 1].",
    "green_share": (
        f"Share of pixels with HSV hue in [{GREEN_HUE[0]:g}, {GREEN_HUE[1]:g}] degrees, saturation at least "
        f"{GREEN_SATURATION_MIN} and value at least {GREEN_VALUE_MIN}: green, plant-like areas."
    ),
    "centre_border_contrast": (
        f"Total-variation distance, from 0 to 1, between the colour histograms ({HISTOGRAM_LEVELS} levels per RGB "
        f"channel, {HISTOGRAM_LEVELS ** 3} bins) of the central box (half the height and half the width) and of the "
        "outer frame (the outermost eighth on each side): 1 when they share no colour bin. A proxy for a subject "
        "that stands out from its background, not a segmentation: a centred subject in the background's colours, "
        "or an off-centre one, scores low, and a scene whose colours merely change towards the middle scores high."
    ),
}


def image_characteristics(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Each characteristic of ``CHARACTERISTICS``, in that order, as a float64 array of shape (n,).

    ``images``: uint8 (n, 3, H, W), RGB, H and W at least 16, on any device (copied to the CPU).
    NaN marks a value that is undefined for an image (see the descriptions).
    """
    _check(images)
    images = images.cpu()
    parts = [_characteristics_of_chunk(images[start : start + _CHUNK]) for start in range(0, images.shape[0], _CHUNK)]
    if not parts:
        return {name: np.empty(0, dtype=np.float64) for name in CHARACTERISTICS}
    return {name: np.concatenate([part[name] for part in parts]) for name in CHARACTERISTICS}


def _check(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise DataError(f"image characteristics need a torch.Tensor of images, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"image characteristics need uint8 RGB images shaped (n, 3, H, W), got {images.dtype} {tuple(images.shape)}: "
            "pass the resized, un-augmented pixels the audit fed the model"
        )
    if min(images.shape[2:]) < MIN_SIDE:
        raise DataError(f"image characteristics need images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got "
                        f"{images.shape[2]}x{images.shape[3]}")


def _characteristics_of_chunk(images: torch.Tensor) -> dict[str, np.ndarray]:
    luma = torch.einsum("nchw,c->nhw", images.to(torch.float64), torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)) / 255
    constant = luma.flatten(1).amax(1) == luma.flatten(1).amin(1)
    hf_share, slope = _spectrum(luma)
    value = images.amax(1).to(torch.int32)  # HSV value times 255, (n, H, W)
    spread = value - images.amin(1).to(torch.int32)
    saturation = spread / value.clamp(min=1)  # float32; 0 for black, where spread is 0 too
    values = {
        "hf_energy_share": hf_share.masked_fill(constant, float("nan")),
        "spectral_slope": slope.masked_fill(constant, float("nan")),
        "compressibility": _png_bytes_per_pixel(images),
        "edge_density": _edge_density(luma),
        "colourfulness": _colourfulness(images),
        "saturation": saturation.flatten(1).mean(1, dtype=torch.float64),
        "brightness": value.flatten(1).mean(1, dtype=torch.float64) / 255,
        "green_share": _green_share(images, value, spread, saturation),
        "centre_border_contrast": _centre_border_contrast(images),
    }
    return {name: values[name].to(torch.float64).numpy() for name in CHARACTERISTICS}


def _spectrum(luma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-frequency share, spectral slope) of each image's luma; garbage for constant ones."""
    height, width = luma.shape[1:]
    power = torch.fft.fft2(luma - luma.mean((1, 2), keepdim=True)).abs().square().flatten(1)  # (n, H*W)
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    radius = (fy.square() + fx.square()).sqrt().flatten()
    hf_share = power[:, radius > HF_CUTOFF].sum(1) / power.sum(1)

    side = min(height, width)
    rings = side // 2  # ring k (1 to rings) holds the radii within half a ring width of k/side
    ring = torch.round(radius * side).to(torch.int64).clamp(max=rings + 1)  # 0: DC; rings + 1: beyond 0.5
    sums = torch.zeros(power.shape[0], rings + 2, dtype=torch.float64).index_add_(1, ring, power)
    mean_power = sums[:, 1 : rings + 1] / torch.bincount(ring, minlength=rings + 2)[1 : rings + 1]
    weight = (mean_power > 0).to(torch.float64)  # least squares over the rings that have power
    x = torch.log(torch.arange(1, rings + 1, dtype=torch.float64) / side)
    y = torch.log(torch.where(weight > 0, mean_power, 1.0))
    count, sx, sy = weight.sum(1), weight @ x, (weight * y).sum(1)
    sxx, sxy = weight @ x.square(), (weight * y) @ x
    slope = (count * sxy - sx * sy) / (count * sxx - sx.square())
    slope = slope.masked_fill(count < 2, float("nan"))
    return hf_share, slope


def _png_bytes_per_pixel(images: torch.Tensor) -> torch.Tensor:
    pixels = images.permute(0, 2, 3, 1).contiguous().numpy()
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        sizes.append(buffer.tell())
    return torch.tensor(sizes, dtype=torch.float64) / (pixels.shape[1] * pixels.shape[2])


def _edge_density(luma: torch.Tensor) -> torch.Tensor:
    # Sobel, separably on the interior: a central difference along one axis, [1, 2, 1] along the other
    along_x = luma[:, :, 2:] - luma[:, :, :-2]
    along_y = luma[:, 2:] - luma[:, :-2]
    gradient_x = (along_x[:, :-2] + 2 * along_x[:, 1:-1] + along_x[:, 2:]) / 8
    gradient_y = (along_y[:, :, :-2] + 2 * along_y[:, :, 1:-1] + along_y[:, :, 2:]) / 8
    magnitude = (gradient_x.square() + gradient_y.square()).sqrt()
    return (magnitude > EDGE_THRESHOLD).flatten(1).to(torch.float64).mean(1)


def _colourfulness(images: torch.Tensor) -> torch.Tensor:
    red, green, blue = images.flatten(2).to(torch.int32).unbind(1)
    pixels = red.shape[1]

    def mean_and_variance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # from exact integer sums, so that a constant column has variance exactly 0
        mean = x.sum(1, dtype=torch.int64).to(torch.float64) / pixels
        mean_square = x.square().sum(1, dtype=torch.int64).to(torch.float64) / pixels
        return mean, (mean_square - mean.square()).clamp(min=0)

    rg_mean, rg_variance = mean_and_variance(red - green)
    yb2_mean, yb2_variance = mean_and_variance(red + green - 2 * blue)  # twice yb
    spread = (rg_variance + yb2_variance / 4).sqrt()
    return spread + 0.3 * (rg_mean.square() + yb2_mean.square() / 4).sqrt()


def _green_share(images: torch.Tensor, value: torch.Tensor, spread: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    # Where green is the largest channel, hue = 120 + 60 (B - R) / spread degrees, which spans 60 to 180 and
    # holds the whole band (ties give the same hue in either sector); so the band is a pair of integer
    # inequalities on B - R, with no division.
    red, green, blue = images.to(torch.int32).unbind(1)
    offset = 60 * (blue - red)
    in_band = ((green == value) & (spread > 0)
               & (offset >= (GREEN_HUE[0] - 120) * spread) & (offset <= (GREEN_HUE[1] - 120) * spread))
    floors = (saturation >= GREEN_SATURATION_MIN) & (value >= GREEN_VALUE_MIN * 255)
    return (in_band & floors).flatten(1).mean(1, dtype=torch.float64)


def _centre_border_contrast(images: torch.Tensor) -> torch.Tensor:
    n, _, height, width = images.shape
    level = torch.div(images, 256 // HISTOGRAM_LEVELS, rounding_mode="floor")
    colour = (level[:, 0] * HISTOGRAM_LEVELS + level[:, 1]) * HISTOGRAM_LEVELS + level[:, 2]  # (n, H, W), uint8
    rows, columns = torch.arange(height)[:, None], torch.arange(width)[None, :]
    centre = ((rows >= height // 4) & (rows < height - height // 4)
              & (columns >= width // 4) & (columns < width - width // 4))
    frame = ((rows < height // 8) | (rows >= height - height // 8)
             | (columns < width // 8) | (columns >= width - width // 8))

    def histogram(region: torch.Tensor) -> torch.Tensor:
        bins = colour[:, region].to(torch.int64)  # (n, pixels in the region)
        counts = torch.zeros(n, HISTOGRAM_LEVELS**3, dtype=torch.float64)
        counts.scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.float64))
        return counts / bins.shape[1]

    return (histogram(centre) - histogram(frame)).abs().sum(1) / 2
