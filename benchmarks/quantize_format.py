"""Size on disk, CPU load time and CPU forward time of ``layerlab quantize``'s two output formats.

What is measured
----------------
A checkpoint with random weights (``--arch llama``: a Llama-style model, hidden 1024, 8 layers by default;
``--arch gpt2``: GPT-2 small's shape, hidden 768, 12 layers, 12 heads, vocabulary 50257, 1024 positions;
``--hidden``, ``--layers``, ``--intermediate``, ``--vocab`` change them; bf16 by default: a real-shaped model,
not a trained one, since neither size nor speed depends on the values) is quantized by
``layerlab.compress.quantize`` twice, with the same widths (``--bits``, ``--widths``, ``--group``,
``--importance zd``: no calibration forward), into

- ``compressed-tensors``: the default output, compressed-tensors' pack-quantized format (symmetric codes,
  one config group per block), which plain transformers loads with the compressed-tensors package (a GPT-2 is
  written as ``model_type opt``, GPT-2's computation with ``nn.Linear`` layers:
  :mod:`layerlab.compress.gpt2_linear`);
- ``layerlab``: layerlab's own packed format (min-max codes, torchao's int8 tensor at 8 bits when torchao is
  installed), which loads after ``import layerlab``.

For the original and each output, in a fresh process each time (so no file cache is warm for the first
load only; the OS page cache is shared, so every load after the very first reads from memory):

- ``disk MB``: the ``*.safetensors`` files;
- ``load s``: ``AutoModelForCausalLM.from_pretrained(dir)`` (imports excluded: the model's class,
  transformers' quantizers and compressed-tensors are imported first, in every process; the compressed-tensors
  output is built compressed and unpacked on the first forward);
- ``first fwd s``: the first forward of ``--batch`` x ``--seq`` tokens (``torch.inference_mode``, no cache),
  which includes compressed-tensors' one-time decompression;
- ``fwd s``: the median of ``--iters`` further forwards (layerlab's format dequantizes every layer on every
  forward; compressed-tensors' is dense by then);
- ``RSS MB`` and ``peak RSS MB``: the process's resident memory after those forwards, and its peak
  (``VmRSS``, ``VmHWM``; the interpreter with torch, transformers and compressed-tensors imported included).

Median over ``--repeats`` fresh processes per model, the processes of the models alternating.

    python benchmarks/quantize_format.py                                   # hidden 1024, 8 layers, bf16, 4 bits
    python benchmarks/quantize_format.py --bits 3.5 --widths 2,3,4,8 --json out.json
    python benchmarks/quantize_format.py --arch gpt2                       # GPT-2 small's shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = """
import json, statistics, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
if sys.argv[2] == "layerlab":
    import layerlab  # noqa: F401  (its quantization method)
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error(); logging.disable_progress_bar()
# imports are not load time: the model's class, transformers' quantizers and compressed-tensors, for every format
import transformers.quantizers.auto  # noqa: F401
import compressed_tensors.compressors, compressed_tensors.quantization  # noqa: F401,E401
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(sys.argv[1]))]
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
load = time.perf_counter() - t
batch, seq, iters = (int(x) for x in sys.argv[3].split(","))
ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    t = time.perf_counter(); model(input_ids=ids, use_cache=False); first = time.perf_counter() - t
    times = []
    for _ in range(iters):
        t = time.perf_counter(); model(input_ids=ids, use_cache=False); times.append(time.perf_counter() - t)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
rss, hwm = (int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
print(json.dumps({"load": load, "first": first, "fwd": statistics.median(times), "rss": rss, "hwm": hwm}))
"""


ARCH_DEFAULTS = {  # --hidden, --layers, --intermediate, --heads, --vocab
    "llama": {"hidden": 1024, "layers": 8, "intermediate": 2816, "heads": 16, "vocab": 32000},
    "gpt2": {"hidden": 768, "layers": 12, "intermediate": 3072, "heads": 12, "vocab": 50257},  # GPT-2 small
}


def build_source(args, directory: Path) -> Path:
    import torch
    import transformers

    from layerlab.data import ByteTokenizer

    torch.manual_seed(0)
    if args.arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                                      n_inner=args.intermediate, n_positions=max(1024, args.seq), bos_token_id=0,
                                      eos_token_id=0)
    else:
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                       max_position_embeddings=max(2048, args.seq), bos_token_id=0, eos_token_id=0,
                                       pad_token_id=0)
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.save_pretrained(directory)
    ByteTokenizer().save(directory)
    return directory


def disk_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="llama")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=4, help="llama only")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--bits", type=float, default=4)
    p.add_argument("--widths", default="4")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--work", type=Path, default=None, help="folder for the checkpoints (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    for k, v in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    from layerlab.compress import quantize

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        src = build_source(args, work / "original")
        widths = tuple(int(w) for w in args.widths.split(","))
        dirs = {"original": src}
        quantize_s = {}
        written = {"original": args.arch}
        for fmt in ("compressed-tensors", "layerlab"):
            t = time.perf_counter()
            rec = quantize(src, bits=args.bits, widths=widths, group=args.group, importance="zd", baselines=False,
                           tokens=args.seq, progress=False, out=work / fmt, output=fmt)
            quantize_s[fmt] = time.perf_counter() - t
            assert rec["format"] == fmt, rec["format_note"]
            dirs[fmt] = work / fmt
            written[fmt] = json.loads((work / fmt / "config.json").read_text())["model_type"]
        runs = {name: [] for name in dirs}
        for _ in range(args.repeats):
            for name, d in dirs.items():
                r = subprocess.run([sys.executable, "-c", MEASURE, str(d), name,
                                    f"{args.batch},{args.seq},{args.iters}", str(args.threads)],
                                   capture_output=True, text=True, check=True,
                                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
        rows = {name: {"disk_mb": disk_mb(d), **{k: statistics.median(r[k] for r in rs) for k in rs[0]}}
                for (name, d), rs in zip(dirs.items(), runs.values(), strict=True)}
    print(f"{args.arch}, hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab "
          f"{args.vocab}, {args.dtype}; --bits {args.bits:g} --widths {args.widths} --group {args.group}; "
          f"forward {args.batch} x {args.seq} tokens on {args.threads} CPU threads; median of {args.repeats}")
    print("| format | model_type | disk MB | load s | first fwd s | fwd s | RSS MB | peak RSS MB | quantize s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        q = f"{quantize_s[name]:.1f}" if name in quantize_s else "-"
        print(f"| {name} | {written[name]} | {r['disk_mb']:.1f} | {r['load']:.2f} | {r['first']:.2f} | "
              f"{r['fwd']:.3f} | {r['rss']:.0f} | {r['hwm']:.0f} | {q} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "quantize_s": quantize_s, "model_type": written}, indent=1))


if __name__ == "__main__":
    main()
