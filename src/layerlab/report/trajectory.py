"""The trajectory page: each per-block metric of a run's checkpoints as a block × step heatmap
(``trajectory.html``), beside the record it draws (``trajectory.json``; see docs/report-format.md and
:mod:`layerlab.analysis.trajectory`).

Columns are the checkpoints in step order, evenly spaced and labelled with their step (Pythia's checkpoints are
log-spaced early in training, so a linear step axis would squeeze them into one column); rows are the blocks,
block 0 at the bottom, as in the per-layer training-dynamics plots of Martinez et al., 2024 ("Tending Towards
Stability"). The page is self-contained as report.html is (:mod:`layerlab.report.html`: inline PNGs, no network).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..analysis.metrics import METRICS
from ..analysis.report import Report
from ..analysis.trajectory import metric_table
from ..io import atomic_write_bytes
from .html import CSP, CSS, SCRIPT, Page, esc
from .plots import mpl_text, new_figure, num

__all__ = ["HEADLINE", "headline_metrics", "render_trajectory_html", "trajectory_figure", "write_trajectory"]

# The metrics the issue names, drawn first: angular distance to the next block, the layer-removal delta (encoders:
# the removal effect), the weight spectra's heavy-tail exponent and the effective rank of the block's output.
HEADLINE = ("angular_distance", "removal_loss_delta", "removal_effect", "esd_alpha", "effective_rank")


def _table(traj: dict, key: str) -> np.ndarray:
    """``key`` as a (blocks, steps) float array, NaN where missing."""
    return np.array([[num(v) for v in row] for row in metric_table(traj, key)], dtype=float).reshape(
        -1, len(traj.get("steps") or []))


def headline_metrics(traj: dict) -> tuple[list[str], list[str]]:
    """The metrics with a finite value anywhere: the headline ones in :data:`HEADLINE`'s order, and the rest in
    registry order (a key the registry does not know comes last)."""
    order = {k: i for i, k in enumerate(METRICS)}
    keys = sorted((k for k in (traj.get("metrics") or {}) if np.isfinite(_table(traj, k)).any()),
                  key=lambda k: order.get(k, len(order)))
    return [k for k in HEADLINE if k in keys], [k for k in keys if k not in HEADLINE]


def _title(key: str) -> str:
    metric = METRICS.get(key)
    if metric is None or not metric.plots:
        return key
    plot = metric.plots[0]
    shared = sum(p.panel == plot.panel for m in METRICS.values() for p in m.plots) > 1
    return plot.panel + (f": {plot.label}" if shared else "")


def trajectory_figure(traj: dict, key: str) -> Figure | None:
    """``key``'s heatmap: block (rows, 0 at the bottom) × checkpoint (columns, in step order); None when it has no
    finite value. A metric the registry draws on a log axis gets a log colour scale where all values are > 0."""
    table = _table(traj, key)
    finite = table[np.isfinite(table)]
    if finite.size == 0:
        return None
    blocks, columns = table.shape
    steps = [s.get("step") for s in traj["steps"]]
    metric = METRICS.get(key)
    log = bool(metric and metric.plots and metric.plots[0].log) and bool((finite > 0).all())
    fig = new_figure(5.4, 3.2 + 0.06 * min(blocks, 40))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(table), cmap=cmap, aspect="auto", interpolation="nearest", origin="lower",
                      norm=LogNorm() if log else None, extent=(-0.5, columns - 0.5, -0.5, blocks - 0.5))
    label = metric.plots[0].ylabel if metric and metric.plots and metric.plots[0].ylabel else key
    fig.colorbar(image, ax=ax, label=mpl_text(label) if not label.startswith("$") else label, shrink=0.9)
    every = max(1, math.ceil(columns / 10))
    ax.set_xticks(range(0, columns, every), [str(s) for s in steps[::every]], rotation=45 if columns > 4 else 0,
                  ha="right" if columns > 4 else "center")
    ax.set_yticks(range(0, blocks, max(1, math.ceil(blocks / 12))))
    ax.set_xlabel("training step (one column per checkpoint)", fontsize=9)
    ax.set_ylabel("block", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.set_title(mpl_text(_title(key)) if "$" not in _title(key) else _title(key), fontsize=10)
    return fig


def _loss_figure(traj: dict) -> Figure | None:
    """The full model's loss at each checkpoint (causal LMs), against the step."""
    pts = [(s.get("step"), num(s.get("loss"))) for s in traj.get("steps") or []]
    pts = [(x, y) for x, y in pts if isinstance(x, int) and not math.isnan(y)]
    if not pts:
        return None
    fig = new_figure(5.4, 3.0)
    ax = fig.add_subplot()
    ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", lw=1.6, ms=3)
    positive = [x for x, _ in pts if x > 0]
    if len(positive) > 2 and max(positive) / min(positive) > 100:  # Pythia-style log-spaced checkpoints (and step 0)
        ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("training step", fontsize=9)
    ax.set_ylabel("loss (nats/token)", fontsize=9)
    ax.set_title("Full-model loss at each checkpoint", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, lw=0.6)
    return fig


def _caption(key: str) -> str:
    metric = METRICS.get(key)
    if metric is None:
        return key
    return f"{key}: {metric.doc}" + (f" ({metric.paper})" if metric.paper else "")


def render_trajectory_html(traj: dict) -> str:
    """``traj`` (a trajectory record) as one self-contained HTML page of block × step heatmaps."""
    steps = traj.get("steps") or []
    page = Page()
    run = str(traj.get("run") or "")
    page.add(f"<h1>Layer trajectories over training: {esc(run)}</h1>")
    prov = traj.get("provenance") or {}
    bits = [f"{len(steps)} checkpoints, steps {esc(', '.join(str(s.get('step')) for s in steps))}"]
    if prov.get("data") is not None:
        bits.append(f"data: {esc(prov['data'])}")
    if prov.get("tokens") is not None:
        bits.append(f"{esc(prov['tokens'])} tokens per checkpoint")
    if prov.get("created"):
        bits.append(f"created {esc(prov['created'])}")
    bits.append(f"format {esc(traj.get('format'))}")
    page.add(f'<p class="provenance">{" · ".join(bits)}</p>')
    loss = _loss_figure(traj)
    if loss is not None:
        page.figure(None, loss, "Full-model loss against the training step", None)
    headline, rest = headline_metrics(traj)
    for title, keys in (("Angular distance, layer removal, weight spectra and effective rank", headline),
                        ("Every other per-block metric", rest)):
        if not keys:
            continue
        page.add(f"<h2>{esc(title)}</h2>")
        page.add('<div class="heatmaps">')
        for key in keys:
            fig = trajectory_figure(traj, key)
            if fig is not None:
                page.figure(None, fig, f"{key}: block against training step", _caption(key), extra_class="heatmap")
        page.add("</div>")
    if not headline and not rest:
        page.add("<p>No per-block values to draw.</p>")
    page.add('<p class="muted">Each column is one checkpoint (in step order, evenly spaced, labelled with its step); '
             "each row one block, block 0 at the bottom; white cells have no value. Layer dynamics over training as "
             "in Martinez et al., 2024 (Tending Towards Stability) on the Pythia checkpoints.</p>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc('layerlab trajectory: ' + run)}</title>\n<style>{CSS}</style>\n</head>\n"
        f"<body data-plots=\"{page.plots}\">\n<main>\n" + "\n".join(page.parts) + "\n</main>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_trajectory(traj: dict, out: str | Path) -> Path:
    """Write ``trajectory.json`` and ``trajectory.html`` into ``out`` (created if needed), each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Report(traj).data  # NaN and Inf become null: strict JSON, as report.json
    atomic_write_bytes(out / "trajectory.json", (json.dumps(data, indent=1) + "\n").encode())
    atomic_write_bytes(out / "trajectory.html", render_trajectory_html(data).encode("utf-8"))
    return out

