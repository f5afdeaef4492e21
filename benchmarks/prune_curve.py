"""Perplexity against layers removed, for every prune metric, with and without healing.

    python benchmarks/prune_curve.py runs/MODEL --max-remove 4 --heal-steps 100 [--unit attn] [--tokens 8192]

Prints a markdown table (the one in docs/compression.md) and, with --json, the records.
Each cell is one `layerlab.compress.prune` call into a temporary directory. With --heal-steps,
the first line is the control: the unpruned model trained for the same healing steps (same
mode, data and seed), since extra steps help an under-trained model whether or not it was pruned.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from layerlab.compress import METRICS, prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--max-remove", type=int, default=4)
    ap.add_argument("--heal-steps", type=int, default=100)
    ap.add_argument("--unit", default="block", choices=["block", "attn", "mlp"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    if args.heal_steps:
        from layerlab.adapters import load_model
        from layerlab.compress.heal import heal
        from layerlab.evaluate import lm_loss

        model, tok, _ = load_model(args.model)
        before = lm_loss(model, tok, None, args.tokens)["perplexity"]
        healed = lm_loss(heal(model, tok, steps=args.heal_steps, progress=False), tok, None, args.tokens)
        rows.append({"metric": "none (control)", "removed": 0, "blocks": [], "before": before, "pruned": before,
                     "healed": healed["perplexity"]})
        print(f"| none (control) | 0 | [] | {before:.2f} | {before:.2f} | {healed['perplexity']:.2f} |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for metric in METRICS:
            for n in range(1, args.max_remove + 1):
                out = Path(tmp) / f"{metric}-{n}"
                rec = prune(args.model, remove=n, metric=metric, out=out, tokens=args.tokens,
                            measure_tokens=args.tokens, unit=args.unit, heal_steps=args.heal_steps)
                blocks = sorted(r["block"] for r in rec["removed"]) if args.unit != "block" else rec["removed_blocks"]
                rows.append({"metric": metric, "unit": args.unit, "removed": n, "blocks": blocks,
                             "before": rec["before"]["perplexity"], "pruned": rec["pruned"]["perplexity"],
                             "healed": rec.get("healed", {}).get("perplexity")})
                r = rows[-1]
                healed = f"{r['healed']:.2f}" if r["healed"] is not None else "-"
                print(f"| {metric} | {n} | {r['blocks']} | {r['before']:.2f} | {r['pruned']:.2f} | {healed} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
