"""A headless Chromium for tests: screenshot a local HTML file, dump its DOM after load, measure a PNG.

Only the flags below are used: they keep Chromium off the network (no QUIC, sync, component updates or
background requests) and let it run as root without a GPU. Each call gets a fresh throw-away profile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return shutil.which("chromium")


def _run(args: list[str], timeout: float) -> str:
    """Run Chromium with FLAGS + args in a fresh profile; return stdout. Kill its whole process group on timeout."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="layerlab-chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"chromium timed out after {timeout} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {err[-2000:]}")
    return out


def screenshot(html_path: Path, png_path: Path, width: int = 1200, height: int = 3000, timeout: float = 60) -> Path:
    """Render ``html_path`` in a ``width`` x ``height`` window and save the screenshot to ``png_path``."""
    png_path = Path(png_path).resolve()
    _run([f"--window-size={width},{height}", f"--screenshot={png_path}", Path(html_path).resolve().as_uri()],
         timeout)
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}")
    return png_path


def dump_dom(html_path: Path, timeout: float = 60) -> str:
    """The serialized DOM of ``html_path`` after the page has loaded (and its load handlers ran)."""
    return _run(["--dump-dom", Path(html_path).resolve().as_uri()], timeout)


def load_rgb(png_path: Path) -> np.ndarray:
    """A PNG as an (H, W, 3) uint8 array."""
    from PIL import Image

    with Image.open(png_path) as image:
        return np.asarray(image.convert("RGB"))


def non_white_fraction(rgb: np.ndarray, threshold: int = 245) -> float:
    """Fraction of pixels with any channel below ``threshold``."""
    return float((rgb < threshold).any(axis=-1).mean())


def count_near(rgb: np.ndarray, color: str, tolerance: int = 30) -> int:
    """Number of pixels within ``tolerance`` (per channel) of the hex ``color`` ("#rrggbb")."""
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=int)
    return int((np.abs(rgb.astype(int) - target) <= tolerance).all(axis=-1).sum())
