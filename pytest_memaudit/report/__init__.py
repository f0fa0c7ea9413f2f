"""The HTML audit report: ``write_report(result, path)``, or ``write_html(path, result, images, gallery)``.
May import: gates, pipeline, results and every layer below, errors."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from .html import render_html, write_html
from .thumbnails import GALLERY_MODES, ImageSetThumbnails, ThumbnailSource

if TYPE_CHECKING:
    from ..models import ModelSpec
    from ..results.result import AuditResult

__all__ = ["GALLERY_MODES", "ImageSetThumbnails", "ThumbnailSource", "render_html", "write_html", "write_report"]


def write_report(result: AuditResult, path: str | Path, gallery: str = "images", model: ModelSpec | None = None) -> Path:
    """Write ``result``'s HTML report to ``path`` (atomically) and return the path.

    With ``gallery="images"`` the thumbnails are decoded again from the images the audit read, as
    its recorded settings name them; a model declared in a YAML file (not built in) must be given
    as ``model`` (its ``ModelSpec``) for that. ``names`` shows file names only, ``none`` neither.
    """
    from ..errors import ConfigError

    if gallery not in GALLERY_MODES:
        raise ConfigError(f"gallery must be one of {', '.join(GALLERY_MODES)}, got {gallery!r}")
    images = None
    if gallery == "images":
        from ..pipeline.setup import open_images
        from ..pipeline.settings import RunSettings, make_settings
        from ..models import get_model_spec

        settings = make_settings(**{f.name: result.settings.get(f.name) for f in fields(RunSettings)})
        spec = model or get_model_spec(result.model)
        images = ImageSetThumbnails(open_images(settings, spec, result.settings["image_size"]))
    return write_html(path, result, images, gallery)
