"""Exact weight mapping between layerlab's GPT-2 design and Hugging Face ``GPT2LMHeadModel``.

The GPT-2 design is: pre placement, layernorm, learned positions, tanh-GELU MLP, biases.
GPT-2 stores its linear layers as ``Conv1D`` with weights of shape (in, out), so every
matrix is transposed on the way; the fused q, k, v order is the same in both.
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
from .model import LayerlabForCausalLM, build_model
from .packed import refuse_quantized
from .registry import EXPORT_TARGETS

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


def export(model_dir: str | Path, *, to: str = "gpt2", out: str | Path) -> Path:
    """Write ``model_dir`` as a plain Hugging Face ``to`` model (with its tokenizer) into ``out``."""
    if to not in EXPORT_TARGETS:
        raise choices_error("export target", to, EXPORT_TARGETS)
    model = load_model(model_dir, dtype="auto", device="cpu").model
    refuse_quantized(model, model_dir, "export")
    if not isinstance(model, LayerlabForCausalLM):
        raise LayerlabError(f"{model_dir} is not a layerlab model (it is {type(model).__name__})")
    tok = load_tokenizer(Path(model_dir))
    gpt2 = to_gpt2(model, eos_token_id=tok.eos_id)
    with output_dir(out, protect=(model_dir,)) as tmp:
        gpt2.save_pretrained(tmp)
        tok.save(tmp)
        write_manifest(tmp, "export", {"model": str(model_dir), "to": to},
                       results={"params": sum(p.numel() for p in gpt2.parameters())})
    return Path(out)
