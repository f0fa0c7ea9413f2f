"""Registry of auditable encoders.

A model is a ``ModelSpec``: how to build the module (with its weights) and which of its
layers to audit, in forward order. Built-in models are listed in ``BUILTIN_MODELS``; users add
their own in an audit YAML file (``models:`` section, a ``module:callable`` factory plus a
layer list). Building imports torch; looking up names and layer lists does not.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import AuditError, ConfigError


@dataclass(frozen=True)
class LayerSpec:
    """One audited layer: its display name (seed report style) and its module path."""

    name: str
    module: str


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

    def layer(self, name_or_module: str) -> LayerSpec | None:
        for layer in self.layers:
            if name_or_module in (layer.name, layer.module):
                return layer
        return None


def var_layer_specs(levels: int = 5, blocks: int = 2, attn_levels: tuple[int, ...] = (4,)) -> tuple[LayerSpec, ...]:
    """The audited layers of a VAR-style VQVAE encoder, in forward order."""
    specs = [LayerSpec("conv.in", "conv_in")]
    for i in range(levels):
        for j in range(blocks):  # attention (where present) runs right after its block
            specs.append(LayerSpec(f"down.{i}.block.{j}", f"down.{i}.block.{j}"))
            if i in attn_levels:
                specs.append(LayerSpec(f"down.{i}.attn.{j}", f"down.{i}.attn.{j}"))
        if i < levels - 1:
            specs.append(LayerSpec(f"down.{i}.downsample", f"down.{i}.downsample"))
    specs += [
        LayerSpec("mid.block.1", "mid.block_1"),
        LayerSpec("mid.attn.1", "mid.attn_1"),
        LayerSpec("mid.block.2", "mid.block_2"),
        LayerSpec("norm.out", "norm_out"),
        LayerSpec("conv.out", "conv_out"),
    ]
    return tuple(specs)


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


def _demo_data(image_size: int, seed: int):
    from .demo import demo_image_set

    # The demo's own training set, whatever the audit's seed (which still drives augmentations
    # and the control's weights).
    return demo_image_set(image_size)


def _demo_holdout(image_size: int):
    from .demo import demo_holdout_set

    return demo_holdout_set(image_size)


BUILTIN_MODELS: dict[str, ModelSpec] = {
    "demo": ModelSpec(
        name="demo",
        layers=var_layer_specs(),
        build=_build_demo,
        locate=_locate_demo,
        description="VAR-d16's encoder at width 32, trained by pytest_memaudit.train_demo as an "
        "autoencoder on its 64x64 demo set with planted, repeated canaries",
        default_image_size=64,
        default_data=_demo_data,
        default_holdout=_demo_holdout,
        input_layer_channels=32,
    ),
    "var_d16": ModelSpec(
        name="var_d16",
        layers=var_layer_specs(),
        build=_build_var_d16,
        locate=_locate_var_d16,
        description="Encoder of VAR-d16's VQVAE tokenizer (vae_ch160v4096z32.pth)",
        input_layer_channels=160,
    ),
}


def user_model_spec(name: str, entry: dict, source: str) -> ModelSpec:
    """A model declared in an audit YAML file: ``factory: module:callable`` and ``layers``."""
    factory_ref = entry["factory"]
    layers = tuple(
        LayerSpec(item, item) if isinstance(item, str) else LayerSpec(item["name"], item["module"])
        for item in entry["layers"]
    )

    def build(checkpoint: Path | None):
        module_name, _, attr = factory_ref.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise AuditError(
                f"model {name!r} (declared in {source}): cannot import factory {factory_ref!r}: "
                f"{exc}. Write it as 'package.module:function' and make sure the package is "
                "importable (installed, or on PYTHONPATH)."
            ) from None
        return factory(None if checkpoint is None else str(checkpoint))

    return ModelSpec(
        name=name,
        layers=layers,
        build=build,
        description=entry.get("description", f"user model from {factory_ref}"),
        default_image_size=int(entry.get("image_size", 256)),
    )


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
