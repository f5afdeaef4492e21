"""Self-speculative greedy decoding (``layerlab sample --exit-block E --draft D``; LayerSkip, Elhoushi et al., 2024)
against its peers measured in the same run: plain greedy decoding by Hugging Face ``generate`` (what ``layerlab
sample`` does) and by the model's forward with its KV cache in a Python loop (no ``generate`` overhead).

    python benchmarks/self_speculative.py runs/l12 --report reports/l12-sections/report.json

For each exit block E and draft length D: the acceptance rate (accepted / drafted tokens), the tokens/s of the
three decoders and the speedups, whether every output equals greedy decoding, and, with ``--report`` (an analysis
made with ``--lenses``), the lens section's estimate ``early_exit_accept`` for the same exit block.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from layerlab.adapters import load_model
from layerlab.data import stream_tokenizer
from layerlab.generate import self_speculative_greedy
from layerlab.model import output_cache

PROMPTS = ["The for statement is used to iterate over the elements of a sequence",
           "An object's identity never changes once it has been created; you may think of it as",
           "Exceptions are raised by"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--report", help="a report.json of the same model made with --lenses (for the estimate)")
    ap.add_argument("--tokens", type=int, default=120, help="new tokens per prompt")
    ap.add_argument("--exits", type=int, nargs="+", default=[1, 3, 5, 8])
    ap.add_argument("--drafts", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, hf_tok, _ = load_model(args.model, dtype="auto")
    model.eval()
    tok = stream_tokenizer(hf_tok)
    lens = json.load(open(args.report))["models"][0]["lenses"] if args.report else None
    n_new = args.tokens

    @torch.no_grad()
    def generate(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                              pad_token_id=tok.eos_id, eos_token_id=None)

    @torch.no_grad()
    def loop(ids):
        out = model(ids, use_cache=True)
        cache, seq = output_cache(out), torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
        for _ in range(n_new - 1):
            out = model(seq[:, -1:], cache=cache, use_cache=True)
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
        return seq

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    prompts = [torch.tensor(tok.encode(p).astype("int64"))[None] for p in PROMPTS]
    for ids in prompts:  # warm-up
        generate(ids), loop(ids), self_speculative_greedy(model, ids, 8, min(args.exits), 4)
    print("| E | draft | accepted | lens estimate | tokens/s generate / loop / self-spec | speedup vs generate / "
          "loop | output = greedy |\n|---|---|---|---|---|---|---|")
    for exit_block in args.exits:
        for draft in args.drafts:
            accepted = drafted = 0
            t_gen = t_loop = t_spec = 0.0
            same = True
            for rep in range(args.repeats):
                for ids in prompts:
                    a, tg = timed(lambda: generate(ids))
                    b, tl = timed(lambda: loop(ids))
                    r, ts = timed(lambda: self_speculative_greedy(model, ids, n_new, exit_block, draft))
                    same &= torch.equal(a, r.ids) and torch.equal(a, b)
                    if rep == 0:
                        accepted, drafted = accepted + r.accepted, drafted + r.drafted
                    t_gen, t_loop, t_spec = t_gen + tg, t_loop + tl, t_spec + ts
            n = n_new * args.repeats * len(prompts)
            estimate = f"{lens[exit_block]['early_exit_accept']:.3f}" if lens else "-"
            print(f"| {exit_block} | {draft} | {accepted / drafted:.3f} | {estimate} | {n / t_gen:.0f} / "
                  f"{n / t_loop:.0f} / {n / t_spec:.0f} | {t_gen / t_spec:.2f}x / {t_loop / t_spec:.2f}x | "
                  f"{'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
