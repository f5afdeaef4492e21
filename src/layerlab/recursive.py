"""Recursive blocks with layer-wise LoRA: Bae et al., 2024 (ICLR 2025), "Relaxed Recursive Transformers: Effective
Parameter Sharing with Layer-wise LoRA" (arXiv:2410.20672).

A model with ``loops`` N > 1 has K = L / N unique blocks: block i runs the linear weights of unique block i % K
(the paper's CYCLE sharing, blocks 0..K-1 looped N times), and with ``loop_lora_rank`` r > 0 each block adds its
own LoRA (Hu et al., 2021) of rank r to every shared linear: y = x W_{i % K}^T + b_i + (x A_i^T) B_i^T, where A_i
(r, in) and B_i (out, r) belong to block i alone (loop i // K, position i % K: the paper's layer-wise, or
depth-wise, LoRA). The rank is capped at min(in, out) per linear: a higher rank adds nothing.

What is shared and what is not. The four weight matrices of a block (``attn.qkv``, ``attn.proj``, ``mlp.fc``,
``mlp.proj``) are stored once, in the model's ``loop_shared[k]`` (under the same paths), and held unregistered
by each block's :class:`LoopLinear` (as :class:`layerlab.model.SharedMLP` holds a shared FFN), so the state dict
and the safetensors file have one copy. The norms (``ln1``, ``ln2``, any output or inner norm) and the linears'
biases stay per block: our decision, made for two reasons. They are O(C) per block (under 1% of a block's
parameters at width 64), so sharing them saves almost nothing; and with them per block, a LoRA of full rank makes
the relaxed model exactly the original one (W_i = W_shared + B_i A_i, the paper's Sec. 3.2 limit of the
relaxation), which ``convert --to recursive`` checks. Per-layer norms under shared weights are also what WideNet
(Xue et al., 2022, "Go Wider Instead of Deeper") argues for. The L blocks stay ``blocks[i]`` with the usual
submodule names, so hooks, the analyze adapter and ``output_hidden_states`` see L blocks; a :class:`LoopLinear`'s
``weight`` is block i's effective weight W_{i % K} + B_i A_i (what a weight analysis of block i should read).

Trained from scratch (``--loops N --loop-lora-rank r``), A starts as peft's LoRA does (Kaiming-uniform, a =
sqrt(5)) and B at zero, so the model starts as the plain recursive one. Converted from a trained plain model
(:func:`layerlab.compress.recursive.to_recursive`; ``layerlab convert --to recursive``), the shared weights come
from the paper's initialisations (Sec. 3.1) and each block's LoRA from the truncated SVD of its residual to them
(Sec. 3.2):
U_r S_r V_r^T = SVD_r(W_i - W_shared), B_i = U_r S_r, A_i = V_r^T; then ``heal_steps`` of uptraining of every
weight (:func:`layerlab.compress.heal.heal`, mode ``full``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import choices_error

LOOP_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")  # the shared linears of a block, by path
# How the K shared blocks are initialised from the L blocks of a trained model (Bae et al., Sec. 3.1, CYCLE):
# ``average`` the mean of the blocks tied to it (k, k + K, k + 2K, ...), ``stepwise`` every N-th block (block k
# of the recursive model from block k * N), ``lower`` the first K blocks.
INITS = ("average", "stepwise", "lower")
_INIT_FLAGS = ("residual_out", "init_gain", "gain_rows")  # what layerlab.model's init reads on a linear


def unique_blocks(layers: int, loops: int) -> int:
    """K = L / N: the unique blocks of an L-block model looped N times."""
    return layers // loops


def tied_blocks(layers: int, loops: int, k: int) -> list[int]:
    """The blocks that run unique block k under CYCLE sharing: k, k + K, ..., k + (N - 1) K."""
    K = unique_blocks(layers, loops)
    return [k + n * K for n in range(loops)]


def init_sources(layers: int, loops: int, k: int, init: str) -> list[int]:
    """The blocks of the original model whose weights (averaged) initialise unique block k (Bae et al., Sec. 3.1)."""
    if init == "average":
        return tied_blocks(layers, loops, k)
    if init == "stepwise":
        return [k * loops]
    if init == "lower":
        return [k]
    raise choices_error("recursive init", init, INITS)


class LoopLinear(nn.Module):
    """Block i's view of a shared linear: ``x W^T + b_i + (x A_i^T) B_i^T``. The shared ``nn.Linear`` (weight
    only) is registered once in the model's ``loop_shared`` and held here unregistered; the bias and the LoRA
    factors ``lora_A`` (r, in) and ``lora_B`` (out, r) are this block's own (absent at rank 0)."""

    def __init__(self, shared: nn.Linear, bias: bool, rank: int):
        super().__init__()
        object.__setattr__(self, "shared", shared)
        self.in_features, self.out_features = shared.in_features, shared.out_features
        self.rank = min(rank, self.in_features, self.out_features)
        w = shared.weight
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype)) if bias else None
        if self.rank:
            self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=w.device, dtype=w.dtype))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=w.device, dtype=w.dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft's LoRA; B = 0: starts at the shared W
        else:
            self.lora_A = self.lora_B = None

    @property
    def weight(self) -> torch.Tensor:
        """This block's effective weight (out, in): the shared W plus B_i A_i."""
        w = self.shared.weight
        return w if not self.rank else w + self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.shared.weight, self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, shared"


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def share_loops(blocks: nn.ModuleList, cfg) -> nn.ModuleList:
    """Turn ``blocks`` (freshly built, one set of weights each) into CYCLE-shared ones, in place: returns the K
    holders of the shared weights (``loop_shared[k].attn.qkv`` ..., bias-free linears with the init flags of block
    k's), and puts a :class:`LoopLinear` over holder i % K in place of each of block i's shared linears."""
    K = unique_blocks(cfg.layers, cfg.loops)
    holders = nn.ModuleList()
    for k in range(K):
        holder = nn.Module()
        for path in LOOP_LINEARS:
            old = _get(blocks[k], path)
            if old is None:
                continue
            parent_name, _, attr = path.rpartition(".")
            if not hasattr(holder, parent_name):
                holder.add_module(parent_name, nn.Module())
            lin = nn.Linear(old.in_features, old.out_features, bias=False, device=old.weight.device,
                            dtype=old.weight.dtype)
            for flag in _INIT_FLAGS:
                if hasattr(old, flag):
                    setattr(lin, flag, getattr(old, flag))
            getattr(holder, parent_name).add_module(attr, lin)
        holders.append(holder)
    for i, block in enumerate(blocks):
        for path in LOOP_LINEARS:
            old = _get(block, path)
            if old is None:
                continue
            parent_name, _, attr = path.rpartition(".")
            shared = _get(holders[i % K], path)
            setattr(_get(block, parent_name), attr, LoopLinear(shared, old.bias is not None, cfg.loop_lora_rank))
    return holders
