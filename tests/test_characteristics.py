"""Per-image characteristics against hand-computed values on tiny synthetic images."""

import colorsys
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from pytest_memaudit.data.characteristics import CHARACTERISTICS, image_characteristics
from pytest_memaudit.errors import DataError

LUMA = np.array([0.2989, 0.587, 0.114])  # the ITU-R 601 weights the augmentations use


def batch(*images) -> torch.Tensor:
    """(n, 3, H, W) uint8 from (H, W) grey or (H, W, 3) RGB arrays."""
    rgb = [np.repeat(np.asarray(i)[..., None], 3, -1) if np.ndim(i) == 2 else np.asarray(i) for i in images]
    return torch.from_numpy(np.stack(rgb).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


def of(images, name):
    return image_characteristics(batch(*images))[name]


def grating(size, fy, fx, amplitude, offset=128):
    """offset + amplitude cos(2 pi (fy y + fx x)), exact in uint8 for the frequencies used here."""
    y, x = np.mgrid[:size, :size]
    return np.rint(offset + amplitude * np.cos(2 * np.pi * (fy * y + fx * x)))


def flat(size=24, value=(90, 90, 90)):
    return np.broadcast_to(np.array(value, np.uint8), (size, size, 3))


def checkerboard(size, square):
    y, x = np.mgrid[:size, :size]
    return ((y // square + x // square) % 2) * 255


def power_law(size, seed, exponent):
    """An image whose luma has FFT power exactly proportional to f^-exponent (then quantized)."""
    rng = np.random.default_rng(seed)
    phase = np.fft.fft2(rng.standard_normal((size, size)))
    phase /= np.abs(phase)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    f[0, 0] = 1
    field = np.fft.ifft2(phase * f ** (-exponent / 2)).real
    return np.rint((field - field.min()) / np.ptp(field) * 255)


def test_names_order_shapes_and_empty_batch():
    images = batch(*[np.random.default_rng(i).integers(0, 256, (16, 24, 3)) for i in range(3)])
    result = image_characteristics(images)
    assert list(result) == list(CHARACTERISTICS) == [
        "hf_energy_share", "spectral_slope", "compressibility", "edge_density", "colourfulness", "saturation",
        "brightness", "green_share", "centre_border_contrast"]
    assert all(v.dtype == np.float64 and v.shape == (3,) for v in result.values())
    empty = image_characteristics(torch.empty(0, 3, 32, 32, dtype=torch.uint8))
    assert list(empty) == list(CHARACTERISTICS) and all(v.shape == (0,) for v in empty.values())


def test_a_batch_gives_each_image_its_own_values():
    # more images than one vectorized chunk; each image alone must give the same numbers
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, (130, 3, 16, 16), dtype=np.uint8))
    images[5] = 77  # a constant image among them
    together = image_characteristics(images)
    for i in (0, 5, 127, 128, 129):
        alone = image_characteristics(images[i : i + 1])
        for name in CHARACTERISTICS:
            np.testing.assert_allclose(together[name][i], alone[name][0], rtol=1e-12, equal_nan=True)


def test_high_frequency_share_of_sinusoids():
    below = grating(24, 0, 1 / 6, 120)  # 0.167 cycles/pixel, under the 0.25 cutoff
    above = grating(24, 0, 1 / 3, 120)  # 0.333
    diagonal = grating(24, 1 / 4, 1 / 4, 120)  # radius sqrt(2)/4 = 0.354: above although each axis is at 0.25
    # amplitudes 60 and 40: power in proportion 60^2 : 40^2, so the share above is 1600 / 5200
    mixed = grating(24, 0, 1 / 6, 60) + grating(24, 0, 1 / 3, 40, offset=0)
    one_pixel_grid = checkerboard(24, 1)
    shares = of([below, above, diagonal, mixed, one_pixel_grid], "hf_energy_share")
    np.testing.assert_allclose(shares, [0, 1, 1, 4 / 13, 1], atol=1e-12)


def test_white_noise_spreads_power_evenly():
    # flat spectrum: the share above is the share of frequencies above 0.25 (DC excluded), the slope near 0
    noise = [np.random.default_rng(seed).integers(0, 256, (64, 64)) for seed in range(4)]
    fy, fx = np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij")
    expected = np.count_nonzero(np.hypot(fy, fx) > 0.25) / (64 * 64 - 1)
    result = image_characteristics(batch(*noise))
    assert result["hf_energy_share"].mean() == pytest.approx(expected, abs=0.02)
    assert np.abs(result["spectral_slope"]).max() < 0.1


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_spectral_slope_of_power_laws(exponent):
    # power exactly f^-exponent; averaging power over rings (the first spans radii 0.5 to 1.5 ring widths)
    # flattens the fit slightly: about 0.05 at 64x64 for f^-2
    slopes = of([power_law(64, seed, exponent) for seed in range(3)], "spectral_slope")
    np.testing.assert_allclose(slopes, -exponent, atol=0.1)


def test_flat_image_compresses_best_and_has_no_spectrum():
    images = [flat(), grating(24, 0, 1 / 6, 120), checkerboard(24, 1), checkerboard(24, 2),
              power_law(24, 0, 2.0), np.random.default_rng(0).integers(0, 256, (24, 24, 3))]
    result = image_characteristics(batch(*images))
    sizes = result["compressibility"]
    assert np.argmin(sizes) == 0 and np.all(sizes[1:] > sizes[0])
    assert math.isnan(result["hf_energy_share"][0]) and math.isnan(result["spectral_slope"][0])
    assert not np.isnan(result["hf_energy_share"][1:]).any()
    # bytes per pixel of the same PNG written by hand
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(images[5]).astype(np.uint8), "RGB").save(buffer, "PNG", compress_level=6)
    assert sizes[5] == len(buffer.getvalue()) / (24 * 24)


def test_edge_density():
    # squares of two pixels: at every interior pixel the central difference is +-1 on its own square's rows
    # and -+1 on the other row, so each axis gives (2 + 1 - 1) / 8 = 0.25; one-pixel squares are Sobel's blind
    # spot (each central difference spans two equal pixels)
    two, one = checkerboard(24, 2), checkerboard(24, 1)
    assert list(of([two, one, flat()], "edge_density")) == [1.0, 0.0, 0.0]
    # a vertical step of 200: only the two columns beside it have a gradient (0.39 luma per pixel)
    step = np.zeros((16, 16))
    step[:, 8:] = 200
    assert of([step], "edge_density")[0] == pytest.approx(2 * 14 / (14 * 14))


def test_edge_density_matches_scipy_sobel():
    images = [np.random.default_rng(seed).integers(0, 256, (4, 4, 3)).repeat(8, 0).repeat(8, 1) for seed in range(3)]
    images = [np.clip(i + np.random.default_rng(9).integers(-12, 12, i.shape), 0, 255) for i in images]
    expected = []
    for image in images:
        luma = image.astype(np.float64) @ LUMA / 255
        magnitude = np.hypot(ndimage.sobel(luma, axis=0), ndimage.sobel(luma, axis=1))[1:-1, 1:-1] / 8
        expected.append(np.mean(magnitude > 0.05))
    np.testing.assert_allclose(of(images, "edge_density"), expected, rtol=0, atol=1e-15)


def test_colourfulness():
    grey = flat(16, (120, 120, 120))
    two_colour = np.zeros((16, 16, 3))
    two_colour[:, :10] = (200, 30, 30)
    two_colour[:, 10:] = (20, 40, 220)
    noise = np.random.default_rng(5).integers(0, 256, (16, 16, 3))
    expected = []
    for image in (two_colour, noise):
        r, g, b = image.reshape(-1, 3).astype(np.float64).T
        rg, yb = r - g, 0.5 * (r + g) - b
        expected.append(math.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2))
    # by hand for the two colours: rg is 170 on 10 columns and -20 on 6, yb is 85 and -190
    assert expected[0] == pytest.approx(math.sqrt(190**2 * 0.375 * 0.625 + 275**2 * 0.375 * 0.625)
                                        + 0.3 * math.hypot(98.75, -18.125))
    values = of([grey, two_colour, noise], "colourfulness")
    assert values[0] == 0
    np.testing.assert_allclose(values[1:], expected, rtol=1e-12)


def test_saturation_brightness_and_green_share_of_pure_colours():
    colours = [(0, 255, 0), (255, 0, 0), (0, 0, 255), (128, 128, 128), (0, 0, 0), (40, 100, 60), (30, 40, 30),
               (180, 240, 0), (181, 240, 0), (0, 240, 180), (0, 240, 181)]
    result = image_characteristics(batch(*[flat(16, c) for c in colours]))
    np.testing.assert_allclose(result["saturation"], [1, 1, 1, 0, 0, 0.6, 0.25, 1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(result["brightness"], [1, 1, 1, 128 / 255, 0, 100 / 255, 40 / 255] + [240 / 255] * 4,
                               rtol=1e-12)
    # (40, 100, 60): hue 140, green; (30, 40, 30): too dark (value 0.157); hue 75 and 165 are in, 74.75 and
    # 165.25 are out
    assert list(result["green_share"]) == [1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0]


def test_hsv_figures_match_colorsys():
    image = np.random.default_rng(11).integers(0, 256, (16, 16, 3))
    hsv = np.array([colorsys.rgb_to_hsv(*(pixel / 255)) for pixel in image.reshape(-1, 3)])
    hue = hsv[:, 0] * 360
    green = (hue >= 75) & (hue <= 165) & (hsv[:, 1] >= 0.2) & (hsv[:, 2] >= 0.2)
    result = image_characteristics(batch(image))
    assert result["saturation"][0] == pytest.approx(hsv[:, 1].mean(), rel=1e-7)
    assert result["brightness"][0] == pytest.approx(hsv[:, 2].mean(), rel=1e-12)
    assert result["green_share"][0] == green.mean()


def test_centre_border_contrast():
    # 32x32: the central box is rows and columns 8 to 23, the frame the outer 4 pixels on each side
    blue, red = (20, 40, 220), (230, 20, 10)
    centred = np.array(flat(32, blue))
    centred[8:24, 8:24] = red
    half = np.array(flat(32, blue))
    half[8:24, 8:16] = red  # half of the central box
    off_centre = np.array(flat(32, blue))
    off_centre[0:8, 24:32] = red  # a subject in a corner: the central box is all background
    values = of([flat(32), centred, half, off_centre], "centre_border_contrast")
    # off-centre: the frame has 32^2 - 24^2 = 448 pixels, 64 - 16 of them red; the centre none
    np.testing.assert_allclose(values, [0, 1, 0.5, 48 / 448], atol=1e-12)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(2, 3, 32, 32), "uint8"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "(n, 3, H, W)"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), "(n, 3, H, W)"),
    (torch.zeros(2, 3, 8, 32, dtype=torch.uint8), "at least 16x16"),
    (np.zeros((2, 3, 32, 32), np.uint8), "torch.Tensor"),
])
def test_bad_input_is_a_data_error(images, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image_characteristics(images)
