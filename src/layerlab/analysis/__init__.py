"""Per-layer measurements of any supported model."""

from .analyze import analyze, analyze_model
from .report import Report

__all__ = ["Report", "analyze", "analyze_model"]
