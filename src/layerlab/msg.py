"""Masked Structural Growth's masks on a grown layerlab model (Yao et al., 2023/ICLR 2024, "Masked Structural Growth
for 2x Faster Language Model Pre-training"): forward hooks that :class:`~layerlab.model.LayerlabForCausalLM` puts on
its modules where its config names masks (``msg_blocks``, ``msg_width``, ``msg_hidden``, ``msg_mask``). Where the
masks act and why the function is kept exactly at m = 0: :mod:`layerlab.grow`, which grows models and ramps m.

Below the model in the layers (docs/architecture.md): it imports only the config.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig

MASK_FIELDS = {"msg_blocks": [], "msg_width": 0, "msg_hidden": 0, "msg_mask": 1.0}  # no masks


def has_masks(cfg: ModelConfig) -> bool:
    return bool(cfg.msg_blocks or cfg.msg_width)


class MaskState:
    """The mask value ``mask`` and the old sizes, shared by every hook of one model."""

    def __init__(self, mask: float, width: int, hidden: int):
        self.mask, self.width, self.hidden = float(mask), width, hidden


def _vector(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """(1, .., 1, m, .., m) over the last dimension of ``like``: the first ``module._msg_old`` entries are 1."""
    v = torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
    v[module._msg_old:] = module._msg.mask
    return v


def _block_hook(block, args, out):
    """MSG's new block: m y + (1 - m) x."""
    m = block._msg.mask
    return m * out + (1 - m) * args[0]


def _output_hook(module, args, out):
    return out * _vector(module, out)


def _input_hook(module, args):
    return (args[0] * _vector(module, args[0]), *args[1:])


def masked_norm(norm: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LayerNorm or RMSNorm of ``x`` with statistics weighted by ``v`` over the last dimension (the plain norm
    where v is all ones)."""
    total = v.sum()
    if norm.norm_name == "layernorm":
        mean = (x * v).sum(-1, keepdim=True) / total
        var = ((x - mean).square() * v).sum(-1, keepdim=True) / total
        return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias
    y = x * torch.rsqrt((x.square() * v).sum(-1, keepdim=True) / total + norm.eps) * norm.weight
    return y + norm.bias if isinstance(getattr(norm, "bias", None), torch.Tensor) else y


def _norm_hook(module, args, out):
    v = _vector(module, args[0])
    return masked_norm(module, args[0], v) * v


HOOKS = (_block_hook, _output_hook, _input_hook, _norm_hook)


def _hook(module: nn.Module | None, state: MaskState, old: int | None, fn, pre: bool = False) -> None:
    if module is None:
        return
    module._msg, module._msg_old = state, old
    if fn is _norm_hook and getattr(module, "norm_name", None) == "none":
        return  # the identity: the stream it passes on is masked already
    if pre:
        module.register_forward_pre_hook(fn)
    else:
        module.register_forward_hook(fn)


def install_masks(model: nn.Module) -> None:
    """Put the masks ``model.cfg`` describes on its modules (called when a layerlab model is built)."""
    cfg = model.cfg
    state = MaskState(cfg.msg_mask, cfg.msg_width, cfg.msg_hidden)
    model._msg = state
    for i in cfg.msg_blocks:
        _hook(model.blocks[i], state, None, _block_hook)
    if not cfg.msg_width:
        return
    C, Fh = cfg.msg_width, cfg.msg_hidden
    _hook(model.embed, state, C, _output_hook)
    _hook(model.pos, state, C, _output_hook)
    _hook(model.ln_f, state, C, _norm_hook)
    for b in model.blocks:
        for name in ("ln1", "ln2", "ln1_out", "ln2_out"):
            _hook(getattr(b, name, None), state, C, _norm_hook)
        if b.attn is not None:
            _hook(b.attn, state, C, _output_hook)
            _hook(b.attn.proj, state, C, _input_hook, pre=True)  # the new heads' outputs
            _hook(b.attn.inner_norm, state, C, _norm_hook)
        if b.mlp is not None:
            _hook(b.mlp, state, C, _output_hook)
            _hook(b.mlp.proj, state, Fh, _input_hook, pre=True)  # the new neurons' activations
            _hook(b.mlp.inner_norm, state, Fh, _norm_hook)


def _set_fields(model: nn.Module, **fields) -> None:
    model.cfg = ModelConfig(**{**model.cfg.to_dict(), **fields})
    for k, v in fields.items():
        setattr(model.config, k, v)


def set_mask(model: nn.Module, value: float) -> None:
    """Set the model's mask value m (its hooks read it; its config, and so a save, records it)."""
    model._msg.mask = float(value)
    _set_fields(model, msg_mask=float(value))


def collapse(model: nn.Module) -> None:
    """Remove the masks in place: the plain model of the grown shape (exact where the masks are at 1)."""
    for m in model.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if fn in HOOKS:
                    del hooks[key]
        m.__dict__.pop("_msg", None)
        m.__dict__.pop("_msg_old", None)
    _set_fields(model, **MASK_FIELDS)
