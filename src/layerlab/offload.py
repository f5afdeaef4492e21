"""Out-of-core models: a checkpoint run block by block, each block read from its safetensors shards when it runs.

:func:`open_offloaded` builds the Hugging Face model class with every parameter on the ``meta`` device (no
memory), keeps the buffers that are computed rather than stored (rotary ``inv_freq``, BERT's ``position_ids``)
real, and reads from the checkpoint only the parameters outside the blocks: embedding, final norm, head (a tied
head shares the embedding's tensor, as in memory). Each block's parameters are read from the shards on a forward
pre-hook of that block and put back on ``meta`` by its forward hook, so at most one block is ever held. The
model's own top-level forward still runs (masks, rotary tables, embedding scale), so the adapter's view, its
traces, the fidelity certificate and the logit lens see the same model as in memory.

The idea of building on ``meta`` and materialising weights on demand is accelerate's ``init_empty_weights``
(parameters only, ``include_buffers=False``) and its CPU/disk offload hooks; this is layerlab's own, reduced to
one block at a time. Peak memory: the non-block parameters, one block, the activations.

Checkpoint names are read as ``from_pretrained`` reads them, through the model's conversion mapping
(``transformers.conversion_mapping``): renamed tensors (GPT-NeoX's ``embed_out``), and tensors that transformers
builds from several stored ones: a mixture-of-experts layer's experts (Mixtral, Qwen3-MoE, OLMoE), stored one
tensor per expert and projection and stacked into ``mlp.experts.gate_up_proj`` / ``down_proj``, are built from
their parts when their block is read (:class:`_Fusion`); a checkpoint that stores the stacked tensors is read as
it is.

Sizes on the command line (``--max-memory 8GB``) are decimal (1 GB = 10^9 bytes); ``GiB``/``MiB`` are binary.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import LayerlabError
from .io import SAFETENSORS_INDEX, check_model_dir

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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


# ---------------------------------------------------------------------------------------------------- checkpoint
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


# ---------------------------------------------------------------------------------------------------- the model
@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While a model is constructed, every parameter it registers goes to the ``meta`` device (no memory, no
    initialisation cost); buffers are created as the model's code computes them. Scoped to the construction,
    as accelerate's ``init_empty_weights(include_buffers=False)``; torch offers no hook for it."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_param(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = value


def _shared(module: nn.Module, prefix: str = "") -> list[list[str]]:
    """The parameter names of ``module`` grouped by tensor: a tied tensor's names share one group."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(prefix=prefix, remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return list(groups.values())


class Offloaded:
    """A model whose blocks live in the checkpoint and are materialised one at a time (see the module doc).

    ``model`` is the Hugging Face model; ``view`` its :class:`~layerlab.adapters.LayerView`. ``after_load`` /
    ``before_free`` are called with the index right after a block is materialised and right before it is
    freed; ``held`` is the set of blocks materialised now."""

    def __init__(self, path: str | Path, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"):
        import transformers

        from .adapters import MODEL_TYPES, view
        from .allocator import return_freed_memory

        return_freed_memory()  # each block's weights are freed for the next: give them back to the system
        self.path = check_model_dir(path)
        self.checkpoint = Checkpoint(self.path)
        config = transformers.AutoConfig.from_pretrained(self.path)
        self.dtype = resolve_dtype(dtype, config, self.checkpoint)
        self.device = torch.device(device)
        auto = (transformers.AutoModel if MODEL_TYPES.get(config.model_type) == "bert"
                else transformers.AutoModelForCausalLM)
        with warnings.catch_warnings(), _parameters_on_meta():
            warnings.simplefilter("ignore")
            model = auto.from_config(config, dtype=self.dtype)
        self.model = model.eval()
        self.view = view(self.model)
        # called with the block index right after a block is materialised and right before it is freed: quantize
        # swaps a block's linear layers for packed ones there, so a forward runs the quantized block
        self.after_load: Callable[[int], None] | None = None
        self.before_free: Callable[[int], None] | None = None
        container = self.view.root.get_submodule(self.view.arch.blocks)
        self.blocks_prefix = next(n for n, m in self.model.named_modules() if m is container)
        self._prefix = getattr(self.model, "base_model_prefix", "")
        self._renamed, self._fused = _renames(self.model, self.checkpoint)
        # a MoE's stacked experts, built from their parts; the renamings this checkpoint's names went through
        self._fusions, self._saved_renamings = _fusions(self.model, self.checkpoint)
        for fusion in self._fusions.values():
            fusion.check(self)
        for b in self.model.buffers():  # computed buffers are created on the CPU
            b.data = b.data.to(self.device)
        # everything outside the blocks: embedding, positions, final norm, head (tied groups share one tensor)
        inside = self.blocks_prefix + "."
        for group in _shared(self.model):
            if all(n.startswith(inside) for n in group):
                continue
            self._materialise(self.model, group, group)
        self._persistent_buffers()
        self._meta = [{n: p for n, p in b.module.named_parameters(remove_duplicate=False)}
                      for b in self.view.blocks]
        self.block_bytes = [
            self.checkpoint.nbytes([k for n in meta for k in self._keys(f"{self.blocks_prefix}.{i}.{n}")], self.dtype)
            for i, meta in enumerate(self._meta)]
        self.held: set[int] = set()
        for b in self.view.blocks:
            b.module.register_forward_pre_hook(self._pre(b.index), prepend=True)
            b.module.register_forward_hook(self._post(b.index))

    # -------------------------------------------------------------------------------------------- reading
    def _key(self, name: str) -> str:
        """The checkpoint's name for the model's tensor ``name`` (a base model's checkpoint lacks the head's
        prefix; a task model's carries it)."""
        if name in self.checkpoint:
            return name
        if name in self._renamed:
            return self._renamed[name]
        if name in self._fusions:
            raise LayerlabError(f"{name} is built from {len(self._fusions[name].sources)} checkpoint tensors, "
                                "not stored as one")  # callers that can take several ask _keys
        p = self._prefix
        for alt in (f"{p}.{name}", name[len(p) + 1:] if p and name.startswith(p + ".") else None):
            if alt and alt in self.checkpoint:
                return alt
        fusion = next((how for target, how in self._fused.items() if target in name), None)
        if fusion is not None:  # a fused tensor none of whose parts the checkpoint holds under the mapping's names
            raise LayerlabError(f"offload cannot read {name} of this {self.model.config.model_type} checkpoint: "
                                f"transformers builds it on load ({fusion}), and the checkpoint holds none of "
                                "those tensors; use --no-offload")
        raise LayerlabError(f"{self.path} has no tensor {name} in its safetensors, which this "
                            f"{self.model.config.model_type} model needs")

    def _keys(self, name: str) -> list[str]:
        """The checkpoint's names of the tensors the model's tensor ``name`` is read from: one, or a fused
        tensor's parts (a MoE's experts, stored one tensor per expert and projection)."""
        if name not in self.checkpoint and name not in self._renamed and name in self._fusions:
            return [key for _, key in self._fusions[name].sources]
        return [self._key(name)]

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint and name not in self._renamed and name in self._fusions:
            return self._fusions[name].read(self)
        return self._cast(self.checkpoint.get(self._key(name)))

    def saved_name(self, name: str) -> str:
        """The name ``save_pretrained`` of the in-memory model (loaded from this checkpoint) writes for the model's
        tensor ``name``: transformers' renamings that this checkpoint's names went through on load, reversed
        (Mixtral's ``.mlp.`` back to ``.block_sparse_moe.``; a checkpoint already stored under the model's
        names keeps them). Meant for tensors no reverse converter claims (a MoE's packed experts, say); a fused
        tensor that ``save_pretrained`` would split per expert is not renamed into its parts here."""
        if not self._saved_renamings:
            return name
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(name, self._saved_renamings)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor as read from the checkpoint, floating ones in the model's dtype, on its device."""
        if t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def _materialise(self, module: nn.Module, group: list[str], full: list[str]) -> None:
        """Read one tensor (names ``full`` in the checkpoint, ``group`` relative to ``module``) and set it
        on every name that shares it."""
        key = next((n for n in full if self._has(n)), full[0])
        p = nn.Parameter(self._read(key), requires_grad=False)
        for n in group:
            _set_param(module, n, p)

    def _has(self, name: str) -> bool:
        try:
            self._keys(name)
        except LayerlabError:
            return False
        return True

    def _persistent_buffers(self) -> None:
        """Buffers the checkpoint stores (persistent ones saved by this transformers) replace the computed ones."""
        for name, _ in list(self.model.named_buffers()):
            if self._has(name):
                owner, _, leaf = name.rpartition(".")
                mod = self.model.get_submodule(owner) if owner else self.model
                mod._buffers[leaf] = self._read(name)

    # -------------------------------------------------------------------------------------------- blocks
    def load(self, i: int) -> None:
        """Materialise block ``i`` (a no-op while it is held)."""
        if i in self.held:
            return
        module = self.view.blocks[i].module
        groups: dict[int, list[str]] = {}
        for n, p in self._meta[i].items():
            groups.setdefault(id(p), []).append(n)
        for group in groups.values():
            self._materialise(module, group, [f"{self.blocks_prefix}.{i}.{n}" for n in group])
        self.held.add(i)
        if self.after_load is not None:
            self.after_load(i)

    def free(self, i: int) -> None:
        """Put block ``i``'s parameters back on ``meta``."""
        if i not in self.held:
            return
        if self.before_free is not None:
            self.before_free(i)
        module = self.view.blocks[i].module
        for n, p in self._meta[i].items():
            _set_param(module, n, p)
        self.held.discard(i)

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` materialised for the duration (to read its weights)."""
        held = i in self.held
        self.load(i)
        try:
            yield self.view.blocks[i].module
        finally:
            if not held:
                self.free(i)

    def _pre(self, i: int):
        def fn(module, args):
            self.load(i)

        return fn

    def _post(self, i: int):
        def fn(module, args, output):
            self.free(i)

        return fn

    @property
    def weight_bytes(self) -> int:
        return self.checkpoint.nbytes(dtype=self.dtype)

    def resident_bytes(self) -> int:
        """Bytes of the parameters held now (not on ``meta``), each tensor once."""
        seen, total = set(), 0
        for p in self.model.parameters():
            if p.device.type != "meta" and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


def _renames(model: nn.Module, checkpoint: Checkpoint) -> tuple[dict[str, str], dict[str, str]]:
    """The checkpoint's names of tensors that transformers renames on load (GPT-NeoX's ``embed_out`` is its
    ``lm_head``), as {model name: checkpoint name}, from the model's conversion mapping (transformers' own
    table, ``transformers.conversion_mapping``); and, where the mapping also fuses tensors (the experts of
    Mixtral-style MoE layers, read as one stacked tensor: :func:`_fusions`), {target pattern: a description of
    its fusion}, which names a fused tensor whose parts the checkpoint lacks."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

        mapping = get_model_conversion_mapping(model) or []
    except Exception:  # noqa: BLE001  (an internal API: without it, names are taken as they are)
        return {}, {}
    renamed, fused = {}, {}
    for rule in mapping:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        if not isinstance(rule, WeightRenaming):
            for tgt in targets:
                fused.setdefault(tgt, f"{', '.join(sources)} -> {', '.join(targets)}")
            continue
        for i, src in enumerate(sources):
            tgt = targets[i] if len(targets) == len(sources) else targets[0]
            for key in checkpoint.info:
                if re.search(src, key):
                    renamed.setdefault(re.sub(src, tgt, key), key)
    return renamed, fused


class _Fusion:
    """A model tensor that transformers builds on load from several checkpoint tensors (a ``WeightConverter`` of
    its conversion mapping): a MoE layer's experts, stored one tensor per expert and projection
    (``...experts.3.w1.weight``, ``...experts.3.gate_proj.weight``) and stacked into one 3-d parameter
    (``mlp.experts.gate_up_proj``, (E, 2I, H); ``mlp.experts.down_proj``, (E, H, I)). ``sources`` are
    (the converter's source pattern, checkpoint name) in transformers' reading order (``dot_natural_key``:
    expert 10 after expert 9), which is the order the experts are stacked in."""

    __slots__ = ("name", "converter", "shape", "sources")

    def __init__(self, name: str, converter, shape: tuple[int, ...]):
        self.name, self.converter, self.shape = name, converter, shape
        self.sources: list[tuple[str, str]] = []

    def read(self, om: Offloaded) -> torch.Tensor:
        """The fused tensor, in ``om``'s dtype on its device. Transformers' two expert fusions (stack the experts
        of each source pattern along dim 0: ``MergeModulelist(dim=0)``; then, with several patterns, concatenate
        the stacks along ``dim``: ``Concatenate(dim)``) are written straight into the result, one expert's
        matrix read at a time, so the peak is the fused tensor plus one expert's matrix; any other chain of
        operations runs through the converter itself (transformers' code) on the tensors read."""
        dim = _stack_then_concat(self.converter)
        return self._place(om, dim) if dim is not None else self._convert(om)

    def _fail(self, why: str) -> LayerlabError:
        return LayerlabError(f"offload cannot build {self.name} from its {len(self.sources)} checkpoint tensors "
                             f"({', '.join(self.converter.source_patterns)}): {why}; use --no-offload")

    def check(self, om: Offloaded) -> None:
        """One line now, before any block runs, if the parts cannot stack into the model's tensor (an expert
        missing, a shape that differs); only the fusions written straight into the result are checked here."""
        dim = _stack_then_concat(self.converter)
        if dim is not None:
            self._plan(om, dim)

    def _plan(self, om: Offloaded, dim: int) -> tuple[list[list[str]], list[int], torch.dtype]:
        """(each source pattern's checkpoint names, in stacking order; each pattern's size along ``dim``; the
        result's dtype), or one line if the parts cannot stack into the model's tensor."""
        patterns = list(self.converter.source_patterns)
        groups = [[key for p, key in self.sources if p == pattern] for pattern in patterns]
        info = om.checkpoint.info
        experts, rest = self.shape[0], list(self.shape[1:])  # (E, *rest)
        if any(len(g) != experts for g in groups):
            raise self._fail(f"{[len(g) for g in groups]} tensors per pattern for {experts} experts")
        sizes = []
        for g in groups:
            shapes = {tuple(info[key][1]) for key in g}
            shape = next(iter(shapes))
            if len(shapes) != 1 or len(shape) != len(rest) or any(
                    a != b for d, (a, b) in enumerate(zip(shape, rest)) if d != dim):
                raise self._fail(f"shapes {sorted(shapes)} do not stack into {list(self.shape)}")
            sizes.append(shape[dim])
        if sum(sizes) != rest[dim]:
            raise self._fail(f"shapes along dim {dim + 1} add up to {sum(sizes)}, not {rest[dim]}")
        st = info[groups[0][0]][0]
        dtype = om.dtype if st in _TORCH else _ST_DTYPES.get(st)
        if dtype is None:
            raise self._fail(f"dtype {st}")
        return groups, sizes, dtype

    def _place(self, om: Offloaded, dim: int) -> torch.Tensor:
        groups, sizes, dtype = self._plan(om, dim)
        out = torch.empty(self.shape, dtype=dtype, device=om.device)
        start = 0
        for g, size in zip(groups, sizes):
            for e, key in enumerate(g):  # expert e's slice of this pattern: (E, ..., start:start+size, ...)
                out[e].narrow(dim, start, size).copy_(om.checkpoint.get(key))
            start += size
        return out

    def _convert(self, om: Offloaded) -> torch.Tensor:
        import copy
        from functools import partial

        converter = copy.deepcopy(self.converter)
        for pattern, key in self.sources:  # read when the converter asks (transformers' synchronous loading)
            converter.add_tensor(self.name, key, pattern, partial(lambda k: om._cast(om.checkpoint.get(k)), key))
        try:
            out = converter.convert(self.name, model=om.model, config=om.model.config)
        except Exception as e:  # noqa: BLE001  (transformers' operations, any error)
            raise self._fail((str(e).strip().splitlines() or [type(e).__name__])[0]) from None
        t = out.get(self.name) if isinstance(out, dict) else None
        t = t[0] if isinstance(t, list) else t
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != self.shape:
            got = list(t.shape) if isinstance(t, torch.Tensor) else "nothing"
            raise self._fail(f"{[type(op).__name__ for op in self.converter.operations]} gave {got}, "
                             f"not {list(self.shape)}")
        return t.to(om.device)


def _stack_then_concat(converter) -> int | None:
    """The per-expert dim along which ``converter`` joins its source patterns' tensors, when its operations are
    ``MergeModulelist(dim=0)`` (one pattern: 0, nothing to join) optionally followed by ``Concatenate(dim=d)``,
    d >= 1 (dim d - 1 of each expert's matrix); None for any other chain."""
    try:
        from transformers.core_model_loading import Concatenate, MergeModulelist
    except ImportError:
        return None
    ops, patterns = list(converter.operations), list(converter.source_patterns)
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1 and len(patterns) == 1:
        return 0
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1 and len(converter.target_patterns) == 1:
        return ops[1].dim - 1
    return None


def _fusions(model: nn.Module, checkpoint: Checkpoint) -> tuple[dict[str, _Fusion], list]:
    """{model tensor name: :class:`_Fusion`} for every model tensor that transformers would build on load from
    several of ``checkpoint``'s tensors: each checkpoint name is renamed as ``from_pretrained`` renames it
    (``transformers.core_model_loading.rename_source_key``, with the model's conversion mapping: its
    renamings, then at most one converter), and those a converter claims are grouped by the model tensor they
    become. A checkpoint that already stores the fused tensor (``mlp.experts.gate_up_proj``) has no claimed
    names, so it is read as it is. Also the reverse of the renamings that matched a checkpoint name, in the
    order ``save_pretrained`` applies them (``revert_weight_conversion``), for :meth:`Offloaded.saved_name`."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        mapping = get_model_conversion_mapping(model) or []
    except Exception:  # noqa: BLE001  (an internal API: without it, nothing is fused)
        return {}, []
    renamings = [r for r in mapping if isinstance(r, WeightRenaming)]
    converters = [r for r in mapping if isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}  # on meta: names and shapes only
    fusions: dict[str, _Fusion] = {}
    for key in sorted(checkpoint.info, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, shapes)
        if pattern is None or name not in shapes:  # as from_pretrained: claimed by a converter, and a tensor
            continue
        fusions.setdefault(name, _Fusion(name, by_pattern[pattern], shapes[name])).sources.append((pattern, key))
    try:  # rename_source_key marked the renamings it applied (was_used), as from_pretrained records them
        saved = [r.reverse_transform() for r in renamings[::-1] if r.was_used() and not isinstance(r, PrefixChange)]
    except Exception:  # noqa: BLE001
        saved = []
    return fusions, saved


def open_offloaded(path: str | Path, *, dtype: str | torch.dtype = "auto",
                   device: str | torch.device = "cpu") -> Offloaded:
    """An :class:`Offloaded` model of the directory ``path``."""
    return Offloaded(path, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------- the choice
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


def choose_offload(path: str | Path, offload: bool | None, max_memory: str | int | None,
                   dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether to stream ``path`` block by block, and a one-line reason: ``offload`` True or False decides;
    None (automatic) offloads when the weights' bytes (in the loaded dtype) exceed ``max_memory`` (default:
    :func:`default_max_memory`). A ``max_memory`` below the largest block is one line naming both."""
    if offload and not has_safetensors(path):
        raise LayerlabError(f"--offload reads safetensors only, and {path} has no model.safetensors (or "
                            f"{SAFETENSORS_INDEX}); convert its weights to safetensors first")
    if offload is False:
        return False, "in memory: --no-offload"
    if max_memory is None:
        limit, why = default_max_memory(device)
    else:
        limit = parse_memory(max_memory) if isinstance(max_memory, str) else int(max_memory)
        why = f"--max-memory {format_bytes(limit)}"
    if not has_safetensors(path):  # pickle checkpoints load in memory (check_weights decides whether at all)
        return False, "in memory: the weights are not safetensors, which offload needs"
    total, _, ckpt = checkpoint_bytes(path, dtype)
    if offload is None and total <= limit:
        return False, f"in memory: weights {format_bytes(total)} <= {why}"
    largest = _largest_block(ckpt, dtype, path)
    if largest is not None and largest[1] > limit:
        raise LayerlabError(f"--max-memory {format_bytes(limit)} is below one block: block {largest[0]} holds "
                            f"{format_bytes(largest[1])}")
    if offload:
        return True, f"offload: --offload (weights {format_bytes(total)})"
    return True, f"offload: weights {format_bytes(total)} > {why}"


def _largest_block(ckpt: Checkpoint, dtype, path) -> tuple[int, int] | None:
    """(index, bytes) of the largest block, from the checkpoint's tensor names: a block is a ``...<n>.`` group
    under the longest common prefix that numbered tensors share (``model.layers.``, ``transformer.h.``)."""
    dt = resolve_dtype(dtype, raw_config(path), ckpt)
    sizes: dict[tuple[str, int], list[str]] = {}
    for name in ckpt.info:
        m = re.match(r"(.*?\.)(\d+)\.", name)
        if m:
            sizes.setdefault((m.group(1), int(m.group(2))), []).append(name)
    if not sizes:
        return None
    by = {k: ckpt.nbytes(v, dt) for k, v in sizes.items()}
    (_, index), size = max(by.items(), key=lambda kv: kv[1])
    return index, size


# ---------------------------------------------------------------------------------------------------- writing
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
