"""Typed configs: the model (:class:`ModelConfig`) and the training run (:class:`TrainConfig`), as pydantic models.

Their field names form one flat namespace, so a YAML file, a preset and ``--field value`` on the command line all set
fields the same way. An optimizer's own settings nest under its name (``tc.llr.every``); in the flat namespace they
are ``llr_every`` (also ``llr.every``, or ``llr: {every: 5}`` in YAML), the names earlier versions kept flat in
:class:`TrainConfig`, which its constructor still takes. pydantic checks the types and the validators below the
ranges and names; every error reaches the user as a one-line :class:`~layerlab.errors.LayerlabError`.

``fields``: the flat namespace, the base class and the errors; ``model``: :class:`ModelConfig`; ``train``:
:class:`TrainConfig`, the optimizers' settings and growth schedules. Every name is imported from here.
"""

from .fields import (
    ALL_FIELDS,
    FIELD_SYNONYMS,
    GROUPS,
    Blocks,
    Float,
    Int,
    check_fields,
    field_key,
    unknown_field_error,
    unknown_name_error,
)
from .model import DENSE_MLPS, HF_RENAMED, MODEL_FIELDS, MOE_DEFAULTS, ModelConfig
from .train import (
    NESTED,
    RESUMABLE_CHANGES,
    TRAIN_FIELDS,
    GrowSpec,
    LISASettings,
    LLRSettings,
    NoiseSettings,
    TrainConfig,
    parse_grow_schedule,
    parse_grow_spec,
)

__all__ = [
    "ALL_FIELDS", "DENSE_MLPS", "FIELD_SYNONYMS", "GROUPS", "HF_RENAMED", "MODEL_FIELDS", "MOE_DEFAULTS", "NESTED",
    "Blocks", "Float", "Int",
    "RESUMABLE_CHANGES", "TRAIN_FIELDS", "GrowSpec", "LISASettings", "LLRSettings", "ModelConfig", "NoiseSettings",
    "TrainConfig", "check_fields", "field_key", "parse_grow_schedule", "parse_grow_spec", "unknown_field_error",
    "unknown_name_error",
]
