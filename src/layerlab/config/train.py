"""The training run's config, :class:`TrainConfig`, saved in ``layerlab.json``: its fields, each layer-wise
optimizer's own settings (nested under the optimizer's name, flat as ``llr_every``), and the growth schedule."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..errors import LayerlabError
from ..registry import OPTIMIZERS
from .fields import ALL_FIELDS, GROUPS, Float, Int, _at_least_one, _check_range, _Config, field_key


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


GROUPS.update(llr=LLRSettings, noise=NoiseSettings, lisa=LISASettings)
# flat name -> (group, field): "llr_every" -> ("llr", "every")
NESTED = {f"{g}_{name}": (g, name) for g, cls in GROUPS.items() for name in cls.model_fields}
# the flat namespace of TrainConfig: its own fields, and each optimizer's settings by flat name
TRAIN_FIELDS = {**{k: f for k, f in TrainConfig.model_fields.items() if k not in GROUPS},
                **{flat: GROUPS[g].model_fields[name] for flat, (g, name) in NESTED.items()}}
ALL_FIELDS.update(TRAIN_FIELDS)
# Fields that may change on --resume without breaking exact continuation checks.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "log_every", "telemetry_every", "save_every",
                     "keep_every", "log", "device", "compile", "parallel"}
