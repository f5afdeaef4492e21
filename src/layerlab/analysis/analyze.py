"""``analyze``: every per-layer measurement in one streaming pass (the papers behind each are cited in
docs/report-format.md and beside each measure in ``stats.py`` and ``spectra.py``).

Fixed sample sizes (documented in docs/report-format.md):
- ``SAMPLE_TOKENS`` tokens feed effective rank, intrinsic dimension and anisotropy;
- ``SAMPLE_SEQUENCES`` whole sequences feed prompt entropy and curvature;
- layer removal runs on the first ``removal_tokens`` tokens (one extra forward per block).
"""

from __future__ import annotations

import math
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import load_model, view
from ..data import batches, default_split, describe_slice, split_ids, window_length
from ..errors import LayerlabError
from ..evaluate import masked_loss_sum
from ..io import cache_dir, versions
from .report import Report
from .stats import StreamStats, TokenSample, sample_measures

DEFAULT_TOKENS = 8192
SAMPLE_TOKENS = 1024
SAMPLE_SEQUENCES = 8
REMOVAL_TOKENS = 2048


def model_label(path: Path) -> str:
    """A short name for plots: the directory's name, or its parent's when the directory is generically named."""
    p = path.resolve()
    return p.parent.name if p.name.lower() in {"model", "models", "checkpoint", "final"} else p.name


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def analyze_model(model, tokenizer, *, name: str, path: str | None, data=None, tokens: int = DEFAULT_TOKENS,
                  seq_len: int | None = None, batch_size: int = 8, removal_tokens: int = REMOVAL_TOKENS,
                  spectra: bool = True, intrinsic: bool = True, progress: bool = True,
                  model_dir: Path | None = None) -> dict:
    """All measurements of one loaded model; returns its entry of the report (see docs/report-format.md)."""
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    v = view(model)
    device = next(model.parameters()).device
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
    L = v.num_layers
    stream, sample = StreamStats(L), TokenSample(L + 1, SAMPLE_TOKENS, SAMPLE_SEQUENCES)
    removal_sum = torch.zeros(L, dtype=torch.float64)
    removal_seen, removal_norm, full_removal_loss = 0, 0, 0.0  # norm: predicted tokens, or sequences
    max_final = 0.0
    n_batches = math.ceil(min(tokens, available) / (seq_len * batch_size)) + 1
    with _progress(progress) as bar:
        task = bar.add_task(f"analyze {name}", total=n_batches)
        for input_ids, mask in batches(tokenizer, ids, tokens, seq_len, batch_size, causal=v.causal):
            input_ids, mask = input_ids.to(device), mask.to(device)
            with v.trace() as t:
                out = v.forward(input_ids, mask)
            states = [t.resid_in[0], *t.resid_out]
            stream.update(states, t.attn, t.mlp, t.mid, mask)
            sample.update(states, mask)
            if t.final is not None:
                max_final = max(max_final, float(t.final.abs().max()))
            if v.has_lm_head:
                stream.update_lens(states, v.logits_from_hidden, out.logits, input_ids, mask)
            if removal_seen < removal_tokens:  # layer removal on the first removal_tokens tokens
                if v.causal:
                    full, n = masked_loss_sum(out.logits, input_ids, mask)
                    full_removal_loss += full
                else:
                    base, n = _pooled(out.last_hidden_state, mask), int(mask.shape[0])
                for i in range(L):
                    with v.skip(i, replay=t):
                        o = v.forward(input_ids, mask)
                    if v.causal:
                        removal_sum[i] += masked_loss_sum(o.logits, input_ids, mask)[0]
                    else:
                        pooled = _pooled(o.last_hidden_state, mask)
                        removal_sum[i] += float((1 - F.cosine_similarity(pooled, base)).sum())
                removal_seen += int(mask.sum())
                removal_norm += n
            bar.advance(task)
        bar.update(task, completed=n_batches)
    res = stream.results()
    measures = sample_measures(sample, intrinsic=intrinsic)
    shift = full_removal_loss if v.causal else 0.0
    removal = ((removal_sum - shift) / max(removal_norm, 1)).tolist()

    spectra_rows, spectra_blocks = [], [{"esd_alpha": None, "stable_rank": None}] * L
    if spectra:
        from .spectra import block_summary, spectra_cached

        found = spectra_cached(v, model_dir, cache_dir(), progress=progress)
        spectra_rows = [dict(block=s.block, name=s.name, shape=list(s.shape), esd_alpha=s.esd_alpha,
                             stable_rank=s.stable_rank) for s in found]
        spectra_blocks = block_summary(found, L)

    placements = v.placements()
    var = res["var"]
    layers = []
    for i in range(L):
        maxes = {"resid": res["max_resid"][i + 1], "attn": res["max_attn"][i], "mlp": res["max_mlp"][i]}
        layers.append({
            "index": i, "placement": placements[i],
            "angular_distance": res["ang"][i][i + 1], "angular_distance_last_token": res["ang_last"][i][i + 1],
            "block_influence": res["block_influence"][i], "relative_contribution": res["relative_contribution"][i],
            "attn_relative_contribution": res["attn_relative_contribution"][i], "attn_cosine": res["attn_cosine"][i],
            "mlp_relative_contribution": res["mlp_relative_contribution"][i], "mlp_cosine": res["mlp_cosine"][i],
            "hidden_rms": res["rms"][i + 1], "variance_growth": var[i + 1] / var[i] if var[i] > 0 else None,
            "max_abs_activation": max(maxes.values()), "max_abs": maxes,
            **{k: measures[k][i + 1] for k in measures},
            "logit_lens_loss": res["lens_ce"][i] if res["lens_ce"] else None,
            "logit_lens_kl": res["lens_kl"][i] if res["lens_kl"] else None,
            "removal_loss_delta": removal[i] if v.causal else None,
            "removal_effect": None if v.causal else removal[i],
            "esd_alpha": spectra_blocks[i]["esd_alpha"], "stable_rank": spectra_blocks[i]["stable_rank"],
        })
    matrix = res["ang_last"] if v.causal else res["ang"]
    best = {}
    for n in range(1, L):
        d, start = min((matrix[s][s + n], s) for s in range(L - n + 1))
        best[str(n)] = {"start": start, "distance": d}
    points = [(res["max_resid"][0], -1, "embedding")] + [(lay["max_abs"][p], lay["index"], p) for lay in layers
                                                          for p in ("resid", "attn", "mlp")]
    if max_final:
        points.append((max_final, L - 1, "final_norm"))
    top = max(points)
    return {
        "name": name, "path": path, "arch": v.arch_name, "causal": v.causal, "num_layers": L,
        "hidden_size": int(states[0].shape[-1]), "placements": placements, "loss": res["loss"],
        "data_slice": describe_slice(data, split, min(tokens, len(split_tokens)), len(split_tokens)), "layers": layers,
        "embedding": {"hidden_rms": res["rms"][0], "max_abs_activation": res["max_resid"][0]},
        "final_norm_max_abs": max_final or None,
        "angular_distance_matrix": res["ang"], "angular_distance_matrix_last_token": res["ang_last"],
        "best_block_to_prune": best,
        "max_activation": {"value": top[0], "layer": top[1], "point": top[2]},
        "weights": spectra_rows,
        "samples": {"tokens": res["tokens"], "token_sample": sample.count, "sequences": res["sequences"],
                    "removal_tokens": removal_seen, "seq_len": seq_len},
    }


def analyze(*models, data: str | Path | None = None, tokens: int = DEFAULT_TOKENS,
            spectra: bool = True, seq_len: int | None = None, batch_size: int = 8,
            removal_tokens: int = REMOVAL_TOKENS, progress: bool = True) -> Report:
    """Measure every layer of one or more models (paths or loaded (model, tokenizer) pairs).

    Several models are overlaid in one report. Writing it is the report layer's
    (:func:`layerlab.report.write_report`; :func:`layerlab.analyze` does both).
    """
    if not models:
        raise LayerlabError("give at least one model to analyze")
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    entries = []
    names: set[str] = set()
    for m in models:
        if isinstance(m, (str, Path)):
            model, tok, _ = load_model(m)
            name, path, model_dir = model_label(Path(m)), str(m), Path(m)
        else:
            model, tok = m
            name, path, model_dir = type(model).__name__, None, None
        while name in names:
            name += "'"
        names.add(name)
        entries.append(analyze_model(model, tok, name=name, path=path, data=data, tokens=tokens, seq_len=seq_len,
                                     batch_size=batch_size, removal_tokens=removal_tokens, spectra=spectra,
                                     progress=progress, model_dir=model_dir))
    report = Report({
        "format": "layerlab-report/1", "models": entries,
        "provenance": {"data": str(data) if data else "embedded (validation split)", "tokens": tokens,
                       "versions": versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    })
    return report
