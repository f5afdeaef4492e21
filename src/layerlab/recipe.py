"""A run's recipe: a shipped preset, a YAML config file and ``--field value`` overrides, read and layered into a
validated :class:`RunSpec` (preset < file < overrides). The typed configs themselves are in :mod:`layerlab.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import HF_RENAMED, MODEL_FIELDS, TRAIN_FIELDS, ModelConfig, TrainConfig, check_fields
from .errors import LayerlabError, choices_error
from .io import check_model_dir, read_json


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
    given: dict[str, Any] = {}  # what the config file and the command line set, over the preset
    if config_file is not None:
        given.update(read_yaml(config_file))
    given.update(check_fields(overrides or {}, source="command line"))
    values.update(given)
    model, train = split_fields(values)
    if train.get("init_from"):
        model = init_model_fields(train["init_from"],
                                  {k: v for k, v in given.items() if k in MODEL_FIELDS or k == "tokenizer"})
        # the run reads the directory's tokenizer: its manifest names it ("byte", "bpe:N") where layerlab wrote it
        saved = Path(train["init_from"]) / "tokenizer_config.json"
        name = read_json(saved).get("layerlab_tokenizer") if saved.is_file() else None
        if isinstance(name, str) and (name == "byte" or name.startswith("bpe:")):
            train["tokenizer"] = name
    return RunSpec(ModelConfig(**model), TrainConfig(**train), preset=preset)


def init_model_fields(model_dir: str | Path, given: dict[str, Any]) -> dict[str, Any]:
    """The model fields of a run started ``--init-from model_dir``: those of the directory's config.json (a layerlab
    model), which a field ``given`` on the command line or in a config file may repeat but not change; a preset's
    model fields give way. ``tokenizer`` is refused: the run reads the directory's own."""
    path = check_model_dir(model_dir)
    saved = read_json(path / "config.json")
    kind = saved.get("model_type") if isinstance(saved, dict) else None
    if kind != "layerlab":
        raise LayerlabError(f"--init-from needs a layerlab model directory (a run, or what grow or convert wrote); "
                            f"{path} holds a {kind or 'unknown'} model")
    if "tokenizer" in given:
        raise LayerlabError(f"--init-from {path}: the run uses that directory's tokenizer; drop --tokenizer")
    fields = {k: saved[HF_RENAMED.get(k, k)] for k in MODEL_FIELDS if HF_RENAMED.get(k, k) in saved}
    loaded = ModelConfig(**fields).to_dict()
    asked = ModelConfig(**{**fields, **given}).to_dict() if given else loaded
    changed = sorted(k for k in given if k in loaded and asked[k] != loaded[k])
    if changed:
        k = changed[0]
        raise LayerlabError(f"--init-from {path}: {k} is {loaded[k]!r} there, {asked[k]!r} asked; the architecture "
                            "is the model directory's (drop the model fields, or start a run without --init-from)")
    return fields
