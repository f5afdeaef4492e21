"""docs/report-format.md's list of per-layer keys, generated from the metric registry.

Two parts of that page come from the registry (:mod:`layerlab.analysis.metrics`): the per-layer entry of the
example report (every key with its example value and one-line description), and the table of per-layer
metrics (description, accumulator, figure of report.html, paper). :func:`render_doc` returns the page with
both regenerated and :func:`update_doc` writes it; tests/test_metric_registry.py fails while the page and the
registry disagree, and names the call that brings the page up to date.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..defaults import REMOVAL_TOKENS, SAMPLE_SEQUENCES, SAMPLE_TOKENS
from ..errors import LayerlabError
from ..io import atomic_write_bytes
from .metrics import FAMILIES, KINDS, LAYER_FIELDS, METRICS, Metric

# Example value and description of the per-layer keys that are not metrics.
LAYER_FIELD_DOCS = {"index": (0, "block index, 0-based"), "placement": ("pre", "the block's norm placement")}
COMMENT_COLUMN = 52  # where the example's // comments start
TABLE_BEGIN = "<!-- per-layer metrics: generated from the metric registry (layerlab.analysis.metrics) -->"
TABLE_END = "<!-- end of the generated per-layer metrics -->"
UPDATE = "python -c 'from layerlab.analysis.metric_docs import update_doc; update_doc(\"docs/report-format.md\")'"


def layer_entry_lines(indent: str = " " * 10) -> list[str]:
    """The example report's per-layer entry, one ``"key": value,  // description`` line per key."""
    rows = [(f, *LAYER_FIELD_DOCS[f]) for f in LAYER_FIELDS]
    rows += [(key, m.example, m.doc) for key, m in METRICS.items()]
    lines = []
    for n, (key, example, doc) in enumerate(rows):
        line = f"{indent}{json.dumps(key)}: {json.dumps(example, ensure_ascii=False)}"
        line += "," if n < len(rows) - 1 else ""
        if doc:
            line += " " * max(COMMENT_COLUMN - len(line), 2) + "// " + doc
        lines.append(line)
    return lines


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def _plain(title: str) -> str:
    return title.replace("$", "").replace("\\", "")


def _drawn_in(metric: Metric) -> str:
    """Figure › panel, and the line's label where the panel draws several metrics."""
    shared: dict[tuple[str, str], int] = {}
    for m in METRICS.values():
        for plot in m.plots:
            shared[plot.family, plot.panel] = shared.get((plot.family, plot.panel), 0) + 1
    labels: dict[tuple[str, str], list[str]] = {}
    for p in metric.plots:
        labels.setdefault((p.family, p.panel), []).append(p.label)
    drawn = "; ".join(f"{family} › {_plain(panel)}" + (f": {', '.join(ls)}" if shared[family, panel] > 1 else "")
                      for (family, panel), ls in labels.items()) or "–"
    return drawn if metric.table else f"{drawn} (no table column)"


def _source(metric: Metric) -> str:
    kind = KINDS[metric.kind]
    switch = metric.switch or kind.switch
    text = kind.source.format(sample_tokens=SAMPLE_TOKENS, sample_sequences=SAMPLE_SEQUENCES,
                              removal_tokens=f"default {REMOVAL_TOKENS}")
    return text + (f"; off with `{switch}=False`" if switch else "")


def metrics_table() -> str:
    """The markdown table of the registered metrics, in registry order."""
    lines = ["| key | what it is | measured from | drawn in report.html (figure › panel) | follows |",
             "|---|---|---|---|---|"]
    for key, m in METRICS.items():
        lines.append(f"| `{key}` | {_cell(m.doc)} | {_source(m)} | {_cell(_drawn_in(m))} | {_cell(m.paper) or '–'} |")
    figures = ", ".join(f"“{title}”" for title in FAMILIES)
    return "\n".join(lines) + f"\n\nThe figures of report.html, in page order: {figures}."


def _replace_layer_entry(lines: list[str]) -> list[str]:
    start = next((i for i, line in enumerate(lines) if line.strip().startswith('"layers": [')), None)
    if start is None or lines[start + 1].strip() != "{":
        raise LayerlabError('the example report has no "layers": [ { ... } ] to generate')
    indent = lines[start + 1][: len(lines[start + 1]) - len(lines[start + 1].lstrip())]
    end = next((i for i in range(start + 2, len(lines)) if lines[i] == indent + "}"), None)
    if end is None:
        raise LayerlabError("the example report's per-layer entry has no closing brace")
    return lines[: start + 2] + layer_entry_lines(indent + "  ") + lines[end:]


def _replace_table(text: str) -> str:
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1:
        raise LayerlabError(f"the page needs one {TABLE_BEGIN} and one {TABLE_END} line around the metric table")
    head, rest = text.split(TABLE_BEGIN)
    _, tail = rest.split(TABLE_END)
    return f"{head}{TABLE_BEGIN}\n{metrics_table()}\n{TABLE_END}{tail}"


def render_doc(text: str) -> str:
    """docs/report-format.md's ``text`` with its per-layer entry and its metric table generated afresh."""
    return _replace_table("\n".join(_replace_layer_entry(text.split("\n"))))


def update_doc(path: str | Path) -> bool:
    """Regenerate the registry's parts of the page at ``path``; True when the page changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = render_doc(text)
    if new != text:
        atomic_write_bytes(path, new.encode("utf-8"))
    return new != text
