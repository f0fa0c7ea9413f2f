"""A folder of .tar shards (the WebDataset layout) as a data source, read in place.

Large image sets are kept as tar archives of many images each (``train-000123.tar`` holding
``n01440764_10026.jpg``, ``n01440764_10026.cls``, ...). A data folder with ``.tar`` files
directly in it is such a set: every image member (by extension, as in a folder of files) of
every archive is a data point, named ``<archive>/<member path>``; other members (labels,
metadata) are ignored. The archives' headers are read once, and each image is then read by its
offset with one positional read: nothing is extracted, and no archive is held in memory.
Compressed archives (.tar.gz) cannot be read this way and are not supported.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import IMAGE_EXTENSIONS, ImageSet, UnreadableImage, _chw, _resize, _rgb_array, select_samples
from .errors import DataError

TAR_SUFFIX = ".tar"


def tar_shards(root: str | os.PathLike) -> list[str]:
    """The names of the .tar files directly in ``root`` (hidden ones left out), sorted."""
    try:
        with os.scandir(root) as entries:
            return sorted(e.name for e in entries
                          if e.name.lower().endswith(TAR_SUFFIX) and not e.name.startswith(".") and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return []


def open_image_folder(root: str | os.PathLike, size: int, samples: int | None, seed: int) -> ImageSet:
    """A data folder: its .tar shards if it has any, else its image files."""
    if tar_shards(root):
        return TarImageSet.from_folder(root, size, samples, seed)
    return ImageSet.from_folder(root, size, samples, seed)


def list_tar_images(root: Path, shards: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every image member of ``shards``: ids (``<archive>/<member>``, sorted), and per id the
    archive's number, the member's data offset and its size."""
    ids, shard_of, offsets, sizes = [], [], [], []
    for number, name in enumerate(shards):
        try:
            with tarfile.open(root / name, mode="r:") as archive:
                for member in archive:
                    base = member.name.rsplit("/", 1)[-1]
                    is_image = os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS
                    if member.isfile() and is_image and not base.startswith("."):
                        ids.append(f"{name}/{member.name}")
                        shard_of.append(number)
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
        except (tarfile.TarError, OSError) as exc:
            raise DataError(
                f"cannot read the tar shard {root / name}: {exc}. Shards must be uncompressed .tar archives "
                "(WebDataset layout); repair or remove this one."
            ) from None
    if not ids:
        raise DataError(
            f"the {len(shards)} .tar shards in {root} hold no images (members ending in {' '.join(IMAGE_EXTENSIONS)}); "
            "pass --memaudit-data DIR with shards of images, or a folder of image files."
        )
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return ([ids[i] for i in order], np.array(shard_of, dtype=np.int32)[order], np.array(offsets, dtype=np.int64)[order],
            np.array(sizes, dtype=np.int64)[order])


@dataclass
class TarImageSet(ImageSet):
    """Data points that are members of .tar shards in ``root``: ``ids[i]`` lies in archive
    ``shards[shard_of[i]]`` at byte ``offsets[i]``, ``sizes[i]`` bytes long."""

    shards: list[str] = field(default_factory=list)
    shard_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def from_folder(cls, root: str | os.PathLike, size: int, samples: int | None, seed: int) -> TarImageSet:
        root = Path(root)
        shards = tar_shards(root)
        ids, shard_of, offsets, sizes = list_tar_images(root, shards)
        images = cls(ids, root, size, seed, shards=shards, shard_of=shard_of, offsets=offsets, sizes=sizes)
        if samples is None:
            return images
        chosen, warning = select_samples(ids, samples, seed, source=str(root))
        return replace(images._subset(chosen), warning=warning)

    def sample(self, samples: int, seed: int) -> TarImageSet:
        chosen = super().sample(samples, seed)
        return replace(self._subset(chosen.ids), warning=chosen.warning, description=chosen.description)

    def _subset(self, ids: list[str]) -> TarImageSet:
        position = {image_id: i for i, image_id in enumerate(self.ids)}
        keep = np.array([position[image_id] for image_id in ids], dtype=np.int64)
        return replace(self, ids=list(ids), shard_of=self.shard_of[keep], offsets=self.offsets[keep],
                       sizes=self.sizes[keep])

    def load(self, position: int) -> torch.Tensor:
        """Data point ``position`` as uint8 (3, size, size), read from its archive in place."""
        name = self.ids[position]
        path = self.root / self.shards[self.shard_of[position]]
        try:
            with open(path, "rb", buffering=0) as archive:
                data = os.pread(archive.fileno(), int(self.sizes[position]), int(self.offsets[position]))
        except OSError as exc:
            raise UnreadableImage(name, f"cannot read its archive: {exc.strerror or exc}") from exc
        if len(data) != self.sizes[position]:
            raise UnreadableImage(name, "its archive ends early (truncated)")
        return decode_member(data, name, self.size)


def decode_member(data: bytes, name: str, size: int) -> torch.Tensor:
    """An archive member's bytes as uint8 (3, size, size), as ``data.decode_image`` decodes a file."""
    if not data:
        raise UnreadableImage(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            pixels = _rgb_array(img)
    except UnidentifiedImageError as exc:
        raise UnreadableImage(name, "not an image Pillow can read") from exc
    except Exception as exc:  # noqa: BLE001 (any decoder failure: the member is skipped)
        raise UnreadableImage(name, str(exc) or type(exc).__name__) from exc
    return _resize(_chw(pixels), size)
