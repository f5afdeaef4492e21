"""Per-layer measurements of any supported model; each per-layer metric is one entry of the metric registry
(:mod:`layerlab.analysis.metrics`)."""

from .analyze import analyze, analyze_model
from .metrics import METRICS, Metric, Plot, register_metric, registered
from .report import Report

__all__ = ["METRICS", "Metric", "Plot", "Report", "analyze", "analyze_model", "register_metric", "registered"]
