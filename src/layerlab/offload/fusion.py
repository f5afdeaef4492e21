"""Checkpoint names as ``from_pretrained`` reads them: renamed tensors and the tensors transformers builds from
several stored ones (a mixture-of-experts layer's stacked experts)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LayerlabError
from .checkpoint import _ST_DTYPES, _TORCH, Checkpoint

if TYPE_CHECKING:
    from . import Offloaded

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
