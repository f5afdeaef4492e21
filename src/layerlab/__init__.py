"""layerlab: build, train, analyze and compress the layers of transformer language models.

``import layerlab`` is light: it loads neither torch nor transformers, so that ``layerlab --help``
and argument errors answer at once. The public names below load on first use. What the import
does promise is that transformers' Auto classes know layerlab's model, config and quantization
method: importing :mod:`layerlab.model` registers them, and this package imports it as soon as
transformers is imported (right away, if it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__


class _DropImportNoise(logging.Filter):
    """Drops torchao's import-time warnings that say nothing to a layerlab user, and nothing else.

    transformers imports torchao, when installed, with its quantizers. torchao then warns for each
    optional CUDA kernel library it cannot load ("Failed to load ...so") and that Triton is missing,
    which no CPU machine has, and torch warns that torchao registers Enum constants in a deprecated
    way. None of it is actionable. (A logger's filter sees only its own records, hence one per logger.)
    """

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


logging.getLogger("torchao").addFilter(_DropImportNoise("Failed to load "))
logging.getLogger("torchao.kernel.intmm").addFilter(_DropImportNoise("Detected no triton"))
logging.getLogger("torch.utils._pytree").addFilter(_DropImportNoise("register_constant() on Enum subclasses"))

_LAZY = {
    "ModelConfig": "config", "TrainConfig": "config", "LayerlabError": "errors",
    "LayerlabConfig": "model", "LayerlabForCausalLM": "model", "build_model": "model",
}
__all__ = ["LayerlabConfig", "LayerlabError", "LayerlabForCausalLM", "ModelConfig", "TrainConfig", "analyze",
           "build_model"]

if TYPE_CHECKING:
    from .config import ModelConfig, TrainConfig
    from .errors import LayerlabError
    from .model import LayerlabConfig, LayerlabForCausalLM, build_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'layerlab' has no attribute {name!r}")


def analyze(*models, out=None, overwrite: bool = False, **kwargs):
    """Measure every layer of one or more models (:func:`layerlab.analysis.analyze`, which takes the other
    keyword arguments) and, with ``out``, write report.json and report.html there. An existing, non-empty
    ``out`` is refused before anything is measured, unless ``overwrite``, as every command refuses its --out."""
    from .analysis import analyze as measure
    from .io import check_output
    from .report import write_report

    if out is not None and not overwrite:
        check_output(out, also=", or pass --overwrite to replace its report")
    report = measure(*models, **kwargs)
    if out is not None:
        write_report(report, out)
    return report


def _register_with_transformers() -> None:
    # A layerlab.model already being imported (it imported transformers) registers when it finishes.
    if f"{__name__}.model" not in sys.modules:
        importlib.import_module(f"{__name__}.model")


class _RegisterAfterImport(importlib.abc.Loader):
    """Runs transformers' own loader, then registers layerlab with the Auto classes it defines."""

    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _register_with_transformers()

    def __getattr__(self, name: str) -> Any:  # everything else (resources, source) from the real loader
        return getattr(self._inner, name)


class _WatchTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader of ``transformers`` the first time that is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _WatchTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _WatchTransformers())
