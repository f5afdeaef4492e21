"""Freed large buffers go back to the operating system (glibc's ``malloc``).

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own ``mmap``, and unmaps it on
free; but each time such a buffer is freed it raises the threshold to that buffer's size (up to 32 MiB), so that
later buffers of that size come from the heap, where freed space is kept for reuse and rarely returned. A pass
that reads a block's 8-22 MiB weights, frees them and reads the next block's, with activations of a few MiB in
between, then grows its resident memory well past what it holds at any moment: measured on a TinyLlama-1.1B-shaped
bf16 checkpoint, ``layerlab analyze --offload --tokens 512 --no-spectra`` peaked at 1339-1800 MiB from run to
run with the default behaviour, and at 1098 MiB with a fixed 1 MiB threshold (65 KiB gave 1092 MiB, 4 MiB 1181
MiB; docs/performance.md). Setting the threshold once, as :func:`return_freed_memory` does, turns that dynamic
rise off: every buffer of 1 MiB or more is mapped on allocation and unmapped on free.

This changes only where freed memory goes, never a result. It applies to the whole process; it is skipped where
the C library is not glibc, and where the user set ``MALLOC_MMAP_THRESHOLD_`` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
THRESHOLD = 1 << 20

_done: bool | None = None


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes, once per process. True when it is in place."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # no C library to call, or one without mallopt
        _done = False
    return _done
