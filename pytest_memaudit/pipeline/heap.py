"""Keeping the CPU audit's forward passes from page-faulting their activations in again.

glibc serves blocks over its mmap threshold (at most 32 MB) with fresh mmap() calls and unmaps
them on free, so every forward pass on the CPU page-faults its activations in again (var_d16 at
64x64, 30 views per pass: 14 GB of fresh pages per 240 views, about 15% of the audit's time).
During an audit, ``reuse_freed_memory`` turns mmap off, so freed blocks stay in the heap for the
next pass, and keeps up to 256 MB free at the heap's top. The heap then holds both the passes'
activations and whatever else is allocated between them, so tensors that outlive a pass are
allocated once and reused (``hooks.LayerRecorder``, ``unitmem``): new ones every pass would
fragment the heap, and peak memory would creep up over a long audit. benchmarks/RESULTS.md has
the figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device) -> Iterator[None]:
    """On the CPU with glibc, let each batch reuse the heap memory the previous batch freed.

    glibc's defaults are restored and the heap trimmed on exit. Elsewhere this does nothing.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # not Linux, or no glibc
        return None
