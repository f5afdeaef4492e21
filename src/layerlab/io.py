"""Files: atomic writes, hashes, safe loading and the ``layerlab.json`` manifest."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import TOKENIZER_FILES, LayerlabError
from .version import __version__


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LayerlabError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayerlabError(f"{path} is not valid JSON: {e}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the libraries that decide a result, for provenance."""
    # imported here, not at the top: io is the bottom layer, and the CLI reads it before torch may load
    import numpy
    import tokenizers
    import torch
    import transformers

    return {
        "layerlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "numpy": numpy.__version__, "python": platform.python_version(),
    }


MANIFEST = "layerlab.json"


def cache_dir() -> Path:
    """Where tokenized corpora and weight spectra are kept: $LAYERLAB_CACHE, else ~/.cache/layerlab."""
    return Path(os.environ.get("LAYERLAB_CACHE") or Path.home() / ".cache" / "layerlab")


def write_manifest(directory: str | Path, command: str, args: dict[str, Any], **fields: Any) -> None:
    """Write ``layerlab.json``: what was done, with which arguments, library versions, and results."""
    atomic_write_json(Path(directory) / MANIFEST, {"command": command, "args": args, "versions": versions(), **fields})


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    """Copy the tokenizer files byte for byte, so the output tokenizes exactly as the input."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)


def check_output(out: str | Path, *, protect: tuple[str | Path, ...] = (), also: str = "") -> Path:
    """``out`` as a Path, or a one-line error if it exists and is not an empty directory, or lies in
    (or is) one of the ``protect``-ed input directories. ``also`` ends the message with another way out."""
    out = Path(out)
    for src in protect:
        src = Path(src).resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise LayerlabError(f"refusing to write into the input directory {src}; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LayerlabError(f"output {out} already exists and is not empty; choose another --out{also}")
    return out


@contextmanager
def output_dir(out: str | Path, *, protect: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block completes.

    An interrupted command leaves nothing half-written. Writing into (or inside) a
    ``protect``-ed input directory, or over a non-empty directory, is refused.
    """
    out = check_output(out, protect=protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        # mkdtemp makes 0700, and the rename keeps it: give the folder the permissions mkdir would
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def progress_bar(enabled: bool = True):
    """The progress bar of a long measurement: description, bar, done/total, time so far (off: silent)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def check_model_dir(path: str | Path) -> Path:
    """A directory that looks like a Hugging Face model, or a one-line error saying why not."""
    path = Path(path)
    if not path.exists():
        raise LayerlabError(f"model path does not exist: {path}")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LayerlabError(f"{path} is not a model directory (no config.json)")
    return path


TRUST_PICKLE_ENV = "LAYERLAB_TRUST_PICKLE"  # set by the CLI's --trust-pickle for the load that follows
SAFETENSORS_INDEX, PICKLE_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


def _missing_shard(path: Path, index: str) -> str | None:
    """The first shard that ``path/index`` names and that is not there; None when all are."""
    try:
        weight_map = json.loads((path / index).read_text()).get("weight_map", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise LayerlabError(f"{path / index} is not a valid shard index (JSON with a weight_map)") from None
    return next((s for s in sorted(set(weight_map.values())) if not (path / s).is_file()), None)


def check_weights(path: str | Path, trust_pickle: bool | None = None) -> None:
    """The weights of a model directory are there and safe to load, or a one-line error saying why not.

    Safetensors (one file, or shards named by ``model.safetensors.index.json``, every one present) load as they
    are. A directory whose weights exist only as a pickle (``pytorch_model.bin`` or its shards) is refused,
    since unpickling can run code, unless ``trust_pickle`` (default: the ``LAYERLAB_TRUST_PICKLE`` environment
    variable the CLI's ``--trust-pickle`` sets); transformers then reads it with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if trust_pickle is None:
        trust_pickle = os.environ.get(TRUST_PICKLE_ENV, "") not in ("", "0")
    for index in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (path / index).is_file() and (shard := _missing_shard(path, index)) is not None:
            raise LayerlabError(f"{path / index} names the shard {shard}, which is missing from {path}")
    if (path / "model.safetensors").is_file() or (path / SAFETENSORS_INDEX).is_file():
        return
    if (path / "pytorch_model.bin").is_file() or (path / PICKLE_INDEX).is_file():
        if not trust_pickle:
            raise LayerlabError(f"{path} holds its weights only as a pickle (pytorch_model.bin), which can run code "
                                "when loaded; convert it to safetensors, or pass --trust-pickle to load it with "
                                "torch.load(weights_only=True)")
        return
    raise LayerlabError(f"{path} has no weights: expected model.safetensors (or its shards with "
                        f"{SAFETENSORS_INDEX})")
