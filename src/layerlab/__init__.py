"""layerlab: build, train, analyze and compress the layers of transformer language models."""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao (when installed) with its quantizers, and torchao then logs warnings
# about optional CUDA kernels it cannot load on a CPU machine: silence them for these imports.
_quiet = {_n: _logging.getLogger(_n).level for _n in ("torchao", "torch.utils._pytree")}
for _n in _quiet:
    _logging.getLogger(_n).setLevel(_logging.ERROR)
try:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import ModelConfig, TrainConfig
    from .errors import LayerlabError
    from .model import LayerlabConfig, LayerlabForCausalLM, build_model
    from .packed import _register as _register_quantizer
finally:
    for _n, _level in _quiet.items():
        _logging.getLogger(_n).setLevel(_level)

# After ``import layerlab``, the Auto classes load layerlab model directories.
AutoConfig.register(LayerlabConfig.model_type, LayerlabConfig, exist_ok=True)
AutoModelForCausalLM.register(LayerlabConfig, LayerlabForCausalLM, exist_ok=True)
# ... and directories written by ``layerlab quantize`` (quantization_config.quant_method "layerlab").
_register_quantizer()

__all__ = ["LayerlabConfig", "LayerlabError", "LayerlabForCausalLM", "ModelConfig", "TrainConfig", "build_model"]


def analyze(*models, **kwargs):
    """Measure every layer of one or more models; see :func:`layerlab.analysis.analyze`."""
    from .analysis import analyze as _analyze

    return _analyze(*models, **kwargs)
