"""The tables of docs/reproductions.md, from the output folders of the two shipped sweeps.

    layerlab sweep sweeps/norm-placement.yaml --out sweeps-out/norm-placement
    layerlab sweep sweeps/layerwise-lr.yaml --out sweeps-out/layerwise-lr
    python benchmarks/reproduce.py --placement sweeps-out/norm-placement --lr sweeps-out/layerwise-lr

Reads each run's metrics.jsonl and the analysis the sweep wrote (analysis/report.json) and prints,
per claim, the measured quantities as markdown tables: means over seeds, with the spread (half the
range) where it matters. Nothing here trains or measures anew.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(sweep_dir: Path) -> dict[str, list[dict]]:
    """config name -> one record per finished seed: fields, metrics rows, analysis layers."""
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    out: dict[str, list[dict]] = defaultdict(list)
    for run in sweep["runs"]:
        if run["status"] != "finished":
            continue
        d = sweep_dir / run["dir"]
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        report = json.loads((d / "analysis" / "report.json").read_text())
        out[run["config"]].append({"fields": run["fields"], "seed": run["seed"], "rows": rows,
                                   "layers": report["models"][0]["layers"]})
    return out


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else float("nan")


def spread(xs):
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def per_layer(runs: list[dict], key: str) -> list[float]:
    n = len(runs[0]["layers"])
    return [mean([r["layers"][i][key] for r in runs]) for i in range(n)]


def thirds(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    k = n // 3
    return mean(values[:k]), mean(values[k:n - k]), mean(values[n - k:])


def final_val(run: dict) -> float:
    return [r["val_loss"] for r in run["rows"] if "val_loss" in r][-1]


def telemetry(run: dict, key: str, which: int) -> list[float]:
    rows = [r for r in run["rows"] if key in r]
    return rows[which][key], rows[which]["step"]


def fmt(xs, digits=3):
    return " ".join(f"{x:.{digits}f}" for x in xs)


def placement_tables(runs: dict[str, list[dict]]) -> None:
    print("### Final validation loss and where the contribution sits\n")
    print("| config | val loss (mean ± half-range) | removal Δloss: first / middle / last third of blocks | "
          "last third ÷ first third |")
    print("|---|---|---|---:|")
    for name, rs in runs.items():
        vals = [final_val(r) for r in rs]
        first, mid, last = thirds(per_layer(rs, "removal_loss_delta"))
        print(f"| {name} | {mean(vals):.4f} ± {spread(vals):.4f} | {first:.4f} / {mid:.4f} / {last:.4f} | "
              f"{last / first:.3g} |")
    print("\n### Per block (mean over seeds; block 0 first)\n")
    for key, digits in (("removal_loss_delta", 3), ("angular_distance", 3), ("hidden_rms", 2)):
        print(f"{key}:\n")
        print("| config | per block |")
        print("|---|---|")
        for name, rs in runs.items():
            print(f"| {name} | {fmt(per_layer(rs, key), digits)} |")
        print()
    print("hidden RMS growth, last block ÷ first block, and gradient norm of block 0 ÷ last block "
          "(metrics.jsonl grad_norm_block) at the first and the last telemetry step:\n")
    print("| config | RMS growth | grad first ÷ last, early (step) | grad first ÷ last, end (step) |")
    print("|---|---:|---:|---:|")
    for name, rs in runs.items():
        rms = per_layer(rs, "hidden_rms")
        early = [telemetry(r, "grad_norm_block", 0) for r in rs]
        late = [telemetry(r, "grad_norm_block", -1) for r in rs]
        e = mean([g[0] / g[-1] for g, _ in early])
        la = mean([g[0] / g[-1] for g, _ in late])
        print(f"| {name} | {rms[-1] / rms[0]:.1f} | {e:.3g} ({early[0][1]}) | {la:.3g} ({late[0][1]}) |")
    print()


def lr_tables(runs: dict[str, list[dict]]) -> None:
    print("### Validation loss against steps (mean over seeds)\n")
    steps = [r["step"] for r in next(iter(runs.values()))[0]["rows"] if "val_loss" in r]
    print("| optimizer | " + " | ".join(str(s) for s in steps) + " | final ± half-range |")
    print("|---|" + "---:|" * (len(steps) + 1))
    curves = {}
    for name, rs in runs.items():
        curve = [mean([[r["val_loss"] for r in run["rows"] if "val_loss" in r][i] for run in rs])
                 for i in range(len(steps))]
        curves[name] = curve
        vals = [final_val(r) for r in rs]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in curve) + f" | {mean(vals):.4f} ± {spread(vals):.4f} |")
    if "adamw" in curves:
        target = curves["adamw"][-1]
        print(f"\nFirst evaluation step at which the mean validation loss is at or below AdamW's final "
              f"{target:.3f}:\n")
        for name, curve in curves.items():
            hit = next((s for s, v in zip(steps, curve) if v <= target), None)
            print(f"- {name}: {hit if hit is not None else 'not reached'}")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--placement", type=Path, help="output folder of sweeps/norm-placement.yaml")
    ap.add_argument("--lr", type=Path, nargs="+", help="output folder(s) of sweeps/layerwise-lr.yaml (and of "
                    "control sweeps over the same base, whose configs are added to the table)")
    args = ap.parse_args()
    if args.placement:
        placement_tables(load(args.placement))
    if args.lr:
        runs: dict[str, list[dict]] = {}
        for folder in args.lr:
            runs.update(load(folder))
        lr_tables(runs)


if __name__ == "__main__":
    main()
