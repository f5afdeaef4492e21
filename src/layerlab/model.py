"""The layerlab GPT: any registered norm in any placement, as a Hugging Face causal LM.

Shapes: B batch, T query positions, S key positions (T + cached), C width, H heads,
D head dim (C // H), F MLP hidden, V vocabulary.

The module names are the adapter's names, so no adapter is needed for our own model:
``embed``, ``pos`` (learned positions), ``blocks[i].{ln1, attn, ln2, mlp}``, ``ln_f``, ``lm_head``.
Placements add ``ln1_out``/``ln2_out`` (peri) or ``attn.inner_norm``/``mlp.inner_norm`` (sandwich).
A block named in ``drop_attn`` (``drop_mlp``) has ``ln1``, ``attn`` (``ln2``, ``mlp``) and its output norm set to None.
A parallel block (``block: parallel``) has no ``ln2``: ``ln1`` feeds both sublayers. With ``wiring: denseformer`` each
block ends with ``dwa`` (:class:`DepthWeightedAverage`). With ``ffn_sharing: all`` the one FFN is ``shared_ffn[0]`` and
every block's ``mlp`` is a :class:`SharedMLP` that calls it. With ``mlp: moe`` a block's ``mlp`` is
:class:`layerlab.moe.MoEMLP` (``mlp.gate``, ``mlp.experts``); with ``loops`` > 1 its linears are
:class:`layerlab.recursive.LoopLinear` over the weights stored once in ``loop_shared``; a block that Mixture-of-Depths
routes (``mod_capacity`` < 1) has ``mod_router`` (:class:`layerlab.mod.DepthRouter`); a grown model under MSG's masks
carries :mod:`layerlab.msg`'s hooks.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import DENSE_MLPS, HF_RENAMED, MODEL_FIELDS, ModelConfig
from .errors import LayerlabError
from .norms import build_norm, lns_scale
from .packed import register_quantizer
from .registry import BLOCKS, FFN_SHARINGS, MLPS, PLACEMENTS, WIRINGS

KNOWN_CACHE_NAMES = ("past_key_values", "cache")


def cache_convention() -> str:
    """The name under which the installed transformers passes the KV cache to ``forward`` and returns it.

    transformers up to 5.23 says ``past_key_values``; 5.24 renamed it ``cache`` in ``generate`` and in
    every output class (the old name still works there, with a deprecation warning). layerlab's forward
    accepts both, and returns the cache under this name so that ``generate`` finds it. An unknown
    convention is an error here, not garbage from ``generate`` later.
    """
    out_fields = {f.name for f in fields(CausalLMOutputWithPast)}
    gen_params = set(inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters)
    for name in reversed(KNOWN_CACHE_NAMES):  # the newer name first
        if name in out_fields and name in gen_params:
            return name
    raise LayerlabError(
        f"transformers {transformers.__version__} passes the KV cache in a way layerlab does not know "
        f"(output fields {sorted(out_fields & {'cache', 'past_key_values', 'cache_params'})}, generate's "
        f"parameters {sorted(gen_params & {'cache', 'past_key_values', 'cache_params'})}); install a version "
        "within the range in pyproject.toml (see docs/install.md)"
    )


CACHE_NAME = cache_convention()


def output_cache(output) -> Cache | None:
    """The KV cache of a model output, under whichever name the installed transformers uses."""
    return output.get(CACHE_NAME)


@dataclass
class LayerlabOutput(CausalLMOutputWithPast):
    """A causal-LM output with the design's auxiliary training loss: the sum of every module's ``aux_loss`` set in
    this forward (a mixture-of-experts router's load-balancing loss, a Mixture-of-Depths predictor's loss), already
    weighted; None where no module set one. ``loss`` stays the plain cross-entropy; training adds ``aux_loss``."""

    aux_loss: torch.FloatTensor | None = None


class LayerlabConfig(PreTrainedConfig):
    """Hugging Face view of :class:`~layerlab.config.ModelConfig` (the fields are stored as-is, but
    :data:`HF_RENAMED`)."""

    model_type = "layerlab"
    attribute_map = {
        "num_hidden_layers": "layers",
        "hidden_size": "width",
        "num_attention_heads": "heads",
        "max_position_embeddings": "context",
    }

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> LayerlabConfig:
        fields = {HF_RENAMED.get(k, k): v for k, v in cfg.to_dict().items()}
        return cls(**fields, tie_word_embeddings=cfg.tie_embeddings)

    def to_model_config(self) -> ModelConfig:
        names = {k: HF_RENAMED.get(k, k) for k in MODEL_FIELDS}
        return ModelConfig(**{k: getattr(self, name) for k, name in names.items() if hasattr(self, name)})


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for rotate-half RoPE (Su et al., 2021; GPT-NeoX/Llama layout): angle p * theta^(-2i/D) at
    position p for the pair (i, i + D/2).

    ``positions`` of shape (T,), shared by every sequence, gives (T, D). Shape (B, T), one row per sequence
    (left padding starts each row's positions at its first real token), gives (B, 1, T, D), which broadcasts
    over the heads of (B, H, T, D) queries and keys.
    """
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    ang = positions.float()[..., None] * inv  # (..., T, D/2)
    ang = torch.cat([ang, ang], dim=-1)  # (..., T, D)
    if positions.dim() == 2:
        ang = ang[:, None]  # (B, 1, T, D)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D) or (B, 1, T, D), from :func:`rope_cos_sin`."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, inner_norm: bool):
        super().__init__()
        self.layer_idx, self.heads, self.dropout = layer_idx, cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
        self.proj.residual_out = True  # depth-scaled init applies here
        self.inner_norm = build_norm(cfg.norm, cfg.width, eps=cfg.norm_eps) if inner_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, cache: Cache | None = None, mask=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        if self.inner_norm is not None:  # Sub-LN: norm before the output projection
            y = self.inner_norm(y)
        return self.drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, inner_norm: bool):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        hidden = cfg.hidden
        self.fc = nn.Linear(cfg.width, (2 if self.gated else 1) * hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.width, bias=cfg.bias)
        self.proj.residual_out = True
        self.inner_norm = build_norm(cfg.norm, hidden, eps=cfg.norm_eps) if inner_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.fc(x)  # (B, T, F) or (B, T, 2F)
        if self.gated:  # SwiGLU (Shazeer, 2020)
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:  # tanh-approximated GELU, as GPT-2
            h = F.gelu(h, approximate="tanh")
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        return self.drop(self.proj(h))


# ---------------------------------------------------------------- placements
# Each placement is the forward of one block; ``attn_kw`` carries rope, cache and mask.


def _pre(b: Block, x, attn_kw):
    """x = x + F(s * Norm(x)); s = 1/sqrt(l) for LNS, else 1. A sublayer the block lacks adds nothing."""
    if b.attn is not None:
        x = x + b.attn(b.ln1(x) * b.scale if b.scale != 1.0 else b.ln1(x), **attn_kw)
    if b.mlp is not None:
        x = x + b.mlp(b.ln2(x) * b.scale if b.scale != 1.0 else b.ln2(x))
    return x


def _post(b: Block, x, attn_kw):
    """x = Norm(x + F(x))."""
    x = b.ln1(x + b.attn(x, **attn_kw))
    return b.ln2(x + b.mlp(x))


def _peri(b: Block, x, attn_kw):
    """x = x + Norm_out(F(Norm_in(x)))."""
    if b.attn is not None:
        x = x + b.ln1_out(b.attn(b.ln1(x), **attn_kw))
    if b.mlp is not None:
        x = x + b.ln2_out(b.mlp(b.ln2(x)))
    return x


def _scaled(b: Block, h):
    return h * b.scale if b.scale != 1.0 else h


def _parallel(b: Block, x, attn_kw):
    """x + Attn(s * Norm1(x)) + MLP(s * Norm2(x)), both sublayers reading the block's input (GPT-J, Wang &
    Komatsuzaki, 2021; PaLM, Chowdhery et al., 2022, Sec. 2); Norm2 is Norm1 where the form shares one norm."""
    out = x
    h1 = _scaled(b, b.ln1(x)) if b.ln1 is not None else None
    if b.attn is not None:
        out = out + b.attn(h1, **attn_kw)
    if b.mlp is not None:
        out = out + b.mlp(h1 if b.ln2 is None else _scaled(b, b.ln2(x)))
    return out


def _parallel_peri(b: Block, x, attn_kw):
    """x + Norm1_out(Attn(Norm1(x))) + Norm2_out(MLP(Norm2(x))): Peri-LN's output norms on a parallel block."""
    out = x
    h1 = b.ln1(x) if b.ln1 is not None else None
    if b.attn is not None:
        out = out + b.ln1_out(b.attn(h1, **attn_kw))
    if b.mlp is not None:
        out = out + b.ln2_out(b.mlp(h1 if b.ln2 is None else b.ln2(x)))
    return out


# The forwards that placements name (layerlab.registry.PLACEMENTS says which placement uses which, and what
# else each needs: output norms, inner norms, the LNS scale), and those the block forms put in their place
# (layerlab.registry.BLOCKS). A placement or form may also carry its own function.
FORWARDS: dict[str, Callable] = {"pre": _pre, "post": _post, "peri": _peri, "parallel": _parallel,
                                 "parallel_peri": _parallel_peri}


class DepthWeightedAverage(nn.Module):
    """DenseFormer's DWA after block i (Pagliardini et al., 2024, "DenseFormer: Enhancing Information Flow in
    Transformers via Depth Weighted Averaging", Sec. 3): with X_0 the embedding and X_k the output of block k - 1,
    the stream entering block i + 1 is Y_{i+1} = sum_j alpha_{i,j} X_j, over j in 0..i+1 with j = i+1 (mod the
    dilation), initialised to the identity (alpha_{i,i+1} = 1, the others 0). With a period p, only blocks i with
    (i + 1) % p == 0 average; the others pass X_{i+1} on (and record it). Definitions as in the paper's code
    (epfml/DenseFormer, ``denseformer/denseformer.py``: DWAModules).

    The average mixes the states of the same positions only, so it needs nothing from the KV cache. ``history``
    maps k to X_k for the current forward; a block records its own output there the first time it runs in a
    forward, so that analyze's layer removal, which runs a block again on other streams, neither overwrites it
    nor loses its own term (that stream's output is used for alpha_{i,i+1}, the model's X_j for the others).
    """

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        k, d = index + 1, cfg.denseformer_dilation
        self.index = index
        self.sources = list(range(k % d, k, d))  # the earlier X_j that this average reads
        if k % cfg.denseformer_period:
            self.alpha = None
        else:
            alpha = torch.zeros(len(self.sources) + 1)
            alpha[-1] = 1.0  # the identity: Y_{i+1} = X_{i+1}
            self.alpha = nn.Parameter(alpha)

    def forward(self, out: torch.Tensor, history: dict[int, torch.Tensor]) -> torch.Tensor:
        history.setdefault(self.index + 1, out)
        if self.alpha is None:
            return out
        y = self.alpha[-1] * out
        for a, j in zip(self.alpha[:-1], self.sources, strict=True):
            y = y + a * history[j]
        return y

    def extra_repr(self) -> str:
        return f"sources={[*self.sources, self.index + 1] if self.alpha is not None else 'none'}"


MIXERS: dict[str, type[nn.Module]] = {"DepthWeightedAverage": DepthWeightedAverage}  # WIRINGS' mixers by name


class SharedMLP(nn.Module):
    """Block i's view of an FFN that several blocks run (``ffn_sharing``; Pires et al., 2023, One Wide Feedforward
    is All You Need). The FFN is registered once, in the model's ``shared_ffn``, and held here unregistered, so
    that its weights are stored once (the state dict and the safetensors file have one copy) while hooks on
    ``blocks[i].mlp`` see block i's call only. ``fc``, ``proj`` and ``inner_norm`` are the shared FFN's (hooks
    on them fire for every block that runs it)."""

    def __init__(self, ffn: MLP):
        super().__init__()
        object.__setattr__(self, "ffn", ffn)

    def forward(self, x):
        return self.ffn(x)

    @property
    def fc(self) -> nn.Linear:
        return self.ffn.fc

    @property
    def proj(self) -> nn.Linear:
        return self.ffn.proj

    @property
    def inner_norm(self) -> nn.Module | None:
        return self.ffn.inner_norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, placement: str, shared_mlp: MLP | None = None):
        """``shared_mlp``: the FFN this block runs where several blocks share one (else it builds its own)."""
        super().__init__()
        p, form = PLACEMENTS[placement], BLOCKS[cfg.block]
        self.index, self.placement, self.form = index, placement, form.form
        self.scale = lns_scale(index + 1) if p.depth_scale else 1.0
        # A block listed in cfg.drop_attn / drop_mlp has no modules at all for that sublayer (None).
        has_attn, has_mlp = index not in cfg.drop_attn, index not in cfg.drop_mlp
        norm = lambda: build_norm(cfg.norm, cfg.width, eps=cfg.norm_eps)  # noqa: E731
        # The KV cache is indexed by attention layer, not block, so that cache layer 0, which generate()
        # reads for the past length, holds keys even when block 0 has no attention.
        cache_index = index - sum(j < index for j in cfg.drop_attn)
        # a form that shares one input norm keeps ln1 for whichever sublayer the block has, and has no ln2
        self.ln1 = norm() if has_attn or (form.shared_norm and has_mlp) else None
        self.attn = Attention(cfg, cache_index, inner_norm=p.inner_norm) if has_attn else None
        self.ln2 = norm() if has_mlp and not form.shared_norm else None
        if not has_mlp:
            self.mlp = None
        else:
            self.mlp = MLPS[cfg.mlp](cfg, inner_norm=p.inner_norm) if shared_mlp is None else SharedMLP(shared_mlp)
        if p.out_norms:
            self.ln1_out = norm() if has_attn else None
            self.ln2_out = norm() if has_mlp else None
        mixer = WIRINGS[cfg.wiring].mixer
        self.dwa = MIXERS[mixer](cfg, index) if mixer is not None else None
        forward = form.forward_for(p)
        self._forward = forward if callable(forward) else FORWARDS[forward]
        self.mod_router = None  # Mixture-of-Depths (layerlab.mod): a routed block runs on the tokens its router picks
        if index in cfg.mod_blocks():
            from .mod import DepthRouter

            self.mod_router = DepthRouter(cfg)
        if p.init_gain is not None:  # Magneto: the value and output projections and the FFN take the gain
            gain = p.init_gain(cfg.layers)
            if self.attn is not None:  # the output projection, and the value rows of the fused qkv
                self.attn.proj.init_gain = gain
                self.attn.qkv.init_gain, self.attn.qkv.gain_rows = gain, (2 * cfg.width, 3 * cfg.width)
            if self.mlp is not None:
                self.mlp.fc.init_gain = self.mlp.proj.init_gain = gain

    def forward(self, x, rope=None, cache=None, mask=None, history=None):
        """``history``: the depth wiring's record of this forward's block outputs (DenseFormer), else unused."""
        if self.mod_router is not None:
            out = self.mod_router.route(self, x, rope, cache, mask)
        else:
            out = self._forward(self, x, {"rope": rope, "cache": cache, "mask": mask})
        return out if self.dwa is None else self.dwa(out, history)

    def extra_repr(self) -> str:
        return f"placement={self.placement}, form={self.form}, scale={self.scale:.4g}"


class LayerlabForCausalLM(PreTrainedModel, GenerationMixin):
    """A GPT whose every block has a configurable norm and placement."""

    config_class = LayerlabConfig
    base_model_prefix = "layerlab"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: LayerlabConfig):
        super().__init__(config)
        cfg = config.to_model_config()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        placements = cfg.block_placements()
        groups = FFN_SHARINGS[cfg.ffn_sharing].groups(cfg.layers)  # block -> its FFN
        shared = [g for g in dict.fromkeys(groups) if groups.count(g) > 1]
        if shared:  # an FFN that several blocks run is stored once; inner norms as its first block's placement
            self.shared_ffn = nn.ModuleList(
                MLP(cfg, inner_norm=PLACEMENTS[placements[groups.index(g)]].inner_norm) for g in shared)
        ffn_of = {g: self.shared_ffn[n] for n, g in enumerate(shared)}
        self.blocks = nn.ModuleList(Block(cfg, i, p, shared_mlp=ffn_of.get(groups[i]))
                                    for i, p in enumerate(placements))
        if cfg.loops > 1:  # recursive blocks: each shared linear stored once, in loop_shared (layerlab.recursive)
            from .recursive import share_loops

            self.loop_shared = share_loops(self.blocks, cfg)
        self.ln_f = build_norm(cfg.norm if cfg.has_final_norm() else "none", cfg.width, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=cfg.head_bias)
        self.post_init()
        if cfg.msg_blocks or cfg.msg_width:  # MSG's masks on a grown model (layerlab.msg)
            from .msg import install_masks

            install_masks(self)
        # the modules with an auxiliary training loss (a MoE router's balancing loss, a MoD predictor's), found once:
        # walking the module tree in every forward cost ~10% of a one-token decoding step of a 12-block model
        self._aux_modules = [m for m in self.modules() if hasattr(m, "aux_loss")]

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std); output projections N(0, init_std/sqrt(2L)) when init is 'scaled'.

        The depth scaling is GPT-2's (Radford et al., 2019). LNS turns it off, as the Curse of
        Depth paper prescribes. A placement with an init gain (Sub-LN: Magneto's gamma = sqrt(log 2L),
        Wang et al., 2022, Foundation Transformers) replaces it, when init is 'scaled': the attention's
        value and output projections and the FFN's weights are N(0, gamma * init_std), the query and key
        rows N(0, init_std). Norms and DenseFormer's weights initialise themselves in their constructors.
        """
        cfg = self.config.to_model_config() if not hasattr(self, "cfg") else self.cfg
        std = cfg.init_std
        scaled = cfg.init == "scaled" and not any(PLACEMENTS[p].depth_scale for p in cfg.block_placements())
        if isinstance(module, nn.Linear):
            gain = getattr(module, "init_gain", None) if cfg.init == "scaled" else None
            s = std / math.sqrt(2 * cfg.layers) if scaled and getattr(module, "residual_out", False) else std
            if gain is not None:
                s = std * gain if not hasattr(module, "gain_rows") else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
            if gain is not None and hasattr(module, "gain_rows"):
                with torch.no_grad():
                    module.weight[slice(*module.gain_rows)].mul_(gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> LayerlabOutput:
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            raise ValueError("pass the KV cache as either `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values  # generate() names it per CACHE_NAME
        use_cache = use_cache or cache is not None  # a cache passed in is updated and returned
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0)  # (1, T)
        if past + T > self.cfg.context and self.pos is not None:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context of {self.cfg.context}")
        rope = None
        if self.pos is not None:
            x = x + self.pos(position_ids)
        else:
            # one row of positions when every sequence shares it (the common case: (T, D) tables); else per
            # row, as generate() passes for a left-padded batch, whose rows start at different offsets
            shared = position_ids.dim() == 1 or position_ids.size(0) == 1
            rope = rope_cos_sin(position_ids.reshape(-1) if shared else position_ids, self.cfg.head_dim,
                                self.cfg.rope_theta)
        x = self.drop(x)
        mask = self._mask(attention_mask, B, T, past, x.device)

        hidden = [] if output_hidden_states else None
        # a module with an auxiliary loss (attribute ``aux_loss``) sets it during this forward; stale ones are cleared
        for m in self._aux_modules:
            m.aux_loss = None
        history = {0: x}  # the block outputs of this forward, for a depth wiring that reads them (DenseFormer)
        for block in self.blocks:
            if hidden is not None:
                hidden.append(x)
            x = block(x, rope=rope, cache=cache, mask=mask, history=history)
        x = self.ln_f(x)
        if hidden is not None:  # as Hugging Face GPT-2: the last entry is after the final norm
            hidden.append(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)  # (B, T, V)

        loss = None
        if labels is not None:  # Hugging Face convention: labels are inputs, shifted here
            flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
            loss = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100)
        aux = [m.aux_loss for m in self._aux_modules if m.aux_loss is not None]
        return LayerlabOutput(
            loss=loss, logits=logits, hidden_states=tuple(hidden) if hidden is not None else None,
            aux_loss=torch.stack([a.float() for a in aux]).sum() if aux else None,
            **{CACHE_NAME: cache if use_cache else None},
        )

    @staticmethod
    def _mask(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor | None:
        """None where plain causal attention is right; else a (B, 1, T, S) boolean mask."""
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (past == 0 or T == 1):
            return None
        S = past + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, S)
        mask = causal[None, None].expand(B, 1, T, S)
        if padded:
            mask = mask & attention_mask[:, None, None, -S:].bool()
            # a fully masked row (left padding) would give NaN: let it attend to itself
            mask = mask | torch.eye(T, S, dtype=torch.bool, device=device).roll(past, dims=1)[None, None]
        return mask


def build_model(cfg: ModelConfig) -> LayerlabForCausalLM:
    """A freshly initialised model for ``cfg``."""
    return LayerlabForCausalLM(LayerlabConfig.from_model_config(cfg))


def carry_ids(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` the special token ids and generation defaults of ``src``."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(dst.config, key, getattr(src.config, key, None))
    if getattr(src, "generation_config", None) is not None:
        dst.generation_config = copy.deepcopy(src.generation_config)
    return dst


def rebuild(model: LayerlabForCausalLM, state: dict[str, torch.Tensor], **changes) -> LayerlabForCausalLM:
    """A new layerlab model with ``model``'s config and ``changes`` (``tie_embeddings`` False unless a change
    says otherwise), exactly the weights in ``state``, ``model``'s token ids, on its device, in eval mode.

    A linear that gained a bias (``bias`` turned on to hold a folded shift) starts at zero; any other weight
    missing from ``state``, or one with no place in the new model, is an error."""
    cfg = ModelConfig(**{**model.cfg.to_dict(), "tie_embeddings": False, **changes})  # validated anew
    new = build_model(cfg)
    want = set(new.state_dict())
    extra = {k: v for k, v in state.items() if k not in want}
    for key in want - set(state):
        if not key.endswith(".bias"):
            raise RuntimeError(f"no weight for {key}")
        state[key] = torch.zeros_like(new.state_dict()[key])
    if extra:
        raise RuntimeError(f"weights with no place in the rebuilt model: {sorted(extra)[:4]}")
    new.load_state_dict(state, strict=True)
    return carry_ids(model, new).to(next(model.parameters()).device).eval()


def load_weights_into(model: LayerlabForCausalLM, weights: dict[str, torch.Tensor], misfit: str) -> None:
    """Load a state dict into a built model: every parameter given but the tied head, nothing extra, or a one-line
    error ``"{misfit}: missing [...], extra [...]"``; the head is tied again where the config ties it."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in model.all_tied_weights_keys]
    if missing or unexpected:
        raise LayerlabError(f"{misfit}: missing {missing}, extra {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()


# The block designs (layerlab.registry BLOCKS, WIRINGS, FFN_SHARINGS) that the compressors and export are written
# for; a model of another design is refused by them until they are taught it (each would edit it wrongly: a pruned
# DenseFormer's averages, one shared FFN quantized per block, a parallel block's norm folded into one sublayer).
PLAIN_DESIGN = {"block": "sequential", "wiring": "residual", "ffn_sharing": "none", "loops": 1,
                "mod_capacity": 1.0, "mlp": DENSE_MLPS,  # a tuple: any of these is plain
                "msg_blocks": [], "msg_width": 0}  # a grown model under MSG's masks (layerlab.grow)


def unplain_fields(cfg: ModelConfig) -> list[str]:
    """The design fields of ``cfg`` that are not plain (:data:`PLAIN_DESIGN`)."""
    return [k for k, v in PLAIN_DESIGN.items() if getattr(cfg, k) not in (v if isinstance(v, tuple) else (v,))]


def design_note(cfg: ModelConfig) -> str:
    """``", block parallel, wiring denseformer"``: the design fields that differ from the plain design's, for a
    summary line."""
    changed = unplain_fields(cfg)
    return "".join(f", {k.replace('_', ' ')} {getattr(cfg, k)}" for k in changed)


def refuse_design(model: nn.Module, command: str) -> None:
    """A one-line error where ``model`` is a layerlab model of a design ``command`` does not handle yet."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, LayerlabForCausalLM) or cfg is None:
        return
    other = [f"{k}={getattr(cfg, k)!r}" for k in unplain_fields(cfg)]
    if other:
        raise LayerlabError(f"{command} handles layerlab models of the plain design "
                            f"({', '.join(f'{k}={v!r}' for k, v in PLAIN_DESIGN.items())}); this one has "
                            f"{', '.join(other)}")


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameter count; tied weights counted once."""
    seen = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in seen.values())
    if exclude_embeddings and isinstance(model, LayerlabForCausalLM):
        n -= model.embed.weight.numel() + (model.pos.weight.numel() if model.pos is not None else 0)
    return n


# After ``import layerlab``, the Auto classes load layerlab model directories and the directories that
# ``layerlab quantize`` writes: importing this module registers both (the package imports it as soon as
# transformers is imported).
AutoConfig.register(LayerlabConfig.model_type, LayerlabConfig, exist_ok=True)
AutoModelForCausalLM.register(LayerlabConfig, LayerlabForCausalLM, exist_ok=True)
register_quantizer()
