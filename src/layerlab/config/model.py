"""The model's config, :class:`ModelConfig`: the architecture of a layerlab GPT, saved in ``config.json``, and the
checks that its design choices combine (experts, recursive blocks, Mixture-of-Depths, MSG's masks)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from ..errors import LayerlabError, choices_error
from ..registry import (
    BLOCKS,
    FFN_SHARINGS,
    MLPS,
    NORMS,
    PLACEMENT_ALIASES,
    PLACEMENTS,
    WIRINGS,
    block_form_placements,
    block_placement_names,
    residual_placement_names,
)
from .fields import ALL_FIELDS, Blocks, Float, Int, _at_least_one, _Config, _split_commas

DENSE_MLPS = ("gelu", "swiglu")  # the MLPs (registry.MLPS) that are one dense MLP per block, the plain design's

# mlp moe's fields and their defaults: 8 experts, top-2 (Mixtral, Jiang et al., 2024), GELU experts as the default
# dense MLP, the balancing loss weighted 0.01 (Switch Transformers' alpha = 10^-2, Fedus et al., 2021, Sec. 2.2)
MOE_DEFAULTS = {"experts": 8, "top_k": 2, "expert_mlp": "gelu", "router_aux_coef": 0.01}


def _check_moe(cfg: ModelConfig) -> None:
    """The mixture-of-experts fields: set only with mlp moe (which fills in :data:`MOE_DEFAULTS`), in range."""
    if cfg.mlp != "moe":
        given = [f"{k}={getattr(cfg, k)!r}" for k in MOE_DEFAULTS if getattr(cfg, k) is not None]
        if given:
            raise LayerlabError(f"{', '.join(given)} set for mlp {cfg.mlp!r}; the expert fields are for mlp 'moe'")
        return
    for k, v in MOE_DEFAULTS.items():
        if getattr(cfg, k) is None:
            cfg.__dict__[k] = v  # not setattr: that would validate the model again, from inside its validation
    if cfg.experts < 2:
        raise LayerlabError(f"mlp 'moe' needs at least 2 experts, got {cfg.experts}")
    if not 1 <= cfg.top_k <= cfg.experts:
        raise LayerlabError(f"top_k must be in 1..{cfg.experts} (the experts), got {cfg.top_k}")
    if cfg.router_aux_coef < 0:
        raise LayerlabError(f"router_aux_coef must be non-negative, got {cfg.router_aux_coef}")
    if cfg.ffn_sharing != "none":
        raise LayerlabError(f"mlp 'moe' does not combine with ffn_sharing {cfg.ffn_sharing!r}")
    inner = [p for p in dict.fromkeys(cfg.block_placements()) if PLACEMENTS[p].inner_norm]
    if inner:
        raise LayerlabError(f"mlp 'moe' does not combine with placement {inner[0]!r} (a norm inside each MLP)")


def _check_loops(cfg: ModelConfig) -> None:
    """Recursive blocks (layerlab.recursive): loops divides the layers; a LoRA rank only where blocks are shared."""
    if cfg.loops < 1 or cfg.layers % cfg.loops:
        raise LayerlabError(f"loops must be a positive divisor of layers {cfg.layers}, got {cfg.loops}")
    if cfg.loop_lora_rank < 0:
        raise LayerlabError(f"loop_lora_rank must be non-negative, got {cfg.loop_lora_rank}")
    if cfg.loops == 1:
        if cfg.loop_lora_rank:
            raise LayerlabError(f"loop_lora_rank {cfg.loop_lora_rank} needs loops > 1 (blocks that share weights)")
        return
    # what the shared blocks cannot be: one FFN for every block already, experts, blocks lacking a sublayer
    other = [f"ffn_sharing {cfg.ffn_sharing!r}"] if cfg.ffn_sharing != "none" else []
    other += [f"mlp {cfg.mlp!r}"] if cfg.mlp not in DENSE_MLPS else []
    other += [f"{k} {getattr(cfg, k)}" for k in ("drop_attn", "drop_mlp") if getattr(cfg, k)]
    if other:
        raise LayerlabError(f"loops {cfg.loops} does not combine with {other[0]}")


def _check_mod(cfg: ModelConfig) -> None:
    """Mixture-of-Depths (layerlab.mod): a capacity in (0, 1]; the routed blocks add each sublayer to the residual
    stream, and the designs it is not written for are refused."""
    if not 0 < cfg.mod_capacity <= 1:
        raise LayerlabError(f"mod_capacity must be in (0, 1], got {cfg.mod_capacity}")
    routed = cfg.mod_blocks()
    if cfg.mod_capacity < 1 and not routed:
        raise LayerlabError(f"mod_capacity routes every other block (1, 3, ...); the model has {cfg.layers} layer")
    placements = cfg.block_placements()
    other = [f"wiring {cfg.wiring!r}"] if cfg.wiring != "residual" else []
    other += [f"loops {cfg.loops}"] if cfg.loops > 1 else []
    other += [f"mlp {cfg.mlp!r}"] if cfg.mlp not in DENSE_MLPS else []
    other += [f"{k} naming routed block {i}" for k in ("drop_attn", "drop_mlp") for i in getattr(cfg, k) if i in routed]
    other += [f"placement {placements[i]!r} on routed block {i}" for i in routed
              if not PLACEMENTS[placements[i]].residual_sublayers]
    if routed and other:
        raise LayerlabError(f"mod_capacity {cfg.mod_capacity} does not combine with {other[0]}")


class ModelConfig(_Config):
    """Architecture of a layerlab GPT. Saved in ``config.json`` of every model directory."""

    vocab_size: Int = 320
    context: Int = 256
    layers: Int = 4
    width: Int = 256
    heads: Int = 4
    mlp: str = "gelu"  # the MLP (layerlab.registry.MLPS): gelu, swiglu, or moe (a mixture of experts, below)
    mlp_hidden: Int | None = None  # default: 4*width for gelu, 8/3*width rounded to 64 for swiglu
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: Float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    head_bias: bool = False  # a bias on the unembedding: `convert` folds the final norm's bias into it
    dropout: Float = 0.0
    norm: str = "layernorm"
    norm_eps: Float = 1e-5
    placement: Annotated[str | list[str], BeforeValidator(_split_commas)] = "pre"
    mix_alpha: Float = 0.25
    init: Literal["standard", "scaled"] = "scaled"
    init_std: Float = 0.02
    # blocks without their attention (ln1 + attn) or MLP (ln2 + mlp) sublayer; written by `prune --unit attn|mlp`
    drop_attn: Blocks = Field(default_factory=list)
    drop_mlp: Blocks = Field(default_factory=list)
    # the block form (layerlab.registry.BLOCKS): sequential, parallel (one norm feeds both sublayers), parallel2
    block: str = "sequential"
    # the depth wiring (WIRINGS): residual, or denseformer with its DWA dilation and period (Pagliardini et al., 2024)
    wiring: str = "residual"
    denseformer_dilation: Int = 1
    denseformer_period: Int = 1
    # which blocks share an FFN (FFN_SHARINGS): none, or all (Pires et al., 2023); ffn_mult scales the FFN's
    # hidden width (mlp_hidden, or its default) for a wide shared FFN
    ffn_sharing: str = "none"
    ffn_mult: Float = 1.0
    # mlp moe (layerlab.moe): E experts, each an MLP of expert_mlp's dense hidden width (so k = 1 runs as many
    # parameters per token as the dense model), top_k of them per token, the load-balancing loss weighted by
    # router_aux_coef; None unless mlp is moe, where the defaults are 8, 2 (Mixtral), gelu and 0.01 (Switch)
    experts: Int | None = None
    top_k: Int | None = None
    expert_mlp: Literal["gelu", "swiglu"] | None = None
    router_aux_coef: Float | None = None
    # recursive blocks (layerlab.recursive; Bae et al., 2024, Relaxed Recursive Transformers): loops N > 1 runs
    # layers / N unique blocks N times (CYCLE), each block with its own LoRA of rank loop_lora_rank on shared weights
    loops: Int = 1
    loop_lora_rank: Int = 0
    # Mixture-of-Depths (layerlab.mod; Raposo et al., 2024): below 1, every other block (1, 3, ...) runs only on the
    # top mod_capacity fraction of each sequence's tokens, chosen by a router; 1.0 is off
    mod_capacity: Float = 1.0
    # MSG's masks on a grown model (layerlab.grow; Yao et al., 2023), written by `grow --method msg` and `--grow-at`:
    # the new blocks msg_blocks, and the residual coordinates >= msg_width and MLP neurons >= msg_hidden (0: no
    # width growth), all at the mask value msg_mask (0 at growth, 1 the plain model)
    msg_blocks: Blocks = Field(default_factory=list)
    msg_width: Int = 0
    msg_hidden: Int = 0
    msg_mask: Float = 1.0

    @field_validator("norm", "block", "wiring", "ffn_sharing", "mlp")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        """A name of the field's registry (the registry's one-line error for any other)."""
        registry = {"norm": NORMS, "block": BLOCKS, "wiring": WIRINGS, "ffn_sharing": FFN_SHARINGS,
                    "mlp": MLPS}[info.field_name]
        return registry.check(name)

    @field_validator("placement")
    @classmethod
    def _known_placement(cls, placement: str | list[str]) -> str | list[str]:
        if isinstance(placement, str):
            placement = PLACEMENT_ALIASES.get(placement, placement)
            if placement not in PLACEMENTS:
                raise choices_error("placement", placement, [*PLACEMENTS, *PLACEMENT_ALIASES])
            return placement
        placement = [PLACEMENT_ALIASES.get(p, p) for p in placement]
        for p in placement:
            if p not in block_placement_names():
                raise choices_error("placement in the per-block schedule", p, block_placement_names())
        return placement

    @field_validator("drop_attn", "drop_mlp")
    @classmethod
    def _sorted_blocks(cls, blocks: list[int]) -> list[int]:
        return sorted(set(blocks))

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if isinstance(self.placement, list) and len(self.placement) != self.layers:
            raise LayerlabError(
                f"placement schedule has {len(self.placement)} entries but the model has {self.layers} layers"
            )
        _at_least_one(type(self), self, ("context", "layers", "width", "heads", "vocab_size"))
        if self.width % self.heads:
            raise LayerlabError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.positions == "rope" and (self.width // self.heads) % 2:
            raise LayerlabError(f"rope needs an even head dimension, got {self.width // self.heads}")
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise LayerlabError(f"mix_alpha must be in [0, 1], got {self.mix_alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LayerlabError(f"dropout must be in [0, 1), got {self.dropout}")
        placements = self.block_placements()
        form = BLOCKS[self.block]
        schedule = PLACEMENTS[self.placement].schedule if isinstance(self.placement, str) else None
        # a schedule is checked by every placement it can give (mix: post and pre), whatever its alpha here
        possible = [*schedule(self.layers, 1.0), *schedule(self.layers, 0.0)] if schedule else placements
        for p in dict.fromkeys(possible):
            if form.forward_for(PLACEMENTS[p]) is None:
                named = self.placement if isinstance(self.placement, str) else p  # mix names its schedule
                raise LayerlabError(f"block {self.block!r} does not combine with placement {named!r}; it combines "
                                    f"with {', '.join(block_form_placements(self.block))}")
        _at_least_one(type(self), self, ("denseformer_dilation", "denseformer_period"))
        if not self.ffn_mult > 0:
            raise LayerlabError(f"ffn_mult must be positive, got {self.ffn_mult}")
        _check_moe(self)
        _check_loops(self)
        _check_mod(self)
        if any(not 0 <= i < self.layers for i in self.msg_blocks) or not 0 <= self.msg_mask <= 1 or (
                self.msg_width and not (0 < self.msg_width < self.width and self.msg_width % self.head_dim == 0
                                        and 0 < self.msg_hidden <= self.hidden)):
            raise LayerlabError(f"bad MSG masks: msg_blocks {self.msg_blocks}, msg_width {self.msg_width}, msg_hidden "
                                f"{self.msg_hidden}, msg_mask {self.msg_mask} for {self.layers} blocks of width "
                                f"{self.width}")
        for name in ("drop_attn", "drop_mlp"):
            for i in getattr(self, name):
                if not 0 <= i < self.layers:
                    raise LayerlabError(f"{name} names block {i}, but the model has blocks 0..{self.layers - 1}")
                if not PLACEMENTS[placements[i]].residual_sublayers:
                    raise LayerlabError(f"{name}: block {i} is {placements[i]}; only "
                                        f"{', '.join(residual_placement_names())} blocks can lack a sublayer")
        if len(self.drop_attn) >= self.layers:  # the KV cache, and so generation, needs one attention layer
            raise LayerlabError("drop_attn names every block; at least one block must keep its attention")
        return self

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        """Width of the MLP's inner layer: ``mlp_hidden``, or the default below, times ``ffn_mult`` (rounded)."""
        if self.mlp_hidden:
            base = self.mlp_hidden
        elif (self.expert_mlp if self.mlp == "moe" else self.mlp) == "swiglu":
            # 2/3 of 4d keeps SwiGLU's parameters equal to GELU's (Shazeer, 2020); a moe expert: its activation's
            base = -(-int(8 * self.width / 3) // 64) * 64
        else:
            base = 4 * self.width
        return max(1, round(base * self.ffn_mult))

    def block_placements(self) -> list[str]:
        """The placement of each block: a per-block list as given, a schedule (mix) resolved, else the same one."""
        if isinstance(self.placement, list):
            return list(self.placement)
        schedule = PLACEMENTS[self.placement].schedule
        return schedule(self.layers, self.mix_alpha) if schedule else [self.placement] * self.layers

    def mod_blocks(self) -> list[int]:
        """The blocks Mixture-of-Depths routes: every other one, 1, 3, ..., where mod_capacity < 1 (the paper routes
        every other block; block 0 runs on every token)."""
        return list(range(1, self.layers, 2)) if self.mod_capacity < 1 else []

    def has_final_norm(self) -> bool:
        """Whether the model ends with a norm before the head: Post-LN's last block already ends in one."""
        return PLACEMENTS[self.block_placements()[-1]].final_norm


MODEL_FIELDS = dict(ModelConfig.model_fields)
ALL_FIELDS.update(MODEL_FIELDS)
# ModelConfig fields whose names transformers reserves in a model config, stored in config.json under another name:
# top_k (mlp moe's experts per token) is a generation parameter, which PreTrainedConfig drops from its keyword
# arguments and refuses to save
HF_RENAMED = {"top_k": "moe_top_k"}
