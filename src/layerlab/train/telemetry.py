"""Per-block training telemetry: gradient norm, update/weight ratio, residual RMS, max |activation|, and for a
mixture-of-experts model (``mlp: moe``) each block's router load (entropy and max share, adapters.router_stats)."""

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

    Yields a dict that fills with ``resid_rms`` and ``max_abs`` lists (one entry per block), and, for a
    mixture-of-experts model, ``router_counts`` (:func:`router_counts`; :func:`router_record` reduces them).
    The hooks keep two floats per block (and the MoE router's counts), never the activations.
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
        with router_counts(model) as counts:
            if counts:
                stats["router_counts"] = counts
            yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def router_counts(model: nn.Module):
    """Per block, how often the mixture-of-experts router picked each expert in the forwards inside: the analysis'
    own counter (:func:`layerlab.adapters.core.router_load`) on a layerlab model with ``mlp: moe``; an empty list
    for any other model."""
    if getattr(getattr(model, "cfg", None), "mlp", None) != "moe":
        yield []
        return
    from ..adapters.core import LayerView, router_load

    with router_load(LayerView(model, "layerlab")) as counts:
        yield counts


def router_record(counts: list[torch.Tensor | None] | None, reduce) -> dict[str, list[float | None]]:
    """``router_entropy_block`` and ``router_max_share_block`` (:func:`layerlab.adapters.core.router_stats`) of the
    counts of :func:`router_counts`, summed over the processes by ``reduce`` (a list of floats, summed); {} without
    counts (a dense model)."""
    if not counts:
        return {}
    from ..adapters.core import router_stats

    stats = [{} if c is None else router_stats(torch.tensor(reduce(c.tolist()))) for c in counts]
    return {f"{key}_block": [s.get(key) for s in stats] for key in ("router_entropy", "router_max_share")}
