"""Layer-wise compression guided by the layer measurements."""

from .convert import TARGETS, convert
from .prune import METRICS, prune, without_blocks
from .quantize import IMPORTANCE, allocate, quantize

__all__ = ["IMPORTANCE", "METRICS", "TARGETS", "allocate", "convert", "prune", "quantize", "without_blocks"]
