"""Checkpoints written shard by shard without building the model: tensors copied byte ranges from the input's
shards or given in memory, the pruned checkpoint, the config."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LayerlabError
from ..io import SAFETENSORS_INDEX
from .checkpoint import _ST_DTYPES, _TORCH, Checkpoint

if TYPE_CHECKING:
    from . import Offloaded

_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}  # torch dtype -> safetensors name
SHARD_PATTERN = "model-{:05d}-of-{:05d}.safetensors"  # transformers' shard names


class _Entry:
    """One tensor to write: its name, safetensors dtype, shape and byte count, and how to get its bytes
    (called once, when it is written): a tensor, None for zeros, or (file, first byte, end byte) to copy."""

    __slots__ = ("name", "dtype", "shape", "size", "produce")

    def __init__(self, name: str, dtype: str, shape: list[int], size: int, produce: Callable[[], torch.Tensor | None]):
        self.name, self.dtype, self.shape, self.size, self.produce = name, dtype, shape, size, produce


def _write_safetensors(path: Path, entries: list[_Entry]) -> None:
    """A safetensors file written one tensor at a time: the header (every dtype, shape and byte range, known
    before any data is read) first, then each tensor's bytes as :attr:`_Entry.produce` hands them over (None:
    that many zero bytes; a byte range of a source file: copied 16 MiB at a time), so the writer holds at most
    one tensor (one that had to be converted), not the shard. The header is padded with spaces to
    a multiple of 8 bytes and carries ``{"format": "pt"}``, as the safetensors library writes it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.size]}
        offset += e.size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for e in entries:
            t = e.produce()
            if t is None:  # zeros
                left = e.size
                while left:
                    n = min(left, _CHUNK)
                    fh.write(bytes(n))
                    left -= n
            elif isinstance(t, tuple):  # (file, first byte, end byte): copied as it is, a chunk at a time
                _copy_range(*t, fh)
            else:
                data = t.contiguous().view(torch.uint8).reshape(-1).numpy() if t.numel() else b""
                if len(data) != e.size:
                    raise RuntimeError(f"{e.name}: {len(data)} bytes to write, {e.size} announced")
                fh.write(data)  # the tensor's own memory, no copy
                del t, data


_CHUNK = 1 << 24  # bytes copied at a time


def _copy_range(src: Path, begin: int, end: int, fh) -> None:
    """Copy bytes ``begin:end`` of ``src`` into the open file ``fh``, 16 MiB at a time."""
    with open(src, "rb", buffering=0) as f:
        f.seek(begin)
        left = end - begin
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise LayerlabError(f"{src} is truncated: it ends before byte {end}")
            fh.write(chunk)
            left -= len(chunk)


def write_shards(out_dir: str | Path, shards, count: int | None = None) -> dict[str, str]:
    """Write ``shards`` (lists of entries) as ``model.safetensors`` when there is one, else as transformers'
    ``model-0000k-of-0000n.safetensors`` with a ``model.safetensors.index.json`` (``metadata.total_size``,
    ``weight_map``). ``shards`` is a list (empty shards are left out), or an iterable of ``count`` non-empty
    shards that builds each one only when the previous one is written (a generator that holds one block
    while its shard is written). Returns the weight map."""
    out_dir = Path(out_dir)
    if count is None:
        shards = [s for s in shards if s]
        count = len(shards)
    weight_map, total = {}, 0
    for k, entries in enumerate(shards, 1):
        name = "model.safetensors" if count == 1 else SHARD_PATTERN.format(k, count)
        _write_safetensors(out_dir / name, entries)
        for e in entries:
            weight_map[e.name] = name
            total += e.size
        del entries
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def tensor_entry(name: str, t: torch.Tensor) -> _Entry:
    """An entry for a tensor already in memory."""
    if t.dtype not in _ST_NAMES:
        raise LayerlabError(f"cannot write tensor {name} of dtype {t.dtype} to safetensors")
    return _Entry(name, _ST_NAMES[t.dtype], list(t.shape), t.numel() * t.element_size(), lambda: t)


def copied_entry(checkpoint: Checkpoint, key: str, name: str, *, zero: bool = False,
                 dtype: torch.dtype | None = None) -> _Entry:
    """An entry that copies the checkpoint's tensor ``key`` under ``name`` when written, byte for byte (zeros of
    its shape with ``zero``); a floating tensor stored in another dtype than ``dtype`` is read whole and
    converted, as a load in ``dtype`` and a save would."""
    st, shape, _, begin, end = checkpoint.info[key]
    n = 1
    for d in shape:
        n *= d
    if dtype is not None and st in _TORCH and _TORCH[st] != dtype:
        st, size = _ST_NAMES[dtype], n * dtype.itemsize

        def produce():
            return None if zero else checkpoint.get(key).to(dtype)
    else:
        size, where = end - begin, (checkpoint.info[key][2], begin, end)

        def produce():
            return None if zero else where
    return _Entry(name, st, shape, size, produce)


def write_pruned(om: Offloaded, out_dir: str | Path, *, keep: list[int], zeroed: list[str] = (),
                 dropped: list[str] = (), config=None) -> dict[str, str]:
    """Write ``om``'s checkpoint to ``out_dir`` without building the model: shard by shard in the source's
    order, each tensor's bytes copied 16 MiB at a time (one tensor at a time where its dtype is converted).
    Tensors of block ``keep[n]`` are renamed to block ``n`` (``<blocks>.<old>.`` -> ``<blocks>.<new>.``, the
    checkpoint's own spelling of the adapter's ``Arch.blocks``) and those of the other blocks left out;
    ``zeroed`` (model parameter names) are written as zeros of their shape; ``dropped`` (model parameter names
    or prefixes ending in ``.``) are left out. Floating tensors are written in ``om.dtype``, the dtype the
    in-memory path loads and saves in. A tied head stays as the source stores it (a checkpoint without the
    tied copy gets none). ``config`` (default ``om.model.config``) is written as ``config.json``, with the
    generation config beside it when the model generates, as ``save_pretrained`` writes them. Returns the
    weight map."""
    ckpt = om.checkpoint
    prefix = _checkpoint_blocks_prefix(om)
    renumber = {old: new for new, old in enumerate(keep)}
    zero = {k for n in zeroed for k in om._keys(n)}  # a fused tensor: every part (each expert's matrices)
    drop_names = {k for n in dropped if not n.endswith(".") for k in om._keys(n)}
    drop_prefixes = tuple(n for n in dropped if n.endswith("."))
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    shards: dict[Path, list[_Entry]] = {}
    for key, (_, _, f, _, _) in ckpt.info.items():
        name = key
        m = pattern.fullmatch(key)
        if m:
            old = int(m.group(1))
            if old not in renumber:
                continue
            name = f"{prefix}{renumber[old]}.{m.group(2)}"
        if key in drop_names or key.startswith(drop_prefixes):
            continue
        shards.setdefault(f, []).append(copied_entry(ckpt, key, name, zero=key in zero, dtype=om.dtype))
    weight_map = write_shards(out_dir, list(shards.values()))
    write_config(om.model, out_dir, config, om.dtype)
    return weight_map


def _checkpoint_blocks_prefix(om: Offloaded) -> str:
    """How the checkpoint spells the blocks' prefix (``model.layers.``), from block 0's first tensor."""
    # a tensor the checkpoint stores as one (a MoE's fused experts are stored per expert, under other names)
    name = next((n for n in om._meta[0] if f"{om.blocks_prefix}.0.{n}" not in om._fusions), next(iter(om._meta[0])))
    key = om._key(f"{om.blocks_prefix}.0.{name}")
    tail = f"0.{name}"
    if not key.endswith("." + tail):
        raise LayerlabError(f"cannot tell where the blocks' tensors are in {om.path}: {key} for block 0's {name}")
    return key[: -len(tail)]


def write_config(model: nn.Module, out_dir: str | Path, config=None, dtype: torch.dtype | None = None) -> None:
    """``config.json`` (and ``generation_config.json`` for a model that generates) as ``save_pretrained`` of
    ``model`` with ``config`` would write them: the architecture's class name and the dtype recorded."""
    import copy as _copy

    config = _copy.deepcopy(config if config is not None else model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out_dir)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def outside_blocks(om: Offloaded) -> list[_Entry]:
    """Entries copying every checkpoint tensor outside the blocks (embedding, positions, final norm, head), in
    file order and in ``om.dtype``, under the checkpoint's own names."""
    prefix = _checkpoint_blocks_prefix(om)
    pattern = re.compile(re.escape(prefix) + r"\d+\.")
    return [copied_entry(om.checkpoint, key, key, dtype=om.dtype) for key in om.checkpoint.info
            if not pattern.match(key)]
