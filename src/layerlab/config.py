"""Typed configs: the model (:class:`ModelConfig`) and the training run (:class:`TrainConfig`).

Both are plain dataclasses whose field names form one flat namespace, so a YAML file, a
preset and ``--field value`` on the command line all set fields the same way. Values are
checked against the annotations, and a wrong type or an unknown name gives a one-line
:class:`~layerlab.errors.LayerlabError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import LayerlabError, choices_error, close_match
from .registry import (
    NORMS,
    OPTIMIZERS,
    PLACEMENT_ALIASES,
    PLACEMENTS,
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


@dataclass
class ModelConfig:
    """Architecture of a layerlab GPT. Saved in ``config.json`` of every model directory."""

    vocab_size: int = 320
    context: int = 256
    layers: int = 4
    width: int = 256
    heads: int = 4
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_hidden: int | None = None  # default: 4*width for gelu, 8/3*width rounded to 64 for swiglu
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    head_bias: bool = False  # a bias on the unembedding: `convert` folds the final norm's bias into it
    dropout: float = 0.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    placement: str | list[str] = "pre"
    mix_alpha: float = 0.25
    init: Literal["standard", "scaled"] = "scaled"
    init_std: float = 0.02
    # blocks without their attention (ln1 + attn) or MLP (ln2 + mlp) sublayer; written by `prune --unit attn|mlp`
    drop_attn: list[int] = field(default_factory=list)
    drop_mlp: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        NORMS.check(self.norm)
        if isinstance(self.placement, str):
            self.placement = PLACEMENT_ALIASES.get(self.placement, self.placement)
            if self.placement not in PLACEMENTS:
                raise choices_error("placement", self.placement, [*PLACEMENTS, *PLACEMENT_ALIASES])
        else:
            self.placement = [PLACEMENT_ALIASES.get(p, p) for p in self.placement]
            for p in self.placement:
                if p not in block_placement_names():
                    raise choices_error("placement in the per-block schedule", p, block_placement_names())
            if len(self.placement) != self.layers:
                raise LayerlabError(
                    f"placement schedule has {len(self.placement)} entries but the model has {self.layers} layers"
                )
        for name in ("context", "layers", "width", "heads", "vocab_size"):
            if getattr(self, name) < 1:
                raise LayerlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise LayerlabError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.positions == "rope" and (self.width // self.heads) % 2:
            raise LayerlabError(f"rope needs an even head dimension, got {self.width // self.heads}")
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise LayerlabError(f"mix_alpha must be in [0, 1], got {self.mix_alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LayerlabError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_drops()

    def _check_drops(self) -> None:
        placements = self.block_placements()
        for name in ("drop_attn", "drop_mlp"):
            blocks = sorted(set(getattr(self, name)))
            setattr(self, name, blocks)
            for i in blocks:
                if not 0 <= i < self.layers:
                    raise LayerlabError(f"{name} names block {i}, but the model has blocks 0..{self.layers - 1}")
                if not PLACEMENTS[placements[i]].residual_sublayers:
                    raise LayerlabError(f"{name}: block {i} is {placements[i]}; only "
                                        f"{', '.join(residual_placement_names())} blocks can lack a sublayer")
        if len(self.drop_attn) >= self.layers:  # the KV cache, and so generation, needs one attention layer
            raise LayerlabError("drop_attn names every block; at least one block must keep its attention")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        """Width of the MLP's inner layer."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # 2/3 of 4d keeps SwiGLU's parameters equal to GELU's (Shazeer, 2020)
            return -(-int(8 * self.width / 3) // 64) * 64
        return 4 * self.width

    def block_placements(self) -> list[str]:
        """The placement of each block: a per-block list as given, a schedule (mix) resolved, else the same one."""
        if isinstance(self.placement, list):
            return list(self.placement)
        schedule = PLACEMENTS[self.placement].schedule
        return schedule(self.layers, self.mix_alpha) if schedule else [self.placement] * self.layers

    def has_final_norm(self) -> bool:
        """Whether the model ends with a norm before the head: Post-LN's last block already ends in one."""
        return PLACEMENTS[self.block_placements()[-1]].final_norm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """How a run trains. Saved in ``layerlab.json`` of every run directory."""

    data: str | None = None  # None: the embedded corpus
    tokenizer: str = "byte"
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    telemetry_every: int = 50
    save_every: int = 100
    seed: int = 0
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
    input_norm_decay: float = 0.0
    output_norm_decay: float = 0.0
    # llr: every llr_every steps, until llr_until of the run, map each block's ESD alpha linearly into
    # [llr_s_min, llr_s_max] x lr, reached over llr_ramp steps (He et al., LLR; range and llr_until from its
    # 130M config, which recomputes every 40 steps with a 20-step ramp: halved here for short runs)
    llr_every: int = 20
    llr_ramp: int = 10
    llr_until: float = 0.2
    llr_s_min: float = 1.0
    llr_s_max: float = 3.0
    # noise: per-block LR multiplier from a gradient signal-to-noise estimate, clipped to [noise_s_min, noise_s_max]
    noise_s_min: float = 0.5
    noise_s_max: float = 2.0
    # lisa: every lisa_every steps train the embeddings, the head and lisa_layers randomly chosen blocks (Pan et al.)
    lisa_every: int = 20
    lisa_layers: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every", "save_every",
                     "llr_every", "lisa_every", "lisa_layers"):
            if getattr(self, name) < 1:
                raise LayerlabError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LayerlabError(f"lr must be positive, got {self.lr}")
        OPTIMIZERS.check(self.optimizer)
        for name in ("input_norm_decay", "output_norm_decay", "llr_ramp"):
            if getattr(self, name) < 0:
                raise LayerlabError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.llr_until <= 1.0:
            raise LayerlabError(f"llr_until must be in [0, 1], got {self.llr_until}")
        for lo, hi in (("llr_s_min", "llr_s_max"), ("noise_s_min", "noise_s_max")):
            if not 0 < getattr(self, lo) <= getattr(self, hi):
                raise LayerlabError(f"need 0 < {lo} <= {hi}, got {getattr(self, lo)} and {getattr(self, hi)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
ALL_FIELDS = {**MODEL_FIELDS, **TRAIN_FIELDS}
# Fields that may change on --resume without breaking exact continuation checks.
RESUMABLE_CHANGES = {"steps", "eval_every", "eval_batches", "log_every", "telemetry_every", "save_every",
                     "device", "compile", "parallel"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_HINTS = {**_hints(ModelConfig), **_hints(TrainConfig)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, from_text: bool) -> Any:
    """Return ``value`` as type ``tp``, or raise ValueError. Text from the CLI is parsed as YAML."""
    if from_text and isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            pass
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin in (typing.Union, types.UnionType):
        args = list(typing.get_args(tp))
        if from_text and isinstance(value, str) and "," in value:  # "pre,post" is a list where one is allowed
            args.sort(key=lambda a: typing.get_origin(a) is not list)
        for arg in args:
            try:
                return _coerce(value, arg, from_text)
            except ValueError:
                continue
        raise ValueError
    if tp is type(None):
        if value is None:
            return None
        raise ValueError
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and from_text:
            value = [v.strip() for v in value.split(",")]
        if from_text and isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]  # "--drop-attn 1": one item
        if not isinstance(value, list):
            raise ValueError
        return [_coerce(v, item, from_text) for v in value]  # "1,2" from the CLI is a list of ints
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):  # YAML 1.1 reads "1e-3" as text
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    raise ValueError


def unknown_field_error(name: object, source: str, also: Iterable[str] = ()) -> LayerlabError:
    """An unknown field: the field it most likely means (spelling, or another tool's name for it), else the list.

    ``also``: other names valid where the field was given (a sweep file's ``preset``), suggested like fields.
    """
    key = str(name).replace("-", "_")
    names = sorted({*ALL_FIELDS, *also})
    if (close := close_match(key, [*names, *FIELD_SYNONYMS])) is not None:
        return LayerlabError(f"unknown field {name!r} in {source}; did you mean {FIELD_SYNONYMS.get(close, close)!r}?")
    return LayerlabError(f"unknown field {name!r} in {source}; valid fields: {', '.join(names)}")


def check_fields(values: dict[str, Any], *, from_text: bool = False, source: str = "config",
                 also: Iterable[str] = ()) -> dict[str, Any]:
    """Validate names and types of a flat field dict; return it with values coerced.

    ``also`` names what the caller accepts besides fields (and has taken out): suggested for a misspelt name.
    """
    out = {}
    for name, value in values.items():
        key = str(name).replace("-", "_")
        if key not in ALL_FIELDS:
            raise unknown_field_error(name, source, also)
        tp = _HINTS[key]
        try:
            out[key] = _coerce(value, tp, from_text)
        except ValueError:
            message = f"field {key!r} in {source} expects {_type_name(tp)}, got {value!r}"
            if typing.get_origin(tp) is Literal and isinstance(value, str):
                if (close := close_match(value, [str(a) for a in typing.get_args(tp)])) is not None:
                    message += f"; did you mean {close!r}?"
            raise LayerlabError(message) from None
    return out


def flatten_yaml(doc: Any, source: str) -> dict[str, Any]:
    """The field: value mapping of a config document; its optional ``model:`` and ``train:`` sections merged in."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise LayerlabError(f"{source} must be a mapping of field: value")
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)  # sections are optional: names are unique across both
        else:
            flat[key] = value
    return flat


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML document at ``path``, or a one-line error naming ``what`` is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise LayerlabError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LayerlabError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Fields from a YAML config file (flat, or with ``model:`` and ``train:`` sections)."""
    p = Path(path)
    doc = load_yaml(p)
    return check_fields(flatten_yaml(doc, str(p)), from_text=True, source=str(p))


def preset_names() -> list[str]:
    files = resources.files("layerlab.presets").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """Fields of a shipped preset (``src/layerlab/presets/NAME.yaml``)."""
    if name not in preset_names():
        raise choices_error("preset", name, preset_names())
    text = resources.files("layerlab.presets").joinpath(f"{name}.yaml").read_text()
    return check_fields(flatten_yaml(yaml.safe_load(text), f"preset {name}"), source=f"preset {name}")


@dataclass
class RunSpec:
    """A model and a training config, plus the preset they started from."""

    model: ModelConfig
    train: TrainConfig
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": self.train.to_dict()}


def split_fields(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat field dict into (model fields, train fields)."""
    model = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    train = {k: v for k, v in values.items() if k in TRAIN_FIELDS}
    return model, train


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> RunSpec:
    """Layer preset < config file < overrides into a validated :class:`RunSpec`.

    With neither a preset nor a config file, preset ``tiny`` is the base.
    """
    values: dict[str, Any] = {}
    if preset is None and config_file is None:
        preset = "tiny"
    if preset is not None:
        values.update(read_preset(preset))
    if config_file is not None:
        values.update(read_yaml(config_file))
    values.update(check_fields(overrides or {}, source="command line"))
    model, train = split_fields(values)
    return RunSpec(ModelConfig(**model), TrainConfig(**train), preset=preset)
