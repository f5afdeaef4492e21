"""Layer-wise compression guided by the layer measurements."""

from .prune import METRICS, prune, without_blocks

__all__ = ["METRICS", "prune", "without_blocks"]
