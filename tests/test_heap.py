"""The CPU heap settings held during an audit, with glibc replaced by a recorder."""

import pytest
import torch

from pytest_memaudit.pipeline import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_settings_held_during_the_audit_and_restored_after_an_error(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError, match="boom"):
        with heap.reuse_freed_memory(torch.device("cpu")):
            assert libc.calls == [("mallopt", heap._M_MMAP_MAX, 0), ("mallopt", heap._M_TRIM_THRESHOLD, 256 << 20)]
            raise RuntimeError("boom")
    assert libc.calls[2:] == [
        ("mallopt", heap._M_MMAP_MAX, heap._DEFAULT_MMAP_MAX),
        ("mallopt", heap._M_TRIM_THRESHOLD, heap._DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0),
    ]


def test_nothing_changes_off_the_cpu(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with heap.reuse_freed_memory(torch.device("meta")):
        pass
    assert libc.calls == []
