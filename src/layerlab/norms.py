"""Normalization modules, one registry (:data:`layerlab.registry.NORMS`).

Every norm is built as ``NORMS[name](dim, *, eps)`` and maps ``(..., dim) -> (..., dim)``.
Token-wise norms accept any leading shape; batch-level norms (powernorm, batchnorm, prepbn,
unified) treat every leading position as one sample of the batch, i.e. BatchNorm "over tokens".

Each class cites the paper that defines it; constants the papers leave open come from their
public code, cited where they are used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LayerlabError
from .registry import NORMS


def register(name: str):
    """Class decorator: add a norm to the registry under ``name`` (declared in :mod:`layerlab.registry`, so
    that configs and the CLI know the name before torch loads)."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        cls.norm_name = name
        return NORMS.register(name, cls)

    return wrap


def build_norm(name: str, dim: int, *, eps: float = 1e-5) -> nn.Module:
    """Build a registered norm; an unknown name raises an error listing the valid ones."""
    return NORMS.get_checked(name)(dim, eps=eps)


@register("layernorm")
class LayerNorm(nn.Module):
    """(x - mean) / std * g + b (Ba et al., 2016)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@register("rmsnorm")
class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


@register("crmsnorm")
class CRMSNorm(nn.Module):
    """Compressed RMSNorm (Jiang et al., 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

    The paper stores a zero-mean d-vector in its first d-1 coordinates and recovers the last
    as -sum(others). Our residual stream keeps all d coordinates (so placements and adapters
    need no special case); this module reads only the first d-1 and rebuilds the last, so
    its output equals RMSNorm(x) exactly whenever x is zero-mean, which is the case after
    ``convert --to crmsnorm``. rms = sqrt((sum_{i<d} x_i^2 + (sum_{i<d} x_i)^2) / d).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = x[..., :-1]  # (..., d-1) stored coordinates
        last = -head.sum(-1, keepdim=True)  # (..., 1) recovered coordinate
        full = torch.cat([head, last], dim=-1)
        return F.rms_norm(full, self.weight.shape, self.weight, self.eps)


class _WithBias:
    """Adds a fixed bias after the norm: the LayerNorm bias that a family's format has no linear bias to hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


class RMSNormWithBias(_WithBias, RMSNorm):
    """RMSNorm(x) * g + b; on a zero-mean stream, the same as LayerNorm with gain g and bias b (what a LayerNorm
    family converted by ``convert --to rmsnorm`` runs with, where its format has no linear to fold b into)."""


class CRMSNormWithBias(_WithBias, CRMSNorm):
    """CRMSNorm(x) * g + b; on a zero-mean stream, the same as LayerNorm with gain g and bias b."""


@register("dyt")
class DyT(nn.Module):
    """Dynamic Tanh: g * tanh(a * x) + b, learnable scalar a initialised to 0.5.

    Zhu et al., 2025, "Transformers without Normalization"; init values from
    facebookresearch/DyT ``dynamic_tanh.py`` (alpha_init_value=0.5, weight 1, bias 0).
    """

    alpha_init = 0.5

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        del eps  # DyT has no statistics to stabilise
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias


@register("seednorm")
class SeeDNorm(nn.Module):
    """Self-rescaled dynamic RMSNorm: (tanh(x·β)·α + γ) ⊙ x / rms(x).

    x·β is a dot product of the raw input with β over the hidden dimension, one scalar per
    token, so the scale varies with the input (SeeDNorm, arXiv 2510.22777). Init as the paper
    gives for language modelling: γ = 1, α = 1, β = 0, so it starts as RMSNorm while β still
    receives gradient. The paper's multi-head variant (one scalar per head) is not built.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(x @ self.beta).unsqueeze(-1)  # (..., 1)
        return (gate * self.alpha + self.gamma) * F.rms_norm(x, (x.shape[-1],), None, self.eps)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (N, C): every leading position is one sample of the batch."""
    return x.reshape(-1, x.shape[-1])


class _PowerFunction(torch.autograd.Function):
    """Forward by a quadratic mean, backward by PowerNorm's approximate gradient.

    Shen et al., 2020, "PowerNorm: Rethinking Batch Normalization in Transformers",
    Algorithm 1, as in sIncerass/powernorm ``mask_powernorm.py``: the gradient is
    g - (1 - alpha_bkw) * ema_gz * z, divided by the batch quadratic mean, and ema_gz
    tracks mean(g * z) across steps.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_phi, ema_gz, eps, abkw, use_batch):
        var = (x * x).mean(dim=0, keepdim=True)  # (1, C) batch quadratic mean
        z = x / (var + eps).sqrt() if use_batch else x / (running_phi + eps).sqrt()
        ctx.save_for_backward(z, var, weight, ema_gz)
        ctx.eps, ctx.abkw = eps, abkw
        return z * weight + bias

    @staticmethod
    def backward(ctx, grad_out):
        z, var, weight, ema_gz = ctx.saved_tensors
        g = grad_out * weight
        approx = g - (1 - ctx.abkw) * ema_gz * z
        ema_gz.add_((approx * z).mean(dim=0, keepdim=True))
        grad_x = approx / (var + ctx.eps).sqrt()
        return grad_x, (grad_out * z).sum(0), grad_out.sum(0), None, None, None, None, None


@register("powernorm")
class PowerNorm(nn.Module):
    """PowerNorm (Shen et al., 2020): batch-level, no mean subtraction, running quadratic mean.

    As in the public code (sIncerass/powernorm, ``fairseq/modules/norms/mask_powernorm.py``),
    the input is first divided by its per-token RMS (``GroupScaling1D``); then by the batch
    quadratic mean during the first ``warmup_iters`` training forwards and by the running
    quadratic mean after, with the approximate backward. Eval uses the running quadratic mean.
    Constants from that code: alpha_fwd = alpha_bkw = 0.9, eps 1e-5.
    Two deviations, both because a norm is built from ``(dim, eps)`` alone: GroupScaling uses
    one group (the reference uses one per attention head), and the warmup is 100 forwards
    (the reference passes the LR warmup, 8000 updates, which exceeds our CPU runs).
    """

    alpha_fwd = 0.9
    alpha_bkw = 0.9
    warmup_iters = 100

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_phi", torch.ones(1, dim))
        self.register_buffer("ema_gz", torch.zeros(1, dim))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = _flat(x)
        x = x / (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # GroupScaling1D, one group
        if not self.training:
            y = x / (self.running_phi + self.eps).sqrt() * self.weight + self.bias
            return y.reshape(shape)
        self.iters += 1
        it = int(self.iters)
        use_batch = it <= self.warmup_iters
        y = _PowerFunction.apply(
            x, self.weight, self.bias, self.running_phi, self.ema_gz, self.eps, self.alpha_bkw, use_batch
        )
        with torch.no_grad():
            var = x.detach().pow(2).mean(0, keepdim=True)
            if it < self.warmup_iters:  # cumulative average during warmup, as the reference code does
                self.running_phi.mul_((it - 1) / it).add_(var / it)
            self.running_phi.mul_(self.alpha_fwd).add_((1 - self.alpha_fwd) * var)
        return y.reshape(shape)


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,), of BatchNorm in eval: (x - mean) / sqrt(var + eps) * w + b = x * scale + shift,
    with the running mean and variance (Ioffe & Szegedy, 2015)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@register("batchnorm")
class BatchNorm(nn.Module):
    """BatchNorm over tokens: statistics over every (batch, position) sample.

    In eval mode it uses the running statistics, a fixed per-channel affine (:meth:`eval_affine`) that
    ``layerlab export --to folded`` folds into the linear layer that reads it.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(_flat(x)).reshape(x.shape)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (C,): the eval-mode output is x * scale + shift."""
        return _bn_affine(self.bn)


class RepBN(nn.Module):
    """BN(x) + η·x with a learnable scalar η, SLAB (Guo et al., 2024) ``RepBN``.

    Init as in SLAB's language-model code (``llama/modeling/llama-350M/modeling_llama.py``):
    η = 0 and the BN affine weight and bias = 0, so RepBN starts at zero and is learnt while
    PRepBN's blend still leans on LayerNorm.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eta = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm1d(dim, eps=eps)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bn(_flat(x)) + self.eta * _flat(x)).reshape(x.shape)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (C,): in eval BN(x) + η·x = x * (w / sqrt(var + eps) + η) + (b - mean · w /
        sqrt(var + eps)), as SLAB's ``merge_bn`` (``llama/modeling/llama-350M/modeling_llama.py``) folds it."""
        scale, shift = _bn_affine(self.bn)
        return scale + self.eta, shift


@register("prepbn")
class PRepBN(nn.Module):
    """Progressive RepBN: γ·LN(x) + (1-γ)·RepBN(x), γ decaying linearly from 1 to 0.

    SLAB (Guo et al., 2024), ``LinearNorm`` in xinghaochen/SLAB: each training forward
    lowers a step counter; γ = remaining / total (their r0 = 1, and no LN-only warm phase,
    as in their classification default warm=0). ``total`` is set by :func:`set_norm_schedule`
    to the run's training forwards (its LR schedule's steps times ``grad_accum``).

    Eval mode computes the same blend with the current γ, RepBN on BN's running statistics,
    and leaves the counter alone, so a validation loss measures the network being trained.
    (SLAB's code evaluates RepBN alone; the two agree once γ = 0, when its runs are evaluated.
    Before that, RepBN alone is another network: at SLAB's zero init it outputs 0.)
    Once γ = 0, eval is RepBN alone, a per-channel affine (:meth:`eval_affine`) that folds into
    the next linear layer (``layerlab export --to folded``).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.ln = LayerNorm(dim, eps=eps)
        self.repbn = RepBN(dim, eps=eps)
        self.register_buffer("total", torch.zeros((), dtype=torch.long))
        self.register_buffer("remaining", torch.zeros((), dtype=torch.long))

    @property
    def gamma(self) -> float:
        return float(self.remaining) / max(int(self.total), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma
        if self.training and self.remaining > 0:  # only training forwards move the schedule
            self.remaining -= 1
        if gamma == 0.0:
            return self.repbn(x)
        return gamma * self.ln(x) + (1 - gamma) * self.repbn(x)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RepBN's (scale, shift) once γ = 0; while γ > 0 the LayerNorm share makes eval non-affine."""
        if self.gamma > 0:
            raise LayerlabError(f"cannot fold prepbn while γ = {self.gamma:.4g} > 0 ({int(self.remaining)} of "
                                f"{int(self.total)} training forwards still blend in LayerNorm); train to the end "
                                "of its schedule first")
        return self.repbn.eval_affine()


class _UnifiedFunction(torch.autograd.Function):
    """UN's backward: PowerNorm's approximate gradient with window-smoothed g·z and gradient compensation.

    Yang et al., 2022, as ``UN2dFunction.backward`` in hikvision-research/Unified-Normalization: with
    g = dL/dy · weight · r, gz = mean(g·z) is written to the window (the EMA instead on a filtered batch);
    the EMA of g·z follows the window's arithmetic mean once smoothing is on (else gz), and the gradient is
    (g - ema_gz·z) / sqrt(var + eps), or (g - gz·z) / sqrt(var + eps) on a filtered batch.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, norm, slot, smooth, skip):
        z = x / (var + norm.eps).sqrt()  # (N, C)
        ctx.save_for_backward(z, var, r, weight)
        ctx.norm, ctx.slot, ctx.smooth, ctx.skip = norm, slot, smooth, skip
        return z * weight + bias

    @staticmethod
    def backward(ctx, grad_out):
        z, var, r, weight = ctx.saved_tensors
        n, m = ctx.norm, ctx.norm.momentum
        g = grad_out * weight * r
        gz = (g * z).mean(0)  # (C,)
        n.buffer_gz[ctx.slot] = n.ema_gz if ctx.skip else gz
        mean_gz = n.buffer_gz.mean(0) if ctx.smooth else gz
        n.ema_gz.mul_(m).add_((1 - m) * mean_gz)
        grad_x = (g - (mean_gz if ctx.skip else n.ema_gz) * z) / (var + n.eps).sqrt()
        return grad_x, (grad_out * r * z).sum(0), grad_out.sum(0), None, None, None, None, None, None


@register("unified")
class UnifiedNorm(nn.Module):
    """Unified Normalization (Yang et al., 2022, "Unified Normalization for Accelerating and Stabilizing
    Transformers"): BN-like offline statistics, a fixed per-channel affine x / sqrt(running_var + eps) · g + b
    in eval (:meth:`eval_affine`), which ``layerlab export --to folded`` folds into the next linear layer.

    Training, as ``UN1d`` / ``UN2dFunction`` in hikvision-research/Unified-Normalization: the per-channel
    quadratic mean x2 (no mean subtraction, as in PowerNorm) of each batch enters a window of the last 4;
    after the warmup the input is divided by the window's geometric mean (fluctuation smoothing). Outlier
    filtration: when some channel's arithmetic minus geometric mean of the window exceeds window · var(sqrt
    of the window before this batch), the batch's x2 is replaced by running_var in the window and the batch
    is normalised by its own x2, which running_var still takes in (``skips`` counts them). Gradient
    compensation: after step max(1000, warmup) the gradient is scaled by r = sqrt(var + eps) /
    sqrt(running_var + eps), clamped to [1/5, 5]. Constants from that code: window 4, momentum 0.9,
    r in [1/5, 5], the 1000-step floor. Outlier filtration is on (PAPERS.md's definition; the reference
    turns it on for vision, off in its NMT script). One deviation, as for PowerNorm: the warmup is 100
    forwards (the reference's 4000 exceeds our CPU runs).
    """

    window = 4
    momentum = 0.9
    warmup_iters = 100
    compensation_from = 1000
    r_max = 5.0
    outlier_filtration = True

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))  # a quadratic mean, named as in the reference
        self.register_buffer("ema_gz", torch.zeros(dim))
        self.register_buffer("buffer_x2", torch.zeros(self.window, dim))
        self.register_buffer("buffer_gz", torch.zeros(self.window, dim))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long))
        self.register_buffer("skips", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, _flat(x)
        if not self.training:
            return (x / (self.running_var + self.eps).sqrt() * self.weight + self.bias).reshape(shape)
        with torch.no_grad():
            self.iters += 1
            it, win, buf = int(self.iters), self.window, self.buffer_x2
            slot = it % win
            x2 = x.detach().to(buf.dtype).pow(2).mean(0)  # (C,) batch quadratic mean
            spread = buf.sqrt().var()  # scalar, over the window before this batch and every channel
            buf[slot] = x2
            skip = False
            if self.outlier_filtration and it >= self.warmup_iters:
                gap = buf.mean(0) - buf.log().mean(0).exp()  # arithmetic - geometric mean, >= 0
                if bool((gap > spread * win).any()):
                    buf[slot] = self.running_var
                    skip = True
                    self.skips += 1
            smooth = not (skip or it <= win or it < self.warmup_iters)
            var = buf.log().mean(0).exp() if smooth else x2  # geometric mean of the window, in log space
            r = torch.ones_like(var)
            if not skip and it > max(self.compensation_from, self.warmup_iters):
                r = ((var + self.eps).sqrt() / (self.running_var + self.eps).sqrt()).clamp(1 / self.r_max, self.r_max)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
        y = _UnifiedFunction.apply(x, self.weight, self.bias, var, r, self, slot, smooth, skip)
        return y.reshape(shape)

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (C,): the eval-mode output is x * scale + shift, which
        ``layerlab export --to folded`` folds into the next linear layer (UN's inference fusion)."""
        return self.weight / (self.running_var + self.eps).sqrt(), self.bias.clone()


@register("none")
class NoNorm(nn.Module):
    """Identity: the LN-free transformer."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        super().__init__()
        del dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def set_norm_schedule(model: nn.Module, steps: int) -> None:
    """Give every scheduled norm (PRepBN) its decay length in training forwards."""
    for m in model.modules():
        if isinstance(m, PRepBN):
            m.total.fill_(steps)
            m.remaining.fill_(steps)


def is_batch_norm(name: str) -> bool:
    """Norms whose output depends on the other samples in the batch."""
    return name in {"powernorm", "batchnorm", "prepbn", "unified"}


# A dimension-free constant used by LNS; kept here so placements and tests agree on it.
def lns_scale(layer: int) -> float:
    """LayerNorm Scaling factor for 1-indexed block ``layer``: 1/sqrt(l) (Sun et al., 2025)."""
    return 1.0 / math.sqrt(layer)
