"""View recipes: how each image becomes the views the model is audited on.

UnitMem is defined over augmented views, and the recipe changes the answer, so an audit uses the
views its model trained on. A recipe is one of:

- ``seed``: the seed report's recipe (``augment.py``), the default;
- ``simclr``: the UnitMem paper's released recipe: ``RandomResizedCrop`` to the audit size (scale
  0.08-1, aspect ratio 3/4-4/3), a horizontal flip with p 0.5, colour jitter 0.9/0.9/0.9/0.1 with
  p 0.9, greyscale with p 0.1, on images in [0, 1] (before the model's normalization);
- ``flip``: two views per image, the image and its mirror image, for a model trained with random
  horizontal flips and nothing else (the demo, the demo_memorizer): the per-image view alignment
  then measures how far a layer is from giving an image and its mirror image one code;
- ``plain``: no augmentation, one view per image;
- ``package.module:function``: the user's own torchvision transforms (v2) pipeline, returned by
  ``function(image_size)``, applied to each image (a float (3, H, W) tensor in [0, 1]).

Every view is seeded by its image (``view_seed``), never by batching. The built-in recipes run
batched on the images' device; a user pipeline draws from torch's global generator, one image at
a time, so it runs in the decode workers (``PipelineViews``), under a generator seeded per image.

Views leave here in [-1, 1]; the model's input contract maps them on from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import augment
from ..data.augment import ViewParams, apply_views, augment_views
from ..data.images import display_id
from ..errors import AuditError, DataError, user_code
from .settings import VIEW_RECIPES

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop: then the whole image
SIMCLR_FLIP_P = 0.5
_CROP_DRAWS = 4  # per attempt: scale, log aspect ratio, top, left
# Columns of a simclr view's row of draws, after the crop attempts' (see ``sample_simclr``).
_FLIP, _JITTER, _FACTORS, _ORDER_KEYS, _GRAYSCALE = 0, 1, slice(2, 6), slice(6, 10), 10
_DRAWS_AFTER_CROP = 11

_PARAMETERS: dict[str, dict[str, Any]] = {
    "seed": {"crop": None, "flip": "two coins of p 0.5 (a flip with p 0.25)",
             "color_jitter": [augment.BRIGHTNESS, augment.CONTRAST, augment.SATURATION, augment.HUE],
             "color_jitter_p": augment.JITTER_P, "grayscale_p": augment.GRAYSCALE_P},
    "simclr": {"crop": {"to": "the audit size", "scale": list(CROP_SCALE), "ratio": [0.75, 4 / 3]},
               "flip": f"p {SIMCLR_FLIP_P}",
               "color_jitter": [augment.BRIGHTNESS, augment.CONTRAST, augment.SATURATION, augment.HUE],
               "color_jitter_p": augment.JITTER_P, "grayscale_p": augment.GRAYSCALE_P},
    "flip": {"flip": "view 0 the image, view 1 its mirror image"},
    "plain": {},
}


@dataclass(frozen=True)
class ViewRecipe:
    """A recipe and what defines its views: its parameters, or a user pipeline's repr."""

    name: str  # seed, simclr, flip, plain, or a user factory 'module:function'
    parameters: dict[str, Any]
    pipeline: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def sha256(self) -> str:
        text = json.dumps({"name": self.name, "parameters": self.parameters}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def record(self) -> dict[str, Any]:
        """What results, reports, comparisons and snapshots keep of the recipe."""
        return {"name": self.name, "parameters": self.parameters, "sha256": self.sha256}

    def views_per_image(self, augmentations: int) -> int:
        return {"plain": 1, "flip": 2}.get(self.name, max(augmentations, 1))

    def make(self, pixels: torch.Tensor, augmentations: int, seeds: Sequence[int],
             ids: Sequence[str] | None = None) -> torch.Tensor:
        """The views of ``pixels`` (n, 3, H, W) in [0, 1], image-major, in [-1, 1], on their device (``ids``
        name the images in a user pipeline's errors)."""
        if self.name in ("seed", "plain"):
            return augment_views(pixels, 0 if self.name == "plain" else augmentations, seeds)
        if self.name == "simclr":
            return simclr_views(pixels, augmentations, seeds)
        if self.name == "flip":
            return torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1).mul(2).sub(1)
        return PipelineViews(self.pipeline, augmentations).batch(pixels, seeds, ids).to(pixels.device).mul_(2).sub_(1)


def describe(record: dict[str, Any]) -> str:
    """A recipe record in one line, for the report and the terminal."""
    parameters = record.get("parameters") or {}
    if record["name"] == "plain":
        detail = "no augmentation"
    elif record["name"] == "flip":
        detail = "the image and its mirror image"
    elif "pipeline" in parameters:
        detail = parameters["pipeline"]
    else:
        crop = parameters.get("crop")
        jitter = "/".join(f"{value:g}" for value in parameters["color_jitter"])
        detail = ", ".join([
            *([f"random resized crop (scale {crop['scale'][0]:g}-{crop['scale'][1]:g}, ratio 3/4-4/3)"]
              if crop else []),
            f"flip {parameters['flip']}", f"colour jitter {jitter} with p {parameters['color_jitter_p']:g}",
            f"greyscale p {parameters['grayscale_p']:g}"])
    return f"{record['name']} ({detail}; sha256 {record['sha256']})"


def record_of(settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe record of a result's settings; results written before recipes existed used the
    seed recipe, or no augmentation with 0 augmentations."""
    if settings.get("views_recipe"):
        return settings["views_recipe"]
    return builtin_recipe("plain" if settings.get("augmentations") == 0 else "seed").record()


def builtin_recipe(name: str) -> ViewRecipe:
    return ViewRecipe(name, _PARAMETERS[name])


def recipe_for(settings, spec) -> ViewRecipe:
    """The recipe an audit of ``spec`` with ``settings`` (config.RunSettings) uses: --memaudit-views, else the
    model's views: (a factory found beside its YAML), else seed."""
    return resolve_recipe(settings.views or spec.views, settings.augmentations,
                          settings.image_size or spec.default_image_size,
                          spec.views_folder if settings.views is None else None)


def resolve_recipe(name: str, augmentations: int, image_size: int, folder: str | Path | None = None) -> ViewRecipe:
    """The recipe ``name`` names (``augmentations == 0``: plain, whatever it names); a user factory is
    imported with ``folder`` (the declaring YAML's, else the working directory) first on sys.path,
    called with the image size, and its pipeline checked on a test image."""
    if augmentations == 0 or name == "plain":
        return builtin_recipe("plain")
    if name in VIEW_RECIPES:
        return builtin_recipe(name)
    from ..models import import_factory

    where = f"views {name!r}"
    factory = import_factory(where, name, Path(folder or Path.cwd()).resolve())
    with user_code(f"{where}: calling {name}({image_size})"):
        pipeline = factory(image_size)
    check_pipeline(where, pipeline, image_size)
    return ViewRecipe(name, {"factory": name, "pipeline": pipeline_text(pipeline)}, pipeline)


def pipeline_text(pipeline: Any) -> str:
    """The pipeline's repr on one line, without memory addresses (a Lambda's function), which change every run."""
    return " ".join(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(pipeline)).split())


def check_pipeline(where: str, pipeline: Any, image_size: int) -> None:
    """AuditError unless ``pipeline`` takes a float (3, S, S) image in [0, 1] and returns one like it,
    and leaves normalization to the model's input contract."""
    if not callable(pipeline):
        raise AuditError(f"{where} returned {type(pipeline).__name__}, not a transform: return a torchvision "
                         "transforms.v2 pipeline (e.g. v2.Compose([...])) that maps an image to a view")
    normalizing = [name for name in _transform_names(pipeline) if name == "Normalize"]
    if normalizing:
        raise AuditError(f"{where}: the pipeline normalizes (v2.Normalize); views must stay in [0, 1] so that the "
                         "model's input contract maps them. Remove Normalize from the pipeline and declare it as "
                         "'normalize: {mean: [...], std: [...]}' under the model in the audit YAML")
    probe = torch.linspace(0, 1, 3 * image_size * image_size).view(3, image_size, image_size)
    with torch.random.fork_rng(devices=[]), user_code(f"{where}: the pipeline on a float (3, {image_size}, "
                                                      f"{image_size}) image in [0, 1]"):
        torch.manual_seed(0)
        view = pipeline(probe)
    _check_view(where, view, image_size)


def _check_view(where: str, view: Any, image_size: int) -> None:
    if not isinstance(view, torch.Tensor) or not view.is_floating_point() or tuple(view.shape) != (3, image_size,
                                                                                                   image_size):
        got = (f"{view.dtype} {tuple(view.shape)}" if isinstance(view, torch.Tensor) else type(view).__name__)
        raise AuditError(f"{where}: the pipeline must turn a float (3, {image_size}, {image_size}) image in [0, 1] "
                         f"into a float view of the same shape (the audit size: end with a Resize or a "
                         f"RandomResizedCrop to it), got {got}")
    low, high = view.min().item(), view.max().item()
    if low < -1e-6 or high > 1 + 1e-6:
        raise AuditError(f"{where}: the pipeline's view ranges over [{low:.3g}, {high:.3g}], not [0, 1]; views must "
                         "stay in [0, 1] (declare the model's normalization in the audit YAML instead)")


def _transform_names(pipeline: Any) -> list[str]:
    """The class names of a pipeline's transforms, nested ones included."""
    names = [type(pipeline).__name__]
    for inner in getattr(pipeline, "transforms", None) or []:
        names += _transform_names(inner)
    inner = getattr(pipeline, "transform", None)
    return names + (_transform_names(inner) if inner is not None else [])


@dataclass
class PipelineViews:
    """A user pipeline's views of one image at a time: image i's views come from torch's generator
    seeded with its seed, view after view, so view k of an image is the same whatever the number
    of views or the batching. Picklable with its pipeline, for the decode workers."""

    pipeline: Callable
    augmentations: int
    seed: int = 0  # the audit's, with an image id -> the image's seed (``__call__``)

    def __call__(self, image: torch.Tensor, image_id: str) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (V, 3, H, W) in [0, 1]: what a decode worker adds to an image.
        DataError (which the loader passes on) when the pipeline fails."""
        return self.one(image.float().div_(255), view_seed(self.seed, image_id), f"image {display_id(image_id)}")

    def one(self, image: torch.Tensor, seed: int, what: str = "an image") -> torch.Tensor:
        views = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                for _ in range(max(self.augmentations, 1)):
                    with user_code(f"the views pipeline on {what}"):
                        views.append(self.pipeline(image))
            except AuditError as exc:
                raise DataError(str(exc)) from exc.__cause__
        return torch.stack(views).float()

    def batch(self, pixels: torch.Tensor, seeds: Sequence[int], ids: Sequence[str] | None = None) -> torch.Tensor:
        """(n, 3, H, W) in [0, 1] -> (n * V, 3, H, W) in [0, 1], on the CPU; ``ids`` name the images in errors."""
        cpu = pixels.float().cpu()
        names = [f"image {display_id(image_id)}" for image_id in ids] if ids else ["an image"] * len(cpu)
        return torch.cat([self.one(image, seed, name) for image, seed, name in zip(cpu, seeds, names)])


def view_seed(seed: int, image_id: str) -> int:
    """The seed of an image's views: depends on the audit seed and the image, not on batching."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --------------------------------------------------------------------------- simclr


@dataclass
class SimclrParams:
    """Random parameters of n simclr views: each view's crop box (top, left, height, width) in
    pixels of its image, and its flip, jitter and greyscale as ``augment.ViewParams``."""

    boxes: np.ndarray  # (n, 4) int64
    rest: ViewParams


def sample_simclr(image_seeds: Sequence[int], views: int, size: int) -> SimclrParams:
    """Draw ``views`` simclr views of each (size x size) image, image-major.

    Per image: ``torch.rand((views, 51), dtype=float64)`` from a generator seeded with its seed; row v
    is view v's. Its first 40 columns are 10 crop attempts of 4 draws, as torchvision's
    RandomResizedCrop makes them: an area fraction uniform in the scale range and a log aspect ratio
    uniform in log(3/4)-log(4/3) give a width and height (rounded); the first attempt that fits is
    placed uniformly at random (top and left), and if none fits the view is the whole image. Then a
    flip coin (p 0.5), the jitter coin (p 0.9), the four jitter factors, the four keys of the jitter
    order and the greyscale coin (p 0.1), as the seed recipe draws them.
    """
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    columns = CROP_ATTEMPTS * _CROP_DRAWS + _DRAWS_AFTER_CROP
    draws = [torch.rand((views, columns), dtype=torch.float64, generator=torch.Generator().manual_seed(int(seed)))
             for seed in image_seeds]
    u = (torch.cat(draws) if draws else torch.empty((0, columns), dtype=torch.float64)).numpy()
    attempts = u[:, :CROP_ATTEMPTS * _CROP_DRAWS].reshape(len(u), CROP_ATTEMPTS, _CROP_DRAWS)
    area = size * size * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * attempts[..., 0])
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = np.exp(log_low + (log_high - log_low) * attempts[..., 1])
    width = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    height = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (width > 0) & (width <= size) & (height > 0) & (height <= size)
    first = fits.argmax(axis=1)
    rows = np.arange(len(u))
    height, width = height[rows, first], width[rows, first]
    top = np.floor(attempts[rows, first, 2] * (size - height + 1)).astype(np.int64)
    left = np.floor(attempts[rows, first, 3] * (size - width + 1)).astype(np.int64)
    none_fits = ~fits.any(axis=1)
    top[none_fits], left[none_fits], height[none_fits], width[none_fits] = 0, 0, size, size
    rest = u[:, CROP_ATTEMPTS * _CROP_DRAWS:]
    factors = rest[:, _FACTORS]
    spans = np.array([[1 - augment.BRIGHTNESS, 1 + augment.BRIGHTNESS], [1 - augment.CONTRAST, 1 + augment.CONTRAST],
                      [1 - augment.SATURATION, 1 + augment.SATURATION], [-augment.HUE, augment.HUE]])
    scaled = torch.from_numpy(spans[:, 0] + (spans[:, 1] - spans[:, 0]) * factors).to(torch.float32)
    return SimclrParams(
        boxes=np.stack([top, left, height, width], axis=1),
        rest=ViewParams(
            flip=torch.from_numpy(rest[:, _FLIP] < SIMCLR_FLIP_P),
            jitter=torch.from_numpy(rest[:, _JITTER] < augment.JITTER_P),
            order=torch.argsort(torch.from_numpy(rest[:, _ORDER_KEYS]), dim=1, stable=True),
            brightness=scaled[:, 0], contrast=scaled[:, 1], saturation=scaled[:, 2], hue=scaled[:, 3],
            grayscale=torch.from_numpy(rest[:, _GRAYSCALE] < augment.GRAYSCALE_P),
        ),
    )


def simclr_views(pixels: torch.Tensor, views: int, seeds: Sequence[int]) -> torch.Tensor:
    """The simclr views of ``pixels`` (n, 3, S, S) in [0, 1]: (n * views, 3, S, S) in [-1, 1]."""
    if len(seeds) != pixels.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for {pixels.shape[0]} images")
    size = pixels.shape[-1]
    params = sample_simclr(seeds, max(views, 1), size)
    return apply_views(resized_crops(pixels, params.boxes, max(views, 1)), params.rest)


def resized_crops(pixels: torch.Tensor, boxes: np.ndarray, views: int) -> torch.Tensor:
    """Crop row r of ``boxes`` (top, left, height, width) from image r // views and resize it back to the
    image's size, bilinear with antialiasing (torchvision's ``resized_crop`` on tensors), in float32."""
    size = pixels.shape[-1]
    x = pixels.to(torch.float32)
    out = torch.empty((len(boxes), x.shape[1], size, size), dtype=torch.float32, device=x.device)
    for row, (top, left, height, width) in enumerate(boxes.tolist()):
        crop = x[row // views, :, top:top + height, left:left + width]
        out[row] = crop if (height, width) == (size, size) else F.interpolate(
            crop[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out
