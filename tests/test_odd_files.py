"""A data folder with odd entries, through the plugin: a file name that is not UTF-8, a named pipe
called like an image, an unreadable sub-folder. The audit runs; each odd entry is audited or
skipped with its reason, and shown escaped."""

import json
import os

import pytest

import pytest_memaudit.pipeline.audit  # noqa: F401  (see test_plugin.py: import before pytester runs)
import pytest_memaudit.plugin  # noqa: F401
import pytest_memaudit.plugin.terminal  # noqa: F401
from conftest import make_images
from test_data import non_utf8_file, refuse_to_read

pytest_plugins = ["pytester"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_odd_entries_in_the_data_folder(pytester, var_checkpoint, monkeypatch):
    data = make_images(pytester.path / "imgs", 3, size=32)
    odd = non_utf8_file(data, b"caf\xe9.png", (data / "img_000.png").read_bytes())
    broken = non_utf8_file(data, b"bad\xff.png", b"not a png")
    os.mkfifo(data / "x.png")
    make_images(data / "locked", 2, size=32)
    refuse_to_read(monkeypatch, data / "locked")
    pytester.mkdir("audits")
    (pytester.path / "audits" / "memaudit.yaml").write_text("thresholds: {mean_unitmem_max: 1.0}\n")
    result = pytester.runpytest(
        "audits", "--memaudit-model", "var_d16", "--memaudit-checkpoint", str(var_checkpoint), "--memaudit-data",
        str(data), "--memaudit-image-size", "32", "--memaudit-augmentations", "2", "--memaudit-workers", "0",
        "--memaudit-json", "out.json", "--memaudit-gallery", "names", "-k", "conv.out", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*3 unreadable image(s) skipped, e.g. locked/: cannot read the folder: Permission denied"])

    out = json.loads((pytester.path / "out.json").read_text(encoding="utf-8"))
    assert out["samples"] == [odd, "img_000.png", "img_001.png", "img_002.png"]
    assert [(item["id"], item["reason"].split(";")[0]) for item in out["skipped"]] == [
        ("locked/", "cannot read the folder: Permission denied"),
        ("x.png", "not a regular file (a named pipe)"),
        (broken, "not an image Pillow can read"),
    ]
    report = (pytester.path / "memaudit-report" / "report.html").read_text(encoding="utf-8")
    assert "<span class=\"name\">bad\\xff.png</span>: not an image Pillow can read" in report


def test_terminal_and_report_labels_escape_odd_ids():
    from pytest_memaudit.report.thumbnails import Gallery
    from pytest_memaudit.plugin.terminal import render_summary
    from test_report import synthetic_result

    samples = ["caf\udce9.png", "bell\x07.png", "plain.png"]
    result = synthetic_result(samples, ["a"], [4])
    result.skipped = [{"id": "bad\udcff.png", "reason": "not an image Pillow can read"}]
    assert "1 unreadable image(s) skipped, e.g. bad\\xff.png: not an image" in render_summary(result)
    gallery = Gallery(samples, "names")
    assert [gallery.point(i).label for i in range(3)] == ["caf\\xe9.png", "bell\\x07.png", "plain.png"]
