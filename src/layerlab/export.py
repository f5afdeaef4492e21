"""``layerlab export``: a layerlab model written in another form, with the same function.

``--to gpt2``: exact weight mapping between layerlab's GPT-2 design and Hugging Face ``GPT2LMHeadModel``.
The GPT-2 design is: pre placement, layernorm, learned positions, tanh-GELU MLP, biases.
GPT-2 stores its linear layers as ``Conv1D`` with weights of shape (in, out), so every
matrix is transposed on the way; the fused q, k, v order is the same in both.

``--to folded``: every norm folded into a linear layer, written as a layerlab model with ``norm: none``
(SLAB, Guo et al., 2024, re-parameterizes PRepBN this way for inference: ``merge_bn`` in xinghaochen/SLAB
``llama/modeling/llama-350M/modeling_llama.py``). It applies to norms that are a fixed per-channel affine
a⊙x + b in eval mode (an ``eval_affine`` method: ``batchnorm`` with its running statistics, ``prepbn`` once
γ = 0, where RepBN(x) = BN(x) + η·x, and ``unified`` with its running quadratic mean). A norm that a linear
layer reads folds into it,
W(s·(a⊙x + b)) + c = (W diag(a))(s·x) + (c + s·W b), with s the LNS depth scale (else 1): ``ln1`` into
``attn.qkv``, ``ln2`` into ``mlp.fc``, Sub-LN's inner norms into the output projections, ``ln_f`` into
``lm_head``, which is untied from the embedding and gets a bias. A norm that reads a linear layer (Peri-LN's
output norms, after ``attn.proj`` / ``mlp.proj`` and eval's identity dropout) folds backwards,
a⊙(W h + c) + b = (diag(a) W) h + (a⊙c + b). Linear biases are turned on where a shift needs one (the
others are zero). Post-LN blocks (``post``, Mix-LN's first blocks) are refused: their norms write the
residual stream, which the next sublayer and the residual path both read, so no one linear layer absorbs
them. The fold is computed in float64 and written in float32 (a bf16 run is upcast first, so it is not
rounded to bf16 twice); the folded model is checked against the original on random ids before it is written.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .adapters import load_model
from .config import ModelConfig
from .data import load_tokenizer
from .errors import LayerlabError, choices_error
from .io import output_dir, write_manifest
from .model import LayerlabForCausalLM, build_model, num_params, rebuild, refuse_design
from .norms import NoNorm
from .packed import refuse_quantized
from .registry import EXPORT_TARGETS, NORMS, PLACEMENTS, block_placement_names

# layerlab name -> GPT-2 name, per block; True where the weight is a transposed Conv1D matrix.
_BLOCK_MAP = {
    "ln1.weight": ("ln_1.weight", False),
    "ln1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln2.weight": ("ln_2.weight", False),
    "ln2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_MAP = {
    "embed.weight": "transformer.wte.weight",
    "pos.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


def gpt2_incompatibility(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` is not the GPT-2 design, or None if it is."""
    wanted = {"placement": "pre", "norm": "layernorm", "positions": "learned", "mlp": "gelu", "bias": True,
              "head_bias": False}
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            return f"{name} is {getattr(cfg, name)!r}, GPT-2 needs {value!r}"
    if cfg.drop_attn or cfg.drop_mlp:
        return "some blocks lack their attention or MLP (drop_attn/drop_mlp); every GPT-2 block has both"
    return None


def gpt2_config(cfg: ModelConfig, eos_token_id: int | None = None) -> GPT2Config:
    return GPT2Config(
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.width, n_layer=cfg.layers,
        n_head=cfg.heads, n_inner=cfg.hidden, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _pairs(layers: int):
    """(layerlab key, gpt2 key, transpose) for every weight."""
    for ours, theirs in _TOP_MAP.items():
        yield ours, theirs, False
    for i in range(layers):
        for ours, (theirs, transpose) in _BLOCK_MAP.items():
            yield f"blocks.{i}.{ours}", f"transformer.h.{i}.{theirs}", transpose


@torch.no_grad()
def to_gpt2(model: LayerlabForCausalLM, eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` with the same function as ``model`` (which must be the GPT-2 design)."""
    cfg = model.cfg
    if (why := gpt2_incompatibility(cfg)) is not None:
        raise LayerlabError(f"cannot export to gpt2: {why}")
    gpt2 = GPT2LMHeadModel(gpt2_config(cfg, eos_token_id)).eval()
    ours, theirs = model.state_dict(), gpt2.state_dict()
    for a, b, transpose in _pairs(cfg.layers):
        theirs[b].copy_(ours[a].t() if transpose else ours[a])
    return gpt2


@torch.no_grad()
def from_gpt2(gpt2: GPT2LMHeadModel) -> LayerlabForCausalLM:
    """A layerlab model with the same function as a Hugging Face GPT-2."""
    c = gpt2.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise LayerlabError(f"GPT-2 activation {c.activation_function!r} has no layerlab equivalent")
    cfg = ModelConfig(
        vocab_size=c.vocab_size, context=c.n_positions, layers=c.n_layer, width=c.n_embd, heads=c.n_head,
        mlp_hidden=c.n_inner or 4 * c.n_embd, norm_eps=c.layer_norm_epsilon, dropout=c.resid_pdrop,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
    )
    model = build_model(cfg).eval()
    ours, theirs = model.state_dict(), gpt2.state_dict()
    for a, b, transpose in _pairs(cfg.layers):
        ours[a].copy_(theirs[b].t() if transpose else theirs[b])
    return model


# ---------------------------------------------------------------- --to folded

# Block forwards (layerlab.model.FORWARDS) that put each norm next to one linear layer: the input norms feed
# attn.qkv / mlp.fc, Sub-LN's inner norms the output projections, Peri-LN's output norms read them.
FOLDABLE_FORWARDS = ("pre", "peri")
FOLD_CHECK_SHAPE = (2, 64)  # rows x positions (at most the context) of the random ids the fold is checked on
FOLD_RTOL = 1e-4  # |logit difference| allowed, relative to the largest |logit| (float32 rounding is ~1e-6)


def foldable_norms() -> list[str]:
    """The registered norms that are a fixed per-channel affine in eval mode (they have ``eval_affine``)."""
    return [name for name, cls in NORMS.items() if hasattr(cls, "eval_affine")]


def _fold_sites(model: LayerlabForCausalLM) -> list[tuple[str, str, bool, float]]:
    """(norm, linear, whether the linear reads the norm (else the norm reads it), scale s) for every norm of
    ``model``, or a one-line error naming a block whose placement has a norm no single linear layer touches."""
    sites = []
    for i, b in enumerate(model.blocks):
        forward = PLACEMENTS[b.placement].forward
        if forward not in FOLDABLE_FORWARDS:
            ok = [n for n in block_placement_names() if PLACEMENTS[n].forward in FOLDABLE_FORWARDS]
            raise LayerlabError(f"cannot fold the norms of block {i} (placement {b.placement!r}): a post-norm "
                                "writes the residual stream, which the next sublayer and the residual path both "
                                f"read, so no one linear layer absorbs it; placements that fold: {', '.join(ok)}")
        s = b.scale if forward == "pre" else 1.0  # the LNS depth scale multiplies the input norms' output
        p = f"blocks.{i}."
        for sub, norm_in, first, norm_out in (("attn", "ln1", "qkv", "ln1_out"), ("mlp", "ln2", "fc", "ln2_out")):
            module = getattr(b, sub)
            if module is None:  # drop_attn / drop_mlp: no norm either
                continue
            sites.append((p + norm_in, f"{p}{sub}.{first}", True, s))
            if module.inner_norm is not None:
                sites.append((f"{p}{sub}.inner_norm", f"{p}{sub}.proj", True, 1.0))
            if getattr(b, norm_out, None) is not None:
                sites.append((p + norm_out, f"{p}{sub}.proj", False, 1.0))
    sites.append(("ln_f", "lm_head", True, 1.0))
    names = [n for n, *_ in sites]
    stray = [n for n, m in model.named_modules() if hasattr(m, "eval_affine")
             and not any(n == k or n.startswith(k + ".") for k in names)]
    if stray:  # a placement this function does not know put a norm elsewhere
        raise LayerlabError(f"cannot fold {stray[0]}: no linear layer next to it is known to export --to folded")
    return sites


@torch.no_grad()
def fold_norms(model: LayerlabForCausalLM) -> tuple[LayerlabForCausalLM, dict]:
    """A ``norm: none`` layerlab model equal to ``model`` in eval mode, every norm folded into the linear layer
    next to it (see the module's docstring), and a record: what was folded where, and the largest |logit
    difference| against ``model`` on random ids (float64 arithmetic, stored in the weights' dtype)."""
    cfg = model.cfg
    if not hasattr(NORMS[cfg.norm], "eval_affine"):
        raise LayerlabError(f"export --to folded needs a norm that is a fixed per-channel affine in eval "
                            f"({', '.join(foldable_norms())}); this model's norm is {cfg.norm!r}")
    model.eval()
    sites = _fold_sites(model)
    before = model.state_dict()
    state = {k: v.detach().clone() for k, v in before.items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()  # its own copy, untied from the embedding
    folded = []
    for norm_name, linear_name, reads, s in sites:
        norm = model.get_submodule(norm_name)
        if isinstance(norm, NoNorm):  # no final norm (or an identity): nothing to fold
            continue
        a, b = (t.double() for t in norm.eval_affine())  # (C,) each
        w = state[linear_name + ".weight"]  # (out, in)
        dtype, w = w.dtype, w.double()
        bias = state.get(linear_name + ".bias")
        c = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if reads:  # W(s(a x + b)) + c = (W diag(a))(s x) + (c + s W b)
            w, c = w * a, c + s * (w @ b)
        else:  # a (W h + c) + b = (diag(a) W) h + (a c + b)
            w, c = a[:, None] * w, a * c + b
        state[linear_name + ".weight"], state[linear_name + ".bias"] = w.to(dtype), c.to(dtype)
        for key in [k for k in state if k.startswith(norm_name + ".")]:
            del state[key]
        folded.append(f"{norm_name} -> {linear_name}")
    added = set(state) - set(before)
    new = rebuild(model, state, norm="none", bias=cfg.bias or any(k.startswith("blocks.") for k in added),
                  head_bias=cfg.head_bias or "lm_head.bias" in state,
                  tie_embeddings=cfg.tie_embeddings and "ln_f -> lm_head" not in folded)
    device = next(model.parameters()).device
    rows, positions = FOLD_CHECK_SHAPE
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (rows, min(positions, cfg.context)), generator=gen).to(device)
    ref, got = model(ids).logits.float(), new(ids).logits.float()
    diff, top = float((got - ref).abs().max()), float(ref.abs().max())
    if not diff <= FOLD_RTOL * max(top, 1.0):
        raise LayerlabError(f"the folded model's logits differ from the original's by up to {diff:.3g} (largest "
                            f"|logit| {top:.3g}); not written")
    return new, {"folded": folded, "max_abs_logit_diff": diff}


# ---------------------------------------------------------------- the command


def _as_gpt2(model: LayerlabForCausalLM, tok) -> tuple[GPT2LMHeadModel, dict]:
    gpt2 = to_gpt2(model, eos_token_id=tok.eos_id)
    return gpt2, {"params": sum(p.numel() for p in gpt2.parameters())}


def _as_folded(model: LayerlabForCausalLM, tok) -> tuple[LayerlabForCausalLM, dict]:
    new, record = fold_norms(model)
    return new, {"params": num_params(new), **record}


# target -> (the dtype it loads the model in, the function that builds the exported model and its results)
WRITERS = {"gpt2": ("auto", _as_gpt2), "folded": (torch.float32, _as_folded)}


def export(model_dir: str | Path, *, to: str = "gpt2", out: str | Path) -> Path:
    """Write ``model_dir`` as ``to`` (with its tokenizer) into ``out``: a plain Hugging Face GPT-2 (``gpt2``), or a
    layerlab model with its batch norms folded into linear layers (``folded``). The input is left untouched and
    ``out`` appears only when complete; its ``layerlab.json`` holds the results (``folded``: what went where and
    the largest |logit difference| against the original on random ids)."""
    if to not in EXPORT_TARGETS:
        raise choices_error("export target", to, EXPORT_TARGETS)
    dtype, write = WRITERS[to]
    model = load_model(model_dir, dtype=dtype, device="cpu").model
    refuse_quantized(model, model_dir, "export")
    if not isinstance(model, LayerlabForCausalLM):
        raise LayerlabError(f"{model_dir} is not a layerlab model (it is {type(model).__name__})")
    refuse_design(model, "export")
    tok = load_tokenizer(Path(model_dir))
    exported, results = write(model, tok)
    with output_dir(out, protect=(model_dir,)) as tmp:
        exported.save_pretrained(tmp)
        tok.save(tmp)
        write_manifest(tmp, "export", {"model": str(model_dir), "to": to}, results=results)
    return Path(out)
