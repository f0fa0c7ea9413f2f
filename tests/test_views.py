"""View recipes: plain, simclr and a user's pipeline give the views they promise, seeded per image,
recorded with the results, and never compared across recipes."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import integrate

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
from conftest import activations, make_images
from test_augment import ATOL, reference_view
from pytest_memaudit.pipeline.audit import run_audit
from pytest_memaudit.gates.compare import compare
from pytest_memaudit.gates.config import load_audit_file, load_catalog
from pytest_memaudit.pipeline.settings import make_settings
from pytest_memaudit.errors import AuditError, ConfigError
from pytest_memaudit.pipeline.views import (CROP_ATTEMPTS, PipelineViews, resized_crops, resolve_recipe, sample_simclr,
                                            simclr_views)

ENCODER = '''
import torch
from torch import nn
from torchvision.transforms import v2


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.input = nn.Identity()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(self.input(x))))


def build(checkpoint):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Encoder().eval()


def identity(size):
    return v2.Compose([v2.Identity()])


def flips(size):
    return v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ColorJitter(0.4, 0.4)])


def normalizing(size):
    return v2.Compose([v2.RandomHorizontalFlip(), v2.Normalize([0.5] * 3, [0.2] * 3)])


def too_small(size):
    return v2.RandomResizedCrop(size // 2)


class FailsAfterTheCheck:
    calls = 0

    def __call__(self, image):
        FailsAfterTheCheck.calls += 1
        if FailsAfterTheCheck.calls > 1:
            raise ValueError("boom")
        return image


def failing(size):
    return FailsAfterTheCheck()
'''
YAML = """\
models:
  enc:
    factory: views_encoder:build
    audited_layers: [{module: input, units: channels_first}, conv, head]
    image_size: 16
"""


@pytest.fixture
def model(tmp_path, monkeypatch):
    """The encoder above, declared in a YAML beside its module, and a folder of 6 images -> (spec, settings)."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the YAML's folder goes on sys.path: undo that
    monkeypatch.delitem(sys.modules, "views_encoder", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "views_encoder.py").write_text(ENCODER)
    (tmp_path / "memaudit.yaml").write_text(YAML)
    folder = make_images(tmp_path / "imgs", 6, size=16)
    spec = load_audit_file(tmp_path / "memaudit.yaml").model_spec("enc")
    return spec, dict(model="enc", data=str(folder), control="none", device="cpu", topk=6, workers=1)


def unitmem(result) -> dict[str, np.ndarray]:
    return {layer.name: layer.values.unitmem for layer in result.layers}


def test_plain_views_give_the_numbers_of_zero_augmentations(model):
    spec, settings = model
    plain = run_audit(make_settings(**settings, views="plain", augmentations=10), spec)
    zero = run_audit(make_settings(**settings, augmentations=0), spec)
    for name, values in unitmem(zero).items():
        assert np.array_equal(unitmem(plain)[name], values)
        assert np.array_equal(activations(plain, name), activations(zero, name))
    assert plain.settings["views_per_image"] == 1
    assert plain.settings["views_recipe"] == zero.settings["views_recipe"]
    assert plain.settings["views_recipe"]["name"] == "plain"


def test_flip_views_are_each_image_and_its_mirror_image(model):
    spec, settings = model
    result = run_audit(make_settings(**settings, views="flip", augmentations=10), spec)
    assert result.settings["views_per_image"] == 2 and result.settings["views_recipe"]["name"] == "flip"
    # By hand, in float64: a unit's mean |activation| over the image's two views.
    from PIL import Image

    encoder = spec.build(None).double()
    folder = Path(settings["data"])
    x = torch.from_numpy(np.stack([np.asarray(Image.open(folder / sample), dtype=np.float64)
                                   for sample in result.samples])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        mirrored = torch.from_numpy(x.numpy()[..., ::-1].copy())
        expected = (encoder.conv(x).abs().mean((2, 3)) + encoder.conv(mirrored).abs().mean((2, 3))) / 2
    np.testing.assert_allclose(activations(result, "conv"), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert resolve_recipe("flip", 3, 16).views_per_image(3) == 2 and resolve_recipe("flip", 0, 16).name == "plain"
    pixels = np.random.default_rng(0).random((2, 3, 4, 4))
    views = resolve_recipe("flip", 10, 16).make(torch.from_numpy(pixels), 10, [0, 1]).numpy()
    np.testing.assert_array_equal(views, np.stack([pixels, pixels[..., ::-1]], 1).reshape(4, 3, 4, 4) * 2 - 1)


def test_an_identity_pipeline_gives_the_plain_numbers(model):
    """Made one image at a time in a decode worker (workers=1), 3 identical views per image."""
    spec, settings = model
    piped = run_audit(make_settings(**settings, views="views_encoder:identity", augmentations=3), spec)
    plain = run_audit(make_settings(**settings, views="plain"), spec)
    for name, values in unitmem(plain).items():
        np.testing.assert_allclose(unitmem(piped)[name], values, rtol=1e-6, atol=1e-7)
    assert piped.settings["views_per_image"] == 3
    record = piped.settings["views_recipe"]
    assert record["name"] == "views_encoder:identity"
    assert record["parameters"]["pipeline"] == "Compose( Identity())"


def test_a_pipeline_is_applied_in_the_decode_workers_as_in_process(model):
    """The same views whether a worker or this process makes them, and per image whatever the batching."""
    spec, settings = model
    runs = [run_audit(make_settings(**settings | {"workers": workers}, views="views_encoder:flips", augmentations=4,
                                    batch_size=batch), spec)
            for workers, batch in ((1, 8), (0, 4))]
    for name, values in unitmem(runs[0]).items():
        np.testing.assert_allclose(unitmem(runs[1])[name], values, rtol=1e-5, atol=1e-6)
    plain = run_audit(make_settings(**settings, views="plain"), spec)
    assert not np.allclose(unitmem(plain)["conv"], unitmem(runs[0])["conv"])  # the pipeline did something


def test_a_pipeline_is_seeded_per_image():
    from torchvision.transforms import v2

    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    pipeline = v2.Compose([v2.RandomResizedCrop(16), v2.RandomHorizontalFlip()])
    four = PipelineViews(pipeline, 4).one(image, seed=7)
    assert torch.equal(four, PipelineViews(pipeline, 4).one(image, seed=7))
    assert torch.equal(PipelineViews(pipeline, 2).one(image, seed=7), four[:2])  # view k whatever the count
    assert not torch.equal(PipelineViews(pipeline, 4).one(image, seed=8), four)
    state = torch.get_rng_state()
    PipelineViews(pipeline, 4).one(image, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was


@pytest.mark.parametrize("factory, message", [
    ("views_encoder:normalizing", r"the pipeline normalizes \(v2.Normalize\); views must stay in \[0, 1\].*"
                                  r"declare it as 'normalize: "),
    ("views_encoder:too_small", r"must turn a float \(3, 16, 16\) image in \[0, 1\] into a float view of the same "
                                r"shape .*got torch.float32 \(3, 8, 8\)"),
    ("views_encoder:nothing", r"module views_encoder has no function 'nothing'"),
])
def test_a_pipeline_that_cannot_make_views_is_refused_before_the_audit(model, factory, message):
    spec, settings = model
    with pytest.raises(AuditError, match=message):
        run_audit(make_settings(**settings, views=factory), spec)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_pipeline_that_fails_on_an_image_names_it(model, workers):
    spec, settings = model
    with pytest.raises(AuditError, match=r"^the views pipeline on image img_000.png failed with ValueError: boom$"):
        run_audit(make_settings(**settings | {"workers": workers}, views="views_encoder:failing"), spec)


# --------------------------------------------------------------------------- simclr


def images(n: int, size: int = 24) -> torch.Tensor:
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(n))


def test_simclr_views_are_seeded_per_image():
    x = images(3)
    views = simclr_views(x, 5, [1, 2, 3])
    assert views.shape == (15, 3, 24, 24)
    assert torch.equal(views, simclr_views(x, 5, [1, 2, 3]))  # same seeds, same views
    other = simclr_views(x, 5, [1, 2, 4])
    assert torch.equal(other[:10], views[:10]) and not torch.equal(other[10:], views[10:])  # only image 3's moved
    assert torch.equal(simclr_views(x[1:2], 5, [2]), views[5:10])  # an image's views, whatever the batch
    assert torch.equal(simclr_views(x, 2, [1, 2, 3]).view(3, 2, 3, 24, 24), views.view(3, 5, 3, 24, 24)[:, :2])


def test_simclr_views_are_torchvisions_resized_crop_flip_jitter_and_greyscale():
    x = images(4)
    seeds = [11, 12, 13, 14]
    params = sample_simclr(seeds, 6, 24)
    views = simclr_views(x, 6, seeds)
    for row, (top, left, height, width) in enumerate(params.boxes.tolist()):
        crop = TF.resized_crop(x[row // 6], top, left, height, width, [24, 24], antialias=True)
        expected = reference_view(crop, params.rest, row)  # in [-1, 1]
        torch.testing.assert_close(views[row], expected, atol=2 * ATOL, rtol=0)


def test_resized_crops_match_torchvision_for_every_box_shape():
    x = images(2, size=20)
    boxes = np.array([[0, 0, 20, 20], [3, 5, 7, 11], [0, 10, 20, 10], [19, 19, 1, 1], [2, 0, 15, 20]])
    crops = resized_crops(x, boxes, views=3)
    for row, (top, left, height, width) in enumerate(boxes.tolist()):
        torch.testing.assert_close(crops[row], TF.resized_crop(x[row // 3], top, left, height, width, [20, 20],
                                                                antialias=True), atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_simclr_views_on_cuda_match_the_cpu():
    x, seeds = images(4, size=32), [1, 2, 3, 4]
    on_cuda = simclr_views(x.cuda(), 10, seeds)
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), simclr_views(x, 10, seeds), rtol=0, atol=2 * ATOL)


def analytic_crop_scale() -> tuple[float, float]:
    """E[crop area / image area] and P(area < half), of RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) on a
    square image, without pixel rounding: an attempt draws s ~ U(0.08, 1), log r ~ U(-a, a) with
    a = log 4/3, and fits when s * r <= 1 and s / r <= 1, i.e. s <= exp(-|log r|); the first fitting
    attempt of 10 is kept (else the whole image, s = 1)."""
    a = math.log(4 / 3)
    top = lambda u: math.exp(-abs(u))  # noqa: E731
    fits, _ = integrate.dblquad(lambda s, u: 1.0, -a, a, 0.08, top)
    mass, _ = integrate.dblquad(lambda s, u: s, -a, a, 0.08, top)
    half, _ = integrate.dblquad(lambda s, u: 1.0, -a, a, 0.08, lambda u: min(0.5, top(u)))
    p_fit = fits / (2 * a * 0.92)
    fallback = (1 - p_fit) ** CROP_ATTEMPTS
    return (1 - fallback) * mass / fits + fallback, (1 - fallback) * half / fits


def test_simclr_crop_scale_and_coin_rates_match_the_recipe_over_many_draws():
    """20,000 views of 5,000 images (each view's draws independent): every sample mean within 4.5 standard
    errors of the recipe's value (a false alarm about once in 10^5 per figure), plus for the crop's area
    its pixel rounding (at 256 px at most 1/(0.28*256) relative: 0.005 bounds the bias)."""
    size, n = 256, 20_000
    params = sample_simclr(range(5_000), 4, size)
    top, left, height, width = params.boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= size).all() and (left + width <= size).all()
    ratio = width / height
    assert ratio.min() >= 0.75 * (1 - 0.05) and ratio.max() <= 4 / 3 * (1 + 0.05)  # within rounding
    area = height * width / size**2
    expected_mean, expected_half = analytic_crop_scale()
    a = math.log(4 / 3)  # by hand: the fitting region's mass 2 (1/4 - 0.08 a), its first moment 7/32 - 0.0064 a
    assert expected_mean == pytest.approx((7 / 32 - 0.0064 * a) / (2 * (1 / 4 - 0.08 * a)), abs=1e-6)  # 0.4778
    assert abs(area.mean() - expected_mean) < 4.5 * area.std() / math.sqrt(n) + 0.005
    below = (area < 0.5).mean()
    assert abs(below - expected_half) < 4.5 * math.sqrt(expected_half * (1 - expected_half) / n) + 0.005
    assert area.min() >= 0.08 * 0.95
    for coin, p in ((params.rest.flip, 0.5), (params.rest.jitter, 0.9), (params.rest.grayscale, 0.1)):
        assert abs(coin.double().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    assert abs(params.rest.brightness.double().mean().item() - 1.0) < 4.5 * (1.8 / math.sqrt(12)) / math.sqrt(n)


# --------------------------------------------------------------------------- records, compare, snapshots


def test_compare_refuses_a_baseline_audited_on_other_views(model):
    spec, settings = model
    seed = run_audit(make_settings(**settings, augmentations=2), spec)
    simclr = run_audit(make_settings(**settings, views="simclr", augmentations=2), spec)
    assert seed.settings["views_recipe"]["sha256"] != simclr.settings["views_recipe"]["sha256"]
    with pytest.raises(ConfigError, match=r"the baseline base was audited on other views: seed \(flip two coins.*"
                                          r"this run's are simclr \(random resized crop \(scale 0.08-1, ratio "
                                          r"3/4-4/3\).*cannot be compared"):
        compare(simclr, seed, "base")
    compare(simclr, simclr, "base")  # the same recipe compares
    old = json.loads(json.dumps(seed.to_json()))  # a result written before recipes were recorded: the seed's
    del old["settings"]["views_recipe"], old["settings"]["views"]
    from pytest_memaudit.results.result import AuditResult

    compare(seed, AuditResult.from_json(old), "old")


def test_a_snapshot_of_other_views_is_refused(model, tmp_path):
    spec, settings = model
    run_audit(make_settings(**settings, augmentations=2, state=str(tmp_path / "state")), spec)
    with pytest.raises(AuditError, match=r"written by another audit: .*views: 'seed, sha256 [0-9a-f]{16}' then, "
                                         r"'simclr, sha256 [0-9a-f]{16}' now"):
        run_audit(make_settings(**settings, augmentations=2, views="simclr", state=str(tmp_path / "state")), spec)


def test_views_in_the_yaml_belong_to_a_model_and_are_checked(tmp_path):
    path = tmp_path / "memaudit.yaml"
    path.write_text("models:\n  demo:\n    views: simclr\n")
    assert load_audit_file(path).model_spec("demo").views == "simclr"
    assert load_audit_file(path).model_spec("var_d16").views == "seed"
    other = tmp_path / "sub" / "memaudit.yaml"
    other.parent.mkdir()
    other.write_text("models:\n  demo:\n    views: plain\n")
    with pytest.raises(ConfigError, match=r"model 'demo' is audited with views 'simclr' in .* and 'plain' in"):
        load_catalog([path, other])
    path.write_text("views: simclr\n")
    with pytest.raises(ConfigError, match=r"views: is a model's .* write it under models: NAME: views:"):
        load_audit_file(path)
    path.write_text("models:\n  demo:\n    views: SimCLR\n")
    with pytest.raises(ConfigError, match=r"models: demo: views must be seed, simclr, flip, plain or "
                                          r"'package.module:function'.*got 'SimCLR'"):
        load_audit_file(path)
    with pytest.raises(ConfigError, match=r"--memaudit-views must be seed, simclr, flip, plain"):
        make_settings(views="crop")


def test_a_views_factory_named_in_the_yaml_is_found_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "beside_views", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    (project / "beside_views.py").write_text("from torchvision.transforms import v2\n\n\ndef make(size):\n"
                                             "    return v2.RandomHorizontalFlip()\n")
    (project / "memaudit.yaml").write_text("models:\n  demo:\n    views: beside_views:make\n")
    monkeypatch.chdir(tmp_path)  # not where the module is
    spec = load_audit_file(project / "memaudit.yaml").model_spec("demo")
    recipe = resolve_recipe(spec.views, 2, 16, spec.views_folder)
    assert recipe.record()["parameters"] == {"factory": "beside_views:make", "pipeline": "RandomHorizontalFlip(p=0.5)"}


def test_zero_augmentations_is_plain_whatever_the_recipe():
    assert resolve_recipe("simclr", 0, 16).name == "plain"
    assert resolve_recipe("simclr", 3, 16).views_per_image(3) == 3
    assert resolve_recipe("plain", 10, 16).views_per_image(10) == 1


# --------------------------------------------------------------------------- end to end

RESNET = '''
import torch
import torchvision


def build(checkpoint):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None)
'''
RESNET_YAML = """\
thresholds:
  mean_unitmem_max: 1.0
models:
  resnet:
    factory: resnet_factory:build
    audited_layers: [layer1, layer4]
    image_size: 32
    normalize: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    views: simclr
"""


def test_a_torchvision_resnet_audited_with_simclr_views_names_the_recipe(pytester):
    pytester.makepyfile(resnet_factory=RESNET)
    pytester.path.joinpath("memaudit.yaml").write_text(RESNET_YAML)
    result = pytester.runpytest("--memaudit-model", "resnet", "--memaudit-data", "builtin", "--memaudit-samples", "6",
                                "--memaudit-augmentations", "2", "--memaudit-control", "none", "--memaudit-holdout",
                                "none", "--memaudit-device", "cpu", "--memaudit-groups", "3", "-p", "no:cacheprovider")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["resnet: 6 members x 2 simclr views at 32px*"])
    document = json.loads((pytester.path / "memaudit-report" / "results.json").read_text())
    settings = document["settings"]
    assert settings["views"] == "simclr" and settings["views_per_image"] == 2
    assert settings["views_recipe"]["parameters"]["crop"]["scale"] == [0.08, 1.0]
    report = (pytester.path / "memaudit-report" / "report.html").read_text()
    assert "simclr (random resized crop (scale 0.08-1, ratio 3/4-4/3), flip p 0.5" in report
    assert settings["views_recipe"]["sha256"] in report


def test_a_baseline_of_other_views_stops_before_the_audit(pytester):
    pytester.makepyfile(resnet_factory=RESNET)
    pytester.path.joinpath("memaudit.yaml").write_text(RESNET_YAML)
    quick = ["--memaudit-model", "resnet", "--memaudit-data", "builtin", "--memaudit-samples", "4",
             "--memaudit-augmentations", "1", "--memaudit-control", "none", "--memaudit-holdout", "none",
             "--memaudit-device", "cpu", "--memaudit-groups", "2", "-p", "no:cacheprovider"]
    first = pytester.runpytest(*quick, "--memaudit-views", "plain", "--memaudit-json", "base.json")
    assert first.ret == 0, first.stdout.str()
    second = pytester.runpytest(*quick, "--memaudit-compare", "base.json")
    assert second.ret == 4
    second.stderr.fnmatch_lines(["*cannot compare with the baseline: the baseline base.json was audited on other "
                                 "views: plain (no augmentation; sha256 *); this run's are simclr*"])
    assert "members x" not in second.stdout.str()  # nothing was audited


def test_an_unknown_recipe_on_the_command_line_is_a_usage_error(pytester):
    pytester.path.joinpath("memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    result = pytester.runpytest("--memaudit-views", "simclr2", "-p", "no:cacheprovider")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*memaudit: --memaudit-views must be seed, simclr, flip, plain or 'package.module:function'"
                                 "*got 'simclr2'"])
