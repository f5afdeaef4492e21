"""The mixture-of-experts MLP (``mlp: moe``): top-k routing over E experts with the load-balancing loss.

Each token x (a row of the (B*T, C) stream the block's MLP reads) is sent to k of E experts, each an MLP of the dense
model's hidden width F (``ModelConfig.hidden`` for ``expert_mlp``): so at k = 1 a token runs exactly the parameters
of the dense model's MLP (plus the router's E x C), the "equal active parameters" comparison.

- Router (Fedus et al., 2021, Switch Transformers, Sec. 2.1; Jiang et al., 2024, Mixtral, Sec. 2.1): logits
  h(x) = W_r x (no bias), p(x) = softmax(h(x)) over the E experts (in fp32), the k largest p_e(x) chosen. Their
  weights are renormalised to sum to 1 for k >= 2, as Mixtral's softmax over the top-k logits (the same thing,
  and what transformers' MixtralTopKRouter does); at k = 1 the weight is p_e(x) itself, as Switch's y = p_i(x)
  E_i(x), since renormalising a single weight would give 1 and leave the router no gradient from the task loss.
- Output: y = sum over the chosen e of w_e(x) E_e(x), E_e(x) = proj_e act(fc_e x + b_e) + c_e (GELU, tanh
  approximated, as the dense MLP; or SwiGLU, fc_e's rows gate then up).
- Load-balancing loss (Switch, Eq. 4-6): aux = alpha E sum_e f_e P_e, with f_e the fraction of the N k token-to-expert
  assignments that went to e and P_e = mean over the N tokens of p_e(x). At k = 1 this is Switch's f_i, the
  fraction of tokens dispatched to i; for k > 1 f sums to 1 as well (transformers' load_balancing_loss_func lets it
  sum to k), so a perfectly balanced router gives alpha at any k. Only P carries a gradient (f is a count); alpha
  is ``router_aux_coef`` (Switch's 10^-2). Set as ``aux_loss`` in a training forward (LayerlabOutput.aux_loss sums
  them over the blocks); an eval forward sets none.

The module tree is that of transformers 5's sparse MoE blocks (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock), so the
adapter's mixture-of-experts path reads it unchanged (``layerlab.adapters.archs``: Arch.router, Arch.experts):
``mlp.gate`` is the router, whose forward returns (router_logits (N, E), top_k_weights (N, k), top_k_index (N, k))
and whose ``weight`` is (E, C); ``mlp.experts`` holds every expert's weights as 3-d parameters, ``fc`` (E, F or 2F,
C) and ``proj`` (E, C, F), (experts, out, in) as transformers stores them. Biases (with ``bias``) are kept flat,
``fc_bias`` (E * F) and ``proj_bias`` (E * C), 1-d as every other bias, so that the optimizers' rule (matrices
decay, biases never) reads them as biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import LayerlabError
from .registry import MLPS, PLACEMENTS


class TopKRouter(nn.Module):
    """``mlp.gate``: softmax over the experts, the top k, their weights (module docstring)."""

    def __init__(self, width: int, experts: int, top_k: int, std: float):
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.weight = nn.Parameter(torch.empty(experts, width))
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1])  # (N, C)
        logits = F.linear(x, self.weight)  # (N, E)
        probs = logits.float().softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, index

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top_k={self.top_k}"


class Experts(nn.Module):
    """``mlp.experts``: E MLPs as 3-d weights; ``forward(x, top_k_index, top_k_weights)`` as transformers' experts."""

    def __init__(self, cfg: ModelConfig, std: float, out_std: float):
        super().__init__()
        E, C, H = cfg.experts, cfg.width, cfg.hidden
        self.num_experts, self.hidden = E, H
        self.gated = cfg.expert_mlp == "swiglu"
        inner = 2 * H if self.gated else H
        self.fc = nn.Parameter(torch.empty(E, inner, C).normal_(0.0, std))
        self.proj = nn.Parameter(torch.empty(E, C, H).normal_(0.0, out_std))
        self.fc_bias = nn.Parameter(torch.zeros(E * inner)) if cfg.bias else None
        self.proj_bias = nn.Parameter(torch.zeros(E * C)) if cfg.bias else None

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows x (n, C) -> (n, C)."""
        b1 = None if self.fc_bias is None else self.fc_bias.view(self.num_experts, -1)[e]
        b2 = None if self.proj_bias is None else self.proj_bias.view(self.num_experts, -1)[e]
        h = F.linear(x, self.fc[e], b1)
        if self.gated:  # SwiGLU (Shazeer, 2020), as the dense MLP's fused fc: gate rows, then up rows
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return F.linear(h, self.proj[e], b2)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """x (N, C), top_k_index and top_k_weights (N, k) -> (N, C): each expert runs on its rows only."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows, slot = (top_k_index == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = x[rows]
            if rows.numel() == 1:  # one row would run a matrix-vector kernel, whose rounding on CPU depends on the
                xe = xe.expand(2, -1)  # weight's memory alignment (a loaded checkpoint's differs): run two, keep one
            y = self.expert(e, xe)[: rows.numel()] * top_k_weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y)
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, gated={self.gated}"


def balancing_loss(probs: torch.Tensor, index: torch.Tensor, experts: int) -> torch.Tensor:
    """E sum_e f_e P_e (Switch Transformers, Eq. 4, unweighted): probs (N, E) the router's softmax, index (N, k) the
    chosen experts; f_e = share of the N k assignments to e (no gradient), P_e = mean of probs[:, e]."""
    counts = torch.bincount(index.reshape(-1), minlength=experts).to(probs.dtype)
    f = counts / index.numel()
    return experts * (f * probs.mean(dim=0)).sum()


@MLPS.register("moe")
class MoEMLP(nn.Module):
    """A block's MLP as a mixture of experts (module docstring): ``gate`` (:class:`TopKRouter`) and ``experts``
    (:class:`Experts`); ``aux_loss`` is the weighted load-balancing loss of the last training forward."""

    def __init__(self, cfg: ModelConfig, inner_norm: bool = False):
        super().__init__()
        if inner_norm:  # the config refuses this first (config._check_moe); a direct build is refused here too
            raise LayerlabError("mlp 'moe' has no norm inside its experts (Sub-LN's inner norm)")
        std = cfg.init_std
        # GPT-2's depth-scaled init of the output projections, as model.LayerlabForCausalLM._init_weights does
        scaled = cfg.init == "scaled" and not any(PLACEMENTS[p].depth_scale for p in cfg.block_placements())
        self.top_k, self.coef = cfg.top_k, cfg.router_aux_coef
        self.gate = TopKRouter(cfg.width, cfg.experts, cfg.top_k, std)
        self.experts = Experts(cfg, std, std / math.sqrt(2 * cfg.layers) if scaled else std)
        self.drop = nn.Dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, C)
        logits, weights, index = self.gate(flat)
        if self.training:
            self.aux_loss = self.coef * balancing_loss(logits.float().softmax(dim=-1), index, self.gate.experts)
        return self.drop(self.experts(flat, index, weights).reshape(shape))
