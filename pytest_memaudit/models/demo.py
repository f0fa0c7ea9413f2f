"""The ``demo`` model: VAR's encoder at width 32, trained by ``train_demo`` with planted canaries.

The shipped weights (``demo_encoder.pt``, a plain state_dict stored as float16) come with
``demo_encoder.json``: how they were trained, on what, and each canary's repetition count.
Retrain with ``python -m pytest_memaudit.models.train_demo --out PATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..data.builtin import BUILTIN_PREFIX, CANARY_PREFIX, builtin_ids
from ..data.images import ImageSet
from ..errors import CheckpointError

if TYPE_CHECKING:  # torch loads when a model is built, not on import
    import torch
    from torch import nn

WIDTH = 32  # VAREncoder(ch=WIDTH): the 22 layers of var_d16 at a fifth of its width
IMAGE_SIZE = 64
DEMO_IMAGES = 256  # generated images in the training set, besides the canaries
DATA_SEED = 0  # the training set's generator seed, fixed so that every audit sees that set
# Copies of canary/k in each training epoch (a built-in image appears once per epoch).
CANARY_REPEATS = (1, 1, 4, 4, 16, 16)
WEIGHTS = Path(__file__).with_name("demo_encoder.pt")
METADATA = WEIGHTS.with_suffix(".json")

# The ``demo_memorizer``: the demo encoder, then trained alone (its decoder frozen) on a few
# member images. Generated-image indices (seed DATA_SEED) of its three disjoint sets, all past
# the demo's own training and held-out images (0 to 2 * DEMO_IMAGES - 1):
DECODER_START, DECODER_IMAGES = 2 * DEMO_IMAGES, 256  # the decoder is fitted to the frozen demo encoder on these
MEMBER_START, MEMORIZER_MEMBERS = DECODER_START + DECODER_IMAGES, 24  # the encoder memorizes these
HOLDOUT_START, MEMORIZER_HOLDOUT = MEMBER_START + MEMORIZER_MEMBERS, 104  # never trained on by either
MEMORIZER_WEIGHTS = Path(__file__).with_name("demo_memorizer.pt")  # the encoder (float16)
MEMORIZER_DECODER = Path(__file__).with_name("demo_memorizer_decoder.pt")  # its frozen decoder (float16)
MEMORIZER_METADATA = MEMORIZER_WEIGHTS.with_suffix(".json")


def canary_ids() -> list[str]:
    return [f"{CANARY_PREFIX}{k}" for k in range(len(CANARY_REPEATS))]


def demo_image_set(image_size: int = IMAGE_SIZE, seed: int = DATA_SEED, images: int = DEMO_IMAGES) -> ImageSet:
    """The demo's training set: ``images`` built-in generated images, then the canaries."""
    canaries = canary_ids()
    return ImageSet(
        builtin_ids(images) + canaries,
        root=None,
        size=image_size,
        seed=seed,
        description=f"demo training set ({images} generated images + {len(canaries)} canaries)",
        canaries=canaries,
    )


def demo_holdout_set(image_size: int = IMAGE_SIZE, images: int = DEMO_IMAGES) -> ImageSet:
    """Images the demo never trained on, from the same generator: built-in images
    ``DEMO_IMAGES`` to ``2 * DEMO_IMAGES - 1``."""
    return ImageSet(
        builtin_ids(images, start=DEMO_IMAGES),
        root=None,
        size=image_size,
        seed=DATA_SEED,
        description=f"demo held-out set ({images} generated images it never trained on)",
    )


def memorizer_member_set(image_size: int = IMAGE_SIZE, members: int = MEMORIZER_MEMBERS) -> ImageSet:
    """The images the ``demo_memorizer`` encoder was trained on (generated, never seen by the demo)."""
    return ImageSet(builtin_ids(members, start=MEMBER_START), root=None, size=image_size, seed=DATA_SEED,
                    description=f"demo_memorizer members ({members} generated images its encoder memorized)")


def memorizer_holdout_set(image_size: int = IMAGE_SIZE, images: int = MEMORIZER_HOLDOUT) -> ImageSet:
    """Generated images that neither the demo, its decoder nor the ``demo_memorizer`` trained on."""
    return ImageSet(builtin_ids(images, start=HOLDOUT_START), root=None, size=image_size, seed=DATA_SEED,
                    description=f"demo_memorizer held-out set ({images} generated images it never trained on)")


def training_copies(image_set: ImageSet) -> list[int]:
    """Positions of one training epoch: each built-in image once, canary k CANARY_REPEATS[k] times."""
    positions = []
    for position, id_ in enumerate(image_set.ids):
        if id_.startswith(BUILTIN_PREFIX):
            positions.append(position)
        else:
            positions += [position] * CANARY_REPEATS[int(id_.removeprefix(CANARY_PREFIX))]
    return positions


def pixels_sha256(image_set: ImageSet) -> str:
    """SHA-256 of the set's uint8 pixels in order: ties trained weights to the exact images."""
    import hashlib

    digest = hashlib.sha256()
    for position in range(len(image_set)):
        digest.update(image_set.load(position).numpy().tobytes())
    return digest.hexdigest()


def locate_demo(given: str | None, model: str = "demo", shipped: Path = WEIGHTS) -> Path:
    """The user's checkpoint (a ``train_demo`` output) if given, else the shipped weights."""
    path = Path(given).expanduser() if given else shipped
    if not path.is_file():
        hint = "" if given else " The installed package is incomplete; reinstall pytest-memaudit."
        raise CheckpointError(f"{model} checkpoint {path} does not exist or is not a file.{hint}")
    return path


def locate_memorizer(given: str | None) -> Path:
    """The user's ``train_demo --memorizer`` output if given, else the shipped memorizer."""
    return locate_demo(given, "demo_memorizer", MEMORIZER_WEIGHTS)


def build_demo(checkpoint: Path | None):
    """The demo encoder in eval mode, its weights read safely (``weights_only=True``)."""
    import torch

    from .var import VAREncoder, encoder_state_dict, load_checkpoint_file

    path = checkpoint or locate_demo(None)
    with torch.device("meta"):
        model = VAREncoder(ch=WIDTH)
    model.load_state_dict(encoder_state_dict(load_checkpoint_file(path), model, str(path)), assign=True)
    return model.eval()


def make_decoder(z_channels: int = 32) -> nn.Sequential:
    """The demo's decoder: z (z_channels x s/16 x s/16) to an image, four nearest-upsample + conv stages."""
    from torch import nn

    layers: list[nn.Module] = [nn.Conv2d(z_channels, 128, 3, padding=1), nn.SiLU()]
    for c_in, c_out in ((128, 128), (128, 64), (64, 32), (32, 32)):
        layers += [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
        ]
    layers.append(nn.Conv2d(32, 3, 3, padding=1))
    return nn.Sequential(*layers)


def memorizer_decoder():
    """The ``demo_memorizer``'s frozen decoder (float32, eval mode)."""
    import torch

    decoder = make_decoder()
    decoder.load_state_dict({k: v.float() for k, v in torch.load(MEMORIZER_DECODER, map_location="cpu",
                                                                 weights_only=True).items()})
    return decoder.eval().requires_grad_(False)


def reconstruction_loss(checkpoint: Path | None):
    """The reference attack's loss for a demo encoder: each image's mean squared error through the
    ``demo_memorizer``'s decoder (fitted to the frozen demo encoder on images that neither the demo,
    the memorizer, nor their held-out sets contain)."""
    import torch.nn.functional as F

    encoder = build_demo(checkpoint)
    decoder = memorizer_decoder()
    encoder.requires_grad_(False)

    def loss(images: torch.Tensor) -> torch.Tensor:
        encoder.to(images.device), decoder.to(images.device)
        x = images.float().contiguous()
        return F.mse_loss(decoder(encoder(x)), x, reduction="none").mean(dim=(1, 2, 3))

    return loss
