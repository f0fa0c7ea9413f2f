"""What a session writes at its end: the results JSON, the HTML report, the run saved as a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import gallery_mode, report_paths

if TYPE_CHECKING:
    from .outputs import OutputLog
    from .session import AuditSession


def write_outputs(state: AuditSession) -> "OutputLog":
    """Write the JSON, then the report; each failure is logged and the other output still written."""
    from .outputs import OutputLog
    from ..results.result import write_json_atomic

    log = OutputLog()
    html_path, json_path = report_paths(state.config)
    document = results_document(state)
    if json_path:
        log.write("results", json_path, lambda: write_json_atomic(json_path, document))
    if html_path:
        log.write("report", html_path, lambda: write_report(state, html_path, log))
    save_run(state, document, log)
    return log


def results_document(state: AuditSession) -> dict[str, Any]:
    """The results JSON: the result and, when compared with a baseline, the comparison; for a checkpoint
    series, each checkpoint's, in series order."""
    documents = run_documents(state)
    if list(documents) == [None]:
        return documents[None]
    from ..results.result import series_document

    return series_document(list(documents.items()))


def run_documents(state: AuditSession) -> dict[str | None, dict[str, Any]]:
    documents = {}
    for checkpoint, comparison in state.compared().items():
        documents[checkpoint] = state.runs[checkpoint].to_json()
        if comparison is not None:
            documents[checkpoint]["comparison"] = comparison.to_json()
    return documents


def save_run(state: AuditSession, document: dict[str, Any], log: "OutputLog") -> None:
    """--memaudit-save NAME / --memaudit-autosave: the results as a new entry under .memaudit/ in the rootdir;
    each checkpoint of a series as its own entry, NAME.<checkpoint>."""
    name = state.config.getoption("memaudit_save")
    if not name and not state.config.getoption("memaudit_autosave"):
        return
    from ..gates.baselines import AUTOSAVE_NAME, STORE, new_entry
    from ..results.result import write_json_atomic

    root, name = state.config.rootpath, name or AUTOSAVE_NAME
    runs = zip(document["series"], document["runs"]) if "series" in document else [(None, document)]
    for checkpoint, run in runs:
        entry = name if checkpoint is None else f"{name}.{checkpoint}"
        try:
            path = new_entry(root, run, entry)
        except OSError:  # the store cannot even be looked into: the write below says why
            path = root / STORE / f"{entry}.json"
        log.write("saved run", path, lambda: write_json_atomic(path, run))


def write_report(state: AuditSession, path: Path, log: "OutputLog") -> Path:
    """Render the session's result; thumbnails are decoded again from the audited images (without
    them, when the images cannot be opened again: ``log`` says why)."""
    from ..report import ImageSetThumbnails, write_html

    gallery = gallery_mode(state.config)
    images = None
    if gallery == "images" and state.stored is not None:
        images = stored_thumbnails(state, log)
    elif gallery == "images":
        from ..pipeline.setup import open_images

        images = log.make("thumbnails", state.result.data_source, lambda: ImageSetThumbnails(
            open_images(state.settings, state.spec, state.result.settings["image_size"])))
    series = list(state.runs.items()) if state.series or (state.stored and None not in state.stored) else None
    return write_html(path, state.result, images, gallery, state.compared().get(list(state.runs)[-1]), series)


def stored_thumbnails(state: AuditSession, log: "OutputLog"):
    """Thumbnails of a stored audit's images, decoded again where they still are; else None (names only,
    which the log says: a job that gates stored results often has no copy of the images)."""
    from ..pipeline.setup import open_images
    from .outputs import failure_reason
    from ..report import ImageSetThumbnails

    try:
        return ImageSetThumbnails(open_images(state.settings, state.spec, state.result.settings["image_size"]))
    except Exception as exc:  # noqa: BLE001 (any reason the images cannot be had leaves names only)
        log.written.append(f"the report shows image names only: the audited images ({state.result.data_source}) "
                           f"cannot be read here: {failure_reason(exc)}")
        return None
