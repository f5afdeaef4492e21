"""A quantized GPT-2 written as transformers' ``opt`` architecture, whose layers are ``nn.Linear``.

compressed-tensors 0.20.1 quantizes ``nn.Linear`` and ``nn.Embedding`` modules only
(``quantization/lifecycle/apply.py``: any other matched module is skipped), and GPT-2's layers are transformers'
``Conv1D`` (weight stored (in, out), ``y = x W + b``), so a GPT-2 cannot hold compressed-tensors' packed weights
under its own ``model_type``. transformers' load-time route for such checkpoints (``dequantize=True``,
``CompressedTensorsDequantize``) picks one scheme for every dense layer, so the per-block widths would be lost
there, and it is not a plain ``from_pretrained`` either.

So the GPT-2 is written as an architecture that computes what GPT-2 computes with ``nn.Linear`` layers. Measured
with transformers 5.24 (``tests/test_quantize_format.py``):

- ``gpt_bigcode`` with ``multi_query=False`` (GPT-2 with ``nn.Linear`` layers; Allal et al., 2023, SantaCoder)
  computes it exactly, but a compressed checkpoint of it does not load: ``GPTBigCodePreTrainedModel._init_weights``
  reads ``c_proj.weight`` of every attention and MLP module, which compressed-tensors has removed
  (``AttributeError: 'Linear' object has no attribute 'weight'``), as Falcon's ``FalconLinear`` does.
- ``opt`` (Zhang et al., 2022, OPT: Open Pre-trained Transformer Language Models; transformers'
  ``models/opt``) with ``do_layer_norm_before=True`` is GPT-2's block: learned absolute positions added to the
  token embedding, pre-LayerNorm (eps 1e-5, OPT's fixed value) attention and MLP with biases, attention scaled
  by ``head_dim ** -0.5``, an MLP ``fc1`` -> ``activation_function`` -> ``fc2``, a final LayerNorm and a head
  tied to the token embedding (or not, as the GPT-2's). It uses the base ``_init_weights``, which skips a linear
  layer without ``.weight``, so its compressed checkpoint loads. This is what is written.

The mapping (:func:`opt_tensors`): ``c_attn``'s output rows are ``[q, k, v]`` of all heads, split into
``q_proj``, ``k_proj`` and ``v_proj``; quantization is row-wise (groups run along the inputs), so the rows of
the packed codes, their scales and the bias split the same way and each part is exactly the packed layer of its
rows. ``attn.c_proj`` is ``out_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` are ``fc1`` and ``fc2``, ``ln_1`` and
``ln_2`` are ``self_attn_layer_norm`` and ``final_layer_norm``. OPT numbers positions from 2
(``OPTLearnedPositionalEmbedding.offset``), so its position table is GPT-2's ``wpe`` after two rows of zeros
that no position reads.

Two differences remain, none in what an unpadded or right-padded input computes: OPT scales the query before
the attention product rather than the product (the same up to float rounding, and exactly when
``head_dim ** -0.5`` is a power of two, as for GPT-2's head_dim 64); and OPT derives positions from the
attention mask (the first real token of a left-padded row is position 0), where GPT-2 counts the padding.

A GPT-2 whose config uses what OPT cannot express (:func:`unsupported`: ``scale_attn_by_inverse_layer_idx``,
cross-attention, a LayerNorm eps other than 1e-5) keeps layerlab's format. ``reorder_and_upcast_attn`` changes
only the rounding of GPT-2's eager attention (the default SDPA attention ignores it), so it does not stop the
conversion.
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import LayerlabError

GPT2 = "gpt2"
OPT = "opt"
OPT_POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
OPT_LN_EPS = 1e-5  # OPT's LayerNorms are nn.LayerNorm with the default eps
_BLOCK = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
_IN_BLOCK = {"ln_1": "self_attn_layer_norm", "attn.c_proj": "self_attn.out_proj", "ln_2": "final_layer_norm",
             "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"}
_OUTSIDE = {"wte": "model.decoder.embed_tokens", "wpe": "model.decoder.embed_positions",
            "ln_f": "model.decoder.final_layer_norm", "lm_head": "lm_head"}
_QKV = ("q_proj", "k_proj", "v_proj")  # c_attn's output rows, in order


def is_gpt2(model: nn.Module) -> bool:
    """A transformers GPT-2 causal LM (its blocks' layers are ``Conv1D``)."""
    return getattr(getattr(model, "config", None), "model_type", None) == GPT2


def unsupported(config) -> str | None:
    """Why the GPT-2 ``config`` cannot be written as OPT, or None when it can."""
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "GPT-2 with scale_attn_by_inverse_layer_idx (OPT has no per-layer attention scale)"
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention"
    if not getattr(config, "scale_attn_weights", True):
        return "GPT-2 without attention scaling (OPT always scales by head_dim ** -0.5)"
    if config.layer_norm_epsilon != OPT_LN_EPS:
        return f"GPT-2 with layer_norm_epsilon {config.layer_norm_epsilon:g} (OPT's LayerNorms use {OPT_LN_EPS:g})"
    return None


def opt_config(config, **extra):
    """The ``OPTConfig`` that computes what the GPT-2 ``config`` does, plus ``extra`` attributes (the
    ``quantization_config``)."""
    from transformers import OPTConfig

    e = config.n_embd
    out = OPTConfig(vocab_size=config.vocab_size, hidden_size=e, num_hidden_layers=config.n_layer,
                    num_attention_heads=config.n_head, ffn_dim=config.n_inner or 4 * e,
                    max_position_embeddings=config.n_positions, do_layer_norm_before=True,
                    _remove_final_layer_norm=False, word_embed_proj_dim=e,
                    activation_function=config.activation_function,
                    dropout=config.resid_pdrop, attention_dropout=config.attn_pdrop, layerdrop=0.0,
                    init_std=config.initializer_range, use_cache=config.use_cache, enable_bias=True,
                    layer_norm_elementwise_affine=True, pad_token_id=config.pad_token_id,
                    bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                    tie_word_embeddings=config.tie_word_embeddings)
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        out.dtype = dtype
    for k, v in extra.items():
        setattr(out, k, v)
    return out


def skeleton(model: nn.Module, quantization_config=None):
    """An empty ``OPTForCausalLM`` (on the meta device: nothing allocated) for the GPT-2 ``model``, with
    :func:`opt_config` (and ``quantization_config`` when given) and the GPT-2's generation config: what writes
    ``config.json`` and ``generation_config.json`` (:func:`layerlab.offload.write_config`)."""
    from transformers import OPTForCausalLM

    cfg = opt_config(model.config, **({"quantization_config": quantization_config}
                                      if quantization_config is not None else {}))
    with torch.device("meta"):
        out = OPTForCausalLM(cfg)
    if getattr(model, "generation_config", None) is not None:
        out.generation_config = copy.deepcopy(model.generation_config)
    return out


def opt_modules(name: str) -> list[str]:
    """The OPT module path(s) of the GPT-2 block module ``name`` (``c_attn`` becomes three)."""
    m = _BLOCK.match(name)
    if m is None:
        raise LayerlabError(f"{name} is not a GPT-2 block module")
    i, rest = m.groups()
    prefix = f"model.decoder.layers.{i}."
    if rest == "attn.c_attn":
        return [prefix + f"self_attn.{p}" for p in _QKV]
    if rest not in _IN_BLOCK:
        raise LayerlabError(f"no OPT module for GPT-2's {name}")
    return [prefix + _IN_BLOCK[rest]]


def opt_tensors(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """GPT-2's tensor ``name`` (``transformer.``-prefixed or not) as OPT stores it: [(OPT name, tensor)]. Block
    layers must be linear-shaped (layerlab's packed layers, or ``nn.Linear``: (out, ...) rows), not ``Conv1D``;
    ``c_attn``'s tensors split by rows into q, k and v (its ``weight_shape`` [3e, in] becomes [e, in] each); the
    position table gets OPT's two leading rows (zeros, never read)."""
    m = _BLOCK.match(name)
    if m is not None:
        module, _, leaf = name.rpartition(".")
        targets = opt_modules(module)
        if len(targets) == 1:
            return [(f"{targets[0]}.{leaf}", t)]
        if leaf == "weight_shape":
            return [(f"{n}.{leaf}", torch.stack([t[0] // 3, t[1]])) for n in targets]
        return [(f"{n}.{leaf}", part.contiguous()) for n, part in zip(targets, t.chunk(3, dim=0), strict=True)]
    if name.removeprefix("transformer.").startswith("wpe."):
        t = torch.cat([t.new_zeros(OPT_POSITION_OFFSET, t.shape[1]), t])
    return [(opt_name(name), t)]


def opt_name(name: str) -> str:
    """The OPT name of GPT-2's tensor ``name`` outside the blocks (embeddings, final norm, head)."""
    module, _, leaf = name.removeprefix("transformer.").rpartition(".")
    if module not in _OUTSIDE:
        raise LayerlabError(f"no OPT tensor for GPT-2's {name}")
    return f"{_OUTSIDE[module]}.{leaf}"


def opt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` of the OPT form of ``model`` (a GPT-2 whose block layers are all
    linear-shaped) would write: every state-dict tensor mapped (:func:`opt_tensors`), the head left out when it
    is tied to the embedding."""
    out = {}
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        out.update(opt_tensors(name, t))
    return out
