"""Layer-wise compression guided by the layer measurements; each command returns a record and a ``*_lines``
function lays it out for the CLI (the shared pipeline is in :mod:`layerlab.compress.common`)."""

from .bitwidths import allocate
from .convert import TARGETS, convert, convert_lines
from .prune import METRICS, prune, prune_lines
from .quantize import IMPORTANCE, quantize, quantize_lines
from .removal import without_blocks

__all__ = ["IMPORTANCE", "METRICS", "TARGETS", "allocate", "convert", "convert_lines", "prune", "prune_lines",
           "quantize", "quantize_lines", "without_blocks"]
