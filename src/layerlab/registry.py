"""Registries of extensions whose names must be known before torch loads.

A :class:`Registry` maps names to objects, like a dict. An entry is either registered with its object
(``@NORMS.register("rmsnorm")`` on the class) or declared here as ``"module:attr"``, which names it
without importing it: the configs, the CLI's choice lists and its one-line errors read the names, and
a typo in ``--norm`` is answered before the seconds torch takes to import. The object is imported on
first use, and the module's own ``register`` then confirms the declaration (a test resolves them all).

This module imports nothing heavy; keep it that way.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import LayerlabError, choices_error


class Registry(Mapping[str, Any]):
    """Name -> object for one kind of extension; ``kind`` names it in errors ("unknown norm 'x'; valid: ...")."""

    def __init__(self, kind: str, declared: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = dict(declared or {})

    def register(self, name: str, obj: Any = None) -> Any:
        """Add ``obj`` under ``name``; without ``obj``, a decorator. A declared ``"module:attr"`` entry must
        name this object: registering something else under a declared name is an error."""
        if obj is None:
            return lambda o: self.register(name, o)
        declared = self._entries.get(name)
        if isinstance(declared, str) and declared != f"{obj.__module__}:{obj.__qualname__}":
            raise LayerlabError(f"{self.kind} {name!r} is declared as {declared}, not "
                                f"{obj.__module__}:{obj.__qualname__}")
        self._entries[name] = obj
        return obj

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(name)
        entry = self._entries[name]
        if isinstance(entry, str):  # declared: import the module, whose register() swaps in the object
            module, _, attr = entry.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry = obj
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else the one-line error that lists the valid names and the closest one."""
        if name not in self._entries:
            raise choices_error(self.kind, name, list(self._entries))
        return name

    def get_checked(self, name: str) -> Any:
        """The object under ``name``, or the one-line error of :meth:`check`."""
        return self[self.check(name)]


# Every norm is built as ``NORMS[name](dim, *, eps)`` (layerlab.norms, where each class is defined and cited).
NORMS = Registry("norm", {
    "layernorm": "layerlab.norms:LayerNorm",
    "rmsnorm": "layerlab.norms:RMSNorm",
    "crmsnorm": "layerlab.norms:CRMSNorm",
    "dyt": "layerlab.norms:DyT",
    "seednorm": "layerlab.norms:SeeDNorm",
    "powernorm": "layerlab.norms:PowerNorm",
    "batchnorm": "layerlab.norms:BatchNorm",
    "prepbn": "layerlab.norms:PRepBN",
    "none": "layerlab.norms:NoNorm",
})

# Every optimizer is built as ``OPTIMIZERS[name](model, train_config)`` (layerlab.train.optimizers).
OPTIMIZERS: Registry = Registry("optimizer", {
    "adamw": "layerlab.train.optimizers:Layerwise",
    "lamb": "layerlab.train.optimizers:LAMB",
    "lars": "layerlab.train.optimizers:LARS",
    "llr": "layerlab.train.optimizers:LLR",
    "noise": "layerlab.train.optimizers:NoiseAdaptive",
    "lisa": "layerlab.train.optimizers:LISA",
})

# The compressors' choices (layerlab.compress), checked by the CLI before the model loads.
PRUNE_METRICS = Registry("metric", {  # each (model, tokenizer, n, data, tokens, unit=...) -> (blocks, scores)
    "angular": "layerlab.compress.prune:by_angular",
    "bi": "layerlab.compress.prune:by_bi",
    "loss": "layerlab.compress.prune:by_loss",
})
SUBLAYERS = ("attn", "mlp")  # the sublayers of a block, as the adapters name them
PRUNE_UNITS = ("block", *SUBLAYERS)
HEAL_MODES = ("lora", "full")
QUANT_IMPORTANCE = ("lim", "zd", "loss")
CONVERT_TARGETS = ("rmsnorm", "crmsnorm", "no-norm")

__all__ = ["CONVERT_TARGETS", "HEAL_MODES", "NORMS", "OPTIMIZERS", "PRUNE_METRICS", "PRUNE_UNITS", "QUANT_IMPORTANCE",
           "SUBLAYERS", "Registry"]
