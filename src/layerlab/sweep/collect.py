"""Read finished runs back from their directories: curves, final losses, per-layer values, and per-config statistics."""

from __future__ import annotations

import json
import math
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io import MANIFEST, versions
from .plan import ANALYSIS_DIR, PlannedRun, Sweep

# Per-layer curves collected from each run: from its analysis report, and from its last telemetry record.
LAYER_METRICS = ("angular_distance", "angular_distance_last_token", "removal_loss_delta")
TELEMETRY_METRICS = ("grad_norm_block",)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _run_data(run: PlannedRun, out: Path) -> dict[str, Any]:
    """Curves, final losses and per-layer values of one run, read from its directory."""
    d: dict[str, Any] = {}
    rows = _read_jsonl(run.run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    d["curve"] = {"step": [r["step"] for r in train_rows], "loss": [_finite(r["loss"]) for r in train_rows]}
    d["val_curve"] = {"step": [r["step"] for r in val_rows], "val_loss": [_finite(r["val_loss"]) for r in val_rows]}
    layers: dict[str, list[float | None]] = {}
    telemetry = [r for r in rows if TELEMETRY_METRICS[0] in r]
    if telemetry:
        layers["grad_norm_block"] = [_finite(v) for v in telemetry[-1]["grad_norm_block"]]
        d["telemetry_step"] = telemetry[-1]["step"]
    try:
        manifest = json.loads((run.run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    results = manifest.get("results") or {}
    d.update(val_loss=_finite(results.get("val_loss")), val_bpb=_finite(results.get("val_bpb")),
             val_loss_step0=_finite(results.get("val_loss_step0")), step=results.get("step"),
             params=manifest.get("params"), manifest_status=manifest.get("status"))
    report_path = run.run_dir / ANALYSIS_DIR / "report.json"
    if report_path.is_file():
        try:
            model = json.loads(report_path.read_text())["models"][0]
        except (OSError, ValueError, KeyError, IndexError):
            model = None
        if model:
            for key in LAYER_METRICS:
                layers[key] = [_finite(lay.get(key)) for lay in model.get("layers", [])]
            d["analysis_loss"] = _finite(model.get("loss"))
            if (run.run_dir / ANALYSIS_DIR / "report.html").is_file():
                d["report"] = os.path.relpath(run.run_dir / ANALYSIS_DIR / "report.html", out)
    d["layers"] = layers
    return d


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def _band(curves: list[list[float | None]]) -> dict[str, list[float | None]] | None:
    """Mean, min and max per layer over seeds (curves of equal length; missing values skipped)."""
    curves = [c for c in curves if c]
    if not curves or len({len(c) for c in curves}) != 1:
        return None
    out: dict[str, list[float | None]] = {"mean": [], "min": [], "max": []}
    for values in zip(*curves):
        vals = [v for v in values if v is not None]
        out["mean"].append(statistics.fmean(vals) if vals else None)
        out["min"].append(min(vals) if vals else None)
        out["max"].append(max(vals) if vals else None)
    return out


def collect(sweep: Sweep, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sweep's summary (written as sweep.json): one entry per run and one per config."""
    runs = []
    for run in sweep.runs:
        rec = records.get(run.name, {})
        entry = {"name": run.name, "config": run.config, "seed": run.seed, "fields": run.fields,
                 "dir": os.path.relpath(run.run_dir, sweep.out), **{k: rec.get(k) for k in (
                     "status", "action", "stage", "error", "traceback", "seconds", "train_seconds",
                     "analyze_seconds")}}
        entry.update(_run_data(run, sweep.out))
        runs.append(entry)
    configs = []
    for label in sweep.configs:
        members = [r for r in runs if r["config"] == label]
        ok = [r for r in members if r["status"] == "finished"]
        layer_keys = list(dict.fromkeys(k for r in ok for k in r["layers"]))
        seconds = [r["seconds"] for r in ok if r.get("seconds")]
        configs.append({
            "name": label, "fields": members[0]["fields"], "seeds": [r["seed"] for r in members],
            "finished": len(ok), "failed": [r["name"] for r in members if r["status"] == "failed"],
            "val_loss": _stats([r["val_loss"] for r in ok if r["val_loss"] is not None]),
            "val_bpb": _stats([r["val_bpb"] for r in ok if r["val_bpb"] is not None]),
            "params": next((r["params"] for r in ok if r.get("params")), None),
            "seconds_per_run": statistics.fmean(seconds) if seconds else None,
            "layers": {k: b for k in layer_keys if (b := _band([r["layers"].get(k) for r in ok])) is not None},
        })
    return {
        "format": "layerlab-sweep/1", "name": sweep.name, "file": str(sweep.path), "out": str(sweep.out),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
        "base": sweep.base, "grid": sweep.grid, "seeds": sweep.seeds, "analyze": sweep.analyze,
        "runs": runs, "configs": configs, "failed": [r["name"] for r in runs if r["status"] == "failed"],
    }


def final_val_loss(run_dir: Path) -> float | None:
    """The final validation loss in a run's manifest, or None where there is none (yet)."""
    try:
        return _finite((json.loads((run_dir / MANIFEST).read_text()).get("results") or {}).get("val_loss"))
    except (OSError, ValueError):
        return None


def previous_records(out: Path) -> dict[str, dict[str, Any]]:
    """Timings of the runs recorded by an earlier invocation (kept for runs now skipped)."""
    try:
        return {r["name"]: r for r in json.loads((out / "sweep.json").read_text()).get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
