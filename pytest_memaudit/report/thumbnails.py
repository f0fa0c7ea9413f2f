"""How training data points appear in a report: thumbnails, file names, or anonymous numbers.

A report of training images leaks training data, so the gallery mode decides what is shown:
``images`` (thumbnail and file name), ``names`` (file name only) or ``none`` (neither: data
point i is shown as "data point #i"). Each distinct thumbnail is encoded once, as a CSS class
whose background is a data URI, however often the report shows it.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, features

from ..data.images import ImageSet, UnreadableImage, display_id

GALLERY_MODES = ("images", "names", "none")
THUMBNAIL_PX = 64
_FORMAT, _MIME = ("WEBP", "image/webp") if features.check("webp") else ("JPEG", "image/jpeg")


class ThumbnailSource(Protocol):
    """Pixels of a data point by its id: uint8 (H, W, 3), or None when it cannot be had."""

    def pixels(self, sample: str) -> np.ndarray | None: ...


class ImageSetThumbnails:
    """Pixels from the audit's ImageSet, decoded only for the data points a report shows."""

    def __init__(self, images: ImageSet):
        self._images = images
        self._positions = {sample: position for position, sample in enumerate(images.ids)}

    def pixels(self, sample: str) -> np.ndarray | None:
        position = self._positions.get(sample)
        if position is None:
            return None
        try:
            return self._images.load(position).permute(1, 2, 0).numpy()
        except UnreadableImage:
            return None


def thumbnail_uri(pixels: np.ndarray, size: int = THUMBNAIL_PX) -> str:
    """A small compressed data URI of ``pixels``, at most ``size`` px on its longer side."""
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), "RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, _FORMAT, quality=75)
    return f"data:{_MIME};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


@dataclass(frozen=True)
class DataPoint:
    label: str  # file name (as display_id shows it), or "data point #i" in gallery mode none
    css: str | None  # the thumbnail's CSS class; None when no image is shown


class Gallery:
    """Labels and thumbnails of the data points one report shows."""

    def __init__(self, samples: list[str], mode: str = "images", source: ThumbnailSource | None = None):
        if mode not in GALLERY_MODES:
            raise ValueError(f"gallery mode must be one of {', '.join(GALLERY_MODES)}, not {mode!r}")
        self.samples = samples
        self.mode = mode
        self._source = source if mode == "images" else None
        self._uris: dict[int, str | None] = {}

    def point(self, index: int) -> DataPoint:
        index = int(index)
        if self.mode == "none":
            return DataPoint(f"data point #{index}", None)
        if index not in self._uris:
            pixels = self._source.pixels(self.samples[index]) if self._source else None
            self._uris[index] = None if pixels is None else thumbnail_uri(pixels)
        css = f"dp{index}" if self._uris[index] else None
        return DataPoint(display_id(self.samples[index]), css)

    def stylesheet(self) -> list[tuple[str, str]]:
        """(CSS class, data URI) of every thumbnail handed out so far."""
        return [(f"dp{index}", uri) for index, uri in sorted(self._uris.items()) if uri]
