"""The adapter registry: one :class:`Arch` entry per block structure (module paths, block form, what each part
is called), :data:`ARCHS`; :data:`MODEL_TYPES` maps a config's ``model_type`` onto its entry (:data:`VARIANTS`
where a config field chooses between forms), and :func:`arch_of` picks the entry of a loaded model. Adding a
family is one entry here and its ``MODEL_TYPES`` line (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import LayerlabError


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture, relative to the loaded model."""

    blocks: str
    embed: str
    final_norm: str | None
    unembed: str | None
    parts: dict[str, str]  # fixed name -> path inside a block; missing parts are absent
    attn_out: str  # path inside a block whose output is what attention adds to the residual stream
    mlp_out: str  # likewise for the MLP
    causal: bool
    placement: str  # where the norms sit: "pre" or "post" (layerlab models say per block)
    # sublayer -> path inside a block of the linear whose output is added to the residual stream (the output
    # projection); in a Pre-LN block, zeroing its weight and bias removes the sublayer exactly
    out_proj: dict[str, str] = field(default_factory=dict)
    # the block runs its MLP on (B*T, C) rows (OPT); a trace reshapes what it records there to (B, T, ...)
    flat_mlp: bool = False
    # how the sublayers meet the residual stream (FORMS): "sequential" x + attn(.), then + mlp(.); "parallel"
    # x + attn(n1(x)) + mlp(n2(x)), both sublayers reading the block's input (GPT-J, Pythia, Phi-1/2, Falcon;
    # Wang & Komatsuzaki, 2021); "output-norm" x + Norm(F(x)), no input norm (OLMo 2, OLMo et al., 2024)
    form: str = "sequential"
    # path inside a block of the module whose input is the stream between the sublayers, where there is no ln2
    # to read it from (OLMo 2: "mlp"); in a parallel block that stream is computed, as resid_in + attn
    mid: str | None = None
    # the config key of the final logit soft-cap c: logits = c * tanh(logits / c) (Gemma 2, Gemma Team, 2024)
    logit_softcap: str | None = None
    # mixture-of-experts: paths inside a block of the experts (3-d weights; what removing the MLP sublayer zeroes)
    # and of the top-k router (its forward returns (router_logits, top_k_weights, top_k_index)); a block without
    # them (a dense block in qwen3_moe) has a plain MLP whose output projection is out_proj["mlp"]
    experts: str | None = None
    router: str | None = None
    # config keys (indices of the blocks whose MLP is dense, the step of the sparse ones): block removal rewrites
    # the first from the blocks that are dense and sets the second to 1 (qwen3_moe)
    dense_layers: tuple[str, str] | None = None
    # the block adds to the MLP's output tensor in place (Falcon: mlp_output += attention_output), so a trace
    # records a copy of it
    inplace_mlp_out: bool = False
    # the MLP read as key-value memories (Geva et al., 2021; :meth:`LayerView.ffn`): alternatives, the first whose
    # modules are all present, of the paths inside a block of its input projection(s): (fc,) for act(fc x), (gate,
    # up) for a gated MLP act(gate x) * up x (GLU variants, Shazeer, 2020), or one fused projection whose output
    # halves are gate then up (Phi-3's gate_up_proj, layerlab's swiglu fc). GPT-2's Conv1D stores (in, out)
    mlp_in: tuple[tuple[str, ...], ...] = ()
    # the activation: alternatives, each a module path inside the block or a name in :data:`MLP_ACTS`
    mlp_act: tuple[str, ...] = ()
    # whether the MLP is gated; a string is the path of the attribute that says, per block (layerlab: "mlp.gated")
    mlp_gated: bool | str = False
    # the gated MLP's activation where it is not mlp_act (layerlab: GELU ungated, SwiGLU gated)
    mlp_gate_act: str | None = None
    # a norm between the activation and the output projection, where there is one (Sub-LN)
    mlp_inner_norm: str | None = None

    @property
    def parallel(self) -> bool:
        """Both sublayers read the block's input; ``Trace.mid`` is then ``resid_in + attn``."""
        return self.form == "parallel"


FORMS = ("sequential", "parallel", "output-norm")

# the activations an Arch's mlp_act may name where the model calls a function rather than a module (layerlab's MLP:
# tanh-approximated GELU as GPT-2, SiLU in SwiGLU)
MLP_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


ARCHS: dict[str, Arch] = {
    "layerlab": Arch("blocks", "embed", "ln_f", "lm_head", {"ln1": "ln1", "attn": "attn", "ln2": "ln2", "mlp": "mlp"},
                     "attn", "mlp", causal=True, placement="per-block",
                     out_proj={"attn": "attn.proj", "mlp": "mlp.proj"}, mlp_in=(("mlp.fc",),), mlp_act=("gelu_tanh",),
                     mlp_gated="mlp.gated", mlp_gate_act="silu", mlp_inner_norm="mlp.inner_norm",
                     # mlp moe (layerlab.moe): the tree of transformers' sparse MoE blocks, read as the "moe" entry's
                     experts="mlp.experts", router="mlp.gate"),
    "gpt2": Arch("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head",
                 {"ln1": "ln_1", "attn": "attn", "ln2": "ln_2", "mlp": "mlp"}, "attn", "mlp",
                 causal=True, placement="pre", out_proj={"attn": "attn.c_proj", "mlp": "mlp.c_proj"},
                 mlp_in=(("mlp.c_fc",),), mlp_act=("mlp.act",)),
    "llama": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                  {"ln1": "input_layernorm", "attn": "self_attn", "ln2": "post_attention_layernorm", "mlp": "mlp"},
                  "self_attn", "mlp", causal=True, placement="pre",
                  out_proj={"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"},
                  # Phi-3 fuses gate and up (gate_up_proj) and names its activation activation_fn
                  mlp_in=(("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",)),
                  mlp_act=("mlp.act_fn", "mlp.activation_fn"), mlp_gated=True),
    "bert": Arch("encoder.layer", "embeddings", None, None,
                 {"ln1": "attention.output.LayerNorm", "attn": "attention", "ln2": "output.LayerNorm",
                  "mlp": "intermediate"}, "attention.output.dense", "output.dense", causal=False, placement="post",
                 out_proj={"attn": "attention.output.dense", "mlp": "output.dense"},
                 mlp_in=(("intermediate.dense",),), mlp_act=("intermediate.intermediate_act_fn",)),
    # OPT (do_layer_norm_before=True, as every size but 350m): the MLP is fc1/fc2 directly in the block (no module
    # of its own, so no "mlp" part), the block's own final_layer_norm is its ln2, learned positions are added
    # before block 0, and the decoder's final_layer_norm is the final norm
    "opt": Arch("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm", "lm_head",
                {"ln1": "self_attn_layer_norm", "attn": "self_attn", "ln2": "final_layer_norm"}, "self_attn", "fc2",
                causal=True, placement="pre", out_proj={"attn": "self_attn.out_proj", "mlp": "fc2"}, flat_mlp=True,
                mlp_in=(("fc1",),), mlp_act=("activation_fn",)),
    # Pythia / GPT-NeoX with use_parallel_residual (x + attn(ln1 x) + mlp(ln2 x)); "gpt_neox_seq" without it
    "gpt_neox": Arch("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head",
                     {"ln1": "input_layernorm", "attn": "attention", "ln2": "post_attention_layernorm", "mlp": "mlp"},
                     "attention", "mlp", causal=True, placement="pre",
                     out_proj={"attn": "attention.dense", "mlp": "mlp.dense_4h_to_h"}, form="parallel",
                     mlp_in=(("mlp.dense_h_to_4h",),), mlp_act=("mlp.act",)),
    "gpt_neox_seq": Arch("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head",
                         {"ln1": "input_layernorm", "attn": "attention", "ln2": "post_attention_layernorm",
                          "mlp": "mlp"}, "attention", "mlp", causal=True, placement="pre",
                         out_proj={"attn": "attention.dense", "mlp": "mlp.dense_4h_to_h"},
                         mlp_in=(("mlp.dense_h_to_4h",),), mlp_act=("mlp.act",)),
    # GPT-J: one ln_1 feeds both sublayers, x + attn(ln_1 x) + mlp(ln_1 x)
    "gptj": Arch("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head",
                 {"ln1": "ln_1", "attn": "attn", "mlp": "mlp"}, "attn", "mlp", causal=True, placement="pre",
                 out_proj={"attn": "attn.out_proj", "mlp": "mlp.fc_out"}, form="parallel",
                 mlp_in=(("mlp.fc_in",),), mlp_act=("mlp.act",)),
    # Phi-1/1.5/2: one input_layernorm feeds both sublayers
    "phi": Arch("model.layers", "model.embed_tokens", "model.final_layernorm", "lm_head",
                {"ln1": "input_layernorm", "attn": "self_attn", "mlp": "mlp"}, "self_attn", "mlp", causal=True,
                placement="pre", out_proj={"attn": "self_attn.dense", "mlp": "mlp.fc2"}, form="parallel",
                mlp_in=(("mlp.fc1",),), mlp_act=("mlp.activation_fn",)),
    # Falcon, three forms (arch_of picks by config): parallel_attn with one input_layernorm (falcon-7b);
    # new_decoder_architecture with ln_attn / ln_mlp (falcon-40b, -180b); parallel_attn=False, sequential
    "falcon": Arch("transformer.h", "transformer.word_embeddings", "transformer.ln_f", "lm_head",
                   {"ln1": "input_layernorm", "attn": "self_attention", "mlp": "mlp"}, "self_attention", "mlp",
                   causal=True, placement="pre", out_proj={"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"},
                   form="parallel", inplace_mlp_out=True, mlp_in=(("mlp.dense_h_to_4h",),), mlp_act=("mlp.act",)),
    "falcon_new": Arch("transformer.h", "transformer.word_embeddings", "transformer.ln_f", "lm_head",
                       {"ln1": "ln_attn", "attn": "self_attention", "ln2": "ln_mlp", "mlp": "mlp"}, "self_attention",
                       "mlp", causal=True, placement="pre",
                       out_proj={"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"}, form="parallel",
                       inplace_mlp_out=True, mlp_in=(("mlp.dense_h_to_4h",),), mlp_act=("mlp.act",)),
    "falcon_seq": Arch("transformer.h", "transformer.word_embeddings", "transformer.ln_f", "lm_head",
                       {"ln1": "input_layernorm", "attn": "self_attention", "ln2": "post_attention_layernorm",
                        "mlp": "mlp"}, "self_attention", "mlp", causal=True, placement="pre",
                       out_proj={"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"},
                       mlp_in=(("mlp.dense_h_to_4h",),), mlp_act=("mlp.act",)),
    # BLOOM (Pre-LN, ALiBi; word_embeddings_layernorm runs before block 0, so the stream entering it is
    # normalised). Its attention and MLP modules add the residual themselves: what each sublayer adds is the
    # output of its dense / dense_4h_to_h projection
    "bloom": Arch("transformer.h", "transformer.word_embeddings", "transformer.ln_f", "lm_head",
                  {"ln1": "input_layernorm", "attn": "self_attention", "ln2": "post_attention_layernorm",
                   "mlp": "mlp"}, "self_attention.dense", "mlp.dense_4h_to_h", causal=True, placement="pre",
                  out_proj={"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"},
                  mlp_in=(("mlp.dense_h_to_4h",),), mlp_act=("mlp.gelu_impl",)),
    # Gemma 2 / Gemma 3 text: Peri-LN ("sandwich") blocks, x + post_norm(F(pre_norm(x))) for each sublayer, and the
    # final logits soft-capped
    "gemma2": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                   {"ln1": "input_layernorm", "attn": "self_attn", "ln2": "pre_feedforward_layernorm", "mlp": "mlp",
                    "ln1_out": "post_attention_layernorm", "ln2_out": "post_feedforward_layernorm"},
                   "post_attention_layernorm", "post_feedforward_layernorm", causal=True, placement="peri",
                   out_proj={"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"},
                   logit_softcap="final_logit_softcapping", mlp_in=(("mlp.gate_proj", "mlp.up_proj"),),
                   mlp_act=("mlp.act_fn",), mlp_gated=True),
    # OLMo 2: no input norms, each sublayer's output normalised, x + Norm(F(x)); q/k norms inside attention
    "olmo2": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                  {"attn": "self_attn", "mlp": "mlp", "ln1_out": "post_attention_layernorm",
                   "ln2_out": "post_feedforward_layernorm"},
                  "post_attention_layernorm", "post_feedforward_layernorm", causal=True, placement="peri",
                  out_proj={"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}, form="output-norm", mid="mlp",
                  mlp_in=(("mlp.gate_proj", "mlp.up_proj"),), mlp_act=("mlp.act_fn",), mlp_gated=True),
    # Mixtral, Qwen3-MoE, OLMoE: Llama's paths, the MLP sublayer a sparse MoE block (mlp.gate, mlp.experts)
    "moe": Arch("model.layers", "model.embed_tokens", "model.norm", "lm_head",
                {"ln1": "input_layernorm", "attn": "self_attn", "ln2": "post_attention_layernorm", "mlp": "mlp"},
                "self_attn", "mlp", causal=True, placement="pre",
                out_proj={"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}, experts="mlp.experts",
                router="mlp.gate", dense_layers=("mlp_only_layers", "decoder_sparse_step"),
                # a dense block's MLP (qwen3_moe's mlp_only_layers); a sparse block's experts are not read as memories
                mlp_in=(("mlp.gate_proj", "mlp.up_proj"),), mlp_act=("mlp.act_fn",), mlp_gated=True),
}
# model_type (config.json) -> architecture entry. Qwen3 (q/k norms inside attention), Phi-3 (fused qkv_proj and
# gate_up_proj), Gemma (RMSNorm scaling by 1 + w, embedding scaled by sqrt(hidden) inside its embedding module) and
# OLMo 1 (non-parametric LayerNorm) have Llama's module paths and sequential Pre-LN blocks; the differences sit
# inside the modules the view names, so the "llama" entry describes them exactly.
MODEL_TYPES = {"layerlab": "layerlab", "gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
               "qwen3": "llama", "phi3": "llama", "gemma": "llama", "olmo": "llama", "opt": "opt", "bert": "bert",
               "gpt_neox": "gpt_neox", "gptj": "gptj", "phi": "phi", "falcon": "falcon", "bloom": "bloom",
               "gemma2": "gemma2", "gemma3_text": "gemma2", "olmo2": "olmo2", "mixtral": "moe", "qwen3_moe": "moe",
               "olmoe": "moe"}


def _falcon_form(config) -> str:
    if not config.parallel_attn:
        return "falcon_seq"
    if config.new_decoder_architecture and config.num_ln_in_parallel_attn in (None, 2):
        return "falcon_new"
    return "falcon"


# model_type -> the entry for this config, where one model_type has several block forms
VARIANTS = {"gpt_neox": lambda c: "gpt_neox" if c.use_parallel_residual else "gpt_neox_seq",
            "falcon": _falcon_form}


def unsupported_error(model_type) -> LayerlabError:
    """The one-line refusal of a ``model_type`` with no adapter entry that cannot be discovered either."""
    return LayerlabError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}, "
                         "or any causal LM of the installed transformers (its block structure discovered)")


def arch_of(model: nn.Module) -> str:
    """The adapter entry for ``model``, or an error listing the supported architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise unsupported_error(model_type)
    if model_type == "opt" and (not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size
                                or getattr(config, "_remove_final_layer_norm", False)):
        raise LayerlabError("this OPT variant (as OPT-350m: Post-LN blocks, do_layer_norm_before=False, or "
                            "project_in/project_out around the blocks) is not supported; only Pre-LN OPT is")
    if model_type == "bloom" and (config.apply_residual_connection_post_layernorm
                                  or (config.pretraining_tp > 1 and config.slow_but_exact)):
        raise LayerlabError("this BLOOM variant (apply_residual_connection_post_layernorm, or slow_but_exact with "
                            "pretraining_tp > 1) is not supported")
    if model_type in VARIANTS:
        return VARIANTS[model_type](config)
    return MODEL_TYPES[model_type]
