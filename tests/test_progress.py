"""Progress where the output is not a terminal (a CI log): a line every so often, with numbers a
person can check; silent under -q."""

import pytest

import pytest_memaudit.pipeline.progress
from pytest_memaudit.pipeline.progress import ProgressLines, duration
from test_user_models import FAST, declare

pytest_plugins = ["pytester"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_with_views_rate_and_time_left():
    clock, lines = Clock(), []
    progress = ProgressLines(lines.append, views_per_image=10, every_s=30, clock=clock)
    clock.now = 5
    progress(8, 100)  # the first batch: the rate is measured from here
    clock.now = 29
    progress(30, 100)
    assert lines == []
    clock.now = 35
    progress(40, 100)  # 32 images x 10 views in 30 s: 10.67 views/s; 600 views left: 56.25 s
    assert lines == ["memaudit: 40/100 images (400/1,000 views), 10.7 views/s, about 56 s left"]
    clock.now = 64
    progress(60, 100)
    assert len(lines) == 1  # next line due at 65 s
    clock.now = 5 + 3600
    progress(90, 1000)  # 82 images x 10 in 3600 s: 0.228 views/s; 9,100 views left: 39,951 s
    assert lines[-1] == "memaudit: 90/1,000 images (900/10,000 views), 0.2 views/s, about 11 h 05 min left"


def test_a_line_before_any_rate_says_the_time_left_is_unknown():
    clock, lines = Clock(), []
    progress = ProgressLines(lines.append, views_per_image=1, every_s=0, clock=clock)
    progress(4, 8)
    assert lines == ["memaudit: 4/8 images (4/8 views), time left unknown"]


@pytest.mark.parametrize("seconds, text", [(12.4, "12 s"), (250, "4 min 10 s"), (7500, "2 h 05 min")])
def test_durations_read_as_a_person_would(seconds, text):
    assert duration(seconds) == text


def test_an_audit_logging_to_a_file_prints_progress_lines_unless_quiet(pytester, monkeypatch):
    """pytester's output is not a terminal, as a CI log is not: progress lines appear between collection
    and the summary (here after every batch); -q silences them."""
    monkeypatch.setattr(pytest_memaudit.pipeline.progress, "EVERY_S", 0.0)
    declare(pytester.path / "audits", "mine")
    args = ["audits", "--memaudit-model", "mine", *FAST, "--memaudit-batch-size", "1"]
    result = pytester.runpytest(*args)
    assert result.ret == 0
    lines = [line for line in result.outlines if line.startswith("memaudit: ") and " images (" in line]
    assert lines and lines[-1].startswith("memaudit: 4/4 images (4/4 views), "), result.outlines
    assert not any(" images (" in line for line in pytester.runpytest(*args, "-q").outlines)
