"""A checkpoint's safetensors shards read by name without loading them, its dtype, and what the choice between
in-memory and offloaded loading reads from it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LayerlabError
from ..io import SAFETENSORS_INDEX

_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# safetensors' dtype names -> torch dtypes (https://github.com/huggingface/safetensors, the format's README)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Checkpoint:
    """The tensors of a safetensors model directory (one ``model.safetensors``, or the shards that
    ``model.safetensors.index.json`` names), read one tensor at a time.

    A safetensors file is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
    and byte range, then the data. Each tensor is read with one positioned read (``os.pread``) into its own
    buffer rather than through a memory map: a map's touched pages count in the process's resident memory until
    it is closed, so reading a whole model through one would show the whole model in RSS (measured: 490 MB of
    file pages after 15 of 16 blocks of a 542 MB checkpoint); read this way, only the tensors held are resident,
    and the page cache keeps the file for the next read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / SAFETENSORS_INDEX).is_file():
            try:
                weight_map = json.loads((self.path / SAFETENSORS_INDEX).read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise LayerlabError(f"{self.path / SAFETENSORS_INDEX} is not a valid shard index "
                                    "(JSON with a weight_map)") from None
            for shard in shards:
                if not (self.path / shard).is_file():
                    raise LayerlabError(f"{self.path / SAFETENSORS_INDEX} names the shard {shard}, which is missing "
                                        f"from {self.path}")
        elif (self.path / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise LayerlabError(f"offload reads safetensors only, and {self.path} has no model.safetensors (or "
                                f"{SAFETENSORS_INDEX}); convert its weights to safetensors first")
        # name -> (safetensors dtype, shape, file, first byte, end byte), in file order
        self.info: dict[str, tuple[str, list[int], Path, int, int]] = {}
        for shard in shards:
            f = self.path / shard
            base, header = _header(f)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                self.info[name] = (entry["dtype"], list(entry["shape"]), f, base + begin, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    @property
    def files(self) -> dict[str, Path]:
        """Tensor name -> the file that holds it."""
        return {name: i[2] for name, i in self.info.items()}

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard into memory of its own."""
        st, shape, f, begin, end = self.info[name]
        if st not in _ST_DTYPES:
            raise LayerlabError(f"{f}: tensor {name} has dtype {st}, which offload cannot read")
        buf = bytearray(end - begin)
        with open(f, "rb") as fh:
            fh.seek(begin)
            if fh.readinto(buf) != len(buf):
                raise LayerlabError(f"{f} is truncated: tensor {name} ends past the end of the file")
        if not buf:
            return torch.empty(shape, dtype=_ST_DTYPES[st])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[st]).reshape(shape)

    def nbytes(self, names=None, dtype: torch.dtype | None = None) -> int:
        """Bytes of the named tensors (all by default), floating ones counted in ``dtype`` when given."""
        total = 0
        for name in self.info if names is None else names:
            st, shape, _, begin, end = self.info[name]
            if dtype is not None and st in _TORCH:
                n = 1
                for d in shape:
                    n *= d
                total += n * dtype.itemsize
            else:
                total += end - begin
        return total

    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor in file order, as transformers' ``dtype="auto"`` falls back to."""
        return next((_TORCH[i[0]] for i in self.info.values() if i[0] in _TORCH), None)


def _header(f: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file; one line if it is not one."""
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise LayerlabError(f"{f} is not a readable safetensors file") from None
    return 8 + n, header


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config, checkpoint: Checkpoint | None) -> torch.dtype:
    """The torch dtype a load with ``dtype`` gives: ``auto`` is the config's recorded ``dtype``, else the first
    floating tensor's (transformers' rule for ``from_pretrained(dtype="auto")``), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise LayerlabError(f"unknown --dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(recorded, str) and recorded != "auto":
        recorded = getattr(torch, recorded, None)
    if isinstance(recorded, torch.dtype):
        return recorded
    found = checkpoint.float_dtype() if checkpoint is not None else None
    return found or torch.float32


def checkpoint_bytes(path: str | Path, dtype: str | torch.dtype = "auto") -> tuple[int, torch.dtype, Checkpoint]:
    """The weights' bytes of a safetensors directory in the dtype a load with ``dtype`` gives."""
    ckpt = Checkpoint(path)
    dt = resolve_dtype(dtype, raw_config(path), ckpt)
    return ckpt.nbytes(dtype=dt), dt, ckpt


def raw_config(path: str | Path):
    """config.json's fields as attributes, without transformers (which may not know the model type)."""
    from types import SimpleNamespace

    try:
        fields = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        fields = {}
    return SimpleNamespace(**fields) if isinstance(fields, dict) else SimpleNamespace()


def has_safetensors(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model.safetensors").is_file() or (path / SAFETENSORS_INDEX).is_file()
