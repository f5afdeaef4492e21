"""The sweep's outputs: the per-config table (printed, and as summary.csv), sweep.json and sweep.html."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from ..io import atomic_write_bytes, atomic_write_json
from .plan import Sweep


def _fmt(x: Any, digits: int = 4, missing: str = "–") -> str:
    return missing if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _value_text(v: Any, none: str) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else none if v is None else str(v)


def table_rows(summary: dict[str, Any], *, for_csv: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-config table: printed, and with ``for_csv`` as summary.csv.

    In the CSV a missing value (a grid value None, the std of one seed, anything of a config whose runs all
    failed) is an empty field: CSV readers such as pandas take that for NaN, where a dash would turn the whole
    column into text. The printed table keeps a readable dash.
    """
    missing, none = ("", "") if for_csv else ("–", "None")
    fields = list(summary["grid"])
    header = ["config", *fields, "runs", "val_loss_mean", "val_loss_std", "val_loss_min", "val_loss_max",
              "val_bpb_mean", "params", "seconds_per_run"]
    rows = []
    for c in summary["configs"]:
        vl, vb = c["val_loss"], c["val_bpb"]
        measured = (vl["mean"], vl["std"], vl["min"], vl["max"], vb["mean"], c["params"])
        rows.append([c["name"], *(_value_text(c["fields"].get(f), none) for f in fields),
                     f"{c['finished']}/{len(c['seeds'])}", *(_fmt(x, missing=missing) for x in measured),
                     _fmt(c["seconds_per_run"], 1, missing)])
    return header, rows


def markdown_table(summary: dict[str, Any]) -> str:
    """The per-config table of ``summary`` as Markdown, as the CLI prints it."""
    header, rows = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(sweep: Sweep, summary: dict[str, Any]) -> None:
    """sweep.json, summary.csv and sweep.html into the sweep's out directory, each atomically."""
    # imported here: the page needs matplotlib, which pool and Ray workers (they import this package) do not
    from ..report.sweep import write_sweep_html

    sweep.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sweep.out / "sweep.json", summary)
    header, rows = table_rows(summary, for_csv=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(sweep.out / "summary.csv", buf.getvalue().encode())
    write_sweep_html(summary, sweep.out / "sweep.html")


def write_progress(plan: Sweep, records: dict[str, dict[str, Any]]) -> None:
    """sweep.json after each run: which runs are done, so an interrupted sweep leaves a record."""
    runs = []
    for r in plan.runs:
        rec = records.get(r.name) or {"status": "pending"}
        runs.append({"name": r.name, "config": r.config, "seed": r.seed, "fields": r.fields,
                     "dir": os.path.relpath(r.run_dir, plan.out),
                     **{k: rec.get(k) for k in ("status", "action", "stage", "error", "seconds", "train_seconds",
                                                "analyze_seconds")}})
    atomic_write_json(plan.out / "sweep.json", {"format": "layerlab-sweep/1", "name": plan.name, "partial": True,
                                                "runs": runs})
