"""The batched view augmentation against a per-view torchvision reference, and its seeding."""

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pytest_memaudit.data.augment import ViewParams, apply_views, augment_views, sample_view_params

PERMUTATIONS = list(itertools.permutations(range(4)))

# Float32 rounding differs from torchvision's (blend written as x*f + m*(1-f), a different
# HSV formula, batched reductions); measured worst case about 4e-6 after four chained ops.
ATOL = 1e-5


def make_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images; odd ones quantized to 5 levels, so channel ties and gray pixels occur."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((n, 3, size, size), generator=g)
    images[1::2] = (images[1::2] * 4).round() / 4
    return images


def explicit_params(rows: int, seed: int = 0) -> ViewParams:
    """Cycles through every op order and every flip / jitter / grayscale combination."""
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(rows)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(rows, generator=g)

    return ViewParams(
        flip=index % 2 == 1,
        jitter=index % 5 != 4,
        order=torch.tensor([PERMUTATIONS[i % len(PERMUTATIONS)] for i in range(rows)]),
        brightness=uniform(0.1, 1.9),
        contrast=uniform(0.1, 1.9),
        saturation=uniform(0.1, 1.9),
        hue=uniform(-0.1, 0.1),
        grayscale=index % 3 == 2,
    )


def reference_view(image: torch.Tensor, params: ViewParams, row: int) -> torch.Tensor:
    """One view made with torchvision's functional ops, as the seed's recipe composes them."""
    x = image
    if params.flip[row]:
        x = TF.horizontal_flip(x)
    if params.jitter[row]:
        ops = (
            lambda x: TF.adjust_brightness(x, params.brightness[row].item()),
            lambda x: TF.adjust_contrast(x, params.contrast[row].item()),
            lambda x: TF.adjust_saturation(x, params.saturation[row].item()),
            lambda x: TF.adjust_hue(x, params.hue[row].item()),
        )
        for op in params.order[row].tolist():
            x = ops[op](x)
    if params.grayscale[row]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return x * 2 - 1


def test_apply_views_matches_torchvision_per_view():
    views = 2 * len(PERMUTATIONS)
    images = make_images(3)
    params = explicit_params(3 * views)
    expected = torch.stack(
        [reference_view(images[r // views], params, r) for r in range(len(params))]
    )
    torch.testing.assert_close(apply_views(images, params), expected, rtol=0, atol=ATOL)


def test_apply_views_matches_torchvision_on_sampled_params():
    images = make_images(4, size=32, seed=1)
    params = sample_view_params([11, 12, 13, 14], 10)
    expected = torch.stack([reference_view(images[r // 10], params, r) for r in range(40)])
    torch.testing.assert_close(apply_views(images, params), expected, rtol=0, atol=ATOL)


def test_op_order_matters():
    images = make_images(1)
    params = explicit_params(2)
    params.jitter[:] = True
    params.flip[:] = params.grayscale[:] = False
    for name in ("brightness", "contrast", "saturation", "hue"):
        getattr(params, name)[1] = getattr(params, name)[0]
    params.order[0] = torch.tensor([0, 1, 2, 3])
    params.order[1] = torch.tensor([3, 2, 1, 0])
    out = apply_views(images, params)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_skipped_ops_leave_views_bit_exact():
    images = make_images(2)
    params = explicit_params(8)
    params.flip[:] = params.jitter[:] = params.grayscale[:] = False
    params.flip[3] = True
    out = apply_views(images, params)
    plain = images.repeat_interleave(4, dim=0) * 2 - 1
    rows = [0, 1, 2, 4, 5, 6, 7]
    assert torch.equal(out[rows], plain[rows])
    assert torch.equal(out[3], plain[3].flip(-1))


def test_grayscale_views_have_equal_channels():
    images = make_images(1)
    params = explicit_params(4)
    params.grayscale[:] = True
    out = apply_views(images, params)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_views_zero_is_plain_scaling():
    images = make_images(3)
    out = augment_views(images, 0, [1, 2, 3])
    assert torch.equal(out, images * 2 - 1)


def test_shape_range_dtype_and_image_major_order():
    images = make_images(3)
    images[1] = 0.0  # black stays black under every op
    out = augment_views(images, 5, [7, 8, 9])
    assert out.shape == (15, 3, 16, 16)
    assert out.dtype == images.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[5:10], torch.full_like(out[5:10], -1.0))
    alone = augment_views(images[2:3], 5, [9])
    torch.testing.assert_close(out[10:15], alone, rtol=0, atol=1e-6)


def test_same_seeds_same_views_and_new_seed_new_views():
    images = make_images(3)
    first = augment_views(images, 10, [1, 2, 3])
    assert torch.equal(first, augment_views(images, 10, [1, 2, 3]))
    changed = augment_views(images, 10, [1, 2, 4])
    assert torch.equal(changed[:20], first[:20])
    assert not torch.allclose(changed[20:], first[20:])


def test_views_do_not_depend_on_batching():
    images = make_images(5)
    seeds = [101, 102, 103, 104, 105]
    batch = augment_views(images, 10, seeds)
    params = sample_view_params(seeds, 10)
    for k in range(5):
        alone = sample_view_params([seeds[k]], 10)
        for name in ("flip", "jitter", "order", "brightness", "contrast", "saturation", "hue",
                     "grayscale"):
            assert torch.equal(getattr(alone, name), getattr(params, name)[k * 10:(k + 1) * 10])
        # Equal parameters; pixels could differ by rounding only (a CPU reduction over a large
        # view may be split across threads differently for a different number of rows).
        torch.testing.assert_close(
            augment_views(images[k:k + 1], 10, [seeds[k]]),
            batch[k * 10:(k + 1) * 10],
            rtol=0,
            atol=1e-6,
        )


def test_draw_sequence_is_as_documented():
    """Pins the documented draws, so past audits stay reproducible."""
    u = torch.rand((3, 12), dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
    p = sample_view_params([1234], 3)
    assert torch.equal(p.flip, (u[:, 0] < 0.5) & (u[:, 1] < 0.5))
    assert torch.equal(p.jitter, u[:, 2] < 0.9)
    assert torch.equal(p.order, torch.argsort(u[:, 7:11], dim=1, stable=True))
    assert torch.equal(p.grayscale, u[:, 11] < 0.1)
    for factor, column, low, high in (
        (p.brightness, 3, 0.1, 1.9),
        (p.contrast, 4, 0.1, 1.9),
        (p.saturation, 5, 0.1, 1.9),
        (p.hue, 6, -0.1, 0.1),
    ):
        torch.testing.assert_close(factor, (low + (high - low) * u[:, column]).float())


def test_first_views_do_not_depend_on_view_count():
    few, many = sample_view_params([5, 6], 3), sample_view_params([5, 6], 8)
    assert torch.equal(few.order[:3], many.order[:3])
    assert torch.equal(few.hue[3:], many.hue[8:11])


def test_half_precision_inputs():
    images = make_images(2)
    expected = augment_views(images, 4, [1, 2])
    for dtype in (torch.bfloat16, torch.float16):
        out = augment_views(images.to(dtype), 4, [1, 2])
        assert out.dtype == dtype
        # Only the input and output roundings differ: a few ulps of the half type.
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.05)


def test_sampled_parameter_statistics():
    n = 20_000
    p = sample_view_params(range(2_000), 10)
    assert len(p) == n

    def assert_rate(mask: torch.Tensor, rate: float) -> None:
        standard_error = math.sqrt(rate * (1 - rate) / mask.numel())
        assert abs(mask.float().mean().item() - rate) < 4 * standard_error

    assert_rate(p.flip, 0.25)
    assert_rate(p.jitter, 0.9)
    assert_rate(p.grayscale, 0.1)
    for position in range(4):
        for op in range(4):
            assert_rate(p.order[:, position] == op, 0.25)
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))

    for factor, low, high in (
        (p.brightness, 0.1, 1.9),
        (p.contrast, 0.1, 1.9),
        (p.saturation, 0.1, 1.9),
        (p.hue, -0.1, 0.1),
    ):
        assert factor.dtype == torch.float32
        width = high - low
        assert factor.min() >= low and factor.max() <= high
        assert factor.min() < low + 0.01 * width and factor.max() > high - 0.01 * width
        standard_error = width / math.sqrt(12 * n)
        assert abs(factor.mean().item() - (low + high) / 2) < 4 * standard_error
    # The four factors of a view are independent draws.
    assert abs(torch.corrcoef(torch.stack([p.brightness, p.contrast]))[0, 1]) < 4 / math.sqrt(n)


def test_bad_arguments_raise():
    images = make_images(2)
    with pytest.raises(ValueError, match="seeds"):
        augment_views(images, 3, [1])
    with pytest.raises(ValueError, match="non-negative"):
        augment_views(images, -1, [1, 2])
    with pytest.raises(ValueError, match="3, H, W"):
        augment_views(images[:, :1], 3, [1, 2])
    with pytest.raises(ValueError, match="divide"):
        apply_views(images, explicit_params(5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images = make_images(4, size=32)
    seeds = [1, 2, 3, 4]
    on_cpu = augment_views(images, 10, seeds)
    on_cuda = augment_views(images.cuda(), 10, seeds)
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=ATOL)
    params = explicit_params(4 * len(PERMUTATIONS))
    torch.testing.assert_close(
        apply_views(images.cuda(), params.to("cuda")).cpu(),
        apply_views(images, params),
        rtol=0,
        atol=ATOL,
    )
