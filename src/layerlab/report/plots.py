"""Figures of the analysis report: one matplotlib Figure per metric family, the heatmap, PNG encoding.

Which metric is drawn in which figure, panel and line style is declared by the metric itself in the metric
registry (:mod:`layerlab.analysis.metrics`); :func:`families` builds the figures from it.

Every plot is drawn on its own :class:`matplotlib.figure.Figure` with the Agg canvas (pyplot and its
global figure registry are never used). Split from ``html.py``, which assembles the page.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..analysis.metrics import FAMILIES, METRICS, Plot, series_key

DPI = 100  # pixels per inch of every figure and of the page's <img> sizes


WIDE = 11.0  # inches: 1100 px at 100 dpi, the width of the page's content column


# One colour per model, in the order the models appear (matplotlib's tab10).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


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
    own_section: bool = False  # drawn under its own heading after the heatmaps


def families() -> list[_Family]:
    """The figures of the page, in the order of the plot families of the metric registry
    (:mod:`layerlab.analysis.metrics`), each with a panel per panel title its metrics name, in registry order;
    a family no registered metric draws in is left out."""
    grouped: dict[str, dict[str, list[tuple[str, Plot]]]] = {title: {} for title in FAMILIES}
    for key, metric in METRICS.items():
        for plot in metric.plots:
            grouped[plot.family].setdefault(plot.panel, []).append((series_key(key, plot), plot))
    out = []
    for title, family in FAMILIES.items():
        if grouped[title]:
            panels = tuple(_panel(panel, plots) for panel, plots in grouped[title].items())
            out.append(_Family(title, family.caption, panels, family.ncols, family.row_height, family.own_section))
    return out


def _panel(title: str, plots: list[tuple[str, Plot]]) -> _Panel:
    """A panel of ``plots`` (series key, plot); its axis settings are those of the first plot."""
    first = plots[0][1]
    return _Panel(title, first.ylabel, tuple(_Series(key, p.label, p.style) for key, p in plots), log=first.log,
                  hline=first.hline, embedding_key=first.embedding_key, final_key=first.final_key,
                  loss_line=first.loss_line)


# The caption under the angular-distance heatmaps.
HEATMAP_CAPTION = (
    "Angular distance d(x_l, x_l+n) between the stream entering block l and the stream leaving block l+n−1, "
    "that is across n consecutive blocks (last token for causal LMs, all tokens for encoders); dark cells are "
    "spans whose removal changes the representation least, and the white dots mark the best block to start "
    "pruning at for each n (Gromov et al., 2024)."
)


def png(fig: Figure) -> bytes:
    """The figure as a PNG, reduced to a 256-colour palette when Pillow is there (plots lose nothing visible and
    the file shrinks three- to four-fold)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
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


def run_lengths(items: list) -> list[tuple[Any, int]]:
    """Run-length encoding: ["pre", "pre", "post"] -> [("pre", 2), ("post", 1)]."""
    out: list[tuple[Any, int]] = []
    for item in items:
        if out and out[-1][0] == item:
            out[-1] = (item, out[-1][1] + 1)
        else:
            out.append((item, 1))
    return out


def num(value: Any) -> float:
    """A finite float, or NaN for None, NaN, infinities and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def layer_value(layer: dict, key: str) -> Any:
    """The value of a per-layer key ("a.b" reads layer["a"]["b"]), or None where it is missing."""
    value: Any = layer
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def model_layers(model: dict) -> list[dict]:
    """The model's per-layer records, an empty dict in place of anything that is not a mapping."""
    return [layer if isinstance(layer, dict) else {} for layer in (model.get("layers") or [])]


def layer_series(model: dict, key: str) -> np.ndarray:
    """One per-layer key of every layer as floats, NaN where missing or not finite."""
    return np.array([num(layer_value(layer, key)) for layer in model_layers(model)], dtype=float)


def best_blocks(model: dict, span: np.ndarray | None) -> dict[int, tuple[int, float]]:
    """n -> (start, distance) from ``best_block_to_prune``, else the argmin of the span matrix."""
    best: dict[int, tuple[int, float]] = {}
    given = model.get("best_block_to_prune")
    if isinstance(given, dict):
        for n, entry in given.items():
            try:
                n_int, start = int(n), int(entry["start"])
            except (TypeError, ValueError, KeyError):
                continue
            best[n_int] = (start, num(entry.get("distance")))
    if not best and span is not None:
        for n in range(1, span.shape[1] + 1):
            column = span[:, n - 1]
            if np.isfinite(column).any():
                start = int(np.nanargmin(column))
                best[n] = (start, float(column[start]))
    return dict(sorted(best.items()))


def mpl_text(text: str) -> str:
    """User text for matplotlib: no mathtext from stray dollar signs."""
    return text.replace("$", r"\$")


def block_indices(model: dict) -> list[int]:
    """Block indices: the layers' ``index`` where it is an int, else the position."""
    out = []
    for i, layer in enumerate(model_layers(model)):
        index = layer.get("index")
        out.append(index if isinstance(index, int) and not isinstance(index, bool) else i)
    return out


def family_alt(family: _Family, panels: list[_Panel]) -> str:
    """The alt text of a family's figure: its title and the titles of the panels drawn."""
    metrics = "; ".join(p.title.replace("$", "").replace("\\", "") for p in panels)
    return f"{family.title} against block index: {metrics}"


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout Figure of ``width`` x ``height`` inches on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def family_figure(
    family: _Family, models: list[dict], names: list[str], colors: list[str]
) -> tuple[Figure, list[_Panel]] | None:
    """One figure for a metric family, a panel per metric group with the models overlaid in their colours, and
    the panels drawn; None when no panel has a finite value."""
    panels = []
    for panel in family.panels:
        lines = []
        for m, model in enumerate(models):
            for series in panel.series:
                y = layer_series(model, series.key)
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
    width = WIDE if ncols > 1 or family.ncols == 1 else 6.5
    fig = new_figure(width, family.row_height * nrows + (0.35 if several else 0.0))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.remove()
    for ax, (panel, lines) in zip(axes, panels):
        _draw_panel(ax, panel, lines, models, colors)
    if several:
        handles = [Line2D([], [], color=c, lw=2.5) for c in colors]
        fig.legend(handles, [mpl_text(n) for n in names], loc="outside upper center", ncols=min(len(names), 5),
                   frameon=False, fontsize=9)
    return fig, [panel for panel, _ in panels]


def _draw_panel(ax: Axes, panel: _Panel, lines: list, models: list[dict], colors: list[str]) -> None:
    drawn_models = sorted({m for m, _, _ in lines})
    styles: dict[str, _Series] = {}
    for m, series, y in lines:
        x = block_indices(models[m])
        ax.plot(x, y, series.style, color=colors[m], lw=1.6, marker="o", ms=3)
        styles.setdefault(series.key, series)
    extra: list[tuple[Line2D, str]] = []
    has_emb = has_final = False
    finals = set()
    for m in drawn_models:
        model = models[m]
        if panel.embedding_key:
            emb = num((model.get("embedding") or {}).get(panel.embedding_key))
            if not math.isnan(emb) and (emb > 0 or not panel.log):
                ax.plot([-1], [emb], "s", color=colors[m], ms=6)
                has_emb = True
        if panel.final_key:
            fin = num(model.get(panel.final_key))
            if not math.isnan(fin) and (fin > 0 or not panel.log):
                x_final = len(model_layers(model))
                ax.plot([x_final], [fin], "D", color=colors[m], ms=6)
                has_final = True
                finals.add(x_final)
        if panel.loss_line:
            loss = num(model.get("loss"))
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
        readable_log_ticks(ax)

    handles = [Line2D([], [], color="0.25", ls=s.style, lw=1.6) for s in styles.values()]
    labels = [s.label for s in styles.values()]
    if len(handles) > 1 or extra:
        ax.legend(handles + [h for h, _ in extra], labels + [t for _, t in extra], fontsize=7.5, framealpha=0.85)
    ax.set_title(panel.title, fontsize=10.5)
    ax.set_xlabel("block", fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, lw=0.6)
    depth = max(len(model_layers(models[m])) for m in drawn_models)
    block_ticks(ax, depth, has_emb, finals)


def readable_log_ticks(ax: Axes) -> None:
    """Plain numbers on a log axis: 1, 2, 5 per decade over a short range (where the default would label only
    one decade, or none), decades otherwise; minor ticks unlabelled."""
    lo, hi = ax.get_ylim()
    if lo > 0 and math.log10(hi / lo) <= 2.5:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def block_ticks(ax: Axes, depth: int, with_embedding: bool, finals: set[int]) -> None:
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


def span_for(model: dict) -> tuple[np.ndarray | None, str]:
    """The span matrix (see :func:`span_matrix`) from the last-token matrix for causal models, the all-token
    matrix for encoders (each falling back to the other), and which one it is."""
    keys = ["angular_distance_matrix_last_token", "angular_distance_matrix"]
    if not model.get("causal", True):
        keys.reverse()
    for key in keys:
        matrix = model.get(key)
        if isinstance(matrix, list) and len(matrix) > 1:
            span = span_matrix(matrix)
            if np.isfinite(span).any():
                return span, "last token" if key.endswith("last_token") else "all tokens"
    return None, ""


def span_matrix(matrix: list) -> np.ndarray:
    """``D[l, n - 1] = d(x_l, x_{l+n})`` for l = 0..L-1 and n = 1..L-l from the (L+1) x (L+1) state-distance
    matrix (upper triangle; the lower one is read where the upper is missing). Cells with l + n > L are NaN."""
    states = len(matrix)
    num_layers = states - 1

    def cell(i: int, j: int) -> float:
        row = matrix[i] if i < states and isinstance(matrix[i], list) else []
        return num(row[j]) if j < len(row) else math.nan

    span = np.full((num_layers, num_layers), np.nan)
    for start in range(num_layers):
        for n in range(1, num_layers - start + 1):
            value = cell(start, start + n)
            span[start, n - 1] = value if not math.isnan(value) else cell(start + n, start)
    return span


def heatmap_figure(model: dict, name: str) -> Figure | None:
    """The angular-distance heatmap d(x_l, x_l+n) of one model with its best blocks to prune; None without a matrix."""
    span, which = span_for(model)
    if span is None:
        return None
    num_layers = span.shape[0]
    fig = new_figure(5.4, 4.5)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(span), cmap=cmap, aspect="auto", interpolation="nearest",
                      extent=(0.5, num_layers + 0.5, num_layers - 0.5, -0.5))
    fig.colorbar(image, ax=ax, label=f"angular distance ({which})", shrink=0.9)
    best = [(n, start) for n, (start, _) in best_blocks(model, span).items() if 1 <= n <= num_layers]
    if best:
        ax.scatter([n for n, _ in best], [s for _, s in best], s=22, c="white", edgecolors="black", linewidths=0.7,
                   zorder=3)
    step = max(1, math.ceil(num_layers / 12))
    ax.set_xticks(range(1, num_layers + 1, step))
    ax.set_yticks(range(0, num_layers, step))
    ax.set_xlabel("n (number of consecutive blocks)", fontsize=9)
    ax.set_ylabel("l (first block)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_title(mpl_text(name) + r": $d(x_l, x_{l+n})$, " + which, fontsize=10)
    return fig
