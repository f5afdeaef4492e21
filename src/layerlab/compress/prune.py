"""``prune``: remove whole blocks, or their attention or MLP sublayers, chosen by a layer measurement.

``--unit block`` (the default) removes whole blocks. Metrics (one registry, each
``(model, tokenizer, n, data, tokens, unit=...) -> (blocks, scores)``):
- ``angular``: the contiguous n blocks whose removal joins the closest residual states,
  argmin_l d(x_l, x_l+n), d = arccos(cos)/pi of the last token, mean over windows (Gromov et al.,
  2024, The Unreasonable Ineffectiveness of the Deeper Layers);
- ``bi``: the n blocks of lowest Block Influence 1 - E cos(x_l, x_l+1) over all tokens (Men et al.,
  2024, ShortGPT);
- ``loss``: greedily, n times, the block whose removal (with those already removed) raises the
  measured loss least (Fan et al., 2024 / Gromov et al.'s baseline).

Every metric chooses on the first ``tokens`` tokens of the training split of ``data`` (the token stream
that ``train`` sees, less its last 10%: :func:`.heal.train_ids`); the before/after perplexities are
measured on the validation split, the rest of the same stream, so the choice is never fitted to the
text it is judged on. Healing trains on the training split too. The record names each slice.

``--unit attn`` / ``--unit mlp`` removes only that sublayer of n blocks, as BlockPruner (Zhong et al.,
2024) prunes attention and MLP sublayers separately and He et al., 2024 (What Matters in
Transformers? Not All Attention is Needed) drop attention layers. x_in is the residual stream
entering the sublayer, x_out = x_in + F(...) the stream leaving it:
- ``angular``: the n sublayers of smallest d(x_in, x_out) = arccos(cos(x_in, x_out))/pi on the last
  token. Gromov et al.'s measure taken per sublayer; the n need not be contiguous, since removing
  sublayers anywhere leaves the blocks in place;
- ``bi``: the n sublayers of lowest 1 - E cos(x_in, x_out) over all tokens (ShortGPT's BI per sublayer,
  as He et al. rank attention and MLP layers);
- ``loss``: greedily, as for blocks, by the measured loss with the sublayers skipped.
Removing a sublayer means it adds nothing to the residual stream, which is a removal only where a
block is ``x + F(...)`` (pre, peri, sandwich, lns); Post-LN blocks (post, and mix's first blocks) are
refused. A sublayer already gone is not a candidate, and one of each kind always stays.

Block removal keeps the architecture with fewer blocks: the config's layer count (and, for
layerlab, the placement schedule; for Llama-style models, ``layer_types``) is cut to match, the
weights are renumbered, and the model is rebuilt, so a Hugging Face GPT-2 or Llama directory stays
loadable by plain transformers. Sublayer removal drops the sublayer's modules from a layerlab model
(config ``drop_attn`` / ``drop_mlp``), so it shrinks. A Hugging Face model gets transformers' heterogeneous
per-layer configuration, ``per_layer_config = {block: {"skip": ["attention" | "mlp"]}}``
(transformers' ``integrations/heterogeneity``), wherever the installed transformers builds that family
without the skipped modules and the result computes what zeroing computes (:func:`sublayer_removal`, checked
on the model itself, not on a list of versions): the modules' weights are then gone from the model and the
directory. Where it does not, the sublayer's output projection is zeroed (weight and bias), which removes it
exactly, keeps the directory loadable by plain transformers, and does not shrink it on disk. transformers
5.24 (the newest release) parses, validates and saves ``skip``, but no model class reads it: every family
still builds the skipped modules, so every Hugging Face family is zeroed there. The record's ``surgery``
says which was done (``"removed"`` / ``"zeroed"``) and ``note`` why.

An encoder (BERT) is pruned by blocks (streamed too, by ``angular`` or ``bi``): its angular distance is averaged
over every real token, its ``loss`` is the distance 1 - cos of its sentence embeddings to the whole model's, and
each stage's row holds that cosine to the input's (:class:`~.common.Quality`) instead of a loss it does not have.

How a removal is done to the model is :mod:`layerlab.compress.removal`'s; this module chooses what to remove,
writes the output and records it.

The model loads in the checkpoint's own dtype by default. A checkpoint larger than ``max_memory`` (or any, with
``offload=True``) is never built: it is streamed block by block (:mod:`layerlab.offload`), chosen on by the same
measurements, and written tensor by tensor (:func:`_prune_offloaded`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import SUBLAYERS, LayerView, view
from ..allocator import param_bytes
from ..analysis.analyze import certify, check_trace
from ..analysis.stats import RemovalSums, angular, last_token_index, output_loss_terms
from ..data import batches, window_length
from ..defaults import MEASURE_TOKENS
from ..errors import LayerlabError, choices_error
from ..evaluate import masked_loss_sum, mean_pooled
from ..probes import measure_spec, probe_spec, stage_lines
from ..registry import HEAL_MODES, PROBE_ITEMS
from ..registry import PRUNE_METRICS as METRICS
from ..registry import PRUNE_UNITS as UNITS
from .common import (
    Quality,
    copy_tokenizer,
    input_mode,
    open_input,
    open_offloaded_input,
    quality_columns,
    quality_heading,
    staged_output,
    table,
)
from .heal import HEAL_TOKENS, train_ids, train_slice
from .heal import heal as run_heal
from .removal import (
    _LAYERLAB_PARTS,
    SKIP_TYPES,
    UNIT_NAMES,
    _check_residual,
    _computes_as_skipped,
    _keeping_zeroed,
    blocks_config,
    present_sublayers,
    remove_sublayers,
    sublayer_removal,
    without_blocks,
)


def _held_batches(model, tok, data, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows holding the first ``tokens`` tokens of the training split of ``data``, on the model's
    device: every metric chooses on these, so no choice is fitted to the validation text that the
    before/after perplexities are measured on."""
    causal = view(model).causal  # an encoder's windows are [CLS] ... [SEP], as analyze reads them
    seq_len = window_length(model.config, causal)
    device = next(model.parameters()).device
    ids = train_ids(tok, data, limit=2 * tokens).tolist()
    return [(i.to(device), m.to(device)) for i, m in batches(tok, ids, tokens, seq_len, 8, causal=causal)]


def choosing_slice(model, tok, data, tokens: int) -> str:
    """The name of the text the metrics choose on (:func:`_held_batches`), e.g. ``embedded train split,
    first 8,192 of 419,577 tokens``."""
    return train_slice(tok, data, sum(int(m.sum()) for _, m in _held_batches(model, tok, data, tokens)))


def _lowest(scores: list[float | None], n: int) -> list[int]:
    """Indices of the n smallest scores, ignoring None (sublayers already gone), in block order."""
    order = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    return sorted(i for _, i in order[:n])


@torch.no_grad()
def stream_measures(model, tok, data, tokens: int, unit: str = "block", present: list[bool] | None = None) -> dict:
    """How far each block (``unit`` ``block``) or each block's ``unit`` sublayer turns the residual stream,
    on the first ``tokens`` tokens of the training split (:func:`_held_batches`).

    For blocks, with x_0..x_L the streams between blocks:
    - ``angular_distance``: the (L+1) x (L+1) matrix d(x_i, x_j) = arccos(cos(x_i, x_j))/pi of the last
      token, mean over windows (Gromov et al., 2024); for an encoder, where no token is the one that predicts,
      the mean over all real tokens (what ``analyze``'s ``best_block_to_prune`` reads for an encoder);
    - ``influence``: per block, 1 - cos(x_l, x_l+1), mean over all real tokens (ShortGPT's BI).
    For a sublayer, from x_in (entering it) to x_out = x_in + F (leaving it), per block, None where the
    sublayer is gone: ``angular_distance`` d(x_in, x_out) of the last token, mean over windows, and
    ``influence`` 1 - cos(x_in, x_out), mean over all real tokens. The trace's ``mid`` (the stream between
    attention and MLP) is x_out of attention and x_in of the MLP. ``present`` (per block) overrides
    :func:`present_sublayers`, for an offloaded model whose weights are not in memory: the traced forwards
    then stream its blocks, one pass per batch.

    ``fidelity``: analyze's certificate (:func:`~layerlab.analysis.analyze.check_fidelity`) on the first batch,
    before anything is kept: the traced stream against the model's plain forward of one or two of its rows. A
    mismatch is an error naming the first block that diverged, never a choice made on a wrong stream.
    """
    v = view(model)
    L = v.num_layers
    if present is None:
        present = [True] * L if unit == "block" else present_sublayers(model, unit)
    S = L + 1 if unit == "block" else L
    ang = torch.zeros((S, S) if unit == "block" else S, dtype=torch.float64)
    cos = torch.zeros(L, dtype=torch.float64)
    seqs, toks, fidelity = 0, 0, None
    for ids, mask in _held_batches(model, tok, data, tokens):
        with v.trace(sublayers=unit != "block") as t:
            out = v.forward(ids, mask)
        if fidelity is None:
            fidelity = check_trace(v, ids, mask, t, out)
        del out  # a batch's logits are not kept past the check
        if unit == "block":
            x_in, x_out = t.resid_in, t.resid_out
        else:
            x_in, x_out = (t.resid_in, t.mid) if unit == "attn" else (t.mid, t.resid_out)
        m, last, rows = mask.bool(), last_token_index(mask), torch.arange(ids.shape[0], device=ids.device)
        for i in range(L):
            if present[i]:
                c = F.cosine_similarity(x_in[i].float(), x_out[i].float(), dim=-1)  # (B, T)
                cos[i] += float(c[m].sum())
                if unit != "block":
                    ang[i] += float(angular(c[rows, last]).sum())
        if unit == "block":
            # (S, B, C): the last tokens; an encoder's (S, n, C): every real token
            states = torch.stack([t.resid_in[0], *t.resid_out])[:, rows, last] if v.causal else \
                torch.stack([t.resid_in[0], *t.resid_out])[:, m]
            u = F.normalize(states.float(), dim=-1)
            ang += angular(torch.einsum("sbc,tbc->stb", u, u)).sum(-1).double().cpu()
        seqs, toks = seqs + ids.shape[0], toks + int(m.sum())
    influence = [1 - float(c) / max(toks, 1) if p else None for c, p in zip(cos, present, strict=True)]
    if unit == "block":
        return {"angular_distance": (ang / max(seqs if v.causal else toks, 1)).tolist(), "influence": influence,
                "fidelity": fidelity}
    return {"angular_distance": [float(a) / max(seqs, 1) if p else None for a, p in zip(ang, present, strict=True)],
            "influence": influence, "fidelity": fidelity}


def by_angular(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    return angular_choice(stream_measures(model, tok, data, tokens, unit), n, unit)


def angular_choice(measures: dict, n: int, unit: str) -> tuple[list[int], dict]:
    """``angular``'s choice from :func:`stream_measures`."""
    d, fidelity = measures["angular_distance"], measures["fidelity"]
    if unit != "block":
        return _lowest(d, n), {"angular_distance": d, "fidelity": fidelity}
    ends = [d[s][s + n] for s in range(len(d) - n)]  # d(x_l, x_l+n) for every start l
    start = min(range(len(ends)), key=ends.__getitem__)
    return list(range(start, start + n)), {"distance": ends[start], "distances": ends, "fidelity": fidelity}


def by_bi(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    return bi_choice(stream_measures(model, tok, data, tokens, unit), n, unit)


def bi_choice(measures: dict, n: int, unit: str) -> tuple[list[int], dict]:
    """``bi``'s choice from :func:`stream_measures`."""
    bi = measures["influence"]
    return _lowest(bi, n), {"block_influence" if unit == "block" else "influence": bi,
                            "fidelity": measures["fidelity"]}


@torch.no_grad()
def _skipped_loss(v: LayerView, batches_: list, skip: list[int], unit: str = "block",
                  reference: list[torch.Tensor] | None = None) -> float:
    """The loss with ``skip`` removed; an encoder's (``reference``: the whole model's sentence embeddings, per
    batch) the mean of 1 - cos(embedding, the whole model's) over windows, as analyze's removal delta reads it
    (:func:`~layerlab.analysis.stats.output_loss_terms`)."""
    total, count = 0.0, 0
    with v.skip(*skip) if unit == "block" else v.skip_sublayers(unit, *skip):
        for k, (ids, mask) in enumerate(batches_):
            out = v.forward(ids, mask)
            if reference is None:
                part, n = masked_loss_sum(out.logits, ids, mask)
            else:
                part, n = output_loss_terms(False, out, ids, mask, reference[k])
            total, count = total + part, count + n
    return total / max(count, 1)


@torch.no_grad()
def by_loss(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    v = view(model)
    held = _held_batches(model, tok, data, tokens)
    fidelity = certify(v, *held[0])  # the view's blocks are what the model runs, before any is skipped
    present = [True] * v.num_layers if unit == "block" else present_sublayers(model, unit)
    # an encoder has no language-model loss: the distance of its sentence embeddings to the whole model's
    reference = None if v.causal else [mean_pooled(v.forward(i, m).last_hidden_state, m) for i, m in held]
    key = "loss" if v.causal else "embedding_distance"
    removed: list[int] = []
    steps = []
    for _ in range(n):
        trials = {c: _skipped_loss(v, held, removed + [c], unit, reference) for c in range(v.num_layers)
                  if present[c] and c not in removed}
        best = min(trials, key=trials.get)
        removed.append(best)
        steps.append({"removed": best, key: trials[best]})
    return sorted(removed), {"greedy": steps, "fidelity": fidelity}


for _name, _fn in {"angular": by_angular, "bi": by_bi, "loss": by_loss}.items():
    METRICS.register(_name, _fn)  # declared in layerlab.registry, so that the CLI knows the names before torch


def _record(model, v, tok, data, measure_tokens: int, unit: str, chosen: list[int], zeroed: list[str],
            why: str = "", gone: list[str] | None = None) -> dict:
    """The part of prune's record that says what was removed and how (both modes). ``why``: why a Hugging Face
    sublayer was zeroed (:func:`sublayer_removal`); ``gone``: the weights left out through transformers' per-layer
    ``skip``."""
    record = {"unit": unit, "removed": [{"block": i, "unit": unit} for i in chosen],
              "chosen_on": choosing_slice(model, tok, data, measure_tokens)}
    if unit == "block":
        record["removed_blocks"] = chosen
    else:
        record["surgery"] = "zeroed" if zeroed else "removed"
    if zeroed:
        record["zeroed"] = zeroed
        paths = sorted({v.out_proj_path(i, unit) for i in chosen})
        record["note"] = (f"{why or 'transformers cannot leave out a ' + model.config.model_type + ' sublayer'}; "
                          f"so its output projection ({', '.join(paths)}, all its weights) is zeroed: plain "
                          "transformers loads the model, and its size on disk does not shrink")
    elif gone:
        import transformers

        record["removed_weights"] = gone
        record["note"] = (f"the {UNIT_NAMES[unit]} modules of blocks {chosen} are left out through transformers' "
                          f"per_layer_config (skip {SKIP_TYPES[unit]!r}): transformers {transformers.__version__} "
                          "builds the model without them; a release that does not read skip would build them "
                          "with random weights")
    return record


def _stage(model, tok, data, tokens: int | None, quality: Quality, om=None, probes: dict | None = None) -> dict:
    """One stage's row: size, sublayer counts, ``quality`` (validation loss; an encoder's embedding cosine to the
    input), and with ``probes`` ({tasks, n, seed}) the capability probes (:func:`layerlab.probes.measure`)."""
    v = view(model)
    known = v.sublayers_known  # a discovered structure: how many sublayers is not known
    counts = {f"{u}_sublayers": sum(present_sublayers(model, u, om)) if known else None for u in SUBLAYERS}
    row = {"layers": v.num_layers, **counts, "bytes": param_bytes(model), **quality(model, tok, data, tokens)}
    if probes:
        row["probes"] = measure_spec(model, tok, probes, data)
    return row


def prune(model_dir: str | Path, *, remove: int, metric: str = "angular", unit: str = "block", out: str | Path,
          data: str | Path | None = None, tokens: int | None = None, measure_tokens: int = MEASURE_TOKENS,
          heal_steps: int = 0, heal: str = "lora", progress: bool = False, dtype: str = "auto",
          offload: bool | None = None, max_memory: str | int | None = None,
          announce: Callable[[str], None] | None = None, tasks: str | list[str] | None = None,
          probe_items: int = PROBE_ITEMS, probe_seed: int = 0) -> dict:
    """Remove ``remove`` blocks (or, with ``unit`` ``attn``/``mlp``, sublayers) chosen by ``metric``,
    optionally heal, and write the model to ``out``; :func:`prune_lines` lays out the result.

    Returns the record also written to ``out/layerlab.json``: ``unit``, ``removed`` (a list of ``{"block",
    "unit"}``; for whole blocks also ``removed_blocks``), the metric's scores, and size, sublayer counts and
    validation loss/perplexity (an encoder: ``embedding_cosine`` to the input model's, :class:`~.common.Quality`; on
    the first ``tokens`` of the validation split; default all of it) before pruning, after pruning and (with
    ``heal_steps``) after healing on the training split of ``data``. ``metric`` reads the first ``measure_tokens``
    tokens of the training split. ``chosen_on`` (and with healing ``healed_on``) names the text read, as each
    stage's ``slice`` names the text it is scored on. For sublayers, ``surgery`` says how they went: ``"removed"``
    (a layerlab model's ``drop_attn``/``drop_mlp``; a Hugging Face model's per-layer ``skip``,
    :func:`remove_sublayers`, with ``removed_weights`` naming the weights left out) or ``"zeroed"`` (a Hugging Face
    family that the installed transformers cannot build without them: ``zeroed`` names the weights, ``note`` says
    why; healing keeps them zero).

    The model loads in ``dtype`` (``"auto"``: the checkpoint's own; float32 when healing) and the output is
    written in it. With
    ``offload=True``, or ``None`` and weights larger than ``max_memory`` (as ``analyze`` decides; ``announce``
    gets the line saying which), the model is never built: see :func:`_prune_offloaded`. ``offload`` in the
    record says which mode ran. With ``tasks`` (probe names, or ``"all"``), every stage also holds the offline
    capability probes (:mod:`layerlab.probes`: ``probe_items`` items each from ``probe_seed``).
    """
    _check_choices(unit, metric, heal, heal_steps)
    probes = probe_spec(tasks, probe_items, probe_seed)
    streamed, reason = input_mode(model_dir, dtype=dtype, offload=offload, max_memory=max_memory)
    args = {"model": str(model_dir), "remove": remove, "metric": metric, "unit": unit, "heal_steps": heal_steps,
            "heal": heal, "data": str(data) if data else "embedded", "tokens": tokens, "measure_tokens": measure_tokens,
            "dtype": dtype, "offload": streamed, **({"probes": probes} if probes else {})}
    if streamed:
        _check_offload(metric, unit, heal_steps)
        (_, tok, _), om = open_offloaded_input(model_dir, "prune", dtype=dtype)
        _check_encoder(om.view, metric, heal_steps, probes, streamed=True)
        if announce is not None:
            announce(f"{model_dir}: {reason}")
        return _prune_offloaded(om, tok, model_dir=model_dir, remove=remove, metric=metric, unit=unit, out=out,
                                data=data, tokens=tokens, measure_tokens=measure_tokens, args=args, probes=probes)
    # healing trains: with dtype auto it loads in float32, as before dtypes were kept (a bf16 optimizer step is lossy)
    model, tok, v = open_input(model_dir, "prune", dtype="float32" if heal_steps and dtype == "auto" else dtype)
    _check_encoder(v, metric, heal_steps, probes, streamed=False)
    if announce is not None:
        announce(f"{model_dir}: {reason}")
    _check_remove(model, v, unit, remove)
    quality = Quality(v.causal)
    with staged_output(model_dir, out, "prune", args) as stage:  # --out checked before the slow work starts
        before = _stage(model, tok, data, tokens, quality, probes=probes)
        chosen, scores = METRICS[metric](model, tok, remove, data, measure_tokens, unit=unit)
        if unit == "block":
            smaller, zeroed, why = without_blocks(model, chosen), [], ""
        else:
            smaller, zeroed, why = remove_sublayers(model, unit, chosen)
        stages = {"before": before, "pruned": _stage(smaller, tok, data, tokens, quality, probes=probes)}
        if heal_steps:
            with _keeping_zeroed(smaller):
                smaller = run_heal(smaller, tok, steps=heal_steps, mode=heal, data=data, progress=progress,
                                   frozen=tuple(sorted({name.rpartition(".")[0] for name in zeroed})))
            if any(bool(smaller.get_parameter(name).any()) for name in zeroed):  # _keeping_zeroed failed
                raise LayerlabError("healing changed a zeroed sublayer; nothing was written")
            stages["healed"] = _stage(smaller, tok, data, tokens, quality, probes=probes)
        stage.save_model(smaller)
        kept = set(smaller.state_dict())
        sublayers_left_out = unit != "block" and not zeroed and v.arch_name != "layerlab"
        gone = [k for k in model.state_dict() if k not in kept] if sublayers_left_out else None
        record = _record(model, v, tok, data, measure_tokens, unit, chosen, zeroed, why, gone)
        if heal_steps:
            record["healed_on"] = train_slice(tok, data, HEAL_TOKENS)
        record.update(metric=metric, fidelity=scores.pop("fidelity", None), scores=scores, stages=list(stages),
                      **stages, after=stages["healed" if heal_steps else "pruned"], offload=False)
        stage.record = record
    return record


OFFLOAD_METRICS = ("angular", "bi", "loss")  # angular, bi: one streamed pass; loss: one per removed block


class _SkipStreams(RemovalSums):
    """:class:`~layerlab.analysis.stats.RemovalSums` of a model whose blocks ``gone`` are already removed: the
    main forward runs with them skipped (``LayerView.skip``), and every other block c starts a skip-stream (the
    model with ``gone`` and c removed) that advances through the later blocks that remain and passes the
    removed ones unchanged. ``candidates`` lists c in order; ``sums[k] / norm`` is the mean loss with
    ``gone`` and ``candidates[k]`` removed. Every block is used while it is loaded, so an offloaded model reads
    each block once per batch."""

    def __init__(self, view, gone: list[int]):
        super().__init__(view.num_layers, limit=1 << 62, causal=True)
        self.gone = set(gone)
        self.candidates = [i for i in range(view.num_layers) if i not in self.gone]
        self.sums = torch.zeros(len(self.candidates), dtype=torch.float64)
        self._index = {id(b.module): b.index for b in view.blocks}

    def _advance(self, module, args, kwargs, output) -> None:
        if self._index[id(module)] not in self.gone:
            super()._advance(module, args, kwargs, output)


@torch.no_grad()
def _greedy_loss_streamed(model, tok, n: int, data, tokens: int, v: LayerView) -> tuple[list[int], dict]:
    """``loss`` (:func:`by_loss`, block unit) by skip-streams: greedy step k is one pass over the held batches
    with the blocks chosen so far skipped, every remaining block's removal measured on a skip-stream in the
    same pass (n passes in all, where :func:`by_loss` runs one forward per candidate and step). Extra memory:
    one (B, T, C) stream per remaining block, of one batch."""
    held = _held_batches(model, tok, data, tokens)
    fidelity = certify(v, *held[0])
    removed: list[int] = []
    steps = []
    for _ in range(n):
        sums = _SkipStreams(v, removed)
        with v.skip(*removed):
            for ids, mask in held:
                with sums.streams(v):
                    out = v.forward(ids, mask)
                sums.update(v, out, ids, mask)
        trials = {c: float(total) / max(sums.norm, 1) for c, total in zip(sums.candidates, sums.sums, strict=True)}
        best = min(trials, key=trials.get)
        removed.append(best)
        steps.append({"removed": best, "loss": trials[best]})
    return sorted(removed), {"greedy": steps, "fidelity": fidelity}


def _check_encoder(v: LayerView, metric: str, heal_steps: int, probes: dict | None, streamed: bool) -> None:
    """What an encoder cannot take, in one line: healing and ``--tasks`` (they train and probe a causal LM), and
    streamed, the ``loss`` metric (its skip-streams compare with the model that has the chosen blocks removed,
    where an encoder's distance is to the whole model's embeddings, as :func:`by_loss` measures it)."""
    if v.causal:
        return
    if heal_steps or probes:
        raise LayerlabError(f"{'healing trains' if heal_steps else '--tasks probe'} a causal LM; this model is an "
                            "encoder (prune it without them)")
    if streamed and metric == "loss":
        raise LayerlabError("prune --offload --metric loss measures a causal LM's loss; stream an encoder with "
                            "--metric angular or bi, or choose by loss in memory (--no-offload)")


def _check_offload(metric: str, unit: str, heal_steps: int) -> None:
    if metric not in OFFLOAD_METRICS:
        raise LayerlabError(f"prune in offload mode chooses by {', '.join(OFFLOAD_METRICS)}; --metric {metric} "
                            "needs the model in memory: use --no-offload")
    if metric == "loss" and unit != "block":
        raise LayerlabError(f"prune in offload mode measures loss for whole blocks only (skip-streams); --unit {unit} "
                            "chooses by angular or bi there, or use --no-offload")
    if heal_steps:
        raise LayerlabError("prune in offload mode cannot heal (training needs the whole model in memory); "
                            "use --no-offload, or prune with --heal-steps 0 and heal the output")


def _prune_offloaded(om, tok, *, model_dir, remove: int, metric: str, unit: str, out, data, tokens: int | None,
                     measure_tokens: int, args: dict, probes: dict | None = None) -> dict:
    """:func:`prune` of a checkpoint streamed block by block (:class:`~layerlab.offload.Offloaded`): the model
    is never built, and at most one block is in memory.

    The choice reads the same first ``measure_tokens`` training tokens as in memory, through
    :func:`stream_measures` on the offloaded model (each traced forward streams the blocks), so ``angular``
    and ``bi`` choose exactly as in memory in one pass; ``loss`` (whole blocks) takes one pass per removed
    block with skip-streams (:func:`_greedy_loss_streamed`); ``loss`` for sublayers and healing (training
    needs the whole model) are refused in one line. The output is
    written by :func:`layerlab.offload.write_pruned`: tensors copied shard by shard, one at a time, renamed
    for the renumbered blocks (config from :func:`blocks_config`), or with the removed sublayers' modules left
    out (a layerlab model's as ``drop_attn`` / ``drop_mlp`` say; a Hugging Face model's as transformers' per-layer
    ``skip`` says, where :func:`sublayer_removal` finds the installed transformers builds it so, and the output,
    read back offloaded, computes what skipping computes: :func:`_computes_as_skipped`), or else with their output
    projections written as zeros. The before and after losses are measured on offloaded models of the input and
    of the output."""
    from ..offload import Offloaded, _parameters_on_meta, write_pruned

    model, v = om.model, om.view
    _check_remove(model, v, unit, remove, om)
    with staged_output(model_dir, out, "prune", args) as stage:
        quality = Quality(v.causal)
        before = _stage(model, tok, data, tokens, quality, om, probes=probes)
        present = [True] * v.num_layers if unit == "block" else present_sublayers(model, unit, om)
        if metric == "loss":
            chosen, scores = _greedy_loss_streamed(model, tok, remove, data, measure_tokens, v)
        else:
            measures = stream_measures(model, tok, data, measure_tokens, unit, present=present)
            chosen, scores = (angular_choice if metric == "angular" else bi_choice)(measures, remove, unit)
        zeroed, dropped, why, gone = [], [], "", None
        if unit == "block":
            keep = [i for i in range(v.num_layers) if i not in set(chosen)]
            config = blocks_config(model, keep, v)
            try:
                with _parameters_on_meta():  # the in-memory path builds this config; check it builds
                    type(model)(config)
            except Exception as e:  # noqa: BLE001
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise LayerlabError(f"cannot remove blocks from this {config.model_type!r} config: {first}") from None
        else:
            _check_residual(v, unit)
            keep, config = list(range(v.num_layers)), None
            if v.arch_name == "layerlab":
                dropped = [f"{om.blocks_prefix}.{i}.{part}." for i in chosen for part in _LAYERLAB_PARTS[unit]]
                config = copy.deepcopy(model.config)
                key = f"drop_{unit}"
                setattr(config, key, sorted(set(getattr(model.cfg, key)) | set(chosen)))
            else:
                config, gone, why = sublayer_removal(model, unit, chosen, v)
                dropped = list(gone)
                if config is None:
                    zeroed = _zeroed_names(v, unit, chosen)
        write_pruned(om, stage.dir, keep=keep, zeroed=zeroed, dropped=dropped, config=config)
        copy_tokenizer(model_dir, stage.dir)
        pruned = Offloaded(stage.dir, dtype=om.dtype, device=om.device)
        if gone and not _computes_as_skipped(model, pruned.model, unit, chosen, v):  # as in memory: zero instead
            del pruned
            why = (f"transformers builds the {model.config.model_type} model without the skipped modules, but it "
                   "does not compute what zeroing them computes")
            zeroed, gone = _zeroed_names(v, unit, chosen), None
            for f in [*stage.dir.glob("*.safetensors"), *stage.dir.glob("*.safetensors.index.json")]:
                f.unlink()
            write_pruned(om, stage.dir, keep=keep, zeroed=zeroed)
            pruned = Offloaded(stage.dir, dtype=om.dtype, device=om.device)
        stages = {"before": before, "pruned": _stage(pruned.model, tok, data, tokens, quality, pruned, probes=probes)}
        del pruned
        record = _record(model, v, tok, data, measure_tokens, unit, chosen, zeroed, why, gone)
        record.update(metric=metric, fidelity=scores.pop("fidelity", None), scores=scores, stages=list(stages),
                      **stages, after=stages["pruned"], offload=True)
        stage.record = record
    return record


def _zeroed_names(v: LayerView, unit: str, chosen: list[int]) -> list[str]:
    """The parameter names of the output projections that zeroing the ``unit`` sublayer of blocks ``chosen``
    writes as zeros."""
    names = []
    for i in chosen:
        path = v.out_proj_path(i, unit)
        proj = v.blocks[i].module.get_submodule(path)
        names += [f"{v.arch.blocks}.{i}.{path}.{n}" for n, _ in proj.named_parameters(recurse=False)]
    return names


def _check_choices(unit: str, metric: str, heal: str, heal_steps: int) -> None:
    if unit not in UNITS:
        raise choices_error("unit", unit, UNITS)
    if metric not in METRICS:
        raise choices_error("metric", metric, list(METRICS))
    if heal not in HEAL_MODES:
        raise choices_error("heal mode", heal, HEAL_MODES)
    if heal_steps < 0:
        raise LayerlabError(f"--heal-steps must be >= 0, got {heal_steps}")


def _check_remove(model, v: LayerView, unit: str, remove: int, om=None) -> None:
    if unit == "block" and not 1 <= remove < v.num_layers:
        raise LayerlabError(f"--remove must be between 1 and {v.num_layers - 1} for a {v.num_layers}-layer model, "
                            f"got {remove}")
    if unit != "block":
        v.require_sublayers(f"prune --unit {unit}")
        _check_residual(v, unit)
        have = sum(present_sublayers(model, unit, om))
        if not 1 <= remove < have:
            raise LayerlabError(f"--remove must be between 1 and {have - 1} for a model with {have} "
                                f"{UNIT_NAMES[unit]} sublayers (one must stay), got {remove}")


def prune_lines(record: dict) -> list[str]:
    """What ``layerlab prune`` prints: the choice, the before/after table on its named slice, any note."""
    unit, chosen, metric = record["unit"], [r["block"] for r in record["removed"]], record["metric"]
    what = f"blocks {chosen}" if unit == "block" else f"the {UNIT_NAMES[unit]} sublayer of blocks {chosen}"
    columns = [("layers", 8, lambda r: f"{r['layers']:d}")]
    if unit != "block":
        columns.append((unit, 8, lambda r: f"{r[unit + '_sublayers']:d}"))
    stages = {name: record[name] for name in record["stages"]}
    columns += [("MB", 10, lambda r: f"{r['bytes'] / 1e6:.2f}"), *quality_columns(list(stages.values()))]
    lines = [f"removed {what} by {metric}", f"chosen on the {record['chosen_on']}",
             *([f"healed on windows drawn from the {record['healed_on']}"] if "healed_on" in record else []),
             quality_heading(record["before"]), *table(stages, columns)]
    return lines + stage_lines(stages) + ([f"note: {record['note']}"] if "note" in record else [])
