"""Per-block training telemetry: gradient norm, update/weight ratio, residual RMS, max |activation|."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def block_params(model: nn.Module) -> list[list[nn.Parameter]]:
    """The trainable parameters of each block, in block order."""
    return [[p for p in b.parameters() if p.requires_grad] for b in model.blocks]


def _norm(tensors) -> float:
    total = sum(float(t.detach().float().pow(2).sum()) for t in tensors)
    return total**0.5


def grad_norms(model: nn.Module) -> list[float]:
    """||grad|| over each block's parameters (call before the optimizer step)."""
    return [_norm(p.grad for p in ps if p.grad is not None) for ps in block_params(model)]


def snapshot(model: nn.Module) -> list[list[torch.Tensor]]:
    """Copies of each block's weights, to measure the step's update afterwards."""
    return [[p.detach().clone() for p in ps] for ps in block_params(model)]


def update_ratios(model: nn.Module, before: list[list[torch.Tensor]]) -> list[float]:
    """||w_after - w_before|| / ||w_before|| per block."""
    out = []
    for ps, old in zip(block_params(model), before, strict=True):
        delta = _norm(p.detach() - o for p, o in zip(ps, old, strict=True))
        out.append(delta / max(_norm(old), 1e-12))
    return out


@contextmanager
def residual_stats(model: nn.Module):
    """Record the RMS and max |x| of the residual stream leaving each block during one forward.

    Yields a dict that fills with ``resid_rms`` and ``max_abs`` lists (one entry per block).
    The hooks keep two floats per block, never the activations.
    """
    stats: dict[str, list[float]] = {"resid_rms": [0.0] * len(model.blocks), "max_abs": [0.0] * len(model.blocks)}

    def hook(i):
        def fn(module, args, output):
            x = output.detach().float()  # (B, T, C)
            stats["resid_rms"][i] = float(x.pow(2).mean().sqrt())
            stats["max_abs"][i] = float(x.abs().max())

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
