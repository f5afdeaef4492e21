"""Inference speed of `layerlab convert` outputs against the original model, in one run.

What is measured
----------------
The wall time of one forward pass (``model(input_ids=..., use_cache=False)`` under
``torch.inference_mode()``, eval mode, fp32) on a fixed batch of token ids, on CUDA when available
(``torch.cuda.synchronize`` around each timed forward) else the CPU. The models are the original
Pre-LN model and its conversions, each made by ``layerlab.compress.convert`` into a temporary
directory and loaded back with ``AutoModelForCausalLM.from_pretrained``:

- ``rmsnorm`` / ``crmsnorm``: the exact Pre-RMSNorm / Pre-CRMSNorm equivalent (Jiang et al., 2023,
  who report 1-10% faster training and inference for Pre-RMSNorm; CRMSNorm saves further only when
  the stream is stored in d-1 coordinates, which layerlab's full-width stream does not do);
- ``no-norm``: the LayerNorm-free model (Baroni et al., 2025). Speed does not depend on the weights,
  so by default it is made with ``--no-norm-steps 0`` (constants measured, no fine-tune).

Method: after ``--warmup`` forwards of each, the models ALTERNATE forward by forward (A B C A B C ...)
for ``--iters`` forwards per round, over ``--repeats`` rounds whose order rotates, so that noise on a
shared machine hits all alike. Per model: the median over rounds of the round's mean forward time,
and tokens/s. The ratio original/converted (> 1: the converted model is faster) is the ratio of
those medians; in brackets the median over rounds of the same-round ratio, in which a round-long
slowdown cancels.

With no MODEL, a layerlab model of the GPT-2 design (pre, layernorm) is built with random weights
(``--layers/--width/--heads/--context``) and saved with the byte tokenizer.

    python benchmarks/convert_speed.py                                # width 256, 4 layers, batch 8 x 256
    python benchmarks/convert_speed.py runs/tiny-pre-layernorm-L4-d256 --to rmsnorm --repeats 31
    python benchmarks/convert_speed.py --width 768 --layers 12 --context 1024 --batch 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_source(args, directory: Path) -> Path:
    import layerlab
    from layerlab.data import ByteTokenizer

    torch.manual_seed(0)
    cfg = layerlab.ModelConfig(layers=args.layers, width=args.width, heads=args.heads, context=args.context,
                               vocab_size=320)
    model = layerlab.build_model(cfg).eval()
    model.save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, nargs="?", help="Pre-LN model directory (default: build one)")
    ap.add_argument("--to", nargs="+", default=["rmsnorm", "crmsnorm", "no-norm"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: the model's context, <= 1024)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3, help="forwards per model per round")
    ap.add_argument("--repeats", type=int, default=15, help="rounds")
    ap.add_argument("--no-norm-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import layerlab  # noqa: F401  (registers the layerlab classes with the Auto classes)
    from layerlab.compress import convert

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        src = args.model or build_source(args, Path(tmp) / "original")
        models = {"original": AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device).eval()}
        for to in args.to:
            out = Path(tmp) / to
            convert(src, to=to, out=out, tokens=1024, steps=args.no_norm_steps, echo=lambda *a: None)
            models[to] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    cfg = models["original"].config
    seq = args.seq or min(getattr(cfg, "max_position_embeddings", 1024), 1024)
    ids = torch.randint(0, min(cfg.vocab_size, 256), (args.batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def forward(m) -> float:
        sync(device)
        t0 = time.perf_counter()
        m(input_ids=ids, use_cache=False)
        sync(device)
        return time.perf_counter() - t0

    names = list(models)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for n in names:
                forward(models[n])
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.iters):
                for n in order:
                    times[n].append(forward(models[n]))
            for n in names:
                rounds[n].append(statistics.fmean(times[n]))

    tokens = args.batch * seq
    base = statistics.median(rounds["original"])
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
          f", threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"model: {src if args.model else 'random'} (layers {cfg.num_hidden_layers}, width {cfg.hidden_size}), "
          f"batch {args.batch} x {seq} tokens, {args.repeats} rounds x {args.iters} forwards")
    print("| model | median ms/forward | tokens/s | original / model |")
    print("|---|---|---|---|")
    results = {}
    for n in names:
        med = statistics.median(rounds[n])
        same_round = statistics.median(o / t for o, t in zip(rounds["original"], rounds[n], strict=True))
        results[n] = {"median_s": med, "tokens_per_s": tokens / med, "ratio": base / med,
                      "same_round_ratio": same_round, "rounds_s": rounds[n]}
        print(f"| {n} | {med * 1e3:.2f} | {tokens / med:,.0f} | {base / med:.3f} [{same_round:.3f}] |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
