"""``analyze``: every per-layer measurement in one streaming pass. Which metrics a layer's entry holds, in
which order and computed how, is the metric registry's (``metrics.py``, one entry per metric, each citing its
paper); this module runs the accumulators they read and fills the entries.

Fixed sample sizes (documented in docs/report-format.md):
- ``SAMPLE_TOKENS`` tokens feed effective rank, intrinsic dimension and anisotropy;
- ``SAMPLE_SEQUENCES`` whole sequences feed prompt entropy and curvature;
- layer removal runs on the first ``removal_tokens`` tokens (whole batches): while each block runs, the
  skip-streams of the earlier blocks' removals advance through it (:class:`~layerlab.analysis.stats.RemovalSums`).

A model is measured in its checkpoint's own dtype (``dtype="auto"``; bf16 stays bf16) and every statistic
accumulates in float32 or float64. A checkpoint larger than ``max_memory`` (or any, with ``offload=True``) is
streamed block by block from its safetensors (:mod:`layerlab.offload`); the report is the same.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .. import allocator
from ..adapters import load_model, router_load, router_stats, view
from ..data import batches, default_split, describe_slice, split_ids, window_length
from ..defaults import ANALYZE_TOKENS, REMOVAL_TOKENS, SAMPLE_SEQUENCES, SAMPLE_TOKENS
from ..errors import LayerlabError
from ..io import atomic_write_json, cache_dir, progress_bar, read_json, versions
from .metrics import layer_results, measure_layer, stream_sums
from .report import Report
from .sections import check_sections, run_sections
from .stats import RemovalSums, StreamStats, TokenSample, one_thread

DEFAULT_TOKENS = ANALYZE_TOKENS


def model_label(path: Path) -> str:
    """A short name for plots: the directory's name, or its parent's when the directory is generically named."""
    p = path.resolve()
    return p.parent.name if p.name.lower() in {"model", "models", "checkpoint", "final"} else p.name


def default_report_dir(models) -> Path:
    """Where ``layerlab analyze`` writes without ``--out``: ``reports/<label>``, labels joined by ``-vs-``."""
    return Path("reports") / "-vs-".join(model_label(Path(m)) for m in models)


@dataclass
class _Pass:
    """The accumulators of one model's streaming pass."""

    stream: StreamStats
    sample: TokenSample
    removal: RemovalSums
    hidden_size: int = 0
    fidelity: dict | None = None
    router: list[torch.Tensor | None] | None = None  # per block, how often the MoE router picked each expert


@torch.no_grad()
def analyze_model(model, tokenizer, *, name: str, path: str | None, data=None, tokens: int = DEFAULT_TOKENS,
                  seq_len: int | None = None, batch_size: int = 8, removal_tokens: int = REMOVAL_TOKENS,
                  spectra: bool = True, intrinsic: bool = True, progress: bool = True,
                  model_dir: Path | None = None, offloaded=None, sections: dict[str, dict] | None = None,
                  seed: int = 0, announce: Callable[[str], None] | None = None) -> dict:
    """All measurements of one loaded model; returns its entry of the report (see docs/report-format.md).

    Each layer's entry holds every metric of the registry (:mod:`layerlab.analysis.metrics`), in its order;
    ``spectra=False`` and ``intrinsic=False`` turn off the metrics that name those switches (their values are
    None). ``offloaded`` is the :class:`~layerlab.offload.Offloaded` that ``model`` belongs to, when its blocks
    are streamed from the checkpoint.

    ``sections`` (a section's name -> its options) runs those opt-in sections of
    :data:`layerlab.registry.SECTIONS` after the pass, on the same tokens (``seed`` seeds their random draws);
    their keys join the entry, and the tensors they save are returned under the private key ``_artifacts``
    (stem -> tensors), which :func:`analyze` turns into files next to the report."""
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    if sections:
        check_sections(sections, offloaded=offloaded is not None)
    # the per-batch buffers are freed batch after batch: returned to the system for a large or streamed model,
    # kept for reuse for a small one (layerlab.allocator)
    allocator.for_weights(0 if offloaded is not None else allocator.model_bytes(model), offloaded is not None)
    v = offloaded.view if offloaded is not None else view(model)
    device = offloaded.device if offloaded is not None else next(model.parameters()).device
    dtype = offloaded.dtype if offloaded is not None else next(model.parameters()).dtype
    seq_len = window_length(model.config, v.causal, seq_len)
    split = default_split(data)
    split_tokens = split_ids(tokenizer, data, split)
    ids = split_tokens[: 2 * tokens].tolist()
    available = len(ids)
    if available < tokens:
        warnings.warn(f"data holds only {available} tokens for this tokenizer, fewer than --tokens {tokens}; "
                      "analyzing what exists", stacklevel=2)
    if available < 4:
        raise LayerlabError("data too short: fewer than 4 tokens to analyze")
    acc = _stream_pass(v, tokenizer, ids, name=name, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                       removal_tokens=removal_tokens, progress=progress, device=device)
    found = None
    if spectra and offloaded is not None:
        found = offloaded_spectra(offloaded, model_dir, progress=progress)
    elif spectra:
        from .spectra import spectra_cached

        found = spectra_cached(v, model_dir, cache_dir(), progress=progress)
    res = {**acc.stream.results(), "removal": acc.removal.results()}
    section_values, artifacts = {}, {}
    if sections:
        ctx = dict(view=v, tokenizer=tokenizer, ids=ids, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                   device=device, name=name, loss=res["loss"], progress=progress, seed=seed)
        section_values, artifacts = run_sections(sections, ctx, announce=announce)
    if not v.sublayers_known:  # a discovered structure: what attention and the MLP add is unknown, not zero
        for key in ("attn_relative_contribution", "attn_cosine", "mlp_relative_contribution", "mlp_cosine"):
            res[key] = None
    router = [router_stats(c) if c is not None else {} for c in acc.router or [None] * v.num_layers]
    for key in ("router_entropy", "router_max_share"):
        res[key] = [r.get(key) for r in router] if any(router) else None
    off = {switch for switch, on in (("spectra", spectra), ("intrinsic", intrinsic)) if not on}
    placements = v.placements()
    rows = layer_results(res, v.num_layers, v.causal, sample=acc.sample, spectra=found)
    workers = min(torch.get_num_threads(), len(rows))  # the cores the forwards used
    # the token-sample measures run small decompositions, each on one thread (see one_thread: a worker thread sets
    # its own), so the layers are measured side by side, as many at once as torch had threads
    with one_thread(), ThreadPoolExecutor(max(workers, 1), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        measured = list(pool.map(lambda r: _measure(r, off), rows))
    layers = [{"index": r.index, "placement": placements[r.index], **m} for r, m in zip(rows, measured, strict=True)]
    return {
        "name": name, "path": path, "arch": v.arch_name, "causal": v.causal, "num_layers": v.num_layers,
        "dtype": str(dtype).removeprefix("torch."), "offload": offloaded is not None,
        "hidden_size": acc.hidden_size, "placements": placements, "form": v.form, "loss": res["loss"],
        "data_slice": describe_slice(data, split, min(tokens, len(split_tokens)), len(split_tokens)), "layers": layers,
        "embedding": {"hidden_rms": res["rms"][0], "max_abs_activation": res["max_resid"][0]},
        "final_norm_max_abs": res["max_final"],
        "angular_distance_matrix": res["ang"], "angular_distance_matrix_last_token": res["ang_last"],
        "best_block_to_prune": _best_blocks(res["ang_last"] if v.causal else res["ang"], v.num_layers),
        "max_activation": _max_activation(res, v.num_layers),
        "fidelity": acc.fidelity,
        "weights": [dict(block=s.block, name=s.name, shape=list(s.shape), esd_alpha=s.esd_alpha,
                         stable_rank=s.stable_rank) for s in found or []],
        "samples": {"tokens": res["tokens"], "token_sample": acc.sample.count, "sequences": res["sequences"],
                    "removal_tokens": acc.removal.seen, "seq_len": seq_len},
        **section_values,
        **({"_artifacts": artifacts} if artifacts else {}),
    }


def _measure(row, off: set[str]) -> dict:
    """One layer's metrics; the layer's float32 token sample, cached while its metrics read it, is freed after."""
    try:
        return measure_layer(row, off)
    finally:
        row.__dict__.pop("tokens", None)  # LayerResult.tokens is a cached_property


def _stream_pass(v, tokenizer, ids: list[int], *, name: str, tokens: int, seq_len: int, batch_size: int,
                 removal_tokens: int, progress: bool, device: torch.device) -> _Pass:
    """One traced forward per batch, folded into the running sums, the token sample and layer removal."""
    L = v.num_layers
    acc = _Pass(StreamStats(L, sums=stream_sums()), TokenSample(L + 1, SAMPLE_TOKENS, SAMPLE_SEQUENCES),
                RemovalSums(L, removal_tokens, v.causal))
    n_batches = math.ceil(min(tokens, len(ids)) / (seq_len * batch_size)) + 1
    with progress_bar(progress) as bar:
        task = bar.add_task(f"analyze {name}", total=n_batches)
        for input_ids, mask in batches(tokenizer, ids, tokens, seq_len, batch_size, causal=v.causal):
            input_ids, mask = input_ids.to(device), mask.to(device)
            acc.stream.begin(mask)
            # each block's sublayer outputs are reduced as the block returns and then dropped, so one block's are
            # alive at a time; only metrics with their own running sums (``Metric.sums``) read the whole batch's
            keep = bool(acc.stream.sums)

            def reduce_block(t, i: int) -> None:
                acc.stream.update_block(i, t.resid_in[i], t.attn[i], t.mlp[i], t.mid[i], gates[i])
                gates[i] = None
                if not keep:
                    t.attn[i] = t.mlp[i] = t.mid[i] = None

            with (v.trace(on_block=reduce_block) as t, trace_gates(v) as gates, router_load(v) as load,
                  acc.removal.streams(v)):
                out = v.forward(input_ids, mask)
            # the main forward's routing only: the fidelity check's plain forward runs outside the context, and
            # the removal streams silence the hooks inside a block
            acc.router = load if acc.router is None else [a if a is None else a + b for a, b in zip(acc.router, load)]
            states = [t.resid_in[0], *t.resid_out]  # x_0..x_L, each (B, T, C)
            acc.removal.update(v, out, input_ids, mask)  # on the first removal_tokens tokens; frees the streams
            if acc.fidelity is None:  # the first batch only: one extra, plain forward of one or two rows
                acc.fidelity = check_fidelity(v, input_ids, mask, states, out, rows=fidelity_rows(mask))
            acc.stream.finish(states, t.final, attn=t.attn, mlp=t.mlp, mids=t.mid)
            acc.sample.update(states, mask)
            if v.has_lm_head:
                acc.stream.update_lens(states, v.logits_from_hidden, out.logits, input_ids, mask)
            acc.hidden_size = int(states[0].shape[-1])
            del t, out, states
            bar.advance(task)
        bar.update(task, completed=n_batches)
    return acc


# The fidelity check's tolerance on max |hooked - plain| / max |plain|, by compute dtype: float32 (and wider)
# forwards agree to rounding, 1e-4 leaves room for non-deterministic kernels (a GPU's reductions); half precision
# rounds at 2^-8 (bfloat16) or 2^-11 (float16) of a value, so 1e-2 (a few units of bfloat16 rounding) there.
FIDELITY_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
FIDELITY_TOLERANCE_DEFAULT = 1e-4


def fidelity_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of :func:`check_fidelity` for hidden states of ``dtype``."""
    return FIDELITY_TOLERANCE.get(dtype, FIDELITY_TOLERANCE_DEFAULT)


def _rel_diff(hooked: torch.Tensor, plain: torch.Tensor, real: torch.Tensor,
              chunk: int = 1 << 20) -> tuple[float, float]:
    """max |hooked - plain| over the real tokens, and that relative to max |plain| there (finite values; equal
    infinities or NaN on both sides count as agreeing). ``hooked`` and ``plain`` are (B, T, ...), ``real`` (B, T);
    the real tokens are read a few at a time, at most ``chunk`` values each (4 MiB in float32), so that a batch's
    logits never get a float copy, whatever the vocabulary."""
    B, T = real.shape
    H, P = hooked.reshape(B * T, -1), plain.reshape(B * T, -1)
    idx = real.reshape(-1).nonzero().squeeze(1)
    step = max(chunk // max(H.shape[1], 1), 1)
    diff = scale = 0.0
    for start in range(0, int(idx.numel()), step):
        rows = idx[start:start + step]
        a, b = H.index_select(0, rows).float(), P.index_select(0, rows).float()
        agree = (a == b) | (a.isnan() & b.isnan())
        d = (a - b).abs_().masked_fill_(agree, 0)
        diff = max(diff, math.inf if bool(d.isnan().any()) else float(d.max()))  # NaN on one side only: diverged
        del d, agree
        top = b.abs_().masked_fill_(~b.isfinite(), 0).max()
        scale = max(scale, float(top))
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def fidelity_rows(mask: torch.Tensor) -> torch.Tensor:
    """The rows of a (B, T) batch that the fidelity check runs again: the first, and the last where it holds
    padding (the data's last window is the short one), so that padding is checked whenever the batch has any.
    One or two rows cost a fraction of the batch's forward and memory."""
    B = mask.shape[0]
    last_padded = B > 1 and not bool(mask[-1].bool().all())
    return torch.tensor([0, B - 1] if last_padded else [0], device=mask.device)


def check_fidelity(v, input_ids: torch.Tensor, mask: torch.Tensor, states: list[torch.Tensor], out,
                   rows: torch.Tensor | None = None) -> dict:
    """Compare a traced forward with the model's plain forward of the same batch (no hooks,
    ``output_hidden_states=True``): the residual stream x_0..x_L the trace recorded against Hugging Face's
    hidden states, and the logits (causal LMs) against the plain logits, on real (non-padded) tokens.
    ``rows`` (indices into the batch) limits the check, and the plain forward, to those rows.

    Hidden state l (l < L) is x_l; the last one has the final norm applied where the model has one, so it is
    compared with final_norm(x_L) (x_L itself for an encoder). Each figure is max |Δ| relative to max |.| of
    the plain value; any above :func:`fidelity_tolerance` raises :class:`LayerlabError` naming the first
    point (embedding, block, logits) that diverged. Returns the report's ``fidelity`` entry."""
    if rows is not None:
        input_ids, mask, states = input_ids[rows], mask[rows], [s[rows] for s in states]
        out = SimpleNamespace(logits=out.logits[rows] if v.has_lm_head else None,
                              last_hidden_state=_rows_of(getattr(out, "last_hidden_state", None), rows))
    kw = {"use_cache": False} if v.causal else {}
    plain = v.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **kw)
    hs = plain.hidden_states
    L = v.num_layers
    if hs is None or len(hs) != L + 1:
        raise LayerlabError(f"fidelity check: the plain forward returned {0 if hs is None else len(hs)} hidden "
                            f"states, expected {L + 1} (embedding and {L} blocks)")
    tol = fidelity_tolerance(states[0].dtype)
    real = mask.bool()
    last = v.final_norm(states[L]) if v.final_norm is not None else states[L]
    worst = 0.0
    for i, hooked in enumerate([*states[:L], last]):
        _, rel = _rel_diff(hooked, hs[i], real)
        worst = max(worst, rel)
        if not rel <= tol:
            where = "the embedding" if i == 0 else f"block {i - 1}"
            raise LayerlabError(f"fidelity check failed: the hooked forward diverges from the plain forward at "
                                f"{where} (max |Δ| = {rel:.3g} of the hidden state's scale, tolerance {tol:g})")
    logit_diff = None
    if v.has_lm_head:
        logit_diff, rel = _rel_diff(out.logits, plain.logits, real)
        if not rel <= tol:
            raise LayerlabError(f"fidelity check failed: the hooked forward's logits diverge from the plain "
                                f"forward's (max |Δlogit| = {logit_diff:.3g}, {rel:.3g} of their scale, "
                                f"tolerance {tol:g})")
    elif getattr(out, "last_hidden_state", None) is not None:  # an encoder: its output is the last hidden state
        _, rel = _rel_diff(out.last_hidden_state, plain.last_hidden_state, real)
        worst = max(worst, rel)
        if not rel <= tol:
            raise LayerlabError(f"fidelity check failed: the hooked forward's output diverges from the plain "
                                f"forward's ({rel:.3g} of its scale, tolerance {tol:g})")
    return {"max_abs_logit_diff": logit_diff, "max_rel_hidden_diff": worst, "layers_checked": L,
            "tolerance": tol, "passed": True}


def check_trace(v, input_ids: torch.Tensor, mask: torch.Tensor, t, out) -> dict:
    """:func:`check_fidelity` of a batch's finished trace ``t`` and its output ``out``, on the batch's
    :func:`fidelity_rows`: for a command that traces its own forwards (prune's stream measures, LIM); called
    outside the trace, so that the plain forward is not recorded."""
    return check_fidelity(v, input_ids, mask, [t.resid_in[0], *t.resid_out], out, rows=fidelity_rows(mask))


@torch.no_grad()
def certify(v, input_ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """:func:`check_fidelity` where a command's own forwards are not traced (prune's ``loss`` metric): a traced
    forward of the batch's :func:`fidelity_rows` against the plain forward of the same rows."""
    rows = fidelity_rows(mask)
    input_ids, mask = input_ids[rows], mask[rows]
    with v.trace(sublayers=False) as t:
        out = v.forward(input_ids, mask)
    return check_fidelity(v, input_ids, mask, [t.resid_in[0], *t.resid_out], out)


def _rows_of(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[rows]


def _best_blocks(matrix: list[list], num_layers: int) -> dict[str, dict]:
    """For each n, the start l of the n contiguous blocks whose ends are closest: argmin_l d(x_l, x_l+n)."""
    best = {}
    for n in range(1, num_layers):
        d, start = min((matrix[s][s + n], s) for s in range(num_layers - n + 1))
        best[str(n)] = {"start": start, "distance": d}
    return best


def _max_activation(res: dict, num_layers: int) -> dict:
    """The largest |activation| over the embedding, every block's hook points and the final norm, and where
    (a point a block lacks, or a model without a final norm, is left out)."""
    points = [(res["max_resid"][0], -1, "embedding")]
    for i in range(num_layers):
        points += [(res["max_resid"][i + 1], i, "resid"), (res["max_attn"][i], i, "attn"),
                   (res["max_mlp"][i], i, "mlp"), (res["max_gate"][i], i, "gate")]
    points.append((res["max_final"], num_layers - 1, "final_norm"))
    top = max(p for p in points if p[0] is not None)
    return {"value": top[0], "layer": top[1], "point": top[2]}


def mlp_out_proj(v, index: int) -> nn.Module | None:
    """Block ``index``'s MLP output projection (the adapter's ``Arch.out_proj["mlp"]``: layerlab ``mlp.proj``,
    GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, BERT ``output.dense``), None where the block has no MLP."""
    path = v.arch.out_proj.get("mlp")
    if path is None:
        return None
    try:
        return v.blocks[index].module.get_submodule(path)
    except AttributeError:  # a layerlab block without its MLP (``drop_mlp``)
        return None


@contextmanager
def trace_gates(v) -> Iterator[list[torch.Tensor | None]]:
    """Hook each block's MLP gate during forwards: per block, the (B, T) max |.| over the hidden units of
    what the MLP's output projection reads, None for a block without an MLP.

    The gate is the MLP's hidden activation, the input of its output (down) projection: silu(gate) * up for
    SwiGLU, act(fc(x)) for GELU MLPs (after the inner norm in Sub-LN), where LLM.int8()'s outlier features
    live (Dettmers et al., 2022; Sun et al., 2024, Massive Activations). It is captured by a forward pre-hook
    on the projection and reduced at once, so no (B, T, 4C) tensor is kept. Entries are replaced on every
    forward, as :meth:`layerlab.adapters.LayerView.trace`'s are.
    """
    gates: list[torch.Tensor | None] = [None] * v.num_layers
    handles = []

    def hook(i: int):
        def fn(module, args):
            x = args[0].detach()  # max and min, without an |x| copy of (B, T, 4C) (aminmax over a dim is slower)
            gates[i] = torch.maximum(x.amax(dim=-1), -x.amin(dim=-1))  # (B, T)

        return fn

    for b in v.blocks:
        proj = mlp_out_proj(v, b.index)
        if proj is not None:
            handles.append(proj.register_forward_pre_hook(hook(b.index)))
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


def analyze(*models, data: str | Path | None = None, tokens: int = DEFAULT_TOKENS,
            spectra: bool = True, seq_len: int | None = None, batch_size: int = 8,
            removal_tokens: int = REMOVAL_TOKENS, progress: bool = True, dtype: str = "auto",
            offload: bool | None = None, max_memory: str | int | None = None,
            announce: Callable[[str], None] | None = None, sections: dict[str, dict] | None = None,
            seed: int = 0) -> Report:
    """Measure every layer of one or more models (paths or loaded (model, tokenizer) pairs).

    Several models are overlaid in one report. Writing it is the report layer's
    (:func:`layerlab.report.write_report`; :func:`layerlab.analyze` does both).

    A path loads in ``dtype`` (``"auto"``: the checkpoint's own). It is streamed block by block
    (:mod:`layerlab.offload`) with ``offload=True``, or with ``offload=None`` when its weights exceed
    ``max_memory`` (bytes, or a size such as ``"8GB"``; default half the available RAM, the GPU's memory on
    CUDA). ``announce`` receives one line per path saying which mode it used and why.

    ``sections`` (name -> options) adds those opt-in sections (:mod:`layerlab.analysis.sections`) to each
    model's entry; the tensors a section saves (fitted lenses) are the report's ``artifacts``, written beside
    report.json as ``<stem>.safetensors`` (``<stem>-<model>.safetensors`` for a second model on).
    """
    if not models:
        raise LayerlabError("give at least one model to analyze")
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    if sections:  # an unknown section, or one that cannot run offloaded, is one line before any model loads
        check_sections(sections, offloaded=bool(offload))
    entries = []
    files: dict[str, dict] = {}
    names: set[str] = set()
    for m in models:
        offloaded = None
        if isinstance(m, (str, Path)):
            model, tok, offloaded = open_model(Path(m), dtype, offload, max_memory, announce)
            name, path, model_dir = model_label(Path(m)), str(m), Path(m)
        else:
            model, tok = m
            name, path, model_dir = type(model).__name__, None, None
        while name in names:
            name += "'"
        names.add(name)
        entries.append(analyze_model(model, tok, name=name, path=path, data=data, tokens=tokens, seq_len=seq_len,
                                     batch_size=batch_size, removal_tokens=removal_tokens, spectra=spectra,
                                     progress=progress, model_dir=model_dir, offloaded=offloaded,
                                     sections=sections, seed=seed, announce=announce))
        made = entries[-1].pop("_artifacts", {})
        if made:
            entries[-1]["artifacts"] = {}
            for stem, tensors in made.items():
                file = f"{stem}.safetensors" if len(entries) == 1 else f"{stem}-{artifact_slug(name)}.safetensors"
                entries[-1]["artifacts"][stem] = file
                files[file] = tensors
        del model, offloaded
    report = Report({
        "format": "layerlab-report/1", "models": entries,
        "provenance": {"data": str(data) if data else "embedded (validation split)", "tokens": tokens,
                       "versions": versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    }, artifacts=files)
    return report


def artifact_slug(name: str) -> str:
    """A model's name as a file-name part: letters, digits, '.', '_' and '-' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def open_model(path: Path, dtype: str, offload: bool | None, max_memory, announce) -> tuple:
    """(model, tokenizer, Offloaded or None) of a model directory, in memory or streamed (see :func:`analyze`)."""
    from ..adapters import MODEL_TYPES, load_tokenizer
    from ..io import check_model_dir, check_weights
    from ..offload import choose_offload, open_offloaded, resolve_dtype

    # an unknown --dtype is one line, before anything loads
    load_dtype = dtype if dtype == "auto" else resolve_dtype(dtype, None, None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_model_dir(path)
    use, reason = choose_offload(path, offload, max_memory, dtype, device)
    if not use:
        model, tok, _ = load_model(path, dtype=load_dtype)
        if announce is not None:  # once the checks passed, so that a refusal stays one line
            announce(f"{path}: {reason}")
        return model, tok, None
    model_type = read_json(path / "config.json").get("model_type")
    if model_type not in MODEL_TYPES:  # discovery runs a probe forward, which needs the whole model
        raise LayerlabError(f"offload needs a family with an adapter entry ({', '.join(sorted(MODEL_TYPES))}); "
                            f"{model_type!r} has none (a discovered structure is measured in memory: --no-offload)")
    check_weights(path)
    tok = load_tokenizer(path, True)
    om = open_offloaded(path, dtype=dtype, device=device)
    if announce is not None:
        announce(f"{path}: {reason}")
    return om.model, tok, om


def offloaded_spectra(om, model_dir: Path | None, progress: bool = False) -> list:
    """The weight spectra of an offloaded model, one block materialised at a time
    (:func:`~layerlab.analysis.spectra.block_spectra` while :meth:`~layerlab.offload.Offloaded.block` holds it).
    Cached as :func:`~layerlab.analysis.spectra.spectra_cached` caches, under the same key (the safetensors
    files' hash), so an in-memory run and an offloaded one of the same checkpoint share the file."""
    from . import spectra as sp

    key = sp.spectra_key(om.view, model_dir)
    file = cache_dir() / f"spectra-{key[:16]}.json"
    cached = sp._read_cache(file, key)
    if cached is not None:
        return cached
    found = []
    with progress_bar(progress) as bar:
        task = bar.add_task("spectra", total=om.view.num_layers)
        for i in range(om.view.num_layers):
            with om.block(i):
                found += sp.block_spectra(om.view, i)
            bar.advance(task)
    atomic_write_json(file, {"format": "layerlab-spectra", "method": sp.METHOD_VERSION, "key": key,
                             "spectra": [sp._to_json(s) for s in found]})
    return found
