"""Sizes: ``--max-memory`` read and printed, and the memory a model may take by default."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import LayerlabError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}



def parse_memory(text: str) -> int:
    """Bytes of a size such as ``8GB``, ``500MB``, ``1.5GiB`` or ``123456`` (bytes); one line if unreadable."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise LayerlabError(f"--max-memory {text!r} is not a size; give e.g. 8GB, 500MB or 1.5GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise LayerlabError(f"--max-memory must be positive, got {text!r}")
    return n


def format_bytes(n: float) -> str:
    """``2.2 GB``, ``512.0 MB``: decimal units, as :func:`parse_memory` reads them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_memory() -> int:
    """Bytes of RAM the kernel says a new allocation can get without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_max_memory(device: str | torch.device) -> tuple[int, str]:
    """The memory a model may take when ``--max-memory`` is not given, and how it was chosen: the GPU's memory
    on CUDA, half the available RAM otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device.index or 0).total_memory
        return total, f"the GPU's {format_bytes(total)}"
    half = available_memory() // 2
    return half, f"half the available RAM, {format_bytes(half)}"
