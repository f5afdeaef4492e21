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
import io
import math
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["render_html", "write_html"]

_DPI = 100
_WIDE = 11.0  # inches: 1100 px at 100 dpi, the width of the page's content column
# One colour per model, in the order the models appear (matplotlib's tab10).
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


# ----------------------------------------------------------------------------------------------- what to plot


@dataclass(frozen=True)
class _Series:
    key: str  # a per-layer key; "a.b" reads layer["a"]["b"]
    label: str
    style: str = "-"


@dataclass(frozen=True)
class _Panel:
    title: str
    ylabel: str
    series: tuple[_Series, ...]
    log: bool = False
    hline: float | None = None  # a grey reference line
    embedding_key: str | None = None  # also plot model["embedding"][key] at x = -1 ("emb")
    final_key: str | None = None  # also plot model[key] at x = num_layers (the final norm)
    loss_line: bool = False  # a dashed line at each model's full loss


@dataclass(frozen=True)
class _Family:
    title: str
    caption: str
    panels: tuple[_Panel, ...]
    ncols: int = 3
    row_height: float = 2.9


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        "Layer similarity",
        "Angular distance between the residual stream entering and leaving each block (solid: all tokens, "
        "dashed: last token) and the ShortGPT block influence 1 − cos; low values mark blocks that change "
        "the stream little and are candidates for pruning (Gromov et al., 2024; Men et al., 2024).",
        (
            _Panel(r"Angular distance $d(x_l, x_{l+1})$", "arccos(cos) / π",
                   (_Series("angular_distance", "all tokens"),
                    _Series("angular_distance_last_token", "last token", "--"))),
            _Panel("Block influence (ShortGPT)", r"$1 - \cos(x_l, x_{l+1})$", (_Series("block_influence", "block"),)),
        ),
    ),
    _Family(
        "Contribution",
        "Size of each block's update relative to the stream it reads, ‖update‖ / ‖input‖, for the whole block "
        "and for its attention and MLP sublayers, and the cosine between each sublayer's output and its input "
        "(negative: the sublayer erases part of the stream) (Csordás et al., 2025).",
        (
            _Panel("Relative contribution", "‖update‖ / ‖input‖",
                   (_Series("relative_contribution", "block"),
                    _Series("attn_relative_contribution", "attention", "--"),
                    _Series("mlp_relative_contribution", "MLP", ":"))),
            _Panel("Cosine of the update with its input", "cosine",
                   (_Series("attn_cosine", "attention", "--"), _Series("mlp_cosine", "MLP", ":")), hline=0.0),
        ),
    ),
    _Family(
        "Hidden-state growth",
        "RMS of the residual stream leaving each block (log scale; the square at “emb” is the embedding "
        "output) and the ratio of its variance to that of the stream entering the block (above 1: the block "
        "grows the stream).",
        (
            _Panel("RMS of the stream leaving the block", "RMS (log scale)",
                   (_Series("hidden_rms", "leaving the block"),), log=True, embedding_key="hidden_rms"),
            _Panel("Variance growth", r"Var$(x_{l+1})$ / Var$(x_l)$", (_Series("variance_growth", "block"),),
                   hline=1.0),
        ),
    ),
    _Family(
        "Representation quality",
        "Geometry of the token representations leaving each block: effective rank (Roy & Vetterli, 2007), "
        "prompt entropy and curvature (Skean et al., 2025), TwoNN intrinsic dimension, and anisotropy "
        "(mean cosine between distinct tokens; high values mean the tokens crowd into a narrow cone).",
        (
            _Panel("Effective rank", "exp(entropy of σ)", (_Series("effective_rank", "effective rank"),)),
            _Panel("Prompt entropy", "normalized entropy", (_Series("prompt_entropy", "prompt entropy"),)),
            _Panel("Curvature", "mean angle (rad)", (_Series("curvature", "curvature"),)),
            _Panel("Intrinsic dimension (TwoNN)", "dimension", (_Series("intrinsic_dimension", "TwoNN"),)),
            _Panel("Anisotropy", "mean cosine", (_Series("anisotropy", "anisotropy"),)),
        ),
        row_height=2.6,
    ),
    _Family(
        "Logit lens",
        "Cross-entropy of the next-token prediction read straight from each block's output through the final "
        "norm and the unembedding, and its KL divergence from the model's own final prediction; the dashed "
        "line is the full model's loss.",
        (
            _Panel("Logit-lens loss", "cross-entropy (nats/token)", (_Series("logit_lens_loss", "logit lens"),),
                   loss_line=True),
            _Panel("KL to the final prediction", "KL (nats)", (_Series("logit_lens_kl", "KL"),)),
        ),
    ),
    _Family(
        "Layer removal",
        "How much the model's output changes when that single block is skipped: the loss increase in "
        "nats/token for causal LMs, 1 − cos of the mean-pooled output for encoders; high values mark the "
        "blocks the model cannot do without.",
        (
            _Panel("Loss increase when the block is skipped", "Δ loss (nats/token)",
                   (_Series("removal_loss_delta", "Δ loss"),), hline=0.0),
            _Panel("Removal effect (encoders)", "1 − cos (pooled output)",
                   (_Series("removal_effect", "removal effect"),), hline=0.0),
        ),
        ncols=2,
    ),
    _Family(
        "Weight spectra",
        "Heavy-tail exponent α of the eigenvalue spectrum of each block's weight matrices (HT-SR, Martin & "
        "Mahoney; 2 ≤ α ≤ 6 is typical of well-trained layers, larger α means less structure learned) and "
        "their stable rank ‖W‖²_F / ‖W‖²_2, both averaged over the block's matrices.",
        (
            _Panel("Heavy-tail exponent α", "α", (_Series("esd_alpha", "α"),)),
            _Panel("Stable rank", "stable rank", (_Series("stable_rank", "stable rank"),)),
        ),
    ),
)

_MAX_ACTIVATION = _Family(
    "Max activations",
    "Largest absolute activation at each block's hook points (the residual stream leaving the block, the "
    "attention output and the MLP output), log scale, with the embedding output (“emb”) and the final norm "
    "(diamond); massive activations show up as spikes orders of magnitude above their neighbours.",
    (
        _Panel("Max |activation| per block", "max |activation| (log scale)",
               (_Series("max_abs.resid", "residual stream"), _Series("max_abs.attn", "attention output", "--"),
                _Series("max_abs.mlp", "MLP output", ":")),
               log=True, embedding_key="max_abs_activation", final_key="final_norm_max_abs"),
    ),
    ncols=1,
    row_height=3.4,
)

_HEATMAP_CAPTION = (
    "Angular distance d(x_l, x_l+n) between the stream entering block l and the stream leaving block l+n−1, "
    "that is across n consecutive blocks (last token for causal LMs, all tokens for encoders); dark cells are "
    "spans whose removal changes the representation least, and the white dots mark the best block to start "
    "pruning at for each n (Gromov et al., 2024)."
)

# Column order of the per-layer table; keys not listed here follow in the order they first appear.
_TABLE_ORDER = (
    "index", "placement", "angular_distance", "angular_distance_last_token", "block_influence",
    "relative_contribution", "attn_relative_contribution", "attn_cosine", "mlp_relative_contribution",
    "mlp_cosine", "hidden_rms", "variance_growth", "max_abs_activation", "max_abs.resid", "max_abs.attn",
    "max_abs.mlp", "effective_rank", "prompt_entropy", "curvature", "intrinsic_dimension", "anisotropy",
    "logit_lens_loss", "logit_lens_kl", "removal_loss_delta", "removal_effect", "esd_alpha", "stable_rank",
)

_CSS = """
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

_SCRIPT = """
window.addEventListener("load", function () {
  var drawn = 0;
  document.querySelectorAll("img.plot").forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { drawn += 1; }
  });
  document.body.dataset.plotsLoaded = String(drawn);
});
"""

# No network at all: inline CSS and script, images only from data: URIs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# ------------------------------------------------------------------------------------------------ public API


def render_html(report: dict) -> str:
    """Render an analysis report as one self-contained HTML page (plots inline, no network needed).

    ``report`` follows docs/report-format.md; missing keys and ``None``/NaN values are tolerated (a series
    without any finite value is left out, a plot without any series is skipped). All text taken from the
    report is HTML-escaped.
    """
    models = [m if isinstance(m, dict) else {} for m in (report.get("models") or [])]
    provenance = report.get("provenance") or {}
    names = [_model_name(m, i) for i, m in enumerate(models)]
    colors = [_PALETTE[i % len(_PALETTE)] for i in range(len(models))]
    page = _Page()

    page.add("<h1>Layer analysis report</h1>")
    page.add(f'<p class="provenance">{_provenance_line(provenance, report.get("format"))}</p>')
    if not models:
        page.add("<p>This report holds no models.</p>")
    else:
        page.add('<ul class="models">')
        for model, name, color in zip(models, names, colors):
            page.add(f"<li>{_swatch(color)}<b>{_esc(name)}</b> — {_model_line(model)}</li>")
        page.add("</ul>")

        page.add("<h2>Summary</h2>")
        page.add('<div class="cards">')
        for model, name, color in zip(models, names, colors):
            page.add(_summary_card(model, name, color))
        page.add("</div>")

        page.add("<h2>Metrics by depth</h2>")
        for family in _FAMILIES:
            drawn = _family_figure(family, models, names, colors)
            if drawn is not None:
                page.figure(family.title, drawn[0], _family_alt(family, drawn[1]), family.caption)

        page.add("<h2>Angular distance across n blocks</h2>")
        page.add('<div class="heatmaps">')
        drew_heatmap = False
        for model, name in zip(models, names):
            fig = _heatmap_figure(model, name)
            if fig is not None:
                alt = f"Angular distance heatmap d(x_l, x_l+n) of {name}"
                page.figure(None, fig, alt, None, extra_class="heatmap")
                drew_heatmap = True
        page.add("</div>")
        page.add(f"<p class=\"muted\">{_esc(_HEATMAP_CAPTION) if drew_heatmap else 'No distance matrix.'}</p>")

        drawn = _family_figure(_MAX_ACTIVATION, models, names, colors)
        if drawn is not None:
            page.add(f"<h2>{_esc(_MAX_ACTIVATION.title)}</h2>")
            page.figure(None, drawn[0], _family_alt(_MAX_ACTIVATION, drawn[1]), _MAX_ACTIVATION.caption)

        page.add("<h2>Per-layer numbers</h2>")
        page.add("<details><summary>All per-layer metrics (3 significant digits)</summary>")
        for model, name, color in zip(models, names, colors):
            page.add(f"<h3>{_swatch(color)}{_esc(name)}</h3>")
            page.add(_numbers_table(model))
        page.add("</details>")

    title = "layerlab report" + (": " + ", ".join(names) if names else "")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body data-plots=\"{page.plots}\">\n<main>\n" + "\n".join(page.parts) + "\n</main>\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
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


# ------------------------------------------------------------------------------------------------ page parts


class _Page:
    """The body's HTML fragments and the number of plots among them."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.plots = 0

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def figure(self, title: str | None, fig: Figure, alt: str, caption: str | None, extra_class: str = "") -> None:
        if title:
            self.add(f"<h3>{_esc(title)}</h3>")
        self.add("<figure>" + _img(fig, alt, extra_class)
                 + (f"<figcaption>{_esc(caption)}</figcaption>" if caption else "") + "</figure>")
        self.plots += 1


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _swatch(color: str) -> str:
    return f'<span class="swatch" style="background:{color}"></span>'


def _png(fig: Figure) -> bytes:
    """The figure as a PNG, reduced to a 256-colour palette when Pillow is there (plots lose nothing visible and
    the file shrinks three- to four-fold)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        return buf.getvalue()
    buf.seek(0)
    with Image.open(buf) as image:
        # median cut keeps white exactly white; Pillow < 9.1 has the constant on Image, not the Quantize enum
        method = Image.Quantize.MEDIANCUT if hasattr(Image, "Quantize") else Image.MEDIANCUT
        small = image.convert("RGB").quantize(colors=256, method=method)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _img(fig: Figure, alt: str, extra_class: str = "") -> str:
    width, height = (round(v * _DPI) for v in fig.get_size_inches())
    data = base64.b64encode(_png(fig)).decode("ascii")
    cls = "plot" + (f" {extra_class}" if extra_class else "")
    return (f'<img class="{cls}" width="{width}" height="{height}" alt="{_esc(alt)}" '
            f'src="data:image/png;base64,{data}">')


def _model_name(model: dict, i: int) -> str:
    return str(model.get("name") or model.get("path") or f"model {i + 1}")


def _provenance_line(provenance: dict, fmt: Any) -> str:
    bits = []
    if provenance.get("data") is not None:
        bits.append(f"data: {_esc(provenance['data'])}")
    tokens = provenance.get("tokens")
    if tokens is not None:
        tok = f"{tokens:,} tokens" if isinstance(tokens, int) else f"{_esc(tokens)} tokens"
        if provenance.get("seq_len") is not None:
            tok += f" (sequences of {_esc(provenance['seq_len'])})"
        bits.append(tok)
    if provenance.get("created"):
        bits.append(f"created {_esc(provenance['created'])}")
    versions = provenance.get("versions") or {}
    if isinstance(versions, dict):
        bits.extend(f"{_esc(k)} {_esc(v)}" for k, v in versions.items())
    if fmt:
        bits.append(f"format {_esc(fmt)}")
    return " · ".join(bits) if bits else "no provenance recorded"


def _model_line(model: dict) -> str:
    bits = []
    if model.get("arch"):
        bits.append(f"arch {_esc(model['arch'])}")
    num_layers = model.get("num_layers", len(model.get("layers") or []))
    bits.append(f"{_esc(num_layers)} layers")
    if model.get("hidden_size") is not None:
        bits.append(f"width {_esc(model['hidden_size'])}")
    if model.get("causal") is not None:
        bits.append("causal LM" if model["causal"] else "encoder")
    placements = model.get("placements")
    if isinstance(placements, list) and placements:
        bits.append("placement " + ", ".join(f"{_esc(p)}×{n}" for p, n in _runs(placements)))
    loss = _num(model.get("loss"))
    if not math.isnan(loss):
        bits.append(f"full loss {loss:.3f} nats/token")
    if model.get("path"):
        bits.append(f'<span class="muted">{_esc(model["path"])}</span>')
    return " · ".join(bits)


def _runs(items: list) -> list[tuple[Any, int]]:
    """Run-length encoding: ["pre", "pre", "post"] -> [("pre", 2), ("post", 1)]."""
    out: list[tuple[Any, int]] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1] + 1)
        else:
            out.append((item, 1))
    return out


# ------------------------------------------------------------------------------------------------ numbers


def _num(value: Any) -> float:
    """A finite float, or NaN for None, NaN, infinities and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _get(layer: dict, key: str) -> Any:
    value: Any = layer
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _layers(model: dict) -> list[dict]:
    return [layer if isinstance(layer, dict) else {} for layer in (model.get("layers") or [])]


def _series(model: dict, key: str) -> np.ndarray:
    return np.array([_num(_get(layer, key)) for layer in _layers(model)], dtype=float)


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
    return _esc(value)


# ------------------------------------------------------------------------------------------------ summary


def _importance(model: dict) -> tuple[str, np.ndarray] | None:
    """The per-layer importance to rank blocks by: removal loss delta (causal), removal effect (encoder),
    else block influence; None when the model has none of them."""
    delta = ("removal_loss_delta", "loss increase when skipped")
    effect = ("removal_effect", "removal effect")
    order = [delta, effect] if model.get("causal", True) else [effect, delta]
    for key, label in [*order, ("block_influence", "block influence")]:
        values = _series(model, key)
        if np.isfinite(values).any():
            return label, values
    return None


def _best_blocks(model: dict, span: np.ndarray | None) -> dict[int, tuple[int, float]]:
    """n -> (start, distance) from ``best_block_to_prune``, else the argmin of the span matrix."""
    best: dict[int, tuple[int, float]] = {}
    given = model.get("best_block_to_prune")
    if isinstance(given, dict):
        for n, entry in given.items():
            try:
                n_int, start = int(n), int(entry["start"])
            except (TypeError, ValueError, KeyError):
                continue
            best[n_int] = (start, _num(entry.get("distance")))
    if not best and span is not None:
        for n in range(1, span.shape[1] + 1):
            column = span[:, n - 1]
            if np.isfinite(column).any():
                start = int(np.nanargmin(column))
                best[n] = (start, float(column[start]))
    return dict(sorted(best.items()))


def _blocks(start: int, n: int) -> str:
    return f"block {start}" if n == 1 else f"blocks {start}..{start + n - 1}"


def _summary_card(model: dict, name: str, color: str) -> str:
    rows: list[tuple[str, str]] = []
    loss = _num(model.get("loss"))
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
        x = _x(model)

        def listing(idx: Iterable[int]) -> str:
            return ", ".join(f"<b>{x[i]}</b> <span class=\"muted\">({values[i]:.3g})</span>" for i in idx)

        rows.append((f"Most important blocks <span class=\"muted\">by {label}</span>", listing(order[:k])))
        rows.append((f"Least important blocks <span class=\"muted\">by {label}</span>", listing(order[::-1][:k])))
    best = _best_blocks(model, _span_for(model)[0])
    which = "last-token" if model.get("causal", True) else "all-token"
    for n in (1, 2, 3):
        if n in best:
            start, dist = best[n]
            note = f" <span class=\"muted\">({which} d&nbsp;=&nbsp;{dist:.3g})</span>" if not math.isnan(dist) else ""
            rows.append((f"Prune {n} block{'s' if n > 1 else ''}", f"<b>{_blocks(start, n)}</b>{note}"))
    if not any(n in best for n in (1, 2, 3)):
        rows.append(("Block to prune", "n/a"))
    rows.append(("Max activation", _max_activation_text(model.get("max_activation"))))
    body = "".join(f"<tr><th>{h}</th><td>{v}</td></tr>" for h, v in rows)
    return (f'<div class="card" style="border-left-color:{color}"><h3>{_swatch(color)}{_esc(name)}</h3>'
            f'<table class="summary">{body}</table></div>')


def _max_activation_text(ma: Any) -> str:
    if not isinstance(ma, dict) or math.isnan(_num(ma.get("value"))):
        return "n/a"
    where = []
    if ma.get("layer") is not None:
        where.append(f"block {_esc(ma['layer'])}")
    if ma.get("point") is not None:
        where.append(_esc(ma["point"]))
    return f"<b>{_num(ma['value']):.4g}</b>" + (f" at {', '.join(where)}" if where else "")


# ------------------------------------------------------------------------------------------------ plots


def _mpl_text(text: str) -> str:
    """User text for matplotlib: no mathtext from stray dollar signs."""
    return text.replace("$", r"\$")


def _x(model: dict) -> list[int]:
    """Block indices: the layers' ``index`` where it is an int, else the position."""
    out = []
    for i, layer in enumerate(_layers(model)):
        index = layer.get("index")
        out.append(index if isinstance(index, int) and not isinstance(index, bool) else i)
    return out


def _family_alt(family: _Family, panels: list[_Panel]) -> str:
    metrics = "; ".join(p.title.replace("$", "").replace("\\", "") for p in panels)
    return f"{family.title} against block index: {metrics}"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _family_figure(
    family: _Family, models: list[dict], names: list[str], colors: list[str]
) -> tuple[Figure, list[_Panel]] | None:
    """One figure for a metric family, a panel per metric group with the models overlaid in their colours, and
    the panels drawn; None when no panel has a finite value."""
    panels = []
    for panel in family.panels:
        lines = []
        for m, model in enumerate(models):
            for series in panel.series:
                y = _series(model, series.key)
                if panel.log:
                    y[y <= 0] = np.nan
                if np.isfinite(y).any():
                    lines.append((m, series, y))
        if lines:
            panels.append((panel, lines))
    if not panels:
        return None

    ncols = min(family.ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    several = len(models) > 1
    width = _WIDE if ncols > 1 or family.ncols == 1 else 6.5
    fig = _new_figure(width, family.row_height * nrows + (0.35 if several else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.remove()
    for ax, (panel, lines) in zip(axes, panels):
        _draw_panel(ax, panel, lines, models, colors)
    if several:
        handles = [Line2D([], [], color=c, lw=2.5) for c in colors]
        fig.legend(handles, [_mpl_text(n) for n in names], loc="outside upper center", ncols=min(len(names), 5),
                   frameon=False, fontsize=9)
    return fig, [panel for panel, _ in panels]


def _draw_panel(ax: Axes, panel: _Panel, lines: list, models: list[dict], colors: list[str]) -> None:
    drawn_models = sorted({m for m, _, _ in lines})
    styles: dict[str, _Series] = {}
    for m, series, y in lines:
        x = _x(models[m])
        ax.plot(x, y, series.style, color=colors[m], lw=1.6, marker="o", ms=3)
        styles.setdefault(series.key, series)
    extra: list[tuple[Line2D, str]] = []
    has_emb = has_final = False
    finals = set()
    for m in drawn_models:
        model = models[m]
        if panel.embedding_key:
            emb = _num((model.get("embedding") or {}).get(panel.embedding_key))
            if not math.isnan(emb) and (emb > 0 or not panel.log):
                ax.plot([-1], [emb], "s", color=colors[m], ms=6)
                has_emb = True
        if panel.final_key:
            fin = _num(model.get(panel.final_key))
            if not math.isnan(fin) and (fin > 0 or not panel.log):
                x_final = len(_layers(model))
                ax.plot([x_final], [fin], "D", color=colors[m], ms=6)
                has_final = True
                finals.add(x_final)
        if panel.loss_line:
            loss = _num(model.get("loss"))
            if not math.isnan(loss):
                ax.axhline(loss, color=colors[m], ls="--", lw=1.1, alpha=0.8)
                if not extra or extra[-1][1] != "full model loss":
                    extra.append((Line2D([], [], color="0.35", ls="--", lw=1.1), "full model loss"))
    if has_emb:
        extra.append((Line2D([], [], color="0.35", marker="s", ls="none", ms=6), "embedding output"))
    if has_final:
        extra.append((Line2D([], [], color="0.35", marker="D", ls="none", ms=6), "final norm"))
    if panel.hline is not None:
        ax.axhline(panel.hline, color="0.55", lw=0.8, zorder=0)
    if panel.log:
        ax.set_yscale("log")
        _readable_log_ticks(ax)

    handles = [Line2D([], [], color="0.25", ls=s.style, lw=1.6) for s in styles.values()]
    labels = [s.label for s in styles.values()]
    if len(handles) > 1 or extra:
        ax.legend(handles + [h for h, _ in extra], labels + [t for _, t in extra], fontsize=7.5, framealpha=0.85)
    ax.set_title(panel.title, fontsize=10.5)
    ax.set_xlabel("block", fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, lw=0.6)
    depth = max(len(_layers(models[m])) for m in drawn_models)
    _block_ticks(ax, depth, has_emb, finals)


def _readable_log_ticks(ax: Axes) -> None:
    """Plain numbers on a log axis: 1, 2, 5 per decade over a short range (where the default would label only
    one decade, or none), decades otherwise; minor ticks unlabelled."""
    lo, hi = ax.get_ylim()
    if lo > 0 and math.log10(hi / lo) <= 2.5:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _block_ticks(ax: Axes, depth: int, with_embedding: bool, finals: set[int]) -> None:
    """Integer block ticks (at most ~16), "emb" at -1, and "norm" at the final norm when all models agree."""
    step = max(1, math.ceil(depth / 16))
    ticks = list(range(0, max(depth, 1), step))
    labels = [str(t) for t in ticks]
    if with_embedding:
        ticks.insert(0, -1)
        labels.insert(0, "emb")
    if len(finals) == 1:
        (final,) = finals
        if final not in ticks:
            ticks.append(final)
            labels.append("norm")
    ax.set_xticks(ticks, labels)


def _span_for(model: dict) -> tuple[np.ndarray | None, str]:
    """The span matrix (see :func:`_span_matrix`) from the last-token matrix for causal models, the all-token
    matrix for encoders (each falling back to the other), and which one it is."""
    keys = ["angular_distance_matrix_last_token", "angular_distance_matrix"]
    if not model.get("causal", True):
        keys.reverse()
    for key in keys:
        matrix = model.get(key)
        if isinstance(matrix, list) and len(matrix) > 1:
            span = _span_matrix(matrix)
            if np.isfinite(span).any():
                return span, "last token" if key.endswith("last_token") else "all tokens"
    return None, ""


def _span_matrix(matrix: list) -> np.ndarray:
    """``D[l, n - 1] = d(x_l, x_{l+n})`` for l = 0..L-1 and n = 1..L-l from the (L+1) x (L+1) state-distance
    matrix (upper triangle; the lower one is read where the upper is missing). Cells with l + n > L are NaN."""
    states = len(matrix)
    num_layers = states - 1

    def cell(i: int, j: int) -> float:
        row = matrix[i] if i < states and isinstance(matrix[i], list) else []
        return _num(row[j]) if j < len(row) else math.nan

    span = np.full((num_layers, num_layers), np.nan)
    for start in range(num_layers):
        for n in range(1, num_layers - start + 1):
            value = cell(start, start + n)
            span[start, n - 1] = value if not math.isnan(value) else cell(start + n, start)
    return span


def _heatmap_figure(model: dict, name: str) -> Figure | None:
    span, which = _span_for(model)
    if span is None:
        return None
    num_layers = span.shape[0]
    fig = _new_figure(5.4, 4.5)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(span), cmap=cmap, aspect="auto", interpolation="nearest",
                      extent=(0.5, num_layers + 0.5, num_layers - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label=f"angular distance ({which})", shrink=0.9)
    best = [(n, start) for n, (start, _) in _best_blocks(model, span).items() if 1 <= n <= num_layers]
    if best:
        ax.scatter([n for n, _ in best], [s for _, s in best], s=22, c="white", edgecolors="black", linewidths=0.7,
                   zorder=3)
    step = max(1, math.ceil(num_layers / 12))
    ax.set_xticks(range(1, num_layers + 1, step))
    ax.set_yticks(range(0, num_layers, step))
    ax.set_xlabel("n (number of consecutive blocks)", fontsize=9)
    ax.set_ylabel("l (first block)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_title(_mpl_text(name) + r": $d(x_l, x_{l+n})$, " + which, fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------------ table


def _numbers_table(model: dict) -> str:
    layers = _layers(model)
    if not layers:
        return '<p class="muted">No per-layer values.</p>'
    keys: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            names = [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else [key]
            keys.extend(k for k in names if k not in keys)
    keys = [k for k in _TABLE_ORDER if k in keys] + [k for k in keys if k not in _TABLE_ORDER]
    keys = [k for k in keys if any(_get(layer, k) is not None for layer in layers)]
    head = "".join(f"<th>{_esc(k).replace('_', '_<wbr>').replace('.', '.<wbr>')}</th>" for k in keys)
    rows = []
    for layer in layers:
        cells = []
        for k in keys:
            value = _get(layer, k)
            cells.append(f"<td>{_fmt(value) if not isinstance(value, (dict, list)) else _esc(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="numbers"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")
