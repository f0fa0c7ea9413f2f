"""The HTML audit report: ``write_html(path, result, images, gallery)``."""

from .html import render_html, write_html
from .thumbnails import GALLERY_MODES, ImageSetThumbnails, ThumbnailSource

__all__ = ["GALLERY_MODES", "ImageSetThumbnails", "ThumbnailSource", "render_html", "write_html"]
