"""Typed configs: the model (:class:`ModelConfig`) and the training run (:class:`TrainConfig`), as pydantic models.

Their field names form one flat namespace, so a YAML file, a preset and ``--field value`` on the command line all set
fields the same way. An optimizer's own settings nest under its name (``tc.llr.every``); in the flat namespace they
are ``llr_every`` (also ``llr.every``, or ``llr: {every: 5}`` in YAML), the names earlier versions kept flat in
:class:`TrainConfig`, which its constructor still takes. pydantic checks the types and the validators below the
ranges and names; every error reaches the user as a one-line :class:`~layerlab.errors.LayerlabError`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import LayerlabError, choices_error, close_match
from .registry import (
    BLOCKS,
    FFN_SHARINGS,
    MLPS,
    NORMS,
    OPTIMIZERS,
    PLACEMENT_ALIASES,
    PLACEMENTS,
    WIRINGS,
    block_form_placements,
    block_placement_names,
    residual_placement_names,
)

# Names other tools (Hugging Face, nanoGPT) give some fields: only for "did you mean", never accepted as fields.
FIELD_SYNONYMS = {
    "learning_rate": "lr", "n_layer": "layers", "n_layers": "layers", "num_layers": "layers",
    "num_hidden_layers": "layers", "n_head": "heads", "n_heads": "heads", "num_heads": "heads",
    "num_attention_heads": "heads", "d_model": "width", "n_embd": "width", "hidden_size": "width",
    "block_size": "context", "max_seq_len": "context", "seq_len": "context", "max_steps": "steps",
    "warmup_steps": "warmup", "wd": "weight_decay", "clip_grad": "grad_clip", "max_grad_norm": "grad_clip",
}


def unknown_name_error(what: str, name: object, valid: Iterable[str], source: str | None = None,
                       listing: str = "valid", hint: str = "") -> LayerlabError:
    """``unknown <what> 'x' in <source>; did you mean 'y'?``, or the valid names when none is close.

    ``hint`` follows the list of valid names (it says where else the name might belong).
    """
    valid = list(valid)
    where = f" in {source}" if source else ""
    if (close := close_match(name, valid)) is not None:
        return LayerlabError(f"unknown {what} {name!r}{where}; did you mean {close!r}?")
    return LayerlabError(f"unknown {what} {name!r}{where}; {listing}: {', '.join(valid)}{hint}")


def _split_commas(value: Any) -> Any:
    """``"pre,post"`` is a per-block list."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) and "," in value else value


def _as_list(value: Any) -> Any:
    """``"1,2"`` and ``1`` (``--drop-attn 1``) are lists of blocks."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


def _not_bool(value: Any) -> Any:
    """A number field takes no true/false: pydantic would read them as 1 and 0."""
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Blocks = Annotated[list[Int], BeforeValidator(_as_list)]


class _Config(BaseModel):
    """The shared behaviour: unknown fields refused, assignments checked, errors as one-line LayerlabErrors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
    _prefix: ClassVar[str] = ""  # the flat-namespace prefix of a nested settings group ("llr_")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _one_line(e, self._prefix, data) from None

    def __setattr__(self, name: str, value: Any) -> None:
        before = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except (ValidationError, LayerlabError) as e:
            if name in self.__dict__:  # a model check that fails runs after pydantic has set the value: undo it
                self.__dict__[name] = before
            raise (_one_line(e, self._prefix, {name: value}) if isinstance(e, ValidationError) else e) from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-able values (nested settings as mappings): what ``layerlab.json`` saves."""
        return self.model_dump()


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


def _at_least_one(cls: type[_Config], values: _Config, names: Iterable[str]) -> None:
    for name in names:
        if getattr(values, name) < 1:
            raise LayerlabError(f"{cls._prefix}{name} must be at least 1, got {getattr(values, name)}")


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


def _check_range(cls: type[_Config], lo: str, hi: str, values: _Config) -> None:
    if not 0 < getattr(values, lo) <= getattr(values, hi):
        p = cls._prefix
        raise LayerlabError(f"need 0 < {p}{lo} <= {p}{hi}, got {getattr(values, lo)} and {getattr(values, hi)}")


class LLRSettings(_Config):
    """llr: every ``every`` steps, until ``until`` of the run, map each block's ESD alpha linearly into
    [s_min, s_max] x lr, reached over ``ramp`` steps (He et al., LLR; range and ``until`` from its 130M config,
    which recomputes every 40 steps with a 20-step ramp: halved here for short runs)."""

    _prefix: ClassVar[str] = "llr_"
    every: Int = 20
    ramp: Int = 10
    until: Float = 0.2
    s_min: Float = 1.0
    s_max: Float = 3.0

    @model_validator(mode="after")
    def _ranges(self) -> LLRSettings:
        _at_least_one(type(self), self, ("every",))
        if self.ramp < 0:
            raise LayerlabError(f"llr_ramp must be non-negative, got {self.ramp}")
        if not 0.0 <= self.until <= 1.0:
            raise LayerlabError(f"llr_until must be in [0, 1], got {self.until}")
        _check_range(type(self), "s_min", "s_max", self)
        return self


class NoiseSettings(_Config):
    """noise: per-block LR multiplier from a gradient signal-to-noise estimate, clipped to [s_min, s_max]."""

    _prefix: ClassVar[str] = "noise_"
    s_min: Float = 0.5
    s_max: Float = 2.0

    @model_validator(mode="after")
    def _ranges(self) -> NoiseSettings:
        _check_range(type(self), "s_min", "s_max", self)
        return self


class LISASettings(_Config):
    """lisa: every ``every`` steps train the embeddings, the head and ``layers`` randomly chosen blocks (Pan et al.)."""

    _prefix: ClassVar[str] = "lisa_"
    every: Int = 20
    layers: Int = 1

    @model_validator(mode="after")
    def _ranges(self) -> LISASettings:
        _at_least_one(type(self), self, ("every", "layers"))
        return self


@dataclasses.dataclass(frozen=True)
class GrowSpec:
    """One growth (layerlab.grow): ``layers`` "2x" (a multiple) or "12" (a depth), ``width``; None keeps it."""

    layers: str | None = None
    width: int | None = None

    def __str__(self) -> str:
        return "+".join([f"layers={self.layers}"] * bool(self.layers) + [f"width={self.width}"] * bool(self.width))


def parse_grow_spec(text: str) -> GrowSpec:
    """``layers=2x``, ``layers=12``, ``width=128``, or two of them joined by ``+`` (``layers=2x+width=128``)."""
    found: dict[str, str] = {}
    for part in str(text).strip().split("+"):
        m = re.fullmatch(r"(layers)=(\d+x|\d+)|(width)=(\d+)", part.strip())
        if m is None:
            raise LayerlabError(f"bad growth spec {text!r}: expected layers=2x, layers=N, width=N, or two of them "
                                "joined by + (layers=2x+width=128)")
        found[m.group(1) or m.group(3)] = m.group(2) or m.group(4)
    return GrowSpec(found.get("layers"), int(found["width"]) if "width" in found else None)


def parse_grow_schedule(text: str, steps: int) -> tuple[tuple[int, GrowSpec], ...]:
    """``STEP:SPEC,...`` (``100:layers=2x,200:width=128``): each growth before step STEP's update, STEP in
    1..steps-1 and increasing."""
    out: list[tuple[int, GrowSpec]] = []
    for entry in str(text).split(","):
        step, sep, spec = entry.strip().partition(":")
        if not sep or not step.strip().isdigit():
            raise LayerlabError(f"bad grow_at entry {entry.strip()!r}: expected STEP:SPEC, e.g. 100:layers=2x")
        g = int(step)
        if not 1 <= g < steps:
            raise LayerlabError(f"grow_at step {g} is outside the run: a growth needs a step in 1..{steps - 1} "
                                f"(steps {steps})")
        if out and g <= out[-1][0]:
            raise LayerlabError(f"grow_at steps must increase, got {out[-1][0]} then {g}")
        out.append((g, parse_grow_spec(spec)))
    return tuple(out)


def _check_grow(tc: TrainConfig) -> None:
    """grow_at's syntax and steps, grow_ramp >= 1, and (msg) growths at least grow_ramp apart: MSG grows a model
    whose masks have reached 1."""
    if tc.grow_ramp < 1:
        raise LayerlabError(f"grow_ramp must be at least 1, got {tc.grow_ramp}")
    steps = [g for g, _ in parse_grow_schedule(tc.grow_at, tc.steps)]
    for a, b in zip(steps, steps[1:]):
        if tc.grow_method == "msg" and b - a < tc.grow_ramp:
            raise LayerlabError(f"grow_at steps {a} and {b} are closer than grow_ramp {tc.grow_ramp}: MSG grows a "
                                "model whose masks have reached 1")


class TrainConfig(_Config):
    """How a run trains. Saved in ``layerlab.json`` of every run directory."""

    data: str | None = None  # None: the embedded corpus
    tokenizer: str = "byte"
    steps: Int = 300
    batch_size: Int = 16
    grad_accum: Int = 1
    lr: Float = 2e-3
    min_lr_ratio: Float = 0.1
    warmup: Int = 30
    weight_decay: Float = 0.1
    beta1: Float = 0.9
    beta2: Float = 0.95
    grad_clip: Float = 1.0
    eval_every: Int = 100
    eval_batches: Int = 16
    log_every: Int = 10
    telemetry_every: Int = 50
    save_every: Int = 100
    # keep the weights of step 0, every keep_every-th step and the last as model directories RUN/steps/stepNNNNNNN/
    # (safetensors, no optimizer state), for `analyze --trajectory`; 0 keeps none
    keep_every: Int = 0
    # a live log besides metrics.jsonl: tensorboard writes its scalars as TensorBoard events under RUN/tb/
    log: Literal["none", "tensorboard"] = "none"
    seed: Int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool | None = None  # None: on for CUDA, off elsewhere
    # With several processes (torchrun, or --nproc): ddp replicates the model, fsdp shards it (train/distributed.py)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Layer-wise optimization (train/optimizers.py documents each rule and its source).
    optimizer: str = "adamw"  # adamw | lamb | lars | llr | noise | lisa
    # Weight decay on norm scale vectors, by role (Wang et al., 2026, Negligible in Size, Significant in Effect):
    # input norms sit in front of a sublayer or linear (ln1, ln2, inner_norm), output norms on a sublayer's
    # output (Peri-LN's ln1_out, ln2_out) and before the head (ln_f). Biases and norm shifts never decay.
    input_norm_decay: Float = 0.0
    output_norm_decay: Float = 0.0
    # LAMB and LARS: "matrices" applies the trust ratio to weight matrices and embeddings only, biases and norm
    # parameters taking the plain step (ratio 1), as the reference code's exclude_from_layer_adaptation does;
    # "all" to every tensor, as You et al. (2020) Algorithm 2 is written.
    trust_ratio_scope: Literal["matrices", "all"] = "matrices"
    # each optimizer's own settings (flat names llr_every, noise_s_min, lisa_layers, ...)
    llr: LLRSettings = Field(default_factory=LLRSettings)
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    lisa: LISASettings = Field(default_factory=LISASettings)
    # LayerSkip (Elhoushi et al., 2024; train/loop.py): block l of L is skipped for a whole sequence with probability
    # layer_dropout * D(l), D rising with depth from 0 at block 0 to 1 at the last (exp: e^(l ln2/(L-1)) - 1, the
    # paper's Eq. 2; linear: l/(L-1)); never at evaluation
    layer_dropout: Float = 0.0
    layer_dropout_schedule: Literal["exp", "linear"] = "exp"
    # an early-exit loss: the final norm and head read every block's output, each block's loss weighted by the
    # paper's scale (Sec. 4.2: proportional to 1 + 2 + ... + (l+1), early_exit_scale on all but the last block,
    # normalised over the blocks the curriculum enables this step)
    early_exit_loss: bool = False
    early_exit_scale: Float = 1.0
    # which blocks have the loss at step t: gradual (deepest first, all by half the run), rotational (every R-th
    # block, R = early_exit_rotation, the set moving up one block a step) or none (all); the last block always
    early_exit_curriculum: Literal["gradual", "rotational", "none"] = "gradual"
    early_exit_rotation: Int = 2
    # growth inside the run (layerlab.grow): "STEP:SPEC,..." grows before step STEP's update, SPEC layers=2x,
    # layers=N, width=N or layers=..+width=..; by grow_method (msg, stack, interp); MSG's masks ramp to 1 over
    # grow_ramp steps (MSG's public script ramps over 5% of its run)
    grow_at: str | None = None
    grow_method: Literal["msg", "stack", "interp"] = "msg"
    grow_ramp: Int = 20
    # start from a layerlab model directory (a run, or what grow or convert wrote): its architecture, weights and
    # tokenizer; the training settings are this run's own. MSG masks it holds below 1 (a `grow --method msg`
    # output) ramp to 1 over grow_ramp steps from step 0, as after a growth in a run
    init_from: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """``llr_every=5`` (or ``"llr.every"``: older layerlab.json files, YAML, the CLI) sets ``llr.every``."""
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in data.items():
            group_field = NESTED.get(field_key(key)) if isinstance(key, str) else None
            if group_field is None:
                out[key] = value
            else:
                nested.setdefault(group_field[0], {})[group_field[1]] = value
        for group, values in nested.items():
            given = out.get(group)
            if isinstance(given, BaseModel):
                given = given.model_dump()
            out[group] = {**(given if isinstance(given, dict) else {}), **values}
        return out

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, optimizer: str) -> str:
        return OPTIMIZERS.check(optimizer)

    @model_validator(mode="after")
    def _ranges(self) -> TrainConfig:
        _at_least_one(type(self), self, ("steps", "batch_size", "grad_accum", "eval_batches", "log_every",
                                         "save_every"))
        if self.lr <= 0:
            raise LayerlabError(f"lr must be positive, got {self.lr}")
        if self.keep_every < 0:
            raise LayerlabError(f"keep_every must be non-negative (0 keeps no steps), got {self.keep_every}")
        if not 0 <= self.layer_dropout < 1:
            raise LayerlabError(f"layer_dropout must be in [0, 1), got {self.layer_dropout}")
        if self.early_exit_scale < 0 or self.early_exit_rotation < 1:
            raise LayerlabError("early_exit_scale must be >= 0 and early_exit_rotation >= 1, got "
                                f"{self.early_exit_scale} and {self.early_exit_rotation}")
        for name in ("input_norm_decay", "output_norm_decay"):
            if getattr(self, name) < 0:
                raise LayerlabError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.grow_at is not None:
            _check_grow(self)
        return self

    def flat_dict(self) -> dict[str, Any]:
        """The fields in the flat namespace: nested settings as ``llr_every`` and so on (what check_fields gives)."""
        out = self.model_dump()
        for group in GROUPS:
            out.update({f"{group}_{k}": v for k, v in out.pop(group).items()})
        return out


GROUPS: dict[str, type[_Config]] = {"llr": LLRSettings, "noise": NoiseSettings, "lisa": LISASettings}
# flat name -> (group, field): "llr_every" -> ("llr", "every")
NESTED = {f"{g}_{name}": (g, name) for g, cls in GROUPS.items() for name in cls.model_fields}

MODEL_FIELDS = dict(ModelConfig.model_fields)
# ModelConfig fields whose names transformers reserves in a model config, stored in config.json under another name:
# top_k (mlp moe's experts per token) is a generation parameter, which PreTrainedConfig drops from its keyword
# arguments and refuses to save
HF_RENAMED = {"top_k": "moe_top_k"}
# the flat namespace of TrainConfig: its own fields, and each optimizer's settings by flat name
TRAIN_FIELDS = {**{k: f for k, f in TrainConfig.model_fields.items() if k not in GROUPS},
                **{flat: GROUPS[g].model_fields[name] for flat, (g, name) in NESTED.items()}}
ALL_FIELDS = {**MODEL_FIELDS, **TRAIN_FIELDS}
# Fields that may change on --resume without breaking exact continuation checks.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "log_every", "telemetry_every", "save_every",
                     "keep_every", "log", "device", "compile", "parallel"}


def field_key(name: object) -> str:
    """A field's name in the flat namespace: ``--mix-alpha`` is ``mix_alpha``, ``llr.every`` is ``llr_every``."""
    return str(name).replace("-", "_").replace(".", "_")


@functools.cache
def _adapter(key: str) -> TypeAdapter:
    """The type of one flat-namespace field, with its validators: checks a value without the rest of a config."""
    info = ALL_FIELDS[key]
    tp = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(tp, config=ConfigDict(coerce_numbers_to_str=True))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _type_error(key: str, value: Any, source: str) -> LayerlabError:
    tp = ALL_FIELDS[key].annotation
    message = f"field {key!r} in {source} expects {_type_name(tp)}, got {value!r}"
    if typing.get_origin(tp) is Literal and isinstance(value, str):
        if (close := close_match(value, [str(a) for a in typing.get_args(tp)])) is not None:
            message += f"; did you mean {close!r}?"
    return LayerlabError(message)


def _one_line(e: ValidationError, prefix: str, data: dict[str, Any], source: str = "config") -> LayerlabError:
    """The first error of ``e`` in the messages of :func:`check_fields`."""
    err = e.errors()[0]
    loc = [str(part) for part in err["loc"]]
    if loc and loc[0] in GROUPS and len(loc) > 1 and not prefix:
        key, value = f"{loc[0]}_{loc[1]}", err["input"]
    else:
        key = f"{prefix}{loc[0]}" if loc else ""
        value = data.get(loc[0], err["input"]) if loc else err["input"]
    if err["type"] == "extra_forbidden" or key not in ALL_FIELDS:
        return unknown_field_error(key or err["input"], source)
    return _type_error(key, value, source)


def unknown_field_error(name: object, source: str, also: Iterable[str] = ()) -> LayerlabError:
    """An unknown field: the field it most likely means (spelling, or another tool's name for it), else the list.

    ``also``: other names valid where the field was given (a sweep file's ``preset``), suggested like fields.
    """
    key = field_key(name)
    names = sorted({*ALL_FIELDS, *also})
    if (close := close_match(key, [*names, *FIELD_SYNONYMS])) is not None:
        return LayerlabError(f"unknown field {name!r} in {source}; did you mean {FIELD_SYNONYMS.get(close, close)!r}?")
    return LayerlabError(f"unknown field {name!r} in {source}; valid fields: {', '.join(names)}")


def _flat_items(values: dict[str, Any], source: str) -> Iterable[tuple[object, str, Any]]:
    """(name as given, flat key, value) of each field; a group's mapping (``llr: {every: 5}``) gives one per entry."""
    for name, value in values.items():
        key = field_key(name)
        if key in GROUPS and key not in ALL_FIELDS:
            if isinstance(value, BaseModel):
                value = value.model_dump()
            if not isinstance(value, dict):
                raise LayerlabError(f"field {key!r} in {source} expects a mapping of "
                                    f"{', '.join(GROUPS[key].model_fields)}, got {value!r}")
            for sub, v in value.items():
                yield f"{name}.{sub}", field_key(f"{key}.{sub}"), v
        else:
            yield name, key, value


def check_fields(values: dict[str, Any], *, from_text: bool = False, source: str = "config",
                 also: Iterable[str] = ()) -> dict[str, Any]:
    """Validate names and types of a flat field dict; return it with values coerced, under flat names.

    ``from_text``: string values are parsed as YAML first (``"1e-3"``, ``"false"``, ``"null"``). ``also`` names
    what the caller accepts besides fields (and has taken out): suggested for a misspelt name.
    """
    out = {}
    for name, key, value in _flat_items(values, source):
        if key not in ALL_FIELDS:
            raise unknown_field_error(name, source, also)
        if value == "\x00bare":  # an option given without a value on the command line (layerlab.cli.BARE_FLAG)
            if ALL_FIELDS[key].annotation is not bool:
                raise LayerlabError(f"option --{name.replace('_', '-')} needs a value")
            value = True
        if from_text and isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError:
                pass
        try:
            out[key] = _adapter(key).validate_python(value)
        except ValidationError:
            raise _type_error(key, value, source) from None
    return out
