"""Render an ``AuditResult`` to one self-contained HTML file with the jinja2 templates."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import jinja2

from ..gates.compare import Comparison
from ..results.result import AuditResult, write_text_atomic
from .context import report_context
from .thumbnails import Gallery, ThumbnailSource

TEMPLATE = "report.html.j2"


def render_html(result: AuditResult, images: ThumbnailSource | None = None, gallery: str = "images",
                comparison: Comparison | None = None, series: list[tuple[str, AuditResult]] | None = None) -> str:
    """The report as HTML text; ``images`` gives thumbnail pixels (None: names only); ``comparison``
    adds the "Compared with" section; ``series`` (each checkpoint's result by label, ``result`` the
    last) the "Checkpoint series" section."""
    context = report_context(result, Gallery(result.samples, gallery, images), comparison, series)
    return _environment().get_template(TEMPLATE).render(context)


def write_html(path: str | Path, result: AuditResult, images: ThumbnailSource | None = None,
               gallery: str = "images", comparison: Comparison | None = None,
               series: list[tuple[str, AuditResult]] | None = None) -> Path:
    """Render, then replace ``path`` atomically: a failed render leaves any old report as it was."""
    text = render_html(result, images, gallery, comparison, series)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def _load_template(name: str) -> str:
    # templates/ is installed as the package pytest_memaudit.templates (see pyproject.toml)
    return resources.files("pytest_memaudit.templates").joinpath(name).read_text(encoding="utf-8")


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
