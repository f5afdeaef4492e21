"""Render an analysis report (``report.json``, see docs/report-format.md) as one self-contained HTML page.

The page opens offline: every plot is drawn on its own :class:`matplotlib.figure.Figure` with the Agg
canvas (pyplot and its global figure registry are never used) and embedded as a base64 PNG ``data:`` URI;
the CSS is inline and a Content-Security-Policy forbids any network access. The page's only script counts
the plots that decoded into ``<body data-plots-loaded="N">`` next to ``data-plots`` (the number of plots),
so that a headless browser can check that the page drew.
"""

from __future__ import annotations

import base64
import html
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..analysis.metrics import LAYER_FIELDS, METRICS
from ..analysis.sections import draw_sections
from .plots import (
    DPI,
    HEATMAP_CAPTION,
    PALETTE,
    best_blocks,
    block_indices,
    block_ticks,
    families,
    family_alt,
    family_figure,
    heatmap_figure,
    layer_series,
    layer_value,
    model_layers,
    mpl_text,
    new_figure,
    num,
    png,
    readable_log_ticks,
    run_lengths,
    span_for,
)

__all__ = ["CSP", "CSS", "SCRIPT", "Page", "esc", "render_html", "swatch", "write_html"]


# The page's inline style sheet (the sweep page adds its own rules after it).
CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #1d2330;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 18px 24px 48px; }
h1 { font-size: 23px; margin: 0 0 2px; }
h2 { font-size: 18px; margin: 26px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #dde1e7; }
h3 { font-size: 15px; margin: 16px 0 4px; }
.provenance { color: #5b6472; margin: 0 0 8px; }
.models { list-style: none; padding: 0; margin: 0; }
.models li { margin: 2px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
          vertical-align: -1px; }
.muted { color: #5b6472; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; }
.card { flex: 1 1 360px; border: 1px solid #dde1e7; border-left-width: 5px; border-radius: 6px;
        padding: 8px 14px 10px; }
.card h3 { margin: 2px 0 6px; }
table { border-collapse: collapse; }
table.summary { width: 100%; }
table.summary th { text-align: left; font-weight: 600; padding: 3px 14px 3px 0; vertical-align: top; width: 38%; }
table.summary th .muted { display: block; font-weight: 400; font-size: 12px; }
table.summary td { padding: 3px 0; vertical-align: top; }
figure { margin: 0 0 14px; }
figcaption { color: #5b6472; font-size: 13px; max-width: 980px; margin-top: 2px; }
img.plot { display: block; max-width: 100%; height: auto; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 10px 18px; }
.heatmaps figure { margin: 0; }
details { margin-top: 6px; }
summary { cursor: pointer; font-weight: 600; }
.scroll { overflow-x: auto; margin-bottom: 12px; }
table.numbers { font-size: 11px; font-variant-numeric: tabular-nums; }
table.numbers th, table.numbers td { border: 1px solid #e3e6eb; padding: 2px 5px; text-align: right; }
table.numbers th { background: #f4f6f8; font-weight: 600; vertical-align: bottom; }
table.numbers tbody tr:nth-child(even) { background: #fafbfc; }
"""


# The page's only script: counts the plots that decoded into <body data-plots-loaded>.
SCRIPT = """
window.addEventListener("load", function () {
  var drawn = 0;
  document.querySelectorAll("img.plot").forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { drawn += 1; }
  });
  document.body.dataset.plotsLoaded = String(drawn);
});
"""


# No network at all: inline CSS and script, images only from data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def render_html(report: dict) -> str:
    """Render an analysis report as one self-contained HTML page (plots inline, no network needed).

    ``report`` follows docs/report-format.md; missing keys and ``None``/NaN values are tolerated (a series
    without any finite value is left out, a plot without any series is skipped). All text taken from the
    report is HTML-escaped.
    """
    models = [m if isinstance(m, dict) else {} for m in (report.get("models") or [])]
    provenance = report.get("provenance") or {}
    names = [_model_name(m, i) for i, m in enumerate(models)]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(models))]
    page = Page()

    page.add("<h1>Layer analysis report</h1>")
    page.add(f'<p class="provenance">{_provenance_line(provenance, report.get("format"))}</p>')
    if not models:
        page.add("<p>This report holds no models.</p>")
    else:
        page.add('<ul class="models">')
        for model, name, color in zip(models, names, colors):
            page.add(f"<li>{swatch(color)}<b>{esc(name)}</b> — {_model_line(model)}</li>")
        page.add("</ul>")

        page.add("<h2>Summary</h2>")
        page.add('<div class="cards">')
        for model, name, color in zip(models, names, colors):
            page.add(_summary_card(model, name, color))
        page.add("</div>")

        figures = families()
        page.add("<h2>Metrics by depth</h2>")
        for family in figures:
            drawn = None if family.own_section else family_figure(family, models, names, colors)
            if drawn is not None:
                page.figure(family.title, drawn[0], family_alt(family, drawn[1]), family.caption)

        page.add("<h2>Angular distance across n blocks</h2>")
        page.add('<div class="heatmaps">')
        drew_heatmap = False
        for model, name in zip(models, names):
            fig = heatmap_figure(model, name)
            if fig is not None:
                alt = f"Angular distance heatmap d(x_l, x_l+n) of {name}"
                page.figure(None, fig, alt, None, extra_class="heatmap")
                drew_heatmap = True
        page.add("</div>")
        page.add(f"<p class=\"muted\">{esc(HEATMAP_CAPTION) if drew_heatmap else 'No distance matrix.'}</p>")

        for family in figures:  # the families with a section of their own (max activations)
            drawn = family_figure(family, models, names, colors) if family.own_section else None
            if drawn is not None:
                page.add(f"<h2>{esc(family.title)}</h2>")
                page.figure(None, drawn[0], family_alt(family, drawn[1]), family.caption)

        draw_sections(page, models, names, colors)  # the opt-in sections the report holds (--interventions, ...)

        page.add("<h2>Per-layer numbers</h2>")
        page.add("<details><summary>All per-layer metrics (3 significant digits)</summary>")
        for model, name, color in zip(models, names, colors):
            page.add(f"<h3>{swatch(color)}{esc(name)}</h3>")
            page.add(_numbers_table(model))
        page.add("</details>")

    title = "layerlab report" + (": " + ", ".join(names) if names else "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body data-plots=\"{page.plots}\">\n<main>\n" + "\n".join(page.parts) + "\n</main>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_html(report: dict, path: Path) -> None:
    """Render ``report`` (see :func:`render_html`) and write it to ``path`` atomically.

    The page goes to a temporary file in the same directory that then replaces ``path`` in one step, so a
    reader never sees a half-written page and a failure leaves no temporary file behind.
    """
    path = Path(path)
    text = render_html(report)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open honours the umask (unlike tempfile's 0600), so the page gets the usual permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Page:
    """The body's HTML fragments and the number of plots among them."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plots = 0
        # the report layer's helpers, for the analysis sections' ``html`` (layerlab.analysis.sections), which sit
        # below this layer and may not import it: escaping, a model's colour swatch, figures in the report's look
        self.esc, self.swatch, self.mpl_text = esc, swatch, mpl_text
        self.new_figure, self.block_ticks, self.readable_log_ticks = new_figure, block_ticks, readable_log_ticks

    def add(self, fragment: str) -> None:
        """Append one HTML fragment to the body."""
        self.parts.append(fragment)

    def figure(self, title: str | None, fig: Figure, alt: str, caption: str | None, extra_class: str = "") -> None:
        """Append ``fig`` as an inline PNG in a <figure>, under an <h3> ``title`` and over its caption."""
        if title:
            self.add(f"<h3>{esc(title)}</h3>")
        self.add("<figure>" + _img(fig, alt, extra_class)
                 + (f"<figcaption>{esc(caption)}</figcaption>" if caption else "") + "</figure>")
        self.plots += 1


def esc(text: Any) -> str:
    """``text`` as a string, HTML-escaped (quotes too, so it is safe in an attribute)."""
    return html.escape(str(text), quote=True)


def swatch(color: str) -> str:
    """A small square of ``color``, to put before a name."""
    return f'<span class="swatch" style="background:{color}"></span>'


def _img(fig: Figure, alt: str, extra_class: str = "") -> str:
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    data = base64.b64encode(png(fig)).decode("ascii")
    cls = "plot" + (f" {extra_class}" if extra_class else "")
    return (f'<img class="{cls}" width="{width}" height="{height}" alt="{esc(alt)}" '
            f'src="data:image/png;base64,{data}">')


def _model_name(model: dict, i: int) -> str:
    return str(model.get("name") or model.get("path") or f"model {i + 1}")


def _provenance_line(provenance: dict, fmt: Any) -> str:
    bits = []
    if provenance.get("data") is not None:
        bits.append(f"data: {esc(provenance['data'])}")
    tokens = provenance.get("tokens")
    if tokens is not None:
        tok = f"{tokens:,} tokens" if isinstance(tokens, int) else f"{esc(tokens)} tokens"
        if provenance.get("seq_len") is not None:
            tok += f" (sequences of {esc(provenance['seq_len'])})"
        bits.append(tok)
    if provenance.get("created"):
        bits.append(f"created {esc(provenance['created'])}")
    versions = provenance.get("versions") or {}
    if isinstance(versions, dict):
        bits.extend(f"{esc(k)} {esc(v)}" for k, v in versions.items())
    if fmt:
        bits.append(f"format {esc(fmt)}")
    return " · ".join(bits) if bits else "no provenance recorded"


def _model_line(model: dict) -> str:
    bits = []
    if model.get("arch"):
        bits.append(f"arch {esc(model['arch'])}")
    num_layers = model.get("num_layers", len(model.get("layers") or []))
    bits.append(f"{esc(num_layers)} layers")
    if model.get("hidden_size") is not None:
        bits.append(f"width {esc(model['hidden_size'])}")
    if model.get("causal") is not None:
        bits.append("causal LM" if model["causal"] else "encoder")
    placements = model.get("placements")
    if isinstance(placements, list) and placements:
        bits.append("placement " + ", ".join(f"{esc(p)}×{n}" for p, n in run_lengths(placements)))
    loss = num(model.get("loss"))
    if not math.isnan(loss):
        bits.append(f"full loss {loss:.3f} nats/token")
    if model.get("path"):
        bits.append(f'<span class="muted">{esc(model["path"])}</span>')
    return " · ".join(bits)


def _fmt(value: Any) -> str:
    """Three significant digits for floats; ints and strings as they are; a dash for a missing value."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.3g}"
    return esc(value)


def _importance(model: dict) -> tuple[str, np.ndarray] | None:
    """The per-layer importance to rank blocks by: removal loss delta (causal), removal effect (encoder),
    else block influence; None when the model has none of them."""
    delta = ("removal_loss_delta", "loss increase when skipped")
    effect = ("removal_effect", "removal effect")
    order = [delta, effect] if model.get("causal", True) else [effect, delta]
    for key, label in [*order, ("block_influence", "block influence")]:
        values = layer_series(model, key)
        if np.isfinite(values).any():
            return label, values
    return None


def _blocks(start: int, n: int) -> str:
    return f"block {start}" if n == 1 else f"blocks {start}..{start + n - 1}"


def _summary_card(model: dict, name: str, color: str) -> str:
    rows: list[tuple[str, str]] = []
    loss = num(model.get("loss"))
    if not math.isnan(loss):
        rows.append(("Full loss", f"{loss:.3f} nats/token"))
    ranked = _importance(model)
    if ranked is None:
        rows.append(("Layer importance", "n/a (no removal or block-influence values)"))
    else:
        label, values = ranked
        finite = np.flatnonzero(np.isfinite(values))
        order = finite[np.argsort(-values[finite], kind="stable")]
        k = max(1, min(3, len(order) // 2))
        x = block_indices(model)

        def listing(idx: Iterable[int]) -> str:
            return ", ".join(f"<b>{x[i]}</b> <span class=\"muted\">({values[i]:.3g})</span>" for i in idx)

        rows.append((f"Most important blocks <span class=\"muted\">by {label}</span>", listing(order[:k])))
        rows.append((f"Least important blocks <span class=\"muted\">by {label}</span>", listing(order[::-1][:k])))
    best = best_blocks(model, span_for(model)[0])
    which = "last-token" if model.get("causal", True) else "all-token"
    for n in (1, 2, 3):
        if n in best:
            start, dist = best[n]
            note = f" <span class=\"muted\">({which} d&nbsp;=&nbsp;{dist:.3g})</span>" if not math.isnan(dist) else ""
            rows.append((f"Prune {n} block{'s' if n > 1 else ''}", f"<b>{_blocks(start, n)}</b>{note}"))
    if not any(n in best for n in (1, 2, 3)):
        rows.append(("Block to prune", "n/a"))
    rows.append(("Max activation", _max_activation_text(model.get("max_activation"))))
    rows.append(("Fidelity", _fidelity_text(model.get("fidelity"))))
    body = "".join(f"<tr><th>{h}</th><td>{v}</td></tr>" for h, v in rows)
    return (f'<div class="card" style="border-left-color:{color}"><h3>{swatch(color)}{esc(name)}</h3>'
            f'<table class="summary">{body}</table></div>')


def _fidelity_text(f: Any) -> str:
    """One line: the check of the hooked forward against the model's plain forward (``fidelity``)."""
    if not isinstance(f, dict):
        return "n/a (not checked)"
    logit = num(f.get("max_abs_logit_diff"))
    what = f"max |&Delta;logit| {logit:.3g}, " if not math.isnan(logit) else ""
    return (f"hooked = plain forward{' ' if f.get('passed') else ' <b>FAILED</b> '}"
            f"<span class=\"muted\">({what}max relative |&Delta;hidden| {num(f.get('max_rel_hidden_diff')):.3g} "
            f"over {f.get('layers_checked')} blocks, tolerance {num(f.get('tolerance')):g})</span>")


def _max_activation_text(ma: Any) -> str:
    if not isinstance(ma, dict) or math.isnan(num(ma.get("value"))):
        return "n/a"
    where = []
    if ma.get("layer") is not None:
        where.append(f"block {esc(ma['layer'])}")
    if ma.get("point") is not None:
        where.append(esc(ma["point"]))
    return f"<b>{num(ma['value']):.4g}</b>" + (f" at {', '.join(where)}" if where else "")


def _numbers_table(model: dict) -> str:
    layers = model_layers(model)
    if not layers:
        return '<p class="muted">No per-layer values.</p>'
    keys: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            names = [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else [key]
            keys.extend(k for k in names if k not in keys)
    keys = _table_columns(keys)
    keys = [k for k in keys if any(layer_value(layer, k) is not None for layer in layers)]
    head = "".join(f"<th>{esc(k).replace('_', '_<wbr>').replace('.', '.<wbr>')}</th>" for k in keys)
    rows = []
    for layer in layers:
        cells = []
        for k in keys:
            value = layer_value(layer, k)
            cells.append(f"<td>{_fmt(value) if not isinstance(value, (dict, list)) else esc(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="numbers"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _table_columns(keys: list[str]) -> list[str]:
    """The per-layer table's columns among ``keys`` (a dict-valued key "a" comes as "a.b", ...): the layer
    fields, then the registered metrics that have a column, in registry order (a dict's entries in their own
    order), then keys the registry does not know (from another version's report) in the order they came."""
    order = {key: i for i, key in enumerate((*LAYER_FIELDS, *METRICS))}
    hidden = {key for key, metric in METRICS.items() if not metric.table}
    shown = [k for k in keys if k.split(".")[0] not in hidden]
    return sorted(shown, key=lambda k: order.get(k.split(".")[0], len(order)))  # stable: ties keep their order
