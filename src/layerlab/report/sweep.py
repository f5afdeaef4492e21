"""Render a sweep summary (``sweep.json``, see docs/sweep.md) as one self-contained HTML page.

The page follows the analysis report (``html.py``): its CSS, Content-Security-Policy (no network), plot counter
script and figure helpers, each plot a base64 PNG drawn on its own Agg figure. One colour per config (and a line
style after ten), in the order the configs appear in the sweep:

- loss curves: training loss of every run (seeds share their config's colour) and validation loss;
- final validation loss: each seed as a dot, the mean with its standard deviation over seeds;
- per-layer curves of the final models side by side: angular distance and layer-removal loss delta (from
  ``analyze``) and the gradient norm per block (last telemetry record), mean over seeds with a min-max band.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from ..io import atomic_write_bytes
from .html import CSP, CSS, SCRIPT, Page, esc, swatch
from .plots import PALETTE, WIDE, block_ticks, mpl_text, new_figure, num, readable_log_ticks

__all__ = ["render_sweep_html", "write_sweep_html"]

_STYLES = ("-", "--", ":", "-.")

_EXTRA_CSS = """
table.configs { font-size: 13px; font-variant-numeric: tabular-nums; margin-bottom: 8px; }
table.configs th, table.configs td { border-bottom: 1px solid #e3e6eb; padding: 3px 10px 3px 0; text-align: left; }
table.configs td.n { text-align: right; }
ul.failed li { margin: 3px 0; }
ul.failed code { color: #a1271d; }
"""

# (key in a config's "layers", panel title, y label, log scale, reference line)
_LAYER_PANELS = (
    ("angular_distance", r"Angular distance $d(x_l, x_{l+1})$", "arccos(cos) / π (all tokens)", False, None),
    ("removal_loss_delta", "Loss increase when the block is skipped", "Δ loss (nats/token)", False, 0.0),
    ("grad_norm_block", "Gradient norm per block (last logged step)", "‖grad‖ (log scale)", True, None),
)

_LAYER_CAPTION = (
    "Each final model measured by layerlab analyze (angular distance between the residual stream entering and "
    "leaving each block, all tokens; loss increase when that block alone is skipped) and the per-block gradient "
    "norm of the last telemetry record of training; lines are the mean over seeds, shaded bands span the seeds' "
    "minimum to maximum."
)


def _style(i: int) -> tuple[str, str]:
    return PALETTE[i % len(PALETTE)], _STYLES[(i // len(PALETTE)) % len(_STYLES)]


def _legend(fig: Figure, names: list[str]) -> None:
    handles = [Line2D([], [], color=_style(i)[0], ls=_style(i)[1], lw=2.2) for i in range(len(names))]
    fig.legend(handles, [mpl_text(n) for n in names], loc="outside upper center", ncols=min(len(names), 5),
               frameon=False, fontsize=9)


def _values(xs: list[Any]) -> np.ndarray:
    return np.array([num(v) for v in xs], dtype=float)


def _curves(run: dict[str, Any], key: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    curve = run.get(key) or {}
    x, y = _values(curve.get("step") or []), _values(curve.get(value) or [])
    return (x, y) if len(x) == len(y) else (np.array([]), np.array([]))


def _zoom(ax, points: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """The y range of the points past the first tenth of training: the first steps' loss would dwarf the rest."""
    last = max((float(np.nanmax(x)) for x, _ in points if len(x)), default=0.0)
    tail = np.concatenate([y[(x >= 0.1 * last) & np.isfinite(y)] for x, y in points if len(x)] or [np.array([])])
    if len(tail) > 1:
        lo, hi = float(tail.min()), float(np.quantile(tail, 0.99))
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def _loss_figure(summary: dict[str, Any], index: dict[str, int]) -> Figure | None:
    """Training loss (each seed thin, the mean over seeds thick) and validation loss per config."""
    runs = [r for r in summary.get("runs") or [] if r.get("config") in index]
    panels = (("curve", "loss", "Training loss"), ("val_curve", "val_loss", "Validation loss"))
    if not any(np.isfinite(_curves(r, key, value)[1]).any() for r in runs for key, value, _ in panels):
        return None
    names = list(index)
    fig = new_figure(WIDE, 3.6 + (0.3 if len(names) > 1 else 0) * math.ceil(len(names) / 5))
    axes = fig.subplots(1, 2, squeeze=False).ravel()
    for ax, (key, value, title) in zip(axes, panels):
        points = []
        for name, i in index.items():
            color, style = _style(i)
            curves = [_curves(r, key, value) for r in runs if r["config"] == name]
            curves = [(x, y) for x, y in curves if np.isfinite(y).any()]
            points += curves
            marker = {"marker": "o", "ms": 3} if key == "val_curve" else {}
            for x, y in curves:
                ax.plot(x, y, style, color=color, lw=0.8, alpha=0.3 if len(curves) > 1 else 0.9, **marker)
            steps = [tuple(x) for x, _ in curves]
            if len(curves) > 1 and len(set(steps)) == 1:  # seeds logged at the same steps: their mean
                with np.errstate(all="ignore"):
                    mean = np.nanmean(np.stack([y for _, y in curves]), axis=0)
                ax.plot(curves[0][0], mean, style, color=color, lw=1.8, **marker)
        _zoom(ax, points)
        ax.set_title(title, fontsize=10.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("loss (nats/token)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, lw=0.6)
    _legend(fig, names)
    return fig


def _final_figure(configs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> Figure | None:
    if not any(not math.isnan(num((c.get("val_loss") or {}).get("mean"))) for c in configs):
        return None
    n = len(configs)
    fig = new_figure(7.5, 0.9 + 0.38 * n)
    ax = fig.add_subplot()
    for i, c in enumerate(configs):
        color, _ = _style(i)
        y = n - 1 - i
        seeds = [num(r.get("val_loss")) for r in runs if r.get("config") == c.get("name")
                 and r.get("status") == "finished"]
        seeds = [v for v in seeds if not math.isnan(v)]
        ax.plot(seeds, [y] * len(seeds), "o", color=color, ms=5, alpha=0.8, mec="white", mew=0.5)
        stats = c.get("val_loss") or {}
        mean, std = num(stats.get("mean")), num(stats.get("std"))
        if not math.isnan(mean):
            ax.errorbar([mean], [y], xerr=[[0 if math.isnan(std) else std]] * 2, fmt="|", color="black", ms=14,
                        mew=1.8, capsize=3, lw=1.2)
    ax.set_yticks(range(n), [mpl_text(str(c.get("name"))) for c in reversed(configs)])
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("final validation loss (nats/token)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, axis="x", alpha=0.3, lw=0.6)
    ax.set_title("Final validation loss: seeds (dots), mean ± std (black)", fontsize=10.5)
    return fig


def _layers_figure(configs: list[dict[str, Any]]) -> Figure | None:
    panels = []
    for key, title, ylabel, log, hline in _LAYER_PANELS:
        lines = []
        for i, c in enumerate(configs):
            band = (c.get("layers") or {}).get(key)
            if not isinstance(band, dict):
                continue
            mean, lo, hi = (_values(band.get(k) or []) for k in ("mean", "min", "max"))
            if log:
                for arr in (mean, lo, hi):
                    arr[arr <= 0] = np.nan
            if np.isfinite(mean).any():
                lines.append((i, mean, lo, hi))
        if lines:
            panels.append((title, ylabel, log, hline, lines))
    if not panels:
        return None
    names = [str(c.get("name")) for c in configs]
    fig = new_figure(WIDE, 3.3 + 0.3 * math.ceil(len(names) / 5))
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (title, ylabel, log, hline, lines) in zip(axes, panels):
        depth = 0
        for i, mean, lo, hi in lines:
            color, style = _style(i)
            x = np.arange(len(mean))
            depth = max(depth, len(mean))
            ax.plot(x, mean, style, color=color, lw=1.5, marker="o", ms=2.5)
            if len(lo) == len(mean) and len(hi) == len(mean) and np.any(hi > lo):
                ax.fill_between(x, lo, hi, color=color, alpha=0.13, lw=0)
        if hline is not None:
            ax.axhline(hline, color="0.55", lw=0.8, zorder=0)
        if log:
            ax.set_yscale("log")
            readable_log_ticks(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("block", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, lw=0.6)
        block_ticks(ax, depth, False, set())
    _legend(fig, names)
    return fig


def _f(x: Any, digits: int = 4) -> str:
    v = num(x)
    return "–" if math.isnan(v) else f"{v:.{digits}f}"


def _value_text(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else str(v)


def _configs_table(summary: dict[str, Any], configs: list[dict[str, Any]]) -> str:
    fields = list(summary.get("grid") or {})
    runs = summary.get("runs") or []
    head = ["config", *fields, "runs", "val loss mean ± std", "min – max", "bits/byte", "params", "time/run",
            "reports"]
    rows = []
    for i, c in enumerate(configs):
        vl = c.get("val_loss") or {}
        params = c.get("params")
        secs = num(c.get("seconds_per_run"))
        links = " ".join(f'<a href="{esc(r["report"])}">s{esc(r.get("seed"))}</a>' for r in runs
                         if r.get("config") == c.get("name") and r.get("report"))
        cells = [f"{swatch(_style(i)[0])}<b>{esc(c.get('name'))}</b>",
                 *(esc(_value_text((c.get("fields") or {}).get(f))) for f in fields),
                 f"{esc(c.get('finished'))}/{len(c.get('seeds') or [])}",
                 f"{_f(vl.get('mean'))} ± {_f(vl.get('std'))}", f"{_f(vl.get('min'))} – {_f(vl.get('max'))}",
                 _f((c.get("val_bpb") or {}).get("mean")),
                 f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else "–",
                 "–" if math.isnan(secs) else f"{secs:.0f} s", links or "–"]
        numeric = range(len(fields) + 1, len(cells) - 1)
        rows.append("<tr>" + "".join(f'<td class="n">{v}</td>' if k in numeric else f"<td>{v}</td>"
                                     for k, v in enumerate(cells)) + "</tr>")
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<div class="scroll"><table class="configs"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}' \
           "</tbody></table></div>"


def _provenance(summary: dict[str, Any]) -> str:
    bits = []
    if summary.get("file"):
        bits.append(f"sweep file {esc(summary['file'])}")
    runs = summary.get("runs") or []
    bits.append(f"{len(runs)} runs, {sum(r.get('status') == 'finished' for r in runs)} finished, "
                f"{len(summary.get('failed') or [])} failed")
    base = summary.get("base") or {}
    if base:
        bits.append("base " + ", ".join(f"{esc(k)}={esc(_value_text(v))}" for k, v in base.items()))
    if summary.get("seeds"):
        bits.append("seeds " + ", ".join(esc(s) for s in summary["seeds"]))
    if summary.get("created"):
        bits.append(f"created {esc(summary['created'])}")
    bits.extend(f"{esc(k)} {esc(v)}" for k, v in (summary.get("versions") or {}).items())
    return " · ".join(bits)


def render_sweep_html(summary: dict[str, Any]) -> str:
    """Render a sweep summary (the dict written as sweep.json) as one self-contained HTML page."""
    configs = [c for c in summary.get("configs") or [] if isinstance(c, dict)]
    runs = [r for r in summary.get("runs") or [] if isinstance(r, dict)]
    index = {str(c.get("name")): i for i, c in enumerate(configs)}
    name = str(summary.get("name") or "sweep")
    page = Page()
    page.add(f"<h1>Sweep: {esc(name)}</h1>")
    page.add(f'<p class="provenance">{_provenance(summary)}</p>')
    page.add("<h2>Configs</h2>")
    page.add(_configs_table(summary, configs) if configs else "<p>This sweep holds no runs.</p>")
    failed = [r for r in runs if r.get("status") == "failed"]
    if failed:
        page.add(f"<h3>Failed runs ({len(failed)})</h3><ul class=\"failed\">")
        for r in failed:
            page.add(f"<li><b>{esc(r.get('name'))}</b> ({esc(r.get('stage'))}): <code>{esc(r.get('error'))}</code>"
                     "</li>")
        page.add("</ul>")

    fig = _loss_figure(summary, index)
    page.add("<h2>Loss curves</h2>")
    if fig is not None:
        page.figure(None, fig, "Training and validation loss against step, one colour per config",
                    "Training loss at every logged step and validation loss at each evaluation: each seed as a "
                    "thin line in its config's colour, the mean over seeds as a thick one; the y range leaves out "
                    "the first tenth of training.")
    else:
        page.add('<p class="muted">No loss curves recorded.</p>')

    fig = _final_figure(configs, runs)
    page.add("<h2>Final validation loss</h2>")
    if fig is not None:
        page.figure(None, fig, "Final validation loss per config: seeds and mean with standard deviation",
                    "Validation loss at the last step of each run (nats/token); the black bar is the mean over "
                    "seeds and its whiskers one standard deviation.")
    else:
        page.add('<p class="muted">No finished run.</p>')

    fig = _layers_figure(configs)
    page.add("<h2>Per-layer measurements of the final models</h2>")
    if fig is not None:
        page.figure(None, fig, "Angular distance, removal loss delta and gradient norm against block, per config",
                    _LAYER_CAPTION)
    else:
        page.add('<p class="muted">No per-layer measurements (analysis off, or no finished run).</p>')

    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>layerlab sweep: {esc(name)}</title>\n<style>{CSS}{_EXTRA_CSS}</style>\n</head>\n"
        f"<body data-plots=\"{page.plots}\">\n<main>\n" + "\n".join(page.parts) + "\n</main>\n"
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_sweep_html(summary: dict[str, Any], path: str | Path) -> None:
    """Render ``summary`` (see :func:`render_sweep_html`) and write it to ``path`` atomically."""
    atomic_write_bytes(path, render_sweep_html(summary).encode("utf-8"))
