"""The flat field namespace that both configs share (a YAML file, a preset and ``--field value`` on the command line
set fields alike), the base class of the config classes, and the one-line errors: an unknown name with the field it
most likely means, a value of the wrong type.

Each config module adds its classes' fields to :data:`ALL_FIELDS` as it defines them (``config/model.py``,
``config/train.py``); the package imports both, so the namespace is whole before any config is made."""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from ..errors import LayerlabError, close_match

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


# flat name -> its field, of ModelConfig and TrainConfig (with each optimizer's settings by flat name, llr_every)
ALL_FIELDS: dict[str, FieldInfo] = {}
# TrainConfig's nested settings groups, by name: "llr" -> LLRSettings (filled by config/train.py)
GROUPS: dict[str, type[_Config]] = {}


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


def _at_least_one(cls: type[_Config], values: _Config, names: Iterable[str]) -> None:
    for name in names:
        if getattr(values, name) < 1:
            raise LayerlabError(f"{cls._prefix}{name} must be at least 1, got {getattr(values, name)}")


def _check_range(cls: type[_Config], lo: str, hi: str, values: _Config) -> None:
    if not 0 < getattr(values, lo) <= getattr(values, hi):
        p = cls._prefix
        raise LayerlabError(f"need 0 < {p}{lo} <= {p}{hi}, got {getattr(values, lo)} and {getattr(values, hi)}")


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
