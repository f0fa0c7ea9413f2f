"""The models: the registry of auditable encoders, their builders and weights, and the hooks that read a layer.
May import: data, metric, errors.

A model is a ``ModelSpec``: how to build the module (with its weights), which of its layers to
audit, and what input it takes. Built-in models are listed in ``BUILTIN_MODELS``; users add
their own in an audit YAML file (``models:`` section, a ``module:function`` factory plus a
layer list). Building imports torch; looking up names and layer lists does not.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import AuditError, CheckpointError, ConfigError, user_code

CHECKPOINT_ENV_VAR = "MEMAUDIT_CHECKPOINT"
UNIT_LAYOUTS = ("channels_first", "channels_last", "token_channels")  # a layer's ``units:``
TOKEN_CHOICES = ("all", "cls", "patches")  # a layer's ``tokens:``


@dataclass(frozen=True)
class LayerSpec:
    """One audited layer: its display name (seed report style), its module path, and which
    tensor of the module's output is measured, along which axis."""

    name: str
    module: str
    # The axis holding the units: a UNIT_LAYOUTS name or an axis number (0 is the batch); None:
    # inferred from the module's own parameters at the first batch (hooks.resolve_unit_axis).
    units: str | int | None = None
    tokens: str = "all"  # of a (batch, tokens, units) output: all, cls (the first token) or patches (the rest)
    output: int | str | None = None  # the part of a tuple, list or dict output
    call: int | str | None = None  # which call (from 0) of a module run more than once per pass; "all": their mean


@dataclass(frozen=True)
class InputContract:
    """What a model takes as input.

    Views leave augmentation in [-1, 1], RGB (``views.py``); the audit gives the model its
    ``channels`` (1: the ITU-R 601 luma of the view) in its channel ``order`` (RGB or BGR), maps
    them, per channel and affinely, to the model's ``value_range``, or to ``(x - mean) / std`` of the
    [0, 1] image when ``mean`` and ``std`` are set (one value per channel, in the model's order),
    and lays them out channels-last when the model supports it (faster convolutions; a model that
    flattens with ``.view()`` does not).
    """

    value_range: tuple[float, float] = (-1.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels_last: bool = False
    channels: int = 3
    order: str = "RGB"  # of 3 channels: RGB or BGR

    def arrange(self, views):
        """RGB views (n, 3, H, W), a tensor -> the model's channels, in its order."""
        if self.channels == 1:
            import torch

            from ..data.augment import LUMA_WEIGHTS

            # The luma of the [0, 1] image, on the views' [-1, 1] scale: 2 * luma((v + 1) / 2) - 1.
            weights = torch.tensor(LUMA_WEIGHTS, dtype=views.dtype, device=views.device).view(1, 3, 1, 1)
            return (views * weights).sum(dim=1, keepdim=True).add_(sum(LUMA_WEIGHTS) - 1)
        return views.flip(1) if self.order == "BGR" else views

    def affine(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Per-channel (scale, shift) with input = view * scale + shift; None: the views as they are."""
        if self.mean is not None and self.std is not None:
            # With x = (view + 1) / 2: (x - m) / s = view / (2 s) + (1 - 2 m) / (2 s).
            return (tuple(1 / (2 * s) for s in self.std),
                    tuple((1 - 2 * m) / (2 * s) for m, s in zip(self.mean, self.std)))
        low, high = self.value_range
        if (low, high) == (-1.0, 1.0):
            return None
        return ((high - low) / 2,) * self.channels, ((high + low) / 2,) * self.channels

    def describe(self) -> str:
        channels = "greyscale (1 channel, luma)" if self.channels == 1 else self.order
        if self.mean is not None and self.std is not None:
            text = f"(x - mean) / std of x in [0, 1], mean {list(self.mean)}, std {list(self.std)}"
            text = text if channels == "RGB" else f"{channels}, {text}"
        else:
            text = f"{channels} in [{self.value_range[0]:g}, {self.value_range[1]:g}]"
        return text + (", channels-last" if self.channels_last else "")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: tuple[LayerSpec, ...]
    # build(checkpoint) -> torch.nn.Module with its weights loaded; ``checkpoint`` is what
    # ``locate`` returned for the user's --memaudit-checkpoint (None: nothing given or needed).
    build: Callable[[Path | None], Any] = field(compare=False)
    locate: Callable[[str | None], Path | None] = field(compare=False, default=lambda given: Path(given) if given else None)
    description: str = ""
    default_image_size: int = 256
    default_samples: int = 64  # for the built-in image set
    # default_data(image_size, seed) -> data.ImageSet: the images audited when --memaudit-data
    # is not given (a demo model's own training set); None: the built-in generated set.
    default_data: Callable[[int, int], Any] | None = field(compare=False, default=None)
    # default_holdout(image_size) -> data.ImageSet: images of the training distribution the model
    # never saw, audited beside the members when --memaudit-holdout is not given; None: none.
    default_holdout: Callable[[int], Any] | None = field(compare=False, default=None)
    # Controls audited beside the model unless --memaudit-control says otherwise (the planted one
    # runs only where there are held-out images).
    default_control: str = "random,planted"
    # Channels of the first layer's output, at full image resolution: with the RGB input, the least
    # memory one view takes (the image-size check's law); 0 when not known (a user model).
    input_layer_channels: int = 0
    input_contract: InputContract = InputContract()
    factory: str | None = None  # a user model's 'module:function'
    checkpoint: str | None = None  # a user model's checkpoint from its YAML, used when none is given
    # A user model is audited on the images given with --memaudit-data ('builtin' for the generated
    # set); the generated set alone says nothing about what it memorized of its training data.
    requires_data: bool = False
    views: str = "seed"  # the view recipe it is audited with unless --memaudit-views says otherwise (views.py)
    views_folder: str | None = None  # where a views factory's module is found: the declaring YAML's folder
    # loss(checkpoint) -> a function of a batch of plain (unaugmented) images, as the model takes
    # them, giving each image's loss (a tensor of one value per image): the reference attack. None: none.
    loss: Callable[[Path | None], Callable[[Any], Any]] | None = field(compare=False, default=None)

    def layer(self, name_or_module: str) -> LayerSpec | None:
        for layer in self.layers:
            if name_or_module in (layer.name, layer.module):
                return layer
        return None


def var_layer_specs(levels: int = 5, blocks: int = 2, attn_levels: tuple[int, ...] = (4,)) -> tuple[LayerSpec, ...]:
    """The audited layers of a VAR-style VQVAE encoder, in forward order: every output is
    (batch, channels, H, W), and at small sizes a channel count can equal H."""
    names = [("conv.in", "conv_in")]
    for i in range(levels):
        for j in range(blocks):  # attention (where present) runs right after its block
            names.append((f"down.{i}.block.{j}", f"down.{i}.block.{j}"))
            if i in attn_levels:
                names.append((f"down.{i}.attn.{j}", f"down.{i}.attn.{j}"))
        if i < levels - 1:
            names.append((f"down.{i}.downsample", f"down.{i}.downsample"))
    names += [("mid.block.1", "mid.block_1"), ("mid.attn.1", "mid.attn_1"), ("mid.block.2", "mid.block_2"),
              ("norm.out", "norm_out"), ("conv.out", "conv_out")]
    return tuple(LayerSpec(name, module, units="channels_first") for name, module in names)


def _build_var_d16(checkpoint: Path | None):
    from .var import build_var_d16

    return build_var_d16(checkpoint)


def _locate_var_d16(given: str | None) -> Path:
    from .var import locate_var_d16_checkpoint

    return locate_var_d16_checkpoint(given)


def _build_demo(checkpoint: Path | None):
    from .demo import build_demo

    return build_demo(checkpoint)


def _locate_demo(given: str | None) -> Path:
    from .demo import locate_demo

    return locate_demo(given)


def _build_memorizer(checkpoint: Path | None):
    from .demo import build_demo, locate_memorizer

    return build_demo(checkpoint or locate_memorizer(None))


def _locate_memorizer(given: str | None) -> Path:
    from .demo import locate_memorizer

    return locate_memorizer(given)


def _demo_loss(checkpoint: Path | None):
    from .demo import reconstruction_loss

    return reconstruction_loss(checkpoint)


def _memorizer_data(image_size: int, seed: int):
    from .demo import memorizer_member_set

    return memorizer_member_set(image_size)


def _memorizer_holdout(image_size: int):
    from .demo import memorizer_holdout_set

    return memorizer_holdout_set(image_size)


def _demo_data(image_size: int, seed: int):
    from .demo import demo_image_set

    # The demo's own training set, whatever the audit's seed (which still drives augmentations
    # and the control's weights).
    return demo_image_set(image_size)


def _demo_holdout(image_size: int):
    from .demo import demo_holdout_set

    return demo_holdout_set(image_size)


VAR_INPUT = InputContract(channels_last=True)  # VAR's encoder: [-1, 1], and it runs fastest channels-last

BUILTIN_MODELS: dict[str, ModelSpec] = {
    "demo": ModelSpec(
        name="demo",
        layers=var_layer_specs(),
        build=_build_demo,
        input_contract=VAR_INPUT,
        locate=_locate_demo,
        description="VAR-d16's encoder at width 32, trained by pytest_memaudit.models.train_demo as an "
        "autoencoder on its 64x64 demo set with planted, repeated canaries",
        default_image_size=64,
        default_data=_demo_data,
        default_holdout=_demo_holdout,
        input_layer_channels=32,
        loss=_demo_loss,
    ),
    "demo_memorizer": ModelSpec(
        name="demo_memorizer",
        layers=var_layer_specs(),
        build=_build_memorizer,
        input_contract=VAR_INPUT,
        locate=_locate_memorizer,
        description="the demo encoder, then trained alone (its decoder frozen) by pytest_memaudit.models.train_demo "
        "--memorizer to reconstruct 24 member images: memorization the encoder itself carries",
        default_image_size=64,
        default_data=_memorizer_data,
        default_holdout=_memorizer_holdout,
        input_layer_channels=32,
        loss=_demo_loss,
    ),
    "var_d16": ModelSpec(
        name="var_d16",
        layers=var_layer_specs(),
        build=_build_var_d16,
        input_contract=VAR_INPUT,
        locate=_locate_var_d16,
        description="Encoder of VAR-d16's VQVAE tokenizer (vae_ch160v4096z32.pth)",
        input_layer_channels=160,
    ),
}


def user_model_spec(name: str, entry: dict, source: str) -> ModelSpec:
    """A model declared in an audit YAML file (validated by ``config``): ``factory: module:function``,
    its ``layers`` (LayerSpec), and optionally ``checkpoint``, ``image_size`` and an ``input``
    InputContract. Its factory module is imported with the YAML's folder on ``sys.path``."""
    factory_ref = entry["factory"]
    folder = Path(source).resolve().parent
    declared = entry.get("checkpoint")
    declared = None if declared is None else str(folder / Path(declared).expanduser())

    def locate(given: str | None) -> Path | None:
        """--memaudit-checkpoint, else $MEMAUDIT_CHECKPOINT, else the YAML's ``checkpoint:``; None: none."""
        for value, origin in ((given, "--memaudit-checkpoint"), (os.environ.get(CHECKPOINT_ENV_VAR), f"${CHECKPOINT_ENV_VAR}"),
                              (declared, f"checkpoint: in {source}")):
            if value:
                path = Path(value).expanduser()
                if not path.exists():
                    raise CheckpointError(f"model {name!r}: the checkpoint from {origin} ({path}) does not exist. "
                                          "Point it at your weights file.")
                return path
        return None

    def build(checkpoint: Path | None):
        from torch import nn

        factory = import_factory(f"model {name!r} (declared in {source})", factory_ref, folder)
        with user_code(f"model {name!r}: its factory {factory_ref}({'None' if checkpoint is None else repr(str(checkpoint))})"):
            net = factory(None if checkpoint is None else str(checkpoint))
        if not isinstance(net, nn.Module):
            raise AuditError(f"model {name!r}: its factory {factory_ref} returned {type(net).__name__}, not a "
                             "torch.nn.Module. It must return the encoder with its weights loaded.")
        return net

    return ModelSpec(
        name=name,
        layers=tuple(entry["layers"]),
        build=build,
        locate=locate,
        description=entry.get("description", f"user model from {factory_ref}"),
        default_image_size=int(entry.get("image_size", 256)),
        input_contract=entry.get("input", InputContract()),
        factory=factory_ref,
        checkpoint=declared,
        requires_data=True,
        loss=None if entry.get("loss") is None else _user_loss(name, entry["loss"], folder, source),
    )


def _user_loss(name: str, loss_ref: str, folder: Path, source: str) -> Callable[[Path | None], Callable]:
    """The YAML's ``loss: module:function``: function(checkpoint_path_or_None) -> per-image loss function."""

    def loss(checkpoint: Path | None) -> Callable:
        factory = import_factory(f"model {name!r} (declared in {source}): its loss", loss_ref, folder)
        with user_code(f"model {name!r}: its loss factory {loss_ref}({'None' if checkpoint is None else repr(str(checkpoint))})"):
            function = factory(None if checkpoint is None else str(checkpoint))
        if not callable(function):
            raise AuditError(f"model {name!r}: its loss factory {loss_ref} returned {type(function).__name__}, not a "
                             "function. It must return a function of a batch of images giving one loss per image.")
        return function

    return loss


def import_factory(where: str, factory_ref: str, folder: Path) -> Callable:
    """The factory function, its module imported with the YAML's folder first on ``sys.path`` (as
    pytest puts a rootdir conftest's folder there), so that bare ``pytest`` finds a module beside it.
    ``where`` names what the factory is for in errors."""
    module_name, _, attr = factory_ref.partition(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        with user_code(f"{where}: importing {module_name}"):
            module = importlib.import_module(module_name)
    except AuditError as exc:
        missing = getattr(exc.__cause__, "name", None)
        if isinstance(exc.__cause__, ModuleNotFoundError) and missing and module_name.startswith(missing):
            raise AuditError(
                f"{where}: cannot import factory {factory_ref!r}: no module {missing!r} (looked in {folder} and on "
                "sys.path). Write it as 'package.module:function' and put the module beside the YAML file, or make "
                "its package importable (installed, or on PYTHONPATH)."
            ) from None
        raise
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AuditError(f"{where}: module {module_name} has no function {attr!r} (factory {factory_ref!r}).")
    return factory


def get_model_spec(name: str, user_models: dict[str, ModelSpec] | None = None) -> ModelSpec:
    models = {**BUILTIN_MODELS, **(user_models or {})}
    if name in models:
        return models[name]
    import difflib

    close = difflib.get_close_matches(name, list(models), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(models))}. "
        "Declare your own encoder under 'models:' in an audit YAML file."
    )
