"""layerlab: build, train, analyze and compress the layers of transformer language models."""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModelForCausalLM

from .config import ModelConfig, TrainConfig
from .errors import LayerlabError
from .model import LayerlabConfig, LayerlabForCausalLM, build_model

# After ``import layerlab``, the Auto classes load layerlab model directories.
AutoConfig.register(LayerlabConfig.model_type, LayerlabConfig, exist_ok=True)
AutoModelForCausalLM.register(LayerlabConfig, LayerlabForCausalLM, exist_ok=True)

__all__ = ["LayerlabConfig", "LayerlabError", "LayerlabForCausalLM", "ModelConfig", "TrainConfig", "build_model"]


def analyze(*models, **kwargs):
    """Measure every layer of one or more models; see :func:`layerlab.analysis.analyze`."""
    from .analysis import analyze as _analyze

    return _analyze(*models, **kwargs)
