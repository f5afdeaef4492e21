"""Human-readable views of an analysis report (``report.json``, see docs/report-format.md)."""

from __future__ import annotations

from pathlib import Path

from ..analysis import Report
from .html import render_html, write_html

__all__ = ["render_html", "write_html", "write_report"]


def write_report(report: Report, out: str | Path) -> Path:
    """Write ``report.json`` and ``report.html`` into ``out`` (created if needed), each atomically, after the
    analysis sections' artifacts (``<stem>.safetensors``), which the report names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.save_artifacts(out)
    report.save_json(out / "report.json")
    write_html(report.data, out / "report.html")
    return out
