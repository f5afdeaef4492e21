"""Files: output directories and atomic writes get the permissions the user's umask asks for."""

import os
import stat

import pytest

from layerlab.errors import LayerlabError
from layerlab.io import atomic_write_bytes, output_dir

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it after."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                       (0o002, 0o775, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_output_dir_and_files_follow_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    with output_dir(tmp_path / "out") as tmp:
        atomic_write_bytes(tmp / "weights.bin", b"x")
        (tmp / "plain.txt").write_text("y")
        (tmp / "sub").mkdir()
    out = tmp_path / "out"
    assert _mode(out) == dir_mode, oct(_mode(out))
    assert _mode(out / "sub") == dir_mode
    assert _mode(out / "weights.bin") == file_mode, oct(_mode(out / "weights.bin"))
    assert _mode(out / "plain.txt") == file_mode


def test_output_dir_replaces_an_empty_directory_and_cleans_up_on_failure(tmp_path, umask):
    (tmp_path / "empty").mkdir(mode=0o700)
    with output_dir(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("a")
    assert _mode(tmp_path / "empty") == 0o755 and (tmp_path / "empty" / "a").read_text() == "a"
    with pytest.raises(RuntimeError), output_dir(tmp_path / "broken") as tmp:
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no half-written output, no temp folder
    with pytest.raises(LayerlabError, match="already exists and is not empty"), output_dir(tmp_path / "empty"):
        pass
