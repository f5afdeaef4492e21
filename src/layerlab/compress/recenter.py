"""Pre-LN LayerNorm families of Hugging Face made exactly Pre-RMSNorm, in their own format (``convert --to
rmsnorm|crmsnorm`` on :data:`FAMILIES`; Jiang et al., 2023, "Pre-RMSNorm and Pre-CRMSNorm Transformers").

Everything that writes to the residual stream (token and position embeddings, BLOOM's embedding LayerNorm, every
sublayer's output projection, weight and bias) is recentred so that the stream is zero-mean; each LayerNorm then
computes RMSNorm * g + b, and b is folded into the linears that read the norm where the family's format gives
them a bias (:func:`recenter_family`). :func:`use_rmsnorm` swaps the norms for RMSNorm modules, as layerlab's
loader does for a directory marked ``"layerlab": {"norms": ...}``. The command itself is
:mod:`layerlab.compress.convert`'s.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..adapters import stream_norms, swap_stream_norms, view
from ..errors import LayerlabError, choices_error


def centered(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` less its mean along ``dim`` (what recentring does to everything that writes to the stream)."""
    return t - t.mean(dim, keepdim=True)


# Pre-LN LayerNorm families converted exactly and written back in their own format (issue 13)
FAMILIES = ("opt", "gpt_neox", "gptj", "phi", "falcon", "bloom")
CONFIG_KEY = "layerlab"  # config.json entry of a converted family model: {"norms": "rmsnorm" | "crmsnorm"}
DISCOVERY_TOKENS = 6  # tokens of the forward that finds which linear layers read each norm
EXACT_REL = 1e-4  # a family conversion off by more than this share of the largest |logit| is an error, not written


def family_problem(model) -> str | None:
    """Why a model of one of :data:`FAMILIES` has no exact Pre-RMSNorm form, or None. (The adapter already
    refuses the Post-LN variants: OPT-350m, BLOOM with apply_residual_connection_post_layernorm.)"""
    norms = list(stream_norms(view(model)).values())
    if bad := sorted({type(m).__name__ for m in norms if not isinstance(m, nn.LayerNorm)}):
        return f"its norms are {', '.join(bad)}, not LayerNorm"
    if model.config.model_type == "bloom" and not model.transformer.word_embeddings_layernorm.eps > 0:
        return "its embedding LayerNorm has epsilon 0 (the recentered embedding needs a positive one)"
    return None


@torch.no_grad()
def norm_readers(model, norms: dict[str, nn.Module]) -> dict[str, list[nn.Linear]]:
    """For each norm in ``norms`` (path -> module), the linear layers that read its output.

    Found by one short forward on fixed token ids: a linear reads a norm when its input holds exactly the
    norm's output (OPT hands its MLP the same values as (B*T, C) rows). A parallel block's single norm has
    the attention's and the MLP's input linears as readers; the final norm has the unembedding. A norm whose
    output reaches no linear cannot have its bias folded: that is an error. (Whatever else might read a norm
    would show in the equality check that :func:`convert` requires.)
    """
    outs: dict[str, torch.Tensor] = {}
    ins: list[tuple[nn.Linear, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=name: outs.__setitem__(n, o.detach().clone()))
               for name, m in norms.items()]
    handles += [m.register_forward_pre_hook(lambda mod, a: ins.append((mod, a[0].detach().clone())))
                for m in model.modules() if isinstance(m, nn.Linear)]
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(1, DISCOVERY_TOKENS + 1).remainder(vocab)[None].to(next(model.parameters()).device)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    readers: dict[str, list[nn.Linear]] = {name: [] for name in norms}
    for linear, x in ins:
        for name, o in outs.items():  # a linear belongs to the first norm whose output it reads
            if x.numel() == o.numel() and torch.equal(x.reshape(-1), o.reshape(-1)):
                if all(linear is not r for r in readers[name]):
                    readers[name].append(linear)
                break
    if empty := [name for name, r in readers.items() if not r]:
        raise LayerlabError(f"cannot find the linear layers that read {empty[0]}: convert cannot fold its bias")
    return readers


def _affine(norm: nn.Module, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, bias) of a LayerNorm, ones (on ``device``) and zeros where it has none."""
    c = norm.normalized_shape[-1]
    w = norm.weight.detach() if norm.weight is not None else torch.ones(c, device=device)
    b = norm.bias.detach() if getattr(norm, "bias", None) is not None else torch.zeros_like(w)
    return w, b


@torch.no_grad()
def _fold_bias(norm: nn.Module, readers: list[nn.Linear], create: bool) -> bool:
    """Move a norm's bias b into its readers: W(g*n + b) + c = W(g*n) + (Wb + c). Only where every reader has
    a bias, unless ``create`` (then readers without one get it). Returns whether it moved."""
    if getattr(norm, "bias", None) is None or not norm.bias.any():
        return True
    if not create and any(r.bias is None for r in readers):
        return False
    beta = norm.bias.detach().double()
    for r in readers:
        shift = (r.weight.detach().double() @ beta).to(r.weight.dtype)
        if r.bias is None:
            r.bias = nn.Parameter(shift)
        else:
            r.bias.add_(shift)
    norm.bias.zero_()
    return True


@torch.no_grad()
def _center_(t: torch.Tensor, dim: int) -> None:
    t.copy_(centered(t.double(), dim).to(t.dtype))


@torch.no_grad()
def _center_embedding_norm(model) -> None:
    """BLOOM: make the stream that ``word_embeddings_layernorm`` starts zero-mean, in BLOOM's own format.

    That LayerNorm's output is g*n(t) + b, n(t) the normalised embedding row of token t. Its mean-free part is
    y(t) + b', y(t) = center(g*n(t)) and b' = center(b); y(t) is not a per-coordinate rescale of a normalised
    row (its norm varies by token), so it is rebuilt through the epsilon: with gain c*1, bias b' and embedding
    row k(t)*y(t), the LayerNorm outputs c*k*y / sqrt(k^2 ms(y) + eps) + b', which is y + b' when
    k(t) = sqrt(eps / (c^2 - ms(y(t)))); c^2 = 2 max_t ms(y) keeps every k real and within a factor sqrt(2).
    Exact in real arithmetic; in float32 the LayerNorm then differs from y + b' only by rounding.
    """
    ln, emb = model.transformer.word_embeddings_layernorm, model.get_input_embeddings()
    g, b = (t.double() for t in _affine(ln))
    e = emb.weight.double()  # (V, C)
    n = centered(e, 1) / (centered(e, 1).pow(2).mean(1, keepdim=True) + ln.eps).sqrt()
    y = centered(g * n, 1)  # (V, C)
    ms = y.pow(2).mean(1, keepdim=True)  # (V, 1)
    c2 = 2 * float(ms.max()) if float(ms.max()) > 0 else 1.0
    k = (ln.eps / (c2 - ms)).sqrt()
    emb.weight.copy_((k * y).to(emb.weight.dtype))
    ln.weight.fill_(math.sqrt(c2))
    ln.bias.copy_(centered(b, 0).to(ln.bias.dtype))


@torch.no_grad()
def recenter_family(model) -> nn.Module:
    """A copy of ``model`` (one of :data:`FAMILIES`) whose residual stream is zero-mean, in its own format.

    Jiang et al., 2023, Section 3, with each family's writers to the stream taken from its adapter entry:
    the token embedding (or, in BLOOM, what its embedding LayerNorm outputs: :func:`_center_embedding_norm`),
    learned position embeddings (OPT), and every block's output projections (``out_proj``: weight rows and
    bias); parallel blocks add both sublayers to the stream, so both are centered the same way. A tied
    unembedding is untied first and keeps the original matrix: centering a tied matrix would change logit v
    by -mean(E_v) * sum(h), h the final norm's output, which depends on v and on the position, so it is not
    a per-position constant and the softmax would change. Each LayerNorm bias is folded into the linears
    that read the norm where all of them have a bias in the family's format; elsewhere it stays in the norm.
    On the zero-mean stream every one of these LayerNorms computes RMSNorm(x) * g + b.
    """
    new = copy.deepcopy(model)
    v = view(new)
    tied = new.get_output_embeddings().weight is new.get_input_embeddings().weight
    if tied:
        new.get_output_embeddings().weight = nn.Parameter(new.get_input_embeddings().weight.detach().clone())
        new.config.tie_word_embeddings = False
    blocks = set(new.get_submodule(v.arch.blocks).modules())
    embed = new.get_input_embeddings()
    width = embed.embedding_dim
    if new.config.model_type == "bloom":
        _center_embedding_norm(new)
    else:
        _center_(embed.weight, 1)
    for m in new.modules():  # learned positions (OPT): every other embedding outside the blocks
        if isinstance(m, nn.Embedding) and m is not embed and m not in blocks and m.embedding_dim == width:
            _center_(m.weight, 1)
    for b in v.blocks:
        for path in v.arch.out_proj.values():
            proj = b.module.get_submodule(path)
            _center_(proj.weight, 0)  # (C, in): each column to mean 0 over the model dimension
            if proj.bias is not None:
                _center_(proj.bias, 0)
    norms = stream_norms(v)
    for name, readers in norm_readers(new, norms).items():
        _fold_bias(norms[name], readers, create=False)
    return new


@torch.no_grad()
def use_rmsnorm(model, norm: str = "rmsnorm", *, fold: bool = False) -> nn.Module:
    """Swap every stream norm of a recentered family model (:func:`recenter_family`) for an RMSNorm (in place).

    Each LayerNorm (gain g, epsilon e) becomes ``NORMS[norm]`` with the same g and e. A LayerNorm with a bias
    becomes ``RMSNormWithBias`` (``CRMSNormWithBias``): RMSNorm, then + b, where b is zero wherever
    :func:`recenter_family` folded it and holds it where the family's format had nowhere to fold it; so the
    state dict keeps the family's keys, and a model written after this swap still loads in plain transformers.
    With ``fold``, every bias is folded into the linears that read the norm instead, adding biases where they
    had none, and the norms are plain RMSNorm: the paper's bias-free Pre-RMSNorm. What layerlab's loader
    applies to a directory whose config.json says ``"layerlab": {"norms": ...}``
    (:func:`layerlab.adapters.swap_stream_norms`, which does the swap). Returns ``model``.
    """
    if norm not in ("rmsnorm", "crmsnorm"):
        raise choices_error("RMSNorm variant", norm, ("rmsnorm", "crmsnorm"))
    if fold:
        norms = stream_norms(view(model))
        for name, readers in norm_readers(model, norms).items():
            _fold_bias(norms[name], readers, create=True)
    return swap_stream_norms(model, norm, keep_bias=not fold)


@torch.no_grad()
def stream_mean(model, input_ids: torch.Tensor) -> float:
    """Largest |mean over the model dimension| of the residual stream entering or leaving any block."""
    v = view(model)
    with v.trace(sublayers=False) as t:
        v.forward(input_ids)
    return max(float(h.float().mean(-1).abs().max()) for h in (*t.resid_in, *t.resid_out))
