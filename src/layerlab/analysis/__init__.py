"""Per-layer measurements of any supported model."""

from .analyze import analyze, analyze_model, load_for_analysis
from .report import Report

__all__ = ["Report", "analyze", "analyze_model", "load_for_analysis"]
