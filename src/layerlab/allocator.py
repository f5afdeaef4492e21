"""Where glibc's ``malloc`` puts freed large buffers: back to the operating system, or kept for reuse.

glibc serves an allocation above its mmap threshold (128 KiB at start) with its own ``mmap``, and unmaps it on
free; but each time such a buffer is freed it raises the threshold to that buffer's size (up to 32 MiB), so that
later buffers of that size come from the heap, where freed space is kept for reuse until more than the trim
threshold (twice the mmap threshold) lies free at the heap's top. Two fixed settings replace that dynamic rule,
each for the runs it suits; setting either turns the dynamic rise off for the process:

* :func:`return_freed_memory` (**return**), for a checkpoint whose weights are large or streamed: every buffer of
  1 MiB or more is mapped on allocation and unmapped on free. A pass that reads a block's 8-22 MiB weights, frees
  them and reads the next block's, with activations of a few MiB in between, otherwise grows its resident memory
  well past what it holds at any moment: measured on a TinyLlama-1.1B-shaped bf16 checkpoint, ``layerlab
  analyze --offload --tokens 512 --no-spectra`` peaked at 1339-1800 MiB from run to run with glibc's default,
  and at 1098 MiB with a fixed 1 MiB threshold (65 KiB gave 1092 MiB, 4 MiB 1181 MiB; docs/performance.md).
* :func:`reuse_freed_memory` (**reuse**), for a small model held in memory: buffers up to 32 MiB come from the
  heap, and up to 256 MiB of freed heap stays mapped. Under **return**, every activation of 1 MiB or more
  (each block's q/k/v and MLP buffers) is a fresh mapping, whose pages fault in when first written: on a
  12-block, 256-wide GPT at the default 8192 tokens that was 0.9 M page faults and about a third of the
  analysis' CPU time, and the plain forward that follows in the same process faulted 0.4 M times and ran
  about 30% slower (docs/performance.md).

:func:`for_weights` picks between them: **return** when the weights are streamed (``--offload``) or take at
least :data:`LARGE_WEIGHTS`, where the memory targets bind and the activations are small against the
per-block compute; **reuse** otherwise, where the allocator's slack is small against any machine that analyses
and the page faults are a large share of the work.

This changes only where freed memory goes, never a result. It applies to the whole process; it is skipped where
the C library is not glibc, and where the user set glibc's malloc environment themselves
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
THRESHOLD = 1 << 20  # return: buffers of 1 MiB and more are unmapped on free
REUSE_MMAP = 32 << 20  # reuse: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
REUSE_TRIM = 256 << 20  # reuse: freed heap kept mapped, at most
LARGE_WEIGHTS = 1 << 30  # for_weights: weights of 1 GiB and more get "return"

_mode: str | None = None  # the mode in place: "return", "reuse", or "" where none can be set


def _user_set() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
                or "glibc.malloc." in tunables)


def _set(mode: str, settings: tuple[tuple[int, int], ...]) -> bool:
    global _mode
    if _mode == mode:
        return True
    if _mode == "" or _user_set() or platform.libc_ver()[0] != "glibc":
        _mode = ""
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except (OSError, AttributeError):  # no C library to call, or one without mallopt
        ok = False
    _mode = mode if ok else ""
    return ok


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """**return**: fix glibc's mmap threshold at ``threshold`` bytes (and its trim threshold at twice that, glibc's
    own ratio). True when it is in place."""
    return _set("return", ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, 2 * threshold)))


def reuse_freed_memory() -> bool:
    """**reuse**: buffers up to 32 MiB from the heap, up to 256 MiB of freed heap kept. True when it is in place."""
    return _set("reuse", ((M_MMAP_THRESHOLD, REUSE_MMAP), (M_TRIM_THRESHOLD, REUSE_TRIM)))


def param_bytes(model) -> int:
    """Bytes of the parameters in memory, tied ones counted once."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def model_bytes(model) -> int:
    """Bytes of a model in memory: its parameters (tied ones once) and its buffers (a packed low-bit model keeps
    its weights there)."""
    return param_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers())


def for_weights(weight_bytes: int, streamed: bool = False) -> str | None:
    """Set the mode that suits a model with ``weight_bytes`` of weights (see the module doc); returns the mode in
    place, or None where none could be set."""
    if streamed or weight_bytes >= LARGE_WEIGHTS:
        ok, mode = return_freed_memory(), "return"
    else:
        ok, mode = reuse_freed_memory(), "reuse"
    return mode if ok else None
