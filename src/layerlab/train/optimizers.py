"""Layer-wise optimizers: one registry, chosen by ``--optimizer NAME``.

Every entry of :data:`OPTIMIZERS` is built as ``(model, tc)`` and returns a :class:`Layerwise`, the object the
training loop steps. It holds a ``torch.optim.Optimizer`` whose parameter groups are one per block and kind
(:func:`param_groups`), each with an ``lr_scale`` that the loop multiplies into the scheduled learning rate
(``group["lr"] = lr_at(step) * group["lr_scale"]``); a rule changes per-block learning rates by changing those
scales. Its ``state_dict`` carries the rule's state with the optimizer's, so ``--resume`` continues exactly.

=========  ==============================================================================================
adamw      AdamW with the weight-decay groups below (the default; one learning rate for all blocks).
lamb       LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
           Algorithm 2): the bias-corrected Adam step plus decoupled weight decay, ``u = m/(sqrt(v)+eps) + wd*w``,
           scaled per parameter tensor by the trust ratio ``||w|| / ||u||``.
lars       LARS in the form of the same paper's Algorithm 1 (You et al., 2017, "Large Batch Training of
           Convolutional Networks"): SGD momentum on ``g + wd*w``, ``m = beta1*m + (1-beta1)(g + wd*w)``, scaled by
           ``||w|| / ||m||``. Both use the identity for the paper's phi and a ratio of 1 where a norm is zero.
           Both apply the ratio to the weight matrices (and embeddings) only by default: biases and norm
           parameters take the plain Adam / momentum step, ratio 1 (``trust_ratio_scope``, see
           :class:`LAMBOptimizer`); ``trust_ratio_scope: all`` applies it to every tensor.
llr        Heavy-tail guided layerwise LR (He et al., "One LR Doesn't Fit All: Heavy-Tail Guided Layerwise
           Learning Rates for LLMs"), on AdamW: see :class:`LLR` and :func:`alpha_to_lr_scale`.
noise      Noise-adaptive layerwise LR, on AdamW: see :class:`NoiseAdaptive`.
lisa       LISA (Pan et al., 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
           Model Fine-Tuning"), on AdamW: see :class:`LISA`.
=========  ==============================================================================================

Weight decay (:func:`param_groups`): matrices decay by ``weight_decay``; biases and norm shifts never decay; norm
scale vectors form two groups, as Wang et al. (2026, "Negligible in Size, Significant in Effect: On Scale Vectors
in Large Language Models") distinguish them: *input* norms, in front of a sublayer or a linear (``ln1``, ``ln2``,
sandwich's ``inner_norm``), and *output* norms, on a sublayer's output (Peri-LN's ``ln1_out``, ``ln2_out``) and
the final ``ln_f``. The paper finds decay helps the former and harms the latter; both default to 0 here (no decay on
norms, as before) and are set by ``input_norm_decay`` and ``output_norm_decay``. In Post-LN blocks ``ln1``/``ln2``
sit after the residual add; they are still named input norms, as each feeds the next sublayer.

The per-block rules (llr, noise) scale the learning rate of a block's linear layers, weights and biases alike
(the LLR paper's code tunes each linear module, bias included), and leave every norm parameter, gain or shift, at
the base LR; embeddings and head are the rule's to set. They build their groups with ``norms_apart`` so that a
block's norm shifts sit in a group of their own, apart from its linear biases (:func:`param_groups`).

Each rule logs its per-block learning-rate multiplier ``lr_scale_block`` to ``metrics.jsonl``, plus
``trust_ratio_block`` (lamb, lars), ``alpha_block`` (llr), ``grad_noise_block`` (noise) or ``lisa_active`` (lisa).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import LayerlabError
from ..registry import OPTIMIZERS
from . import telemetry

if TYPE_CHECKING:
    from ..config import TrainConfig

KINDS = ("decay", "no_decay", "input_norm", "output_norm")
STRUCTURE_KEYS = ("kind", "block", "norm", "layer_adaptation")  # what a group is, as opposed to its state
INPUT_NORMS = ("ln1", "ln2", "inner_norm")
OUTPUT_NORMS = ("ln1_out", "ln2_out", "ln_f")


# ---------------------------------------------------------------------------------------------------- groups
def norm_of(name: str) -> str | None:
    """The innermost norm module (``ln1``, ``ln_f``, ...) a parameter belongs to; None outside every norm."""
    parts = name.split(".")
    for part in reversed(parts[:-1]):
        if part in INPUT_NORMS or part in OUTPUT_NORMS:
            return part
    return None


def param_kind(name: str, param: torch.Tensor) -> str:
    """The weight-decay kind of a parameter: ``decay``, ``no_decay``, ``input_norm`` or ``output_norm``."""
    norm = norm_of(name)
    if norm is not None:
        if name.rsplit(".", 1)[-1] == "bias":  # a norm's shift is a bias
            return "no_decay"
        return "input_norm" if norm in INPUT_NORMS else "output_norm"
    return "decay" if param.dim() >= 2 else "no_decay"


def block_of(name: str) -> int | None:
    """The block index of a parameter named ``blocks.<i>.…``; None for embeddings, final norm and head."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def param_groups(model: nn.Module, tc: TrainConfig, norms_apart: bool = False) -> list[dict[str, Any]]:
    """One group per (block, kind), blocks in order and then the rest, each with its weight decay and lr_scale 1.

    Each group's ``norm`` says whether all its parameters belong to norms (the ``input_norm`` and ``output_norm``
    kinds do). ``no_decay`` mixes linear biases and norm shifts; ``norms_apart`` puts a block's norm shifts in a
    group of their own (``norm`` True) after its linear biases, for a rule that leaves norms at the base LR. The
    default keeps one ``no_decay`` group per block, so that optimizer states saved before the split still load.
    """
    decay = {"decay": tc.weight_decay, "no_decay": 0.0, "input_norm": tc.input_norm_decay,
             "output_norm": tc.output_norm_decay}
    buckets: dict[tuple[int | None, str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # tied weights are listed once
        if p.requires_grad:
            kind = param_kind(name, p)
            norm = kind.endswith("_norm") or (norms_apart and norm_of(name) is not None)
            buckets.setdefault((block_of(name), kind, norm), []).append(p)
    order = sorted(buckets, key=lambda k: (k[0] is None, k[0] or 0, KINDS.index(k[1]), k[2]))
    return [{"params": buckets[k], "weight_decay": decay[k[1]], "kind": k[1], "block": k[0], "norm": k[2],
             "lr_scale": 1.0} for k in order]


def describe_groups(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind, its weight decay and parameter names (``blocks.*.`` standing for every block), for the manifest."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        entry = out.setdefault(g["kind"], {"weight_decay": g["weight_decay"], "params": []})
        for p in g["params"]:
            pattern = re.sub(r"^blocks\.\d+\.", "blocks.*.", names[id(p)])
            if pattern not in entry["params"]:
                entry["params"].append(pattern)
    return out


# ---------------------------------------------------------------------------------------------------- LAMB, LARS
def trust_ratio(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``||w|| / ||u||`` as a 0-d tensor, 1 where either norm is zero (no sync with the device)."""
    w, u = weight.float().norm(), update.float().norm()
    return torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))


class LAMBOptimizer(torch.optim.Optimizer):
    """LAMB (You et al., 2020, Algorithm 2) with a per-tensor trust ratio, kept in ``state[p]["trust_ratio"]``.

    ``m, v`` are Adam's moments (bias-corrected), ``u = m / (sqrt(v) + eps) + weight_decay * w`` and
    ``w <- w - lr * (||w|| / ||u||) * u``. ``eps`` 1e-6 is the paper's.

    A group with ``layer_adaptation`` False takes the plain step ``w <- w - lr * u`` (ratio 1, nothing kept in
    ``state``). Algorithm 2 adapts every tensor; the reference code exempts biases and LayerNorm parameters:
    google-research/albert ``lamb_optimizer.py`` and tensorflow/addons ``optimizers/lamb.py`` skip the ratio for
    the names in ``exclude_from_layer_adaptation``, which defaults to ``exclude_from_weight_decay``, given as
    ``["LayerNorm", "layer_norm", "bias"]`` in ALBERT's ``optimization.py``. :class:`LAMB` does the same by
    default (``trust_ratio_scope: matrices``).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, layer_adaptation: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      layer_adaptation=layer_adaptation))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (m / (1 - b1**t)) / (v / (1 - b2**t)).sqrt().add_(group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                if group["layer_adaptation"]:
                    ratio = trust_ratio(p, update)
                    state["trust_ratio"] = ratio
                    update.mul_(ratio)
                p.add_(update, alpha=-group["lr"])
        return loss


class LARSOptimizer(torch.optim.Optimizer):
    """LARS as written in You et al. (2020), Algorithm 1, with a per-tensor trust ratio in ``state``.

    ``m <- beta * m + (1 - beta) * (g + weight_decay * w)`` and ``w <- w - lr * (||w|| / ||m||) * m``. A group with
    ``layer_adaptation`` False takes the plain momentum step ``w <- w - lr * m``, as the reference code does for the
    names in ``exclude_from_layer_adaptation`` (google-research/simclr ``tf2/lars_optimizer.py``: it defaults to
    ``exclude_from_weight_decay``, given as ``['batch_normalization', 'bias', ...]`` in its ``tf2/model.py``).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 layer_adaptation: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      layer_adaptation=layer_adaptation))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                m.lerp_(g, 1 - group["momentum"])
                if group["layer_adaptation"]:
                    ratio = trust_ratio(p, m)
                    state["trust_ratio"] = ratio
                    p.add_(m * ratio, alpha=-group["lr"])
                else:
                    p.add_(m, alpha=-group["lr"])
        return loss


# ---------------------------------------------------------------------------------------------------- the base
class Layerwise:
    """What the training loop steps: an optimizer over :func:`param_groups`, plus a per-block rule.

    The loop calls :meth:`begin_step` before each step's forward, then sets every group's ``lr`` to the
    scheduled LR times its ``lr_scale``, and calls :meth:`step` and :meth:`zero_grad` after the backward.
    This base class is AdamW with one learning rate for all blocks.
    """

    name = "adamw"
    norms_apart = False  # a rule that leaves norms at the base LR groups a block's norm shifts apart

    def __init__(self, model: nn.Module, tc: TrainConfig):
        self.model, self.tc = model, tc
        self.num_blocks = len(model.blocks)
        groups = param_groups(model, tc, norms_apart=self.norms_apart)
        self.groups_described = describe_groups(model, groups)
        self.optimizer = self.make_optimizer(groups)
        # What each group is comes from this run's model and config, not from a loaded state: torch's
        # load_state_dict takes the saved groups' keys, and a state saved before a key existed lacks it.
        self._structure = [{k: g[k] for k in STRUCTURE_KEYS if k in g} for g in self.optimizer.param_groups]
        self.optimizer.register_load_state_dict_post_hook(self._restore_structure)

    def _restore_structure(self, optimizer: torch.optim.Optimizer) -> None:
        for group, structure in zip(optimizer.param_groups, self._structure, strict=True):
            group.update(structure)

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        fused = next(self.model.parameters()).device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.tc.lr, betas=(self.tc.beta1, self.tc.beta2), fused=fused or None)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def begin_step(self, step: int) -> None:
        """Prepare step ``step`` (0-based, the number of steps already taken)."""

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def block_lr_scales(self) -> list[float]:
        """Each block's LR multiplier: that of its weight matrices (1 for a block without any)."""
        scales = [1.0] * self.num_blocks
        for g in self.param_groups:
            if g["block"] is not None and g["kind"] == "decay":
                scales[g["block"]] = float(g["lr_scale"])
        return scales

    def telemetry(self) -> dict[str, Any]:
        """Per-block quantities for ``metrics.jsonl``."""
        return {"lr_scale_block": self.block_lr_scales()}

    def describe(self) -> dict[str, Any]:
        """The optimizer and its weight-decay groups, for the run's manifest."""
        return {"name": self.name, "param_groups": self.groups_described}

    # the rule's own state travels with the optimizer's (``optimizer.pt`` is loaded with weights_only=True)
    def rule_state(self) -> dict[str, Any]:
        return {}

    def load_rule_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "rule": self.rule_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"optimizer", "rule"}:
            raise LayerlabError("optimizer state was saved by an older layerlab; it cannot be resumed")
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_rule_state(state["rule"])

    def _block_trust_ratios(self) -> list[float | None]:
        """Mean trust ratio over each block's weight matrices at the last step (None before the first)."""
        out: list[float | None] = []
        for params in telemetry.block_params(self.model):
            ratios = [self.optimizer.state[p]["trust_ratio"] for p in params
                      if p.dim() >= 2 and "trust_ratio" in self.optimizer.state.get(p, {})]
            out.append(float(torch.stack(ratios).mean()) if ratios else None)
        return out


def with_layer_adaptation(groups: list[dict[str, Any]], scope: str) -> list[dict[str, Any]]:
    """Mark the groups LAMB and LARS apply the trust ratio to: all (``scope`` "all"), or the weight matrices and
    embeddings only ("matrices", the default), biases and norm parameters taking the plain step."""
    return [{**g, "layer_adaptation": scope == "all" or g["kind"] == "decay"} for g in groups]


class LAMB(Layerwise):
    """:class:`LAMBOptimizer` over :func:`param_groups`, the trust ratio on ``trust_ratio_scope``."""

    name = "lamb"

    def make_optimizer(self, groups):
        groups = with_layer_adaptation(groups, self.tc.trust_ratio_scope)
        return LAMBOptimizer(groups, lr=self.tc.lr, betas=(self.tc.beta1, self.tc.beta2))

    def telemetry(self):
        return {**super().telemetry(), "trust_ratio_block": self._block_trust_ratios()}


class LARS(Layerwise):
    """:class:`LARSOptimizer` over :func:`param_groups`, the trust ratio on ``trust_ratio_scope``."""

    name = "lars"

    def make_optimizer(self, groups):
        groups = with_layer_adaptation(groups, self.tc.trust_ratio_scope)
        return LARSOptimizer(groups, lr=self.tc.lr, momentum=self.tc.beta1)

    def telemetry(self):
        return {**super().telemetry(), "trust_ratio_block": self._block_trust_ratios()}


# ---------------------------------------------------------------------------------------------------- LLR
def block_alphas(model: nn.Module) -> list[float]:
    """Each block's ESD alpha, the mean over its weight matrices: the code ``analyze`` reports ``esd_alpha`` with."""
    from ..adapters import view
    from ..analysis.spectra import block_summary, weight_spectra

    v = view(model)
    return [b["esd_alpha"] for b in block_summary(weight_spectra(v), v.num_layers)]


def alpha_to_lr_scale(alphas: list[float], s_min: float, s_max: float) -> list[float]:
    """Map alphas linearly by value onto ``[s_min, s_max]``: the smallest alpha gets s_min, the largest s_max.

    This is ``tb_linear_map`` with ``alpha_positively_with_lr=True`` in the public code of He et al.
    (github.com/hed-ucas/Layer-wise-Learning-Rate, ``olmo/LRUnbalance.py``, ``layerTempbalance.get_layer_temps``):
    ``np.interp(alpha, [min(alpha), max(alpha)], [s_min * lr, s_max * lr])``. A larger alpha (a lighter-tailed,
    less trained layer) gets a larger LR. Two choices of ours for cases the public code does not meet: equal alphas
    all get the midpoint (``np.interp`` would give s_max), and a block without a finite alpha (its matrices too
    small to fit) keeps the base LR, 1 clipped into the range.
    """
    a = np.asarray(alphas, dtype=np.float64)
    out = np.full(a.shape, min(max(1.0, s_min), s_max))
    ok = np.isfinite(a)
    if ok.any():
        lo, hi = float(a[ok].min()), float(a[ok].max())
        out[ok] = np.interp(a[ok], [lo, hi], [s_min, s_max]) if hi > lo else 0.5 * (s_min + s_max)
    return [float(x) for x in out]


class LLR(Layerwise):
    """Heavy-tail guided layerwise learning rates (He et al., "One LR Doesn't Fit All"), on AdamW.

    At every step that is a multiple of ``llr_every``, up to ``llr_until`` of the run, each block's ESD alpha is
    measured (:func:`block_alphas`) and mapped to a target multiplier (:func:`alpha_to_lr_scale`); the multipliers
    then move linearly from where they are to the targets over ``llr_ramp`` steps, and stay after ``llr_until``.
    As in the public code (``olmo/train.py`` and ``olmo/LRUnbalance.py``): the schedule is ``LLR_ratio`` 0.2 of the
    run, recomputing every ``unbalancedlr_every`` steps with a ``linear_steps`` ramp (40 and 20 in its 130M config,
    range [1, 3]); the embeddings and head get s_max (their alpha is set to the largest one), and norms keep the
    base LR (they are not among the tuned modules). The code gives each tuned linear module one parameter group,
    ``module.parameters()``, so a linear's bias follows its weight; its ``layerTempbalance`` leaves LayerNorms at
    the untuned LR (``layernorm=False``). Here likewise: a block's scale applies to its linear weights and biases,
    the head's bias (if any) follows the head, and every norm parameter, gain and shift, of the blocks and the
    final norm keeps the base LR. Two differences: the code tunes each linear module on its own, we tune whole
    blocks by their mean alpha, as ``analyze`` reports it; and alpha is fitted as ``analyze`` fits it (xmin by KS
    distance) where the code fixes xmin at the median eigenvalue.
    """

    name = "llr"
    norms_apart = True

    def __init__(self, model, tc):
        super().__init__(model, tc)
        n = self.num_blocks + 1  # the blocks, then everything outside them (embeddings and head)
        self.start, self.target, self.t0 = [1.0] * n, [1.0] * n, 0
        self.alpha: list[float] = [math.nan] * self.num_blocks

    def _scales_at(self, step: int) -> list[float]:
        ramp = self.tc.llr.ramp
        frac = 1.0 if ramp == 0 else min(1.0, (step - self.t0 + 1) / ramp)
        return [s + (t - s) * frac for s, t in zip(self.start, self.target)]

    def begin_step(self, step: int) -> None:
        tc = self.tc
        if step % tc.llr.every == 0 and step <= tc.llr.until * tc.steps:
            self.alpha = block_alphas(self.model)
            self.start = self._scales_at(step)
            self.target = alpha_to_lr_scale(self.alpha, tc.llr.s_min, tc.llr.s_max) + [tc.llr.s_max]
            self.t0 = step
        scales = self._scales_at(step)
        for g in self.param_groups:
            if not g["norm"]:
                g["lr_scale"] = scales[g["block"] if g["block"] is not None else -1]

    def telemetry(self):
        alpha = [a if math.isfinite(a) else None for a in self.alpha]
        return {**super().telemetry(), "alpha_block": alpha}

    def rule_state(self):
        return {"start": self.start, "target": self.target, "t0": self.t0, "alpha": self.alpha}

    def load_rule_state(self, state):
        self.start, self.target, self.t0 = list(state["start"]), list(state["target"]), int(state["t0"])
        self.alpha = list(state["alpha"])


# ---------------------------------------------------------------------------------------------------- noise
class NoiseAdaptive(Layerwise):
    """Noise-adaptive layerwise learning rates, on AdamW: each block's step follows its gradient's noise.

    Hao et al. (2025, "Noise-Adaptive Layerwise Learning Rates: Accelerating Geometry-Aware Optimization for Deep
    Neural Network Training", arXiv:2510.14009) estimate each layer's gradient variance on the fly, in the dual
    norm of their LMO-based optimizer, and give noisier layers smaller learning rates. Their exact update was not
    available to us; this is our estimator, for AdamW (Frobenius norms), documented here in full.

    For block l, over its linear weights and biases (its norms keep the base LR and are left out), with Adam's
    first moment ``m_l`` (EMA of the gradients, rate beta1) and our EMA ``s_l`` of ``||g_l||^2`` at the same rate,
    both bias-corrected after ``t`` steps:

        q_l = ||m_l||^2 / s_l,   r_l = clip((q_l - c_t) / (1 - c_t), 0, 1),   noise_l = 1 - r_l,
        c_t = sum_i w_i^2 = (1 - beta1)(1 + beta1^t) / ((1 + beta1)(1 - beta1^t)),

    with ``w_i`` the EMA's weights (summing to 1). If the gradients are ``g_i = G + xi_i``, with independent noise
    of ``E||xi||^2 = sigma^2`` (``tr(S)/B``), then ``E||m||^2 = |G|^2 + c_t sigma^2`` and ``E s = |G|^2 + sigma^2``:
    the EMA averages the noise down by ``c_t`` but keeps some, so ``q_l`` alone would overstate the signal
    (``c_t`` tends to ``(1-beta1)/(1+beta1)``, 0.053 at beta1 0.9, and is 1 at the first step). Solving the two for
    ``|G|^2`` is McCandlish et al.'s unbiased two-batch-size estimate (2018, "An Empirical Model of Large-Batch
    Training", Appendix A.1) with batches of 1 and ``1/c_t`` steps, and gives ``r_l``, an estimate of
    ``|G|^2 / (|G|^2 + tr(S)/B)``: the factor ``1 / (1 + B_noise / B)`` by which noise lowers the best SGD step
    (their eq. 2.6, with ``B_noise = tr(S) / |G|^2``). It assumes G steady over the EMA's window (about
    ``1/(1-beta1)`` steps). The block's LR multiplier is ``clip(r_l / mean_j r_j, noise_s_min, noise_s_max)``:
    relative to the others, a quieter block steps further. Embeddings, norms and head keep the base LR. At the
    first step (``c_1 = 1``, no estimate) ``r_l = 1`` for every block.
    """

    name = "noise"
    norms_apart = True

    def __init__(self, model, tc):
        super().__init__(model, tc)
        self.t = 0
        self.sq_ema = torch.zeros(self.num_blocks, dtype=torch.float64)
        self.signal = [1.0] * self.num_blocks
        self.tuned: list[list[nn.Parameter]] = [[] for _ in range(self.num_blocks)]  # what the rule scales
        for g in self.param_groups:
            if g["block"] is not None and not g["norm"]:
                self.tuned[g["block"]].extend(g["params"])

    def step(self) -> None:
        zero = torch.zeros((), device=next(self.model.parameters()).device)

        def sq(tensors):
            return sum((t.float().pow(2).sum() for t in tensors), zero)

        grad_sq = torch.stack([sq(p.grad for p in ps if p.grad is not None) for ps in self.tuned])
        self.optimizer.step()
        state = self.optimizer.state
        mean_sq = torch.stack([sq(state[p]["exp_avg"] for p in ps if "exp_avg" in state.get(p, {}))
                               for ps in self.tuned])
        grad_sq, mean_sq = grad_sq.double().cpu(), mean_sq.double().cpu()  # one sync per step
        b = self.tc.beta1
        self.t += 1
        self.sq_ema = b * self.sq_ema + (1 - b) * grad_sq
        corr = 1 - b**self.t
        c = (1 - b) * (1 + b**self.t) / ((1 + b) * corr)
        q = torch.where(self.sq_ema > 0, (mean_sq / corr**2) / (self.sq_ema / corr).clamp_min(1e-300),
                        torch.ones_like(self.sq_ema))
        ratio = (q - c) / (1 - c) if c < 1 - 1e-12 else torch.ones_like(q)
        self.signal = ratio.clamp(0.0, 1.0).tolist()
        mean = sum(self.signal) / max(1, len(self.signal))
        for g in self.param_groups:
            if g["block"] is not None and not g["norm"]:
                r = self.signal[g["block"]]
                g["lr_scale"] = min(max(r / mean, self.tc.noise.s_min), self.tc.noise.s_max) if mean > 0 else 1.0

    def telemetry(self):
        return {**super().telemetry(), "grad_noise_block": [1.0 - r for r in self.signal]}

    def rule_state(self):
        return {"t": self.t, "sq_ema": self.sq_ema, "signal": self.signal}

    def load_rule_state(self, state):
        self.t, self.sq_ema, self.signal = int(state["t"]), state["sq_ema"].double(), list(state["signal"])


# ---------------------------------------------------------------------------------------------------- LISA
class LISA(Layerwise):
    """LISA (Pan et al., 2024, Algorithm 1), on AdamW: train the embeddings, head and ``lisa_layers`` blocks.

    Every ``lisa_every`` steps, ``lisa_layers`` of the blocks are drawn uniformly without replacement and all
    others are frozen (``requires_grad`` off, so they get no gradient and AdamW skips them: no update, no weight
    decay); the embeddings, final norm and head always train. As in the authors' LMFlow callback, one optimizer
    lives through the run and a block keeps its Adam moments while frozen. The draw of period ``k`` comes from a
    generator seeded by the run's seed and ``k``, so a resumed run draws exactly what an uninterrupted one did.
    """

    name = "lisa"

    def __init__(self, model, tc):
        super().__init__(model, tc)
        if tc.lisa.layers > self.num_blocks:
            raise LayerlabError(f"lisa_layers is {tc.lisa.layers}, but the model has {self.num_blocks} blocks")
        self.period: int | None = None
        self.active = list(range(self.num_blocks))

    def sample(self, period: int) -> list[int]:
        """The blocks that train during sampling period ``period``."""
        gen = torch.Generator().manual_seed((self.tc.seed * 1_000_003 + 7_919 * period + 1) % (2**63))
        return sorted(torch.randperm(self.num_blocks, generator=gen)[: self.tc.lisa.layers].tolist())

    def begin_step(self, step: int) -> None:
        period = step // self.tc.lisa.every
        if period != self.period:
            self.period, self.active = period, self.sample(period)
            for i, block in enumerate(self.model.blocks):
                block.requires_grad_(i in self.active)

    def telemetry(self):
        return {"lr_scale_block": [1.0 if i in self.active else 0.0 for i in range(self.num_blocks)],
                "lisa_active": list(self.active)}

    def rule_state(self):
        return {"period": self.period, "active": self.active}  # for inspection: begin_step redraws them


# the names are declared in layerlab.registry, so that configs and the CLI know them before torch loads
for _name, _cls in {"adamw": Layerwise, "lamb": LAMB, "lars": LARS, "llr": LLR, "noise": NoiseAdaptive,
                    "lisa": LISA}.items():
    OPTIMIZERS.register(_name, _cls)


def build_optimizer(model: nn.Module, tc: TrainConfig) -> Layerwise:
    """The optimizer ``tc.optimizer`` names, over ``model``'s trainable parameters (already on their device)."""
    return OPTIMIZERS.get_checked(tc.optimizer)(model, tc)
