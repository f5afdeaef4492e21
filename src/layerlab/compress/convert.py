"""``convert``: change the normalization of a Pre-LN model, exactly or by a short fine-tune.

Targets (``--to``):

- ``rmsnorm`` / ``crmsnorm``: the exact Pre-RMSNorm / Pre-CRMSNorm equivalent of a Pre-LN model
  (Jiang et al., 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN
  Transformers", NeurIPS; github.com/ZixuanJiang/pre-rmsnorm-transformer). In Pre-LN every norm
  reads the residual stream and LayerNorm(x) depends only on x - mean(x). Subtracting the mean over
  the model dimension from everything that writes to the stream (token and learned position
  embeddings, each sublayer's output projection, weight rows and bias) makes the stream zero-mean,
  which changes no norm's output; on a zero-mean stream LayerNorm's variance is the mean square, so
  LayerNorm(x) = RMSNorm(x) * g + b with the same gain g and epsilon. RMSNorm has no bias: b is
  folded into the bias of the linear layer that reads the norm (q/k/v, MLP input, and the head, which
  gets a bias for it). CRMSNorm reads d-1 coordinates and rebuilds the last as -sum(others), which
  is exact on the zero-mean stream (see :class:`layerlab.norms.CRMSNorm`).
- ``no-norm``: LayerNorm removal by fine-tuning (Heimersheim, 2024, "You can remove GPT2's
  LayerNorm by fine-tuning"; Baroni et al., 2025, "Transformers Don't Need LayerNorm at Inference
  Time", github.com/submarat/removing-layer-norm). During a short full fine-tune, each norm's
  per-token std is replaced, one norm after another, by a fixed per-layer constant: the moving
  average (momentum 0.9, their config's default) of the batch-mean std measured while the norm was
  still live. Once every norm is fixed, LN_fixed(x) = (x - mean(x)) / c * g + b is linear, and its
  centering, 1/c, g and b are folded into the linear layer that reads it; the norms become identity
  (``norm: none``). Simplifications, documented: all of ``ln1`` is fixed at once (the paper fixes the
  q/k and v paths of ``ln1`` separately), and there is no special std for the first position (the
  paper's BOS/EOT constants, which its final models also make uniform). Centering is kept while the
  norm is fixed, so the folded model equals the fine-tuned one and the constant-epsilon GPT-2 form the
  authors publish (eps = 1e12, gains * 1e6 / c) computes the same function.

Both work on layerlab models (placement ``pre`` in every block, norm ``layernorm``) and on Hugging
Face GPT-2. GPT-2's config has no RMSNorm or identity-norm option, so a converted GPT-2 is written
as a layerlab model (through :func:`layerlab.export.from_gpt2`, an exact mapping), loadable with
``AutoModelForCausalLM.from_pretrained`` after ``import layerlab``. The head of a model with tied
embeddings is untied in the output: the input embedding is recentered (or the head's weights take the
folded norm), so the two matrices differ.

``rmsnorm`` / ``crmsnorm`` also take the Pre-LN LayerNorm families of Hugging Face (:data:`FAMILIES`: OPT,
GPT-NeoX, GPT-J, Phi, Falcon, BLOOM), whose parallel blocks, partial rotary and ALiBi layerlab's model cannot
express: the output is the same family's directory, recentered (:func:`layerlab.compress.recenter.recenter_family`),
with ``"layerlab": {"norms": ...}`` in its config.json; :func:`~layerlab.compress.recenter.use_rmsnorm` swaps its
norms for RMSNorm modules.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from ..adapters import view
from ..allocator import param_bytes
from ..data import batches, measure_ids, window_length
from ..defaults import CONVERT_LR, CONVERT_STEPS
from ..errors import LayerlabError, choices_error
from ..evaluate import lm_loss
from ..io import progress_bar
from ..model import LayerlabForCausalLM, carry_ids, num_params, rebuild
from ..norms import CRMSNormWithBias, LayerNorm, RMSNormWithBias
from ..probes import measure_spec, probe_spec, stage_lines
from ..registry import CONVERT_TARGETS as TARGETS
from ..registry import PROBE_ITEMS
from .common import loss_columns, open_input, staged_output, table
from .heal import lm_step, train_ids
from .recenter import (
    CONFIG_KEY,
    EXACT_REL,
    FAMILIES,
    centered,
    family_problem,
    recenter_family,
    stream_mean,
    use_rmsnorm,
)

STD_MOMENTUM = 0.9  # moving average of the measured std (Baroni et al., config.py ``momentum``)
CALIBRATION_BATCHES = 4  # forwards that measure every norm's std before the fine-tune starts
CHECK_BATCH = 4  # windows the equality check of an exact conversion reads


# ---------------------------------------------------------------- what can be converted


def _gpt2_variant_problem(config) -> str | None:
    """Why a GPT2Config is not the plain GPT-2 that :func:`from_gpt2` maps exactly, or None."""
    if not getattr(config, "scale_attn_weights", True):
        return "scale_attn_weights is off"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "scale_attn_by_inverse_layer_idx is on"
    if getattr(config, "add_cross_attention", False):
        return "it has cross-attention"
    return None


def as_pre_ln(model, to: str) -> LayerlabForCausalLM:
    """``model`` as a layerlab Pre-LN model (a GPT-2 is mapped exactly), or a one-line reason why not."""
    from ..export import from_gpt2

    v = view(model)
    if not v.causal:
        raise LayerlabError(f"convert needs a causal Pre-LN language model; this is a {v.arch_name.upper()}-style "
                            "encoder with Post-LN blocks")
    model_type = getattr(model.config, "model_type", None)
    if v.arch_name == "llama" and model_type != "olmo":
        if to in ("rmsnorm", "crmsnorm"):
            raise LayerlabError("this Llama-style model already uses RMSNorm; convert --to rmsnorm|crmsnorm turns "
                                "Pre-LN (LayerNorm) models into their RMSNorm equivalent")
        raise LayerlabError("convert --to no-norm removes LayerNorm from Pre-LN models (layerlab pre+layernorm, "
                            "GPT-2); this Llama-style model uses RMSNorm")
    if v.arch_name == "gpt2":
        if (why := _gpt2_variant_problem(model.config)) is not None:
            raise LayerlabError(f"this GPT-2 variant has no exact layerlab equivalent: {why}")
        device = next(model.parameters()).device
        return carry_ids(model, from_gpt2(model).to(device).eval())
    if model_type in FAMILIES:
        if to == "no-norm":
            raise LayerlabError(f"convert --to no-norm supports layerlab and GPT-2 models; a {model_type!r} model "
                                "converts exactly with --to rmsnorm|crmsnorm")
        if (why := family_problem(model)) is not None:
            raise LayerlabError(f"this {model_type!r} model cannot be converted exactly: {why}")
        return model
    if not isinstance(model, LayerlabForCausalLM) and "RMSNorm" in type(v.final_norm).__name__:
        raise LayerlabError(f"this {model_type!r} model already uses RMSNorm; convert turns Pre-LN (LayerNorm) "
                            "models into their RMSNorm equivalent")
    if not isinstance(model, LayerlabForCausalLM):
        raise LayerlabError(f"convert supports layerlab, GPT-2 and the Pre-LN families {', '.join(FAMILIES)} "
                            f"(LayerNorm); this is a {model_type!r} model, which it cannot convert yet")
    cfg = model.cfg
    placements = cfg.block_placements()
    if any(p != "pre" for p in placements):
        shown = cfg.placement if isinstance(cfg.placement, str) else ",".join(placements)
        raise LayerlabError(f"convert needs Pre-LN (placement 'pre' in every block), this model's placement is "
                            f"{shown!r}: only when every norm reads the residual stream and every sublayer adds to "
                            "it is the conversion exact")
    if cfg.norm != "layernorm":
        hint = " already" if cfg.norm == to else ""
        raise LayerlabError(f"convert needs a LayerNorm model; this model's norm is{hint} {cfg.norm!r}")
    return model


# ---------------------------------------------------------------- exact: Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm


def _sublayers(model: LayerlabForCausalLM):
    """(block prefix, its norm, the linear that reads the norm, that linear's key, the output projection's key)
    for every sublayer a block has (``drop_attn`` / ``drop_mlp`` blocks lack one)."""
    for i, b in enumerate(model.blocks):
        if b.attn is not None:
            yield f"blocks.{i}.", "ln1", b.attn.qkv, "attn.qkv", "attn.proj"
        if b.mlp is not None:
            yield f"blocks.{i}.", "ln2", b.mlp.fc, "mlp.fc", "mlp.proj"


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias.detach().clone() if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])


@torch.no_grad()
def to_rmsnorm(model, norm: str = "rmsnorm") -> LayerlabForCausalLM:
    """The exact Pre-RMSNorm (``norm="rmsnorm"``) or Pre-CRMSNorm equivalent of a Pre-LN model.

    ``model`` is a layerlab Pre-LN model or a Hugging Face GPT-2; the result is a layerlab model.
    Recenters the embeddings and every output projection, keeps each gain, folds each LayerNorm
    bias into the next linear layer's bias (the head gets one when the final bias is non-zero), and
    unties the head (it keeps the original embedding matrix). Jiang et al., 2023, Section 3.
    """
    if norm not in ("rmsnorm", "crmsnorm"):
        raise choices_error("RMSNorm variant", norm, ("rmsnorm", "crmsnorm"))
    model = as_pre_ln(model, norm)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()  # before the embedding is recentered
    state["embed.weight"] = centered(state["embed.weight"], 1)  # (V, C): each row to mean 0
    if model.pos is not None:
        state["pos.weight"] = centered(state["pos.weight"], 1)
    needs_bias = False
    for p, ln, reader, key, proj in _sublayers(model):
        state[p + proj + ".weight"] = centered(state[p + proj + ".weight"], 0)  # (C, in): mean over outputs removed
        if p + proj + ".bias" in state:
            state[p + proj + ".bias"] = centered(state[p + proj + ".bias"], 0)
        beta = state.pop(p + ln + ".bias")
        if reader.bias is not None or beta.any():
            needs_bias |= reader.bias is None
            state[p + key + ".bias"] = _bias(reader) + reader.weight @ beta  # W(g*n + beta) + c = W(g*n) + (W beta + c)
    head_bias = state["lm_head.weight"] @ state.pop("ln_f.bias")
    if (model.lm_head.bias is not None) or head_bias.any():
        state["lm_head.bias"] = _bias(model.lm_head) + head_bias
    cfg = model.cfg
    return rebuild(model, state, norm=norm, bias=cfg.bias or needs_bias, head_bias="lm_head.bias" in state)


# ---------------------------------------------------------------- no-norm: fixed constants, then fold


class FixedScaleLayerNorm(nn.Module):
    """LayerNorm whose per-token std is replaced by a fixed per-layer constant once ``fixed`` is set.

    While live it is LayerNorm, and in training mode it tracks a moving average of the batch-mean
    std (the constant it will be fixed to). Fixed: (x - mean(x)) / scale * g + b, which is linear.
    Baroni et al., 2025 (``FakeLayerNorm`` in github.com/submarat/removing-layer-norm).
    """

    def __init__(self, ln: LayerNorm, momentum: float = STD_MOMENTUM):
        super().__init__()
        self.weight, self.bias, self.eps, self.momentum = ln.weight, ln.bias, ln.eps, momentum
        self.register_buffer("scale", torch.tensor(float("nan"), device=ln.weight.device))
        self.fixed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(-1, keepdim=True)  # (..., C)
        if self.fixed:
            return xc / self.scale * self.weight + self.bias
        std = (xc.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()  # (..., 1)
        if self.training:
            with torch.no_grad():
                m = std.float().mean()
                self.scale.copy_(m if self.scale.isnan() else self.momentum * self.scale + (1 - self.momentum) * m)
        return xc / std * self.weight + self.bias


def norm_names(cfg) -> list[str]:
    """The order in which norms are fixed: every block's ``ln2``, then every ``ln1``, then ``ln_f``.

    The paper's order (MLP norms first, then attention, the final norm last), ``ln1`` taken whole.
    Blocks without a sublayer (``drop_attn`` / ``drop_mlp``) have no norm for it.
    """
    ln2 = [f"blocks.{i}.ln2" for i in range(cfg.layers) if i not in getattr(cfg, "drop_mlp", ())]
    ln1 = [f"blocks.{i}.ln1" for i in range(cfg.layers) if i not in getattr(cfg, "drop_attn", ())]
    return ln2 + ln1 + ["ln_f"]


def removal_schedule(cfg, steps: int) -> dict[str, int]:
    """The step at which each norm of a ``cfg`` model is fixed: evenly from 10% to 50% of ``steps``.

    Baroni et al. fix GPT-2 small's 37 norms between steps 20 and ~105 of 300 (2-3 steps apart)
    and keep fine-tuning after; this spreads the same order over the same share of a shorter run.
    """
    names = norm_names(cfg)
    start, span = steps // 10, steps * 4 // 10
    return {n: start + (i * span) // max(len(names) - 1, 1) for i, n in enumerate(names)}


def _fixable(model: LayerlabForCausalLM) -> dict[str, FixedScaleLayerNorm]:
    """Swap every LayerNorm of a Pre-LN layerlab model for a :class:`FixedScaleLayerNorm` (in place)."""
    out = {}
    for name in norm_names(model.cfg):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = FixedScaleLayerNorm(getattr(parent, attr))
        setattr(parent, attr, new)
        out[name] = new
    return out


def _windows(ids: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)


def remove_norms(model: LayerlabForCausalLM, tokenizer, *, steps: int, data: str | Path | None = None,
                 lr: float = CONVERT_LR, batch_size: int = 8, seq_len: int | None = None, seed: int = 0,
                 fix: bool = True, progress: bool = False) -> tuple[LayerlabForCausalLM, dict]:
    """Fine-tune ``model`` (in place) while its norms are fixed one by one; return it and the schedule.

    The returned model still holds :class:`FixedScaleLayerNorm` modules, all fixed; :func:`fold_norms`
    turns it into a norm-free model. Data: random windows of the training part (first 90%) of
    ``data``, seeded, as healing uses. With ``steps=0`` the constants are measured and nothing is trained.
    With ``fix=False`` the norms stay live throughout: the same fine-tune with LayerNorm, the paper's control.
    """
    if steps < 0:
        raise LayerlabError(f"--steps must be >= 0, got {steps}")
    seq_len = window_length(model.config, seq_len=seq_len)
    device = next(model.parameters()).device
    ids = train_ids(tokenizer, data, limit=4_000_000)
    if len(ids) < seq_len + 2:
        raise LayerlabError(f"data too short to fine-tune on: {len(ids)} training tokens, need more than {seq_len + 1}")
    norms = _fixable(model)
    schedule = removal_schedule(model.cfg, steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():  # every norm gets a measured std before any is fixed
        for _ in range(CALIBRATION_BATCHES):
            model(input_ids=_windows(ids, seq_len, batch_size, gen)[:, :-1].to(device), use_cache=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(steps // 10, 1)
    losses = []
    with progress_bar(progress) as bar:
        task = bar.add_task("fine-tune, fixing norms" if fix else "fine-tune with norms (control)", total=steps)
        for step in range(steps):
            for name, at in schedule.items():
                norms[name].fixed |= fix and step >= at
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup)
            rows = _windows(ids, seq_len, batch_size, gen).to(device)
            losses.append(lm_step(model, rows, params, opt).item())
            bar.advance(task)
    for n in norms.values():
        n.fixed = fix
    model.eval()
    info = {"schedule": schedule, "scales": {name: float(n.scale) for name, n in norms.items()},
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None}
    return model, info


@torch.no_grad()
def fold_norms(model: LayerlabForCausalLM) -> LayerlabForCausalLM:
    """A norm-free (``norm: none``) model equal to ``model``, whose norms are all fixed.

    Each fixed norm is A x + b with A = diag(g / c) (I - 11^T / d); the linear W that reads it becomes
    W A (scale the columns by g / c, then remove each row's mean) with bias W b + its own.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(".scale")}
    needs_bias = False

    def fold(norm_name: str, linear: nn.Linear, key: str) -> torch.Tensor:
        n = model.get_submodule(norm_name)
        if not (isinstance(n, FixedScaleLayerNorm) and n.fixed):
            raise RuntimeError(f"{norm_name} is not a fixed norm")
        state.pop(norm_name + ".weight"), state.pop(norm_name + ".bias")
        scaled = linear.weight * (n.weight / n.scale)  # (out, C): W diag(g / c)
        state[key + ".weight"] = centered(scaled, 1)  # ... (I - 11^T / d): the centering folded in
        return _bias(linear) + linear.weight @ n.bias

    for p, ln, reader, key, _ in _sublayers(model):
        bias = fold(p + ln, reader, p + key)
        if reader.bias is not None or bias.any():
            needs_bias |= reader.bias is None
            state[p + key + ".bias"] = bias
    head_bias = fold("ln_f", model.lm_head, "lm_head")
    if model.lm_head.bias is not None or head_bias.any():
        state["lm_head.bias"] = head_bias
    return rebuild(model, state, norm="none", bias=model.cfg.bias or needs_bias, head_bias="lm_head.bias" in state)


# ---------------------------------------------------------------- the command


def random_ids(model, batch_size: int = CHECK_BATCH, seed: int = 0) -> torch.Tensor:
    """(batch_size, window) token ids drawn uniformly from the model's vocabulary with a seeded generator: what
    the equality check reads when the model has no tokenizer. An exact conversion is exact on any input."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, window_length(model.config)), generator=gen)


@torch.no_grad()
def max_logit_diff(a, b, tokenizer, data: str | Path | None = None, tokens: int = 2048,
                   batch_size: int = CHECK_BATCH, seed: int = 0) -> float:
    """Largest |logit difference| between two models on the first batch of the validation windows, or, with
    ``tokenizer`` None, on ``batch_size`` windows of :func:`random_ids` (``seed``)."""
    device = next(a.parameters()).device
    if tokenizer is None:
        input_ids = random_ids(a, batch_size, seed)
        mask = torch.ones_like(input_ids)
    else:
        ids = measure_ids(tokenizer, data, tokens)
        input_ids, mask = next(iter(batches(tokenizer, ids, tokens, window_length(a.config), batch_size)))
    input_ids, mask = input_ids.to(device), mask.to(device)
    la = view(a).forward(input_ids, mask).logits
    lb = view(b).forward(input_ids, mask).logits
    return float((la - lb).abs()[mask.bool()].max())


def _stage(model, tok, data, tokens, probes: dict | None = None) -> dict:
    """A row of the table: size, and the loss on text when there is a tokenizer to read it with; with ``probes``
    (:func:`layerlab.probes.measure`'s ``tasks``, ``n`` and ``seed``), the probes too."""
    loss = lm_loss(model, tok, data, tokens) if tok is not None else {}
    row = {"params": num_params(model), "bytes": param_bytes(model), **loss}
    if probes and probes.get("tasks") and tok is not None:
        row["probes"] = measure_spec(model, tok, probes, data)
    return row


def _convert_family(model, tok, to: str, data, tokens, seed: int, decisions: list[str],
                    probes: dict | None = None) -> dict:
    """The record of converting a model of :data:`FAMILIES` (its ``"model"`` entry: what to write).

    The output is the same family's directory, recentered (:func:`recenter_family`), its config.json saying
    ``"layerlab": {"norms": to}``: plain transformers loads it and runs LayerNorm on a zero-mean stream, which
    is RMSNorm * g + b; layerlab's loader swaps the norms for RMSNorm modules (:func:`use_rmsnorm`). Three
    equality figures against the input, on the same windows: ``max_abs_logit_diff`` with the RMSNorm modules
    as layerlab loads them, ``max_abs_logit_diff_bias_free`` with every norm bias folded into linears (the
    paper's bias-free Pre-RMSNorm) and ``max_abs_logit_diff_layernorm`` as plain transformers runs the file;
    and the largest |mean| of the stream at a block boundary, before and after. Any figure above
    :data:`EXACT_REL` times the input's largest |logit| is an error: nothing is written.
    """
    model_type = model.config.model_type
    new = recenter_family(model)
    setattr(new.config, CONFIG_KEY, {"norms": to})
    record: dict = {"to": to, "source": model_type}
    bias_free = use_rmsnorm(copy.deepcopy(new), to, fold=True)  # one copy at a time: at most 3 models in memory
    record["max_abs_logit_diff_bias_free"] = max_logit_diff(model, bias_free, tok, data, seed=seed)
    del bias_free
    swapped = use_rmsnorm(copy.deepcopy(new), to)
    record["max_abs_logit_diff"] = max_logit_diff(model, swapped, tok, data, seed=seed)
    record["max_abs_logit_diff_layernorm"] = max_logit_diff(model, new, tok, data, seed=seed)
    ids = random_ids(model, 2, seed).to(next(model.parameters()).device)
    with torch.no_grad():
        scale = float(view(model).forward(ids).logits.abs().max())
    worst = max(("max_abs_logit_diff", "max_abs_logit_diff_bias_free", "max_abs_logit_diff_layernorm"),
                key=lambda k: record[k])
    if not record[worst] <= EXACT_REL * scale:  # also catches NaN
        raise LayerlabError(f"the conversion of this {model_type!r} model is not exact ({worst} = "
                            f"{record[worst]:.2e}, largest |logit| {scale:.2e}); nothing written")
    record["max_abs_stream_mean_before"] = stream_mean(model, ids)
    record["max_abs_stream_mean"] = stream_mean(swapped, ids)
    if tok is None:
        record["checked_on"] = f"{CHECK_BATCH} x {window_length(model.config)} random token ids (seed {seed})"
    kept = [m for m in swapped.modules() if isinstance(m, (RMSNormWithBias, CRMSNormWithBias)) and m.bias.any()]
    decisions.append(f"written as a {model_type!r} directory (plain transformers loads it: its LayerNorms read a "
                     f"zero-mean stream, where they equal RMSNorm); config.json says \"{CONFIG_KEY}\": "
                     f"{{\"norms\": \"{to}\"}}, and layerlab swaps its norms for {to} modules")
    if kept:
        decisions.append(f"{len(kept)} norm bias(es) kept as a bias after the RMSNorm: the linears reading them "
                         "have no bias in this family's format (the bias-free figure folds them into new biases)")
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        decisions.append("head untied from the input embedding (the two now differ)")
    if model_type == "bloom":
        decisions.append("the embedding LayerNorm stays a LayerNorm, rebuilt so that its output is zero-mean")
    stages = {"before": _stage(model, tok, data, tokens, probes), "after": _stage(swapped, tok, data, tokens, probes)}
    return {**record, "decisions": decisions, "stages": list(stages), **stages, "model": new}


def convert(model_dir: str | Path, *, to: str, out: str | Path, data: str | Path | None = None,
            tokens: int | None = None, steps: int = CONVERT_STEPS, lr: float = CONVERT_LR, seed: int = 0,
            control: bool = False, progress: bool = False, tasks: str | list[str] | None = None,
            probe_items: int = PROBE_ITEMS, probe_seed: int = 0, loops: int | None = None, lora_rank: int = 0,
            init: str = "average", heal_steps: int = 0) -> dict:
    """Convert a Pre-LN model to ``to`` (rmsnorm | crmsnorm | no-norm) and write it to ``out``.

    ``recursive`` (any plain layerlab model) is :func:`layerlab.compress.recursive.convert_to_recursive`: ``loops``,
    ``lora_rank``, ``init`` and ``heal_steps`` (uptraining at ``lr``, ``seed``) are its own.

    ``rmsnorm``/``crmsnorm`` are exact: the record holds the largest logit difference against the
    original. ``no-norm`` fine-tunes for ``steps`` steps (learning rate ``lr``, ``seed``) on the
    training part of ``data`` while fixing the norms, then folds them; the record holds the
    validation loss before, with the fixed constants (``fixed``) and after the fold (``after``), and
    ``loss_delta`` = after - before, the paper's figure. Part of that delta is the fine-tune itself
    (an under-trained model improves with more steps): with ``control``, a copy is also fine-tuned the
    same way with its norms live, and the record adds ``loss_delta_vs_control`` = after - control, as
    the paper also reports. Returns the record also written to ``out/layerlab.json``;
    :func:`convert_lines` lays it out.

    An input without a tokenizer (no tokenizer files, or empty ones) converts to the exact targets all the
    same: the equality check reads windows of random token ids (``seed``; ``checked_on`` says which), and
    the stages hold sizes but no loss. ``no-norm``, ``data`` and ``tokens`` read text, so they refuse it.

    A model of :data:`FAMILIES` (OPT, GPT-NeoX, GPT-J, Phi, Falcon, BLOOM) is written as the same family,
    recentered, with the figures of :func:`_convert_family`.

    With ``tasks`` (probe names, or ``"all"``), every stage also holds ``probes``: :func:`layerlab.probes.measure`
    of them, ``probe_items`` items each from ``probe_seed``, and :func:`convert_lines` adds their before/after
    table. Off by default: the probes cost about one more pass over the validation split per stage, and an
    exact conversion cannot change them.
    """
    if to not in TARGETS:
        raise choices_error("conversion target", to, TARGETS)
    if steps < 0:
        raise LayerlabError(f"--steps must be >= 0, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise LayerlabError(f"--lr must be positive, got {lr}")
    probes = probe_spec(tasks, probe_items, probe_seed)  # checked before the model loads
    if to == "recursive":  # Relaxed Recursive Transformers (Bae et al., 2024): layerlab.compress.recursive
        from .recursive import convert_to_recursive

        return convert_to_recursive(model_dir, out=out, loops=loops, rank=lora_rank, init=init, heal_steps=heal_steps,
                                    data=data, tokens=tokens, lr=lr, seed=seed, progress=progress, probes=probes,
                                    measure=_stage, logit_diff=max_logit_diff, check_batch=CHECK_BATCH)
    if loops is not None or lora_rank or heal_steps or init != "average":
        raise LayerlabError("--loops, --lora-rank, --init and --heal-steps are options of --to recursive")
    # the exact targets read text only to measure: without a tokenizer they still convert, checked on random ids
    model, tok, v = open_input(model_dir, "convert", need_tokenizer=to == "no-norm" or data is not None
                               or tokens is not None)
    pre_ln = as_pre_ln(model, to)
    args = {"model": str(model_dir), "to": to, "data": str(data) if data else "embedded", "tokens": tokens}
    if to == "no-norm":
        args.update(steps=steps, lr=lr, seed=seed, control=control)
    if probes is not None:
        args.update(tasks=probes["tasks"], probe_items=probe_items, probe_seed=probe_seed)
    decisions = []
    if tok is None:
        args.update(data=None, seed=seed)
        decisions.append("the input has no tokenizer: equality checked on random token ids, no loss measured")
    if pre_ln is model and not isinstance(model, LayerlabForCausalLM):  # one of FAMILIES, in its own format
        with staged_output(model_dir, out, "convert", args) as stage:
            stage.record = _convert_family(model, tok, to, data, tokens, seed, decisions, probes)
            stage.save_model(stage.record.pop("model"))
        return stage.record
    if v.arch_name == "gpt2":
        decisions.append("GPT-2 has no RMSNorm or identity-norm option: written as a layerlab model (exact mapping)")
    if pre_ln.cfg.tie_embeddings:
        decisions.append("head untied from the input embedding (the two now differ)")
    with staged_output(model_dir, out, "convert", args) as stage:  # --out checked before the slow work starts
        stages = {"before": _stage(model, tok, data, tokens, probes)}
        record: dict = {"to": to, "source": v.arch_name}
        if to in ("rmsnorm", "crmsnorm"):
            new = to_rmsnorm(pre_ln, to)
            record["max_abs_logit_diff"] = max_logit_diff(model, new, tok, data, seed=seed)
            if tok is None:
                record["checked_on"] = f"{CHECK_BATCH} x {window_length(model.config)} random token ids (seed {seed})"
        else:
            tune = dict(steps=steps, data=data, lr=lr, seed=seed, progress=progress)
            if control:
                live, _ = remove_norms(copy.deepcopy(pre_ln), tok, fix=False, **tune)
                stages["control"] = _stage(live, tok, data, tokens, probes)
                del live
            fixed, info = remove_norms(pre_ln if pre_ln is not model else copy.deepcopy(model), tok, **tune)
            stages["fixed"] = _stage(fixed, tok, data, tokens, probes)
            new = fold_norms(fixed)
            record["fold_max_abs_logit_diff"] = max_logit_diff(fixed, new, tok, data)
            record.update(info, steps=steps)
            decisions.append("norms fixed one by one (every ln2, every ln1, then ln_f), each to the moving average "
                             "of its measured std, then folded into the linear layers that read them")
        if new.cfg.head_bias and not pre_ln.cfg.head_bias:
            decisions.append("the final norm's bias is folded into a new head bias")
        if new.cfg.bias and not pre_ln.cfg.bias:
            decisions.append("linear biases turned on to hold the folded norm biases")
        stages["after"] = _stage(new, tok, data, tokens, probes)
        if to == "no-norm":
            record["loss_delta"] = stages["after"]["loss"] - stages["before"]["loss"]
            if control:
                record["loss_delta_vs_control"] = stages["after"]["loss"] - stages["control"]["loss"]
        record.update(decisions=decisions, stages=list(stages), **stages)
        stage.save_model(new)
        stage.record = record
    return record


def convert_lines(record: dict) -> list[str]:
    """What ``layerlab convert`` prints: what became what, how exact, and the table on its named slice (or, for
    an input without a tokenizer, the random ids it was checked on and sizes alone)."""
    if record["to"] == "recursive":
        from .recursive import recursive_lines

        return recursive_lines(record)
    label = {"rmsnorm": "Pre-RMSNorm", "crmsnorm": "Pre-CRMSNorm", "no-norm": "no normalization"}[record["to"]]
    lines = [f"converted Pre-LN ({record['source']}) to {label}"]
    columns = [("params", 12, lambda r: f"{r['params']:,d}"), ("MB", 10, lambda r: f"{r['bytes'] / 1e6:.2f}")]
    rows = {name: record[name] for name in record["stages"]}
    family = []
    if "max_abs_stream_mean" in record:  # a family written in its own format
        family = [f"  bias-free Pre-RMSNorm {record['max_abs_logit_diff_bias_free']:.2e}, as LayerNorm in plain "
                  f"transformers {record['max_abs_logit_diff_layernorm']:.2e}; max |stream mean| "
                  f"{record['max_abs_stream_mean_before']:.2e} before, {record['max_abs_stream_mean']:.2e} after"]
    if "checked_on" in record:  # no tokenizer: no text, so no loss
        return [*lines, f"max |logit difference| against the original on {record['checked_on']}: "
                f"{record['max_abs_logit_diff']:.2e}", *family,
                "no loss measured: the input has no tokenizer to read text with", *table(rows, columns)]
    if "max_abs_logit_diff" in record:
        lines += [f"max |logit difference| against the original: {record['max_abs_logit_diff']:.2e}", *family]
    else:
        vs = f" ({record['loss_delta_vs_control']:+.4f} against the control)" if "loss_delta_vs_control" in record \
            else ""
        lines.append(f"fine-tuned {record['steps']} steps; fold max |logit difference|: "
                     f"{record['fold_max_abs_logit_diff']:.2e}; loss delta {record['loss_delta']:+.4f}{vs}")
    return [*lines, f"loss (nats/token) and perplexity on the {record['before']['slice']}",
            *table(rows, [*columns, *loss_columns()]), *stage_lines(rows)]
