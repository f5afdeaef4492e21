"""Human-readable views of an analysis report (``report.json``, see docs/report-format.md)."""

from .html import render_html, write_html

__all__ = ["render_html", "write_html"]
