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

The package: the streamed model and the choice to stream here; the checkpoint read by name (``checkpoint``); the
names as transformers reads them (``fusion``); sizes (``memory``); checkpoints written without a model (``write``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerlabError
from ..io import SAFETENSORS_INDEX, check_model_dir
from .checkpoint import DTYPES, Checkpoint, checkpoint_bytes, has_safetensors, raw_config, resolve_dtype
from .fusion import _fusions, _renames
from .memory import available_memory, default_max_memory, format_bytes, parse_memory
from .write import (
    SHARD_PATTERN,
    copied_entry,
    outside_blocks,
    tensor_entry,
    write_config,
    write_pruned,
    write_shards,
)

__all__ = ["DTYPES", "SHARD_PATTERN", "Checkpoint", "Offloaded", "available_memory", "checkpoint_bytes",
           "choose_offload", "copied_entry", "default_max_memory", "format_bytes", "has_safetensors",
           "open_offloaded", "outside_blocks", "parse_memory", "raw_config", "resolve_dtype", "tensor_entry",
           "write_config", "write_pruned", "write_shards"]


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

        from ..adapters import MODEL_TYPES, view
        from ..allocator import return_freed_memory

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



def open_offloaded(path: str | Path, *, dtype: str | torch.dtype = "auto",
                   device: str | torch.device = "cpu") -> Offloaded:
    """An :class:`Offloaded` model of the directory ``path``."""
    return Offloaded(path, dtype=dtype, device=device)



# ---------------------------------------------------------------------------------------------------- the choice
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


