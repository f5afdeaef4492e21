"""Peak memory and wall time of `layerlab analyze` on a TinyLlama-1.1B-shaped checkpoint (issue 13, section 4).

The checkpoint is random-init, shaped like TinyLlama-1.1B (LlamaConfig: hidden 2048, 22 layers, MLP 5632,
vocabulary 32000, 32 heads, 4 KV heads, untied head), stored in bf16 as sharded safetensors with layerlab's byte
tokenizer. It is built once, in ``--cache`` (default ``$LAYERLAB_CACHE/bench`` or ``~/.cache/layerlab/bench``),
tensor by tensor: the names and shapes come from a model on the meta device, each tensor is drawn (normal with
the config's ``initializer_range``, norms at 1) and written to its shard, so neither the model nor a second copy
of the weights is ever held. About 2.2 GB.

Each row runs in a fresh subprocess, whose peak resident memory is its own ``VmHWM`` (written by the process as
it exits; see :data:`HWM`) and whose wall time includes Python's start and all imports:

- ``peer``: a plain ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16)`` and one forward of ``--tokens``
  tokens (batch 1), under ``torch.no_grad()``. The reference for time and memory.
- ``analyze``: ``layerlab analyze CKPT --tokens N --out DIR --no-offload`` (in memory).
- ``analyze --offload``: the same with ``--offload`` (skipped, with a note, when the CLI has no such flag).
- ``phases`` (one per mode): the same analysis through the library (``layerlab.analysis.analyze.analyze`` and
  ``layerlab.report.write_report``), with timers wrapped around the functions of each phase: load (opening the
  checkpoint), streaming pass (``_stream_pass`` less the removal hooks inside it), removal
  (``RemovalSums._advance`` and ``update``), token-sample measures (``layer_results`` and ``measure_layer``),
  spectra (``spectra_cached`` / ``offloaded_spectra``), report (``write_report``).

Every analysis gets a fresh, empty ``LAYERLAB_CACHE``, so the weight spectra are computed, not read from a cache.
The table gives peak RSS against the checkpoint's bytes and time against the peer, with the issue's targets:
offload <= 25% of the bytes + 600 MB; in memory <= 1.3x the bytes; <= 4 min for the whole command.

    python benchmarks/analyze_memory.py                   # build once, then measure (about 10-20 min on 2 cores)
    python benchmarks/analyze_memory.py --tokens 512 --cache /tmp/bench --json out.json
    python benchmarks/analyze_memory.py --only peer analyze

``spectra`` (first) times the weight spectra against the float64 SVD on TinyLlama's matrix shapes and checks
alpha (see :func:`spectra_check`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=32000,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, initializer_range=0.02)
SHARD_BYTES = 1 << 30  # at most 1 GiB a shard: a 2.2 GB checkpoint gets three
TARGET_OFFLOAD = (0.25, 600 * 2**20)  # peak <= 25% of the checkpoint's bytes + 600 MB
TARGET_IN_MEMORY = 1.3  # peak <= 1.3x the checkpoint's bytes
TARGET_SECONDS = 240.0
ROWS = ("spectra", "peer", "analyze", "offload", "phases", "phases-offload")
SPECTRA_SHAPES = ((2048, 2048), (5632, 2048), (2048, 5632), (256, 2048))  # q/o, gate/up, down, k/v


def default_cache() -> Path:
    return Path(os.environ.get("LAYERLAB_CACHE") or Path.home() / ".cache" / "layerlab") / "bench"


# ---------------------------------------------------------------------------------------------------- checkpoint
def build_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the random-init TinyLlama-shaped bf16 checkpoint to ``path`` (once; an existing one is kept).

    At most one shard (:data:`SHARD_BYTES`) of tensors is held at a time; it is written into ``path.partial`` and
    renamed when complete, so an interrupted build is never mistaken for a checkpoint."""
    if (path / "model.safetensors.index.json").is_file() and (path / "config.json").is_file():
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerlab.data import ByteTokenizer

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**TINYLLAMA, dtype="bfloat16")
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    shards: list[list[str]] = []  # tensor names per shard, in writing order
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        save_file(shard, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) * config.initializer_range).to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[k] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):  # the transformers names, now that the number of shards is known
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (tmp / f"shard-{i}.safetensors").rename(tmp / name)
        weight_map.update({k: name for k in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    ByteTokenizer().save(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def checkpoint_bytes(path: Path) -> tuple[int, int, dict[str, int]]:
    """(total bytes, bytes of the largest block, bytes of the embedding/head/final norm by name), read from the
    safetensors headers (8-byte length, then JSON with each tensor's data_offsets)."""
    total, blocks, other = 0, {}, {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            b = v["data_offsets"][1] - v["data_offsets"][0]
            total += b
            parts = k.split(".")
            if "layers" in parts:
                i = int(parts[parts.index("layers") + 1])
                blocks[i] = blocks.get(i, 0) + b
            else:
                other[k] = b
    return total, max(blocks.values()), other


# ---------------------------------------------------------------------------------------------------- measuring
# Every measured process writes its own peak resident set (VmHWM of /proc/self/status: the high-water mark of the
# address space it exec'ed into) to the file in $LAYERLAB_BENCH_HWM when it exits. ru_maxrss from wait4 is no
# good here: Linux starts a child's ru_maxrss at the RSS its parent had when it forked (measured: a 6 s run that
# failed at import reported the 2.1 GB of this script after it had built the checkpoint).
HWM = """
import atexit, os
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["LAYERLAB_BENCH_HWM"], "w").write(line.split()[1])
atexit.register(_hwm)
"""

CLI = HWM + """
import sys
sys.argv = {argv!r}
from layerlab.cli import main
main()
"""

PEER = HWM + """
import sys, time, torch
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.bfloat16).eval()
t1 = time.perf_counter()
ids = torch.randint(1, 256, (1, {tokens}), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    model(input_ids=ids)
t2 = time.perf_counter()
print("PHASES", {{"load": t1 - t0, "forward": t2 - t1}})
"""

PHASES = HWM + """
import importlib, time, warnings, torch
warnings.simplefilter("ignore")
# import_module: layerlab.analysis.analyze is also the name of a function that layerlab.analysis exports
A = importlib.import_module("layerlab.analysis.analyze")
S = importlib.import_module("layerlab.analysis.spectra")
ST = importlib.import_module("layerlab.analysis.stats")
R = importlib.import_module("layerlab.report")
times = {{}}

def timed(owner, attr, phase):
    f = getattr(owner, attr)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - t
    setattr(owner, attr, wrapper)

timed(A, "open_model", "load")
timed(A, "_stream_pass", "pass")
timed(ST.RemovalSums, "_advance", "removal")
timed(ST.RemovalSums, "update", "removal")
timed(A, "layer_results", "token-sample measures")
timed(A, "measure_layer", "token-sample measures")
timed(S, "spectra_cached", "spectra")
if hasattr(A, "offloaded_spectra"):
    timed(A, "offloaded_spectra", "spectra")
kw = {{"offload": True}} if {offload} else {{"offload": False}}
report = A.analyze({path!r}, tokens={tokens}, progress=False, **kw)
timed(R, "write_report", "report")
R.write_report(report, {out!r})
times["streaming pass"] = times.pop("pass", 0.0) - times.get("removal", 0.0)
print("PHASES", times)
"""


def run_measured(argv: list[str], env: dict[str, str], logs: Path) -> dict:
    """Run ``argv`` in a fresh process; its wall time, peak RSS (bytes; its own VmHWM, see :data:`HWM`) and what
    it printed after ``PHASES``."""
    out_f, err_f, hwm_f = logs.with_suffix(".out"), logs.with_suffix(".err"), logs.with_suffix(".hwm")
    with open(out_f, "w") as fo, open(err_f, "w") as fe:
        t = time.perf_counter()
        p = subprocess.run(argv, env={**env, "LAYERLAB_BENCH_HWM": str(hwm_f)}, stdout=fo, stderr=fe)
        wall = time.perf_counter() - t
    peak = int(hwm_f.read_text()) * 1024 if hwm_f.is_file() else 0  # VmHWM is in kB
    phases = {}
    for line in out_f.read_text().splitlines():
        if line.startswith("PHASES "):
            phases = ast.literal_eval(line[len("PHASES "):])
    err = err_f.read_text()
    return {"wall_s": wall, "peak_rss": peak, "returncode": p.returncode, "phases": phases,
            "stderr_tail": err[-2000:] if p.returncode else ""}


def spectra_check(seed: int = 0) -> list[dict]:
    """Fast spectra against the exact float64 SVD on TinyLlama's real matrix shapes, one thread each.

    The entries are Student t (df 2 and 3; z / sqrt(chi2_df / df)) times 0.02, in bf16: heavy-tailed enough for a
    power-law tail above a bulk. The reference fits the squared float64 singular values of the same bf16 values.
    """
    import torch

    from layerlab.analysis import spectra as sp

    torch.set_num_threads(1)
    rows = []
    for shape in SPECTRA_SHAPES:
        for df in (2, 3):
            g = torch.Generator().manual_seed(seed + shape[0] + shape[1] + df)
            chi2 = torch.randn(df, *shape, generator=g).square().sum(0)
            w = (0.02 * torch.randn(*shape, generator=g) / (chi2 / df).sqrt()).to(torch.bfloat16)
            t = time.perf_counter()
            s = torch.linalg.svdvals(w.to(torch.float64)).numpy()
            ref = sp.fit_power_law(s * s)
            exact_s = time.perf_counter() - t
            t = time.perf_counter()
            got = sp.matrix_spectrum(w)
            fast_s = time.perf_counter() - t
            method = sp._eigenvalues(w)[2]
            rows.append({"shape": shape, "df": df, "method": method, "alpha_exact": ref.alpha,
                         "alpha_fast": got.esd_alpha, "n_tail": ref.n_tail, "exact_s": exact_s, "fast_s": fast_s,
                         "stable_rank_rel_err": abs(got.stable_rank / float((s * s).sum() / (s * s).max()) - 1)})
            r = rows[-1]
            print(f"  spectra {str(shape):14s} t{df}: {method:6s} alpha {r['alpha_fast']:.4f} vs exact "
                  f"{r['alpha_exact']:.4f} (|d| {abs(r['alpha_fast'] - r['alpha_exact']):.1e}, tail {ref.n_tail}), "
                  f"{fast_s:.2f} s vs SVD {exact_s:.2f} s ({exact_s / fast_s:.1f}x)", flush=True)
    return rows


def has_offload_flag(env: dict[str, str]) -> bool:
    out = subprocess.run([*layerlab_argv(), "analyze", "--help"], env=env, capture_output=True, text=True).stdout
    return "--offload" in out


def layerlab_argv() -> list[str]:
    exe = shutil.which("layerlab")
    return [exe] if exe else [sys.executable, "-c", "from layerlab.cli import main; main()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=default_cache(), help="where the checkpoint is built once")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each row (medians are reported)")
    ap.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    ckpt = args.cache / "tinyllama-1.1b-shaped-bf16"
    t = time.perf_counter()
    build_checkpoint(ckpt)
    built = time.perf_counter() - t
    total, block, other = checkpoint_bytes(ckpt)
    print(f"checkpoint: {ckpt} ({total / 1e9:.3f} GB bf16; largest block {block / 2**20:.1f} MiB; "
          f"embedding + head + final norm {sum(other.values()) / 2**20:.1f} MiB; ready in {built:.1f} s)")
    base_env = {**os.environ, "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    offload_ok = has_offload_flag(base_env)
    work = Path(tempfile.mkdtemp(prefix="layerlab-bench-mem-"))

    def env_fresh(tag: str, i: int) -> dict[str, str]:
        c = work / f"cache-{tag}-{i}"  # empty: spectra are computed, never read from an earlier run
        c.mkdir()
        return {**base_env, "LAYERLAB_CACHE": str(c)}

    commands = {
        "peer": lambda i: [sys.executable, "-c", PEER.format(path=str(ckpt), tokens=args.tokens)],
        "analyze": lambda i: [sys.executable, "-c", CLI.format(argv=[
            "layerlab", "analyze", str(ckpt), "--tokens", str(args.tokens), "--out", str(work / f"out-mem-{i}"),
            "--no-offload", "--no-progress"])],
        "offload": lambda i: [sys.executable, "-c", CLI.format(argv=[
            "layerlab", "analyze", str(ckpt), "--tokens", str(args.tokens), "--out", str(work / f"out-off-{i}"),
            "--offload", "--no-progress"])],
        "phases": lambda i: [sys.executable, "-c", PHASES.format(path=str(ckpt), tokens=args.tokens, offload=False,
                                                                 out=str(work / f"out-ph-{i}"))],
        "phases-offload": lambda i: [sys.executable, "-c", PHASES.format(
            path=str(ckpt), tokens=args.tokens, offload=True, out=str(work / f"out-pho-{i}"))],
    }
    results: dict[str, list[dict]] = {}
    spectra_rows = None
    for row in args.only:
        if row == "spectra":
            spectra_rows = spectra_check()
            continue
        if row in ("offload", "phases-offload") and not offload_ok:
            print(f"{row}: skipped, `layerlab analyze` has no --offload flag yet")
            continue
        for i in range(args.repeats):
            r = run_measured(commands[row](i), env_fresh(row, i), work / f"{row}-{i}")
            results.setdefault(row, []).append(r)
            status = "ok" if r["returncode"] == 0 else f"FAILED rc={r['returncode']}: {r['stderr_tail'][-600:]}"
            print(f"  {row} run {i + 1}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {status}",
                  flush=True)
    shutil.rmtree(work, ignore_errors=True)
    report(results, total, block, other, args, spectra_rows)


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


def report(results: dict[str, list[dict]], total: int, block: int, other: dict[str, int], args,
           spectra_rows: list[dict] | None) -> None:
    peer = results.get("peer")
    peer_s = _median([r["wall_s"] for r in peer]) if peer else None
    print(f"\n--tokens {args.tokens}; checkpoint {total / 2**20:.0f} MiB; medians of {args.repeats} run(s)")
    print(f"{'row':16s} {'wall s':>8s} {'x peer':>7s} {'peak MiB':>9s} {'peak/bytes':>10s} {'target':>22s} {'met':>4s}")
    summary = {}
    for row, rs in results.items():
        ok = [r for r in rs if r["returncode"] == 0]
        if not ok:
            print(f"{row:16s} failed")
            continue
        wall = _median([r["wall_s"] for r in ok])
        peak = _median([r["peak_rss"] for r in ok])
        offload = row in ("offload", "phases-offload")
        if row == "peer":
            target, met = "-", "-"
        elif offload:
            limit = TARGET_OFFLOAD[0] * total + TARGET_OFFLOAD[1]
            target = f"<= {limit / 2**20:.0f} MiB, <= 240 s"
            met = "yes" if peak <= limit and wall <= TARGET_SECONDS else "no"
        else:
            limit = TARGET_IN_MEMORY * total
            target = f"<= {limit / 2**20:.0f} MiB, <= 240 s"
            met = "yes" if peak <= limit and wall <= TARGET_SECONDS else "no"
        ratio = f"{wall / peer_s:6.2f}x" if peer_s else "-"
        print(f"{row:16s} {wall:8.1f} {ratio:>7s} {peak / 2**20:9.0f} {peak / total:9.2f}x {target:>22s} {met:>4s}")
        summary[row] = {"wall_s": wall, "peak_rss": peak, "peak_over_bytes": peak / total,
                        "phases": ok[0]["phases"], "runs": rs}
    for row in ("peer", "phases", "phases-offload"):
        if row in summary and summary[row]["phases"]:
            ph = summary[row]["phases"]
            print(f"\nphases of {row} (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "tokens": args.tokens,
                                         "checkpoint_bytes": total, "largest_block_bytes": block,
                                         "embedding_head_bytes": sum(other.values()), "rows": summary,
                                         "spectra_check": spectra_rows},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
