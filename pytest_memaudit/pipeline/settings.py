"""The run's settings (``RunSettings``, from options, ini keys or keyword arguments; the audit's cache key)
and their checks: the only input of the pipeline besides the model and the data."""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, quote
from ..models import BUILTIN_MODELS, ModelSpec
from . import hardware

PRECISIONS = ("float32", "bfloat16", "tf32")
VIEW_RECIPES = ("seed", "simclr", "flip", "plain")  # --memaudit-views and a model's views:, or a 'module:function' factory
CONTROLS = ("random", "planted")  # --memaudit-control: none, or a comma-separated list of these


@dataclass(frozen=True)
class RunSettings:
    """Everything that decides the computed numbers (thresholds do not): the audit's cache key."""

    model: str = "demo"
    checkpoint: str | None = None
    data: str | None = None  # a directory, or None for the model's default image set
    samples: int | None = None
    image_size: int | None = None  # None: the model's default
    augmentations: int = 10
    views: str | None = None  # the view recipe (VIEW_RECIPES or 'module:function'); None: the model's
    reduce: str = "mean"
    batch_size: int | None = None  # views per forward pass; None: by device
    device: str = "auto"
    seed: int = 0
    topk: int = 10
    precision: str = "float32"
    workers: int | None = None
    median_memory: int = 2048  # MB the median's N x units matrix may take in memory; over it, on disk
    control: str | None = None  # "none" or a comma-separated list of CONTROLS; None: the model's default
    holdout: str | None = None  # a directory, "builtin" or "none"; None: the model's default held-out set
    planted_units: int = 16  # planted images (one default-strength unit each) in the planted control
    planted_strength: float = 8.0  # a planted image's activation over its unit's mean
    groups: int = 10  # data point groups for the jackknife error bars
    permutations: int = 10_000  # label permutations of the membership test
    embedding_layer: str | None = None  # whose activations embed images for clustering; None: the last audited
    state: str | None = None  # directory of the resumable snapshots; None: none
    state_every: int = 300  # seconds between snapshots (0: after every batch)
    dist_timeout: int = 1800  # seconds a process waits for the others at a collective

    def as_dict(self) -> dict:
        return asdict(self)


# (least, most) of each whole-number setting. The most is a bound no sensible audit reaches, set
# so that a mistyped value is refused here, not after the compute as an overflow (the seed: what
# torch's generators take) or as an allocation of gigabytes (views, top-k lists, groups).
INT64_MAX = 2**63 - 1
_INT_FIELDS = {"samples": (2, INT64_MAX), "image_size": (16, 2**20), "augmentations": (0, 10_000),
               "batch_size": (1, 2**31), "seed": (0, INT64_MAX), "topk": (1, 100_000), "workers": (0, 1024),
               "median_memory": (0, 2**40), "planted_units": (1, 1_000_000), "groups": (2, 100_000),
               "permutations": (100, 10**9), "state_every": (0, 10**9), "dist_timeout": (1, 10**7)}

_CHOICES = {"reduce": ("mean", "median"), "precision": PRECISIONS}


def make_settings(**values: Any) -> RunSettings:
    """RunSettings from option values (None = not given), validated; ConfigError otherwise."""
    known = {f.name for f in fields(RunSettings)}
    given = {key: value for key, value in values.items() if value is not None}
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    for key, (least, most) in _INT_FIELDS.items():
        if key in given:
            try:
                given[key] = int(given[key])
            except (TypeError, ValueError):
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be a whole number, got {given[key]!r}") from None
            if given[key] < least:
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be at least {least}, got {given[key]}")
            if given[key] > most:
                raise ConfigError(f"--memaudit-{key.replace('_', '-')} must be at most {most}, got {given[key]}")
    if "image_size" in given and given["image_size"] % 16:
        raise ConfigError(
            f"--memaudit-image-size must be a multiple of 16 (the encoder downsamples 4 times), got {given['image_size']}"
        )
    for key, choices in _CHOICES.items():
        if key in given and given[key] not in choices:
            raise ConfigError(f"--memaudit-{key} must be one of {', '.join(choices)}, got {given[key]!r}")
    if "planted_strength" in given:
        try:
            given["planted_strength"] = float(given["planted_strength"])
        except (TypeError, ValueError):
            raise ConfigError(f"--memaudit-planted-strength must be a number, got {given['planted_strength']!r}") from None
        if not 1 < given["planted_strength"] < 1e6:
            raise ConfigError(
                "--memaudit-planted-strength is a planted image's activation over its unit's mean: a number above 1, "
                f"got {given['planted_strength']:g}"
            )
    if "control" in given:
        roles = [role.strip() for role in str(given["control"]).split(",")]
        if roles != ["none"] and (not roles or any(role not in CONTROLS for role in roles)):
            raise ConfigError(
                f"--memaudit-control must be none or a comma-separated list of {', '.join(CONTROLS)}, "
                f"got {given['control']!r}"
            )
        given["control"] = ",".join(roles)
    if "views" in given:
        check_views_value("--memaudit-views", given["views"])
    if "device" in given and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(given["device"])):
        raise ConfigError(f"--memaudit-device must be auto, cpu, cuda or cuda:N (N: a GPU number, 0 the first), "
                          f"got {quote(given['device'])}")
    return RunSettings(**given)


def check_views_value(where: str, value: Any) -> None:
    """ConfigError unless ``value`` names a view recipe or a 'package.module:function' factory."""
    if value in VIEW_RECIPES or (isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value)):
        return
    raise ConfigError(f"{where} must be {', '.join(VIEW_RECIPES)} or 'package.module:function' (a function in your "
                      f"code that takes the image size and returns your torchvision transforms v2 pipeline), "
                      f"got {quote(value)}")


def checkpoint_series(given: list[str], base: Path) -> dict[str, str]:
    """--memaudit-checkpoint values (globs expanded, relative to ``base``) by label, the file name without
    its extension, in natural order of the labels (step-2 before step-10). ConfigError for a glob that
    matches nothing and for two files with one label."""
    paths = []
    for text in given:
        if not any(char in text for char in "*?["):
            paths.append(text)
            continue
        found = sorted(glob.glob(text if os.path.isabs(text) else str(base / text)))
        if not found:
            raise ConfigError(f"--memaudit-checkpoint {quote(text)} matches no file (relative to {base})")
        paths += found
    series: dict[str, str] = {}
    for path in paths:
        label = Path(path).stem
        if label in series and os.path.abspath(series[label]) != os.path.abspath(path):
            raise ConfigError(f"--memaudit-checkpoint: {series[label]} and {path} are both named {label}; the tests of a "
                              "checkpoint series are named by file name, so give the files different names")
        series[label] = path
    return dict(sorted(series.items(), key=lambda item: natural_key(item[0])))


def natural_key(text: str) -> list:
    """Sorts numbers in names by value: step-2 before step-10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text)]


def settings_from_record(record: dict[str, Any]) -> RunSettings:
    """The settings a finished audit ran with, from its results' ``settings`` (resolved values: the
    image size, batch size, device and controls it used)."""
    known = {f.name for f in fields(RunSettings)}
    return RunSettings(**{key: value for key, value in record.items() if key in known})


def check_image_fits(settings: RunSettings) -> None:
    """ConfigError when an image's views at ``settings.image_size`` cannot fit in the machine's memory.

    The law is a lower bound, so that only impossible sizes are refused: an image's views are made
    together, as float32 RGB, and one view goes through the model at least with its first layer's
    output at full resolution (the first layer's width is known for the built-in models; for a user
    model only the input counts)."""
    spec = BUILTIN_MODELS.get(settings.model)
    size = settings.image_size or (spec.default_image_size if spec else None)
    memory = hardware.physical_memory_bytes()
    if size is None or memory is None:
        return
    channels = spec.input_layer_channels if spec else 0
    views = max(settings.augmentations, 1)
    needed = size * size * (3 + channels) * 4
    if needed > memory:
        per_pixel = "the RGB input" + (f" and its first layer's {channels} channels" if channels else "")
        raise ConfigError(
            f"--memaudit-image-size {size}: one {size}x{size} view of {settings.model} needs at least "
            f"{_binary_size(needed)} ({3 + channels} float32 values per pixel: {per_pixel}), more than this "
            f"machine's {_binary_size(memory)} of memory. Audit at a smaller size"
            + (f" (the model's own is {spec.default_image_size})." if spec else ".")
        )
    if 3 * views > 3 + channels and 3 * views * size * size * 4 > memory:
        raise ConfigError(
            f"--memaudit-augmentations {settings.augmentations}: one image's {views} views at {size}x{size} need "
            f"{_binary_size(3 * views * size * size * 4)} (3 float32 values per pixel each), more than this "
            f"machine's {_binary_size(memory)} of memory. Audit with fewer augmentations or at a smaller size."
        )


def _binary_size(count: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(count, 1), 1024)), len(units) - 1)
    return f"{count / 1024**power:.1f} {units[power]}"


def control_roles(settings: RunSettings, spec: ModelSpec) -> tuple[str, ...]:
    """The controls audited beside the model: of ``random`` and ``planted``."""
    text = settings.control or spec.default_control
    return tuple(role for role in CONTROLS if role in text.split(","))


def has_holdout(settings: RunSettings, spec: ModelSpec) -> bool:
    return settings.holdout != "none" and (settings.holdout is not None or spec.default_holdout is not None)


def audit_has(settings: RunSettings, spec: ModelSpec) -> set[str]:
    """The figures that need something extra (gates.NEEDS) which this audit will have."""
    has = set()
    if has_holdout(settings, spec):
        has |= {"membership_excess", "membership_p", "verdict_p"}
    if "random" in control_roles(settings, spec):
        has.add("excess_over_control")
    return has
