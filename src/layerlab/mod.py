"""Mixture-of-Depths (Raposo et al., 2024, "Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models"): every other block (1, 3, ...; :meth:`~layerlab.config.ModelConfig.mod_blocks`) runs on a fraction
C = ``mod_capacity`` of each sequence's tokens; the others pass on the residual stream unchanged.

Shapes: B batch, T positions, C width; k = max(1, floor(mod_capacity * T)) tokens of a sequence routed in training.

A routed block's :class:`DepthRouter` (``blocks[i].mod_router``) scores each token with a linear router,
r_t = w . x_t, from the block's input. In training (``model.train()``) the top k scores of each sequence go through the
block (the paper's expert-choice routing) and their update is scaled by the router weight, the paper's
Eq. 1: x'_t = x_t + r_t (f(X~)_t - x_t) for a chosen token, x'_t = x_t otherwise, so that the router is trained by the
language-model loss. The block runs on the chosen tokens only, gathered in position order, so that its attention
is among them (each keeps its own position: learned positions are already in the stream, RoPE's angles are
gathered with it) and its cost falls with C.

Top-k over a sequence reads the future, so sampling routes with a causal predictor (the second of the paper's two
methods for sampling): a small MLP on the block input, behind a stop-gradient, trained by binary cross-entropy
against the top-k membership; its loss is the router's ``aux_loss`` (:class:`~layerlab.model.LayerlabOutput`),
weighted by :data:`PREDICTOR_WEIGHT`. In evaluation (``model.eval()``: ``generate``, ``analyze``, the eval loss) a
token goes through where the predictor's logit is positive, a decision that reads that token alone, so a full forward
and KV-cached decoding make the same decisions. The evaluation forward is masked rather than gathered: every token runs
through the block, attention reads only the keys of tokens that went through (each token also sees itself, so that
no row is empty; a skipped token's output is discarded), and a skipped token keeps its input exactly. In a routed
block's layer of the KV cache a skipped token's keys are zeros, which no later query attends to: the token has no
keys there in effect, a left-padded batch, whose rows route differently, is right, and the mark travels with the
cache wherever generation takes it (cut back by self-speculative decoding, reordered by beam search).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The predictor is trained by its loss alone (its input is detached, and it feeds nothing else), so under Adam its
# weight hardly changes the predictor's steps; a small one keeps it out of the global gradient norm that clipping
# reads. Our choice: the paper gives no weight.
PREDICTOR_WEIGHT = 0.01


def capacity_tokens(capacity: float, T: int) -> int:
    """k, the tokens of a sequence of T that a routed block processes in training: floor(C T), at least one."""
    return max(1, int(capacity * T))


class DepthRouter(nn.Module):
    """The router and the causal predictor of one routed block. ``forward(x)`` gives (r, chosen), each (B, T): the
    router weight of every token and whether it goes through the block (top-k in training, the predictor in
    evaluation). ``last_through``: the fraction of tokens the predictor sent through in the last evaluation forward
    (a 0-d tensor; None before one)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.width
        self.capacity = cfg.mod_capacity
        self.router = nn.Linear(C, 1, bias=False)
        # the paper's "small auxiliary MLP": one hidden layer of width C / 4, our choice (the paper gives no size)
        self.predictor = nn.Sequential(nn.Linear(C, max(1, C // 4)), nn.SiLU(), nn.Linear(max(1, C // 4), 1))
        self.aux_loss: torch.Tensor | None = None
        self.last_through: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = _score(self.router, x)  # (B, T)
        if self.training:
            k = capacity_tokens(self.capacity, x.shape[1])
            top = r.topk(k, dim=1).indices
            chosen = torch.zeros_like(r, dtype=torch.bool).scatter(1, top, True)
            guess = self.predict(x.detach())  # stop-gradient: the predictor does not train the stream
            self.aux_loss = PREDICTOR_WEIGHT * F.binary_cross_entropy_with_logits(guess.float(), chosen.float())
        else:
            chosen = self.predict(x) > 0
            self.last_through = chosen.float().mean().detach()
        return r, chosen

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's logit (B, T) that a token is in its sequence's top k: SiLU(x W1 + b1) w2 + b2."""
        return _score(self.predictor[2], self.predictor[1](self.predictor[0](x)))

    def route(self, block: nn.Module, x: torch.Tensor, rope, cache, mask) -> torch.Tensor:
        """Block ``block``'s output for x (B, T, C): the tokens this router picks through the block, the others
        passed on. Gathered in training (no cache, no padding mask), masked otherwise."""
        r, chosen = self(x)
        if self.training and cache is None and mask is None:
            return _gathered(block, x, r, chosen, rope, capacity_tokens(self.capacity, x.shape[1]))
        return _masked(block, x, r, chosen, rope, cache, mask)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity:g}"


def _score(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A one-output linear as a product and a sum over the width, (..., C) -> (...): a matrix product with one
    output column may round differently with the weight's address in memory (a model loaded from disk then routes
    otherwise than the one saved); this does not."""
    y = (x * linear.weight[0].to(x.dtype)).sum(-1)
    return y if linear.bias is None else y + linear.bias[0].to(x.dtype)


def _take_rope(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The RoPE table rows of the chosen positions: (T, D) or (B, 1, T, D) -> (B, 1, k, D)."""
    if t.dim() == 2:
        return t[idx][:, None]
    return t.gather(2, idx[:, None, :, None].expand(-1, 1, -1, t.shape[-1]))


def _gathered(block, x, r, chosen, rope, k: int) -> torch.Tensor:
    """The block run on the k chosen tokens of each row only, in position order; each update scaled by r."""
    B, T, C = x.shape
    idx = torch.argsort((~chosen).to(torch.uint8), dim=1, stable=True)[:, :k]  # (B, k): chosen positions, ascending
    at = idx[..., None].expand(B, k, C)
    xs = x.gather(1, at)
    rs = None if rope is None else tuple(_take_rope(t, idx) for t in rope)
    out = block._forward(block, xs, {"rope": rs, "cache": None, "mask": None})
    return x.scatter(1, at, xs + r.gather(1, idx)[..., None].to(x.dtype) * (out - xs))


def _masked(block, x, r, chosen, rope, cache, mask) -> torch.Tensor:
    """The block run on every token, attention reading only the keys of tokens that went through (and each query its
    own key); a token that did not go through keeps its input. With a cache, a token that did not go through has its
    keys zeroed in this block's cache layer once the block has run: that marks it (a real key is never all zeros)
    wherever the cache goes (cut back, reordered, a row selected), and a later query reads only the others."""
    T = x.shape[1]
    keep, past = chosen, 0
    if cache is not None:
        layer = block.attn.layer_idx
        past = cache.get_seq_length(layer)
        if past:
            keys = cache.layers[layer].keys  # (B, H, past, D)
            keep = torch.cat([keys[:, 0].ne(0).any(-1), chosen], dim=1)
    S = past + T
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)[None, None]
    own = torch.eye(T, S, dtype=torch.bool, device=x.device).roll(past, dims=1)  # query t's own key
    out = block._forward(block, x, {"rope": rope, "cache": cache, "mask": (mask & keep[:, None, None, :]) | own})
    if cache is not None:
        cache.layers[layer].keys[:, :, past:].masked_fill_(~chosen[:, None, :, None], 0)
    return torch.where(chosen[..., None], x + r[..., None].to(x.dtype) * (out - x), x)


def describe_routed(trace, i: int, routing: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A trace's record of routed block ``i`` as the stream has it (layerlab.adapters.core.LayerView.trace): what each
    sublayer adds is its output times g = r where the token went through, else 0, and ``mid`` is resid_in plus the
    scaled attention, so that resid_out = mid + mlp holds as in an unrouted block."""
    r, chosen = routing
    g = torch.where(chosen, r, torch.zeros_like(r))[..., None].to(trace.resid_in[i].dtype)
    for store in (trace.attn, trace.mlp):
        if store[i] is not None:
            store[i] = store[i] * g
    if trace.attn[i] is not None:
        trace.mid[i] = trace.resid_in[i] + trace.attn[i]
