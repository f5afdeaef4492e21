"""Perplexity against average bits, for every importance, next to the uniform and random baselines.

    python benchmarks/quantize_curve.py runs/MODEL --bits 2.5 3 3.5 --group 64 [--tokens 8192] [--seeds 3]

Prints a markdown table (the one in docs/compression.md) and, with --json, the records. Each
`--bits` value (the budget) is one `layerlab.compress.quantize` call per importance into a temporary
directory; the baselines (uniform floor/ceil, random ordering) come from the first call, and the
random ordering is repeated over `--seeds` seeds (median and range shown), since one random draw
says little. "avg bits" is the average width an allocation actually uses: the budget for LWQ's
orderings, at most the budget for the `loss` integer program.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

from layerlab.compress import IMPORTANCE, allocate, quantize


def random_order(model_dir: Path, bits: float, widths: tuple[int, ...], group: int, tokens: int, seed: int) -> dict:
    """The loss of one more random ordering, as quantize's own baseline draws it with ``seed``."""
    import random

    from layerlab.adapters import load_model
    from layerlab.compress.quantize import Quantizer, ranked_cost
    from layerlab.evaluate import lm_loss

    model, tok, _ = load_model(model_dir)
    q = Quantizer(model, group)
    sizes = q.sizes()
    rng = random.Random(seed)
    alloc = allocate(sizes, bits, widths, ranked_cost([rng.random() for _ in sizes], bits, widths), fill=True)
    return {"allocation": alloc, **lm_loss(q.quantized_copy(alloc), tok, None, tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--widths", default="2,3,4,8")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    widths = tuple(int(w) for w in args.widths.split(","))
    quiet = {"tokens": args.tokens, "widths": widths, "group": args.group}
    records = []
    print("| budget | avg bits | ordering | widths per block | MB | loss | ppl | Δloss |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            rows = {}
            for i, importance in enumerate(IMPORTANCE):
                rec = quantize(args.model, bits=bits, out=Path(tmp) / f"{bits}-{importance}", importance=importance,
                               baselines=i == 0, **quiet)
                rows.update(rec["runs"])
                records.append({"bits": bits, "importance": importance, **rec})
            random_runs = [rows["random order"]] if "random order" in rows else []
            for seed in range(1, args.seeds if random_runs else 0):
                random_runs.append(random_order(args.model, bits, widths, args.group, args.tokens, seed))
            base = rows["original"]["loss"]
            for name, r in rows.items():
                if name == "random order":
                    losses = sorted(x["loss"] for x in random_runs)
                    loss = statistics.median(losses)
                    cell = f"{loss:.4f} ({losses[0]:.4f}-{losses[-1]:.4f})"
                    print(f"| {bits:g} | {r['avg_bits']:.2f} | random ({len(losses)} seeds: median, range) | - | "
                          f"{r['bytes'] / 1e6:.3f} | {cell} | - | {loss - base:+.4f} |", flush=True)
                    continue
                if name == "original" and bits != args.bits[0]:
                    continue
                avg = "fp32" if r["avg_bits"] is None else f"{r['avg_bits']:.2f}"
                alloc = "".join(map(str, r.get("allocation", []))) or "-"
                budget = "-" if name == "original" else f"{bits:g}"
                print(f"| {budget} | {avg} | {name} | {alloc} | {r['bytes'] / 1e6:.3f} | {r['loss']:.4f} | "
                      f"{r['perplexity']:.2f} | {r['loss'] - base:+.4f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
