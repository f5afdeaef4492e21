"""Training throughput of layerlab's GPT-2 design against Hugging Face GPT-2 and x-transformers.

What is measured
----------------
Tokens per second of one FULL training step: forward, cross-entropy loss, backward, AdamW step and
``zero_grad``, in fp32, on CUDA when available (with ``torch.cuda.synchronize`` around each timed
segment), else on the CPU. Three implementations of the same shapes are compared (vocabulary 320,
same width / layers / heads / context, MLP 4x with tanh-GELU, learned absolute positions, tied
embeddings, biases, no dropout):

1. layerlab: ``layerlab.build_model`` with the GPT-2 design (pre placement, layernorm);
2. Hugging Face ``GPT2LMHeadModel(layerlab.export.gpt2_config(cfg))`` with its default attention
   implementation (``sdpa`` in transformers 5; the script prints the one in use);
3. ``x_transformers.TransformerWrapper`` + ``Decoder`` configured as close to GPT-2 as its options
   allow (see :func:`build_xtransformers` for the options chosen and why).

The loss is computed the same way for all three, outside the model, from ``model(ids).logits``.

Method: each model is warmed up (``--warmup`` steps), then the implementations ALTERNATE in rounds
(``--repeats`` rounds; each round times ``--steps`` steps of every model, the order rotating from
round to round) so that machine noise hits all of them alike. Within a round the models take turns
step by step (``--interleave step``, the default: A B C A B C ...; ``block`` runs A A A B B B C C C),
because on a shared 2-core machine a slow spell of ten seconds or more would otherwise land on one
model's block. Each step is timed on its own (fixed random batches, the same for every model). The MEDIAN
over rounds of each model's mean step time is reported as tokens/s, with the ratios layerlab / HF,
layerlab / x-transformers and layerlab / max(peers); in brackets, the median over rounds of the
same-round ratio, in which a round-long slowdown cancels.

MFU: the machine's fp32 matmul peak is measured in the same run (``--peak-size`` square ``torch.mm``,
two samples after every round, so it sees the same noise as the models; median GFLOP/s). Model FLOPs per token are
estimated as ``6 * N + 12 * layers * width * context`` with N the non-embedding parameters (Kaplan et
al., 2020, "Scaling Laws for Neural Language Models", Table 1, forward 2N + 2·L·T·d, times 3 for
training; Chowdhery et al., 2022, PaLM, Appendix B, "6N + 12LHQT"). MFU = achieved FLOP/s / peak.
The estimate leaves out the tied output head (6·width·vocab per token, ~2-3% here) and counts full
rather than causal attention, as the standard estimate does.

Per-norm timing (unless ``--no-norms``): a layerlab model of width 256 (pre placement) for every
name in ``layerlab.norms.NORMS``, timed in alternating rounds the same way; the median step time of
each is printed relative to layernorm.

Per-design timing (unless ``--no-designs``): the block designs that are registry entries of the model (the
block form, the depth wiring, FFN sharing; ``DESIGNS`` below), each a layerlab model of width
``--design-width`` (256; pre placement, layernorm), timed against the baseline (sequential block, residual
wiring, an FFN per block) in the same alternating rounds; the median step time of each is printed relative to
the baseline. ``--designs-only`` runs just this comparison (no peers, so no x-transformers needed).

Run (``pip install -e '.[bench]'`` gives x-transformers)::

    python benchmarks/train_throughput.py                      # widths 256 512, 5 rounds of 10 steps
    python benchmarks/train_throughput.py --quick              # smoke test (batch 2 x 128 tokens), < 1 minute
    python benchmarks/train_throughput.py --widths 256 --no-norms --json out.json
    python benchmarks/train_throughput.py --designs-only --layers 8 --repeats 5 --steps 5

Results for the reference machine are in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import layerlab
from layerlab.config import ModelConfig
from layerlab.export import gpt2_config
from layerlab.norms import NORMS, set_norm_schedule

VOCAB = 320
IMPLS = ("layerlab", "hf-gpt2", "x-transformers")
# name -> the ModelConfig fields that make the design; "baseline" first (layerlab.registry: BLOCKS, WIRINGS,
# FFN_SHARINGS). DenseFormer's 4x5 is the paper's dilation 4, period 5 (Pagliardini et al., 2024).
DESIGNS = {
    "baseline": {},
    "parallel": {"block": "parallel"},
    "parallel2": {"block": "parallel2"},
    "denseformer": {"wiring": "denseformer"},
    "denseformer-4x5": {"wiring": "denseformer", "denseformer_dilation": 4, "denseformer_period": 5},
    "shared-ffn": {"ffn_sharing": "all"},
    "shared-ffn-x2": {"ffn_sharing": "all", "ffn_mult": 2.0},
    # Mixture-of-Depths (Raposo et al., 2024): every other block on the top half, or the paper's 12.5%, of the tokens
    "mod-0.5": {"mod_capacity": 0.5},
    "mod-0.125": {"mod_capacity": 0.125},
    # recursive blocks (Bae et al., 2024): layers / 2 unique blocks looped twice, a rank-8 LoRA per block (needs an
    # even --layers)
    "recursive-x2-r8": {"loops": 2, "loop_lora_rank": 8},
    # MSG (Yao et al., 2023; layerlab.grow): the cost of the depth masks while they ramp, blocks 0 and 1 at mask 0.5
    "msg-ramping": {"msg_blocks": [0, 1], "msg_mask": 0.5},
    # mixture of experts (layerlab.moe; Switch, Fedus et al., 2021; Mixtral, Jiang et al., 2024): 4 experts of the
    # dense MLP's width, top-1 (the dense model's active parameters) and top-2
    "moe-4-top1": {"mlp": "moe", "experts": 4, "top_k": 1},
    "moe-4-top2": {"mlp": "moe", "experts": 4, "top_k": 2},
}


# ---------------------------------------------------------------- models


def model_config(width: int, layers: int, heads: int, context: int, norm: str = "layernorm") -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, context=context, layers=layers, width=width, heads=heads, mlp="gelu",
        positions="learned", tie_embeddings=True, bias=True, dropout=0.0, norm=norm, placement="pre",
    )


def build_layerlab(cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    model = layerlab.build_model(cfg)
    return model, lambda ids: model(input_ids=ids).logits


def build_hf(cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(cfg))
    # use_cache=False: a training step has no use for a KV cache (layerlab builds none either).
    return model, lambda ids: model(input_ids=ids, use_cache=False).logits


def build_xtransformers(cfg: ModelConfig) -> tuple[nn.Module, Callable]:
    """x-transformers configured as close to GPT-2 as its options allow (read from x_transformers 2.31).

    Chosen:
      * ``use_abs_pos_emb=True`` (the default): a learned ``nn.Embedding(max_seq_len, dim)`` added to
        the tokens (x-transformers multiplies it by dim**-0.5, one extra elementwise op);
      * pre-norm LayerNorm is the Decoder default (``pre_norm=True``, final norm on); x-transformers'
        LayerNorm has a gain but never a bias (``nn.LayerNorm(elementwise_affine=False) * (gamma + 1)``);
      * ``attn_dim_head=width // heads``: the default head dim is 64 whatever the width, which would
        change the attention shapes at width 512;
      * ``attn_flash=True``: its ``Attend`` then calls ``F.scaled_dot_product_attention(is_causal=True)``,
        the same kernel layerlab and HF use; without it x-transformers materialises the (T, T) scores
        in einsum + softmax, which would compare an attention algorithm rather than an implementation;
      * ``ff_mult=4`` with ``ff_custom_activation=nn.GELU(approximate="tanh")``: GPT-2's ``gelu_new``
        (the default there is exact erf GELU); the feed-forward linears keep their biases
        (``ff_no_bias=False``, the default);
      * ``tie_embedding=True``: logits = x @ token_emb.weight.T (times dim**-0.5, its default scale).
    Not available: biases on q, k, v and the output projection (``LinearNoBias`` in ``Attention``, no
    option) and norm biases, so x-transformers has 6·width·layers + width fewer parameters (~0.2%).
    """
    from x_transformers import Decoder, TransformerWrapper

    model = TransformerWrapper(
        num_tokens=cfg.vocab_size, max_seq_len=cfg.context, tie_embedding=True, use_abs_pos_emb=True,
        emb_dropout=0.0,
        attn_layers=Decoder(
            dim=cfg.width, depth=cfg.layers, heads=cfg.heads, attn_dim_head=cfg.width // cfg.heads,
            attn_flash=True, attn_dropout=0.0, ff_mult=4, ff_dropout=0.0,
            ff_custom_activation=nn.GELU(approximate="tanh"),
        ),
    )
    return model, model


BUILDERS = {"layerlab": build_layerlab, "hf-gpt2": build_hf, "x-transformers": build_xtransformers}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters); tied weights counted once.

    Embedding tables (token and position, ``nn.Embedding``) are the excluded ones; with tied
    embeddings the output head is the token table, so it is excluded too.
    """
    params = {id(p): p for p in model.parameters()}
    embed = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in params.values())
    return total, total - sum(params[i].numel() for i in embed if i in params)


def flops_per_token(n_nonembedding: int, layers: int, width: int, context: int) -> int:
    """Training FLOPs per token: 6N + 12·L·d·T (Kaplan et al., 2020; PaLM, Chowdhery et al., 2022, App. B)."""
    return 6 * n_nonembedding + 12 * layers * width * context


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    """One model with its optimizer, timed on the shared batches."""

    name: str
    model: nn.Module
    logits: Callable
    opt: torch.optim.Optimizer
    samples: list[float] = field(default_factory=list)  # seconds per step, one per round

    def step(self, inp: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        logits = self.logits(inp)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def make_runner(name: str, model: nn.Module, logits: Callable, device: torch.device) -> Runner:
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return Runner(name, model, logits, opt)


def make_batches(n: int, batch: int, context: int, device: torch.device, seed: int) -> list[tuple]:
    """``n`` fixed random (inputs, targets) pairs, each (batch, context): next-token targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (batch, context + 1), generator=g)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def time_step(runner: Runner, inp: torch.Tensor, tgt: torch.Tensor, device: torch.device) -> float:
    """Seconds of one training step."""
    sync(device)
    t0 = time.perf_counter()
    runner.step(inp, tgt)
    sync(device)
    return time.perf_counter() - t0


def matmul_gflops(size: int, device: torch.device, repeats: int = 1) -> list[float]:
    """GFLOP/s of ``repeats`` fp32 (size x size) @ (size x size) products, one sample each."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        out.append(2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return out


def round_robin(runners: list[Runner], batches: list[tuple], args, device: torch.device,
                between: Callable[[], None] | None = None, label: str = "") -> None:
    """Warm up every runner, then time them in ``args.repeats`` alternating rounds (order rotating).

    Each round times ``len(batches)`` steps of every runner. With ``args.interleave == "step"`` the
    runners take turns step by step within the round (A B C A B C ...), so that a noise burst of a few
    seconds lands on all of them; with ``"block"`` each runner does its steps in one block (AAA BBB CCC).
    """
    for r in runners:
        for i in range(args.warmup):
            loss = r.step(*batches[i % len(batches)])
        if not torch.isfinite(loss):
            raise RuntimeError(f"{r.name}: non-finite loss during warmup")
    for k in range(args.repeats):
        order = runners[k % len(runners):] + runners[:k % len(runners)]
        spent = {r.name: 0.0 for r in runners}
        gc.collect()
        if args.interleave == "step":
            for inp, tgt in batches:
                for r in order:
                    spent[r.name] += time_step(r, inp, tgt, device)
        else:
            for r in order:
                for inp, tgt in batches:
                    spent[r.name] += time_step(r, inp, tgt, device)
        for r in runners:
            r.samples.append(spent[r.name] / len(batches))
        if between is not None:
            between()
        line = "  ".join(f"{r.name} {r.samples[-1] * 1e3:7.1f} ms" for r in runners)
        print(f"  {label}round {k + 1}/{args.repeats}: {line}", flush=True)


# ---------------------------------------------------------------- runs


def bench_width(width: int, args, device: torch.device, peak: list[float]) -> dict:
    cfg = model_config(width, args.layers, args.heads, args.context)
    batches = make_batches(args.steps, args.batch, args.context, device, args.seed)
    runners, info = [], {}
    for name in IMPLS:
        torch.manual_seed(args.seed)
        model, logits = BUILDERS[name](cfg)
        total, nonemb = count_params(model)
        info[name] = {"params": total, "params_nonembedding": nonemb,
                      "flops_per_token": flops_per_token(nonemb, cfg.layers, cfg.width, cfg.context)}
        runners.append(make_runner(name, model, logits, device))
    hf = runners[1].model
    info["hf-gpt2"]["attn_implementation"] = hf.config._attn_implementation
    ref = info["layerlab"]["params"]
    print(f"\nwidth {width}: layers {cfg.layers}, heads {cfg.heads}, context {cfg.context}, batch {args.batch}, "
          f"{args.steps} steps x {args.repeats} rounds (HF attention: {hf.config._attn_implementation})")
    for name in IMPLS:
        p = info[name]["params"]
        print(f"  params {name:15s} {p:>11,d} ({(p - ref) / ref * 100:+.2f}% vs layerlab), "
              f"non-embedding {info[name]['params_nonembedding']:,d}")
        if abs(p - ref) / ref > 0.01:
            print(f"  WARNING: {name} differs from layerlab by more than 1% in parameters")

    round_robin(runners, batches, args, device, between=peak_sampler(args, device, peak), label=f"w{width} ")
    tokens = args.batch * args.context
    for r in runners:
        med = statistics.median(r.samples)
        info[r.name].update(step_s_samples=r.samples, step_s_median=med, tok_s_median=tokens / med,
                            tok_s_samples=[tokens / s for s in r.samples])
    ll, hfv, xt = (info[n]["tok_s_median"] for n in IMPLS)
    ours, hf_s, xt_s = (r.samples for r in runners)
    return {"width": width, "layers": cfg.layers, "heads": cfg.heads, "context": cfg.context, "batch": args.batch,
            "impls": info, "ratio_vs_hf": ll / hfv, "ratio_vs_xtransformers": ll / xt,
            "ratio_vs_best_peer": ll / max(hfv, xt), "paired_ratio_vs_hf": paired_speedup(ours, hf_s),
            "paired_ratio_vs_xtransformers": paired_speedup(ours, xt_s)}


def paired_speedup(ours: list[float], theirs: list[float]) -> float:
    """Median over rounds of theirs / ours step time within the same round (round-level noise cancels)."""
    return statistics.median(t / o for o, t in zip(ours, theirs))


def peak_sampler(args, device: torch.device, peak: list[float]) -> Callable[[], None]:
    """Called after each round: two fp32 matmul samples into ``peak``."""
    return lambda: peak.extend(matmul_gflops(args.peak_size, device, 2))


def bench_norms(args, device: torch.device, peak: list[float]) -> dict:
    batches = make_batches(args.steps, args.batch, args.context, device, args.seed)
    runners = []
    for norm in NORMS:
        torch.manual_seed(args.seed)
        cfg = model_config(256, args.layers, args.heads, args.context, norm=norm)
        model, logits = build_layerlab(cfg)
        # PRepBN's schedule: blend LayerNorm and RepBN throughout (its cost during training);
        # with no schedule set it would run RepBN alone.
        set_norm_schedule(model, 10**9)
        runners.append(make_runner(norm, model, logits, device))
    print(f"\nper-norm timing: layerlab width 256, layers {args.layers}, placement pre, "
          f"{args.steps} steps x {args.repeats} rounds")
    round_robin(runners, batches, args, device, between=peak_sampler(args, device, peak), label="norms ")
    base = runners[0]
    return {r.name: {"step_s_median": statistics.median(r.samples), "step_s_samples": r.samples,
                     "relative_to_layernorm": statistics.median(r.samples) / statistics.median(base.samples),
                     "paired_relative_to_layernorm": 1 / paired_speedup(r.samples, base.samples)} for r in runners}


def bench_designs(args, device: torch.device, peak: list[float]) -> dict:
    """Every design in :data:`DESIGNS` against the baseline block, in the same alternating rounds."""
    batches = make_batches(args.steps, args.batch, args.context, device, args.seed)
    runners, params = [], {}
    for name, fields in DESIGNS.items():
        torch.manual_seed(args.seed)
        base = model_config(args.design_width, args.layers, args.heads, args.context)
        cfg = ModelConfig(**{**base.to_dict(), **fields})
        model, logits = build_layerlab(cfg)
        params[name] = count_params(model)[0]
        runners.append(make_runner(name, model, logits, device))
    print(f"\nper-design timing: layerlab width {args.design_width}, layers {args.layers}, placement pre, "
          f"{args.steps} steps x {args.repeats} rounds")
    round_robin(runners, batches, args, device, between=peak_sampler(args, device, peak), label="designs ")
    base = runners[0]
    return {r.name: {"fields": DESIGNS[r.name], "params": params[r.name],
                     "step_s_median": statistics.median(r.samples), "step_s_samples": r.samples,
                     "relative_to_baseline": statistics.median(r.samples) / statistics.median(base.samples),
                     "paired_relative_to_baseline": 1 / paired_speedup(r.samples, base.samples)} for r in runners}


# ---------------------------------------------------------------- report


def print_report(results: dict) -> None:
    peak = results["peak_gflops_median"]
    print(f"\n## Training throughput (fp32, {results['device']}, torch {results['torch']}, "
          f"{results['threads']} threads)\n")
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s (median of {len(results['peak_gflops_samples'])} "
          f"{results['args']['peak_size']}^3 torch.mm)\n")
    if results["widths"]:
        print("| width | implementation | params | median tok/s | GFLOP/s | MFU | layerlab / this |")
        print("|---:|---|---:|---:|---:|---:|---:|")
    for w in results["widths"]:
        ll = w["impls"]["layerlab"]["tok_s_median"]
        for name in IMPLS:
            d = w["impls"][name]
            print(f"| {w['width']} | {name} | {d['params']:,d} | {d['tok_s_median']:,.0f} | "
                  f"{d['achieved_gflops']:.1f} | {d['mfu'] * 100:.1f}% | {ll / d['tok_s_median']:.3f}x |")
    if results["widths"]:
        print("\nratios of median tok/s (in brackets: median over rounds of the same-round ratio)\n")
        print("| width | layerlab / HF | layerlab / x-transformers | layerlab / max(peers) | target >= 1.0 |")
        print("|---:|---:|---:|---:|---|")
    for w in results["widths"]:
        met = "met" if w["ratio_vs_best_peer"] >= 1.0 else "NOT met"
        print(f"| {w['width']} | {w['ratio_vs_hf']:.3f}x ({w['paired_ratio_vs_hf']:.3f}x) | "
              f"{w['ratio_vs_xtransformers']:.3f}x ({w['paired_ratio_vs_xtransformers']:.3f}x) | "
              f"{w['ratio_vs_best_peer']:.3f}x | {met} |")
    if results.get("norms"):
        print("\n| norm | median step (ms) | relative to layernorm | same-round ratio, median |")
        print("|---|---:|---:|---:|")
        for name, d in results["norms"].items():
            print(f"| {name} | {d['step_s_median'] * 1e3:.1f} | {d['relative_to_layernorm']:.2f}x | "
                  f"{d['paired_relative_to_layernorm']:.2f}x |")
    if results.get("designs"):
        print("\n| design | params | median step (ms) | relative to baseline | same-round ratio, median |")
        print("|---|---:|---:|---:|---:|")
        for name, d in results["designs"].items():
            print(f"| {name} | {d['params']:,d} | {d['step_s_median'] * 1e3:.1f} | {d['relative_to_baseline']:.3f}x | "
                  f"{d['paired_relative_to_baseline']:.3f}x |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=None, help="sequence length (default 256; --quick: 128)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; --quick: 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--interleave", choices=("step", "block"), default="step",
                   help="within a round, alternate models every step (default) or run each model's steps in a block")
    p.add_argument("--norms", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every registered norm (default on)")
    p.add_argument("--designs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every block design (DESIGNS) against the baseline block (default on)")
    p.add_argument("--design-width", type=int, default=256, help="width of the per-design models")
    p.add_argument("--designs-only", action="store_true",
                   help="time only the block designs against the baseline (no peers, no per-norm timing)")
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the fp32 peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: width 256, 2 rounds of 3 steps, batch 2 x context 128 unless given")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = p.parse_args(argv)
    if args.quick:  # a full-size step takes seconds on 2 cores, so the smoke test also shrinks the batch
        args.widths, args.repeats, args.steps, args.warmup = [256], 2, 3, 2
    args.batch = args.batch or (2 if args.quick else 8)
    args.context = args.context or (128 if args.quick else 256)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    import transformers

    if not args.designs_only:
        import x_transformers  # noqa: F401  (fail early when the bench extra is missing)
    try:
        from importlib.metadata import version
        xt_version = version("x-transformers")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        xt_version = "unknown"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"device {device} ({dev_name}), {os.cpu_count()} CPU cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, x-transformers {xt_version}")

    warm = matmul_gflops(args.peak_size, device, 3)  # warms the BLAS; not part of the peak
    print(f"fp32 matmul warm-up: {', '.join(f'{g:.1f}' for g in warm)} GFLOP/s")
    peak: list[float] = []  # filled between rounds, so that the peak sees the same noise as the models
    widths = [] if args.designs_only else [bench_width(w, args, device, peak) for w in args.widths]
    norms = bench_norms(args, device, peak) if args.norms and not args.designs_only else None
    designs = bench_designs(args, device, peak) if args.designs or args.designs_only else None
    peak_med = statistics.median(peak)
    for w in widths:
        for d in w["impls"].values():
            d["achieved_gflops"] = d["tok_s_median"] * d["flops_per_token"] / 1e9
            d["mfu"] = d["achieved_gflops"] / peak_med
    results = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "args": vars(args), "device": str(device), "device_name": dev_name, "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "x_transformers": xt_version, "peak_warmup_gflops": warm, "peak_gflops_samples": peak,
        "peak_gflops_median": peak_med, "widths": widths, "norms": norms, "designs": designs,
    }
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
