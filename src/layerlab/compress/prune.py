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
(config ``drop_attn`` / ``drop_mlp``), so it shrinks; Hugging Face configs cannot express a missing
sublayer, so there the sublayer's output projection is zeroed (weight and bias), which removes it
exactly, keeps the directory loadable by plain transformers, and does not shrink it on disk.

The model loads in the checkpoint's own dtype by default. A checkpoint larger than ``max_memory`` (or any, with
``offload=True``) is never built: it is streamed block by block (:mod:`layerlab.offload`), chosen on by the same
measurements, and written tensor by tensor (:func:`_prune_offloaded`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import SUBLAYERS, LayerView, view
from ..analysis.stats import RemovalSums, angular, last_token_index
from ..data import batches, window_length
from ..defaults import MEASURE_TOKENS
from ..errors import LayerlabError, choices_error
from ..evaluate import lm_loss, masked_loss_sum
from ..registry import HEAL_MODES, PLACEMENTS, residual_placement_names
from ..registry import PRUNE_METRICS as METRICS
from ..registry import PRUNE_UNITS as UNITS
from .common import (
    copy_tokenizer,
    input_mode,
    loss_columns,
    open_input,
    open_offloaded_input,
    param_bytes,
    staged_output,
    table,
)
from .heal import HEAL_TOKENS, train_ids, train_slice
from .heal import heal as run_heal

UNIT_NAMES = {"block": "block", "attn": "attention", "mlp": "MLP"}
# the sublayer's modules in a layerlab block; what drop_attn / drop_mlp leaves out
_LAYERLAB_PARTS = {"attn": ("ln1", "attn", "ln1_out"), "mlp": ("ln2", "mlp", "ln2_out")}


def _held_batches(model, tok, data, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows holding the first ``tokens`` tokens of the training split of ``data``, on the model's
    device: every metric chooses on these, so no choice is fitted to the validation text that the
    before/after perplexities are measured on."""
    seq_len = window_length(model.config)
    device = next(model.parameters()).device
    ids = train_ids(tok, data, limit=2 * tokens).tolist()
    return [(i.to(device), m.to(device)) for i, m in batches(tok, ids, tokens, seq_len, 8)]


def choosing_slice(model, tok, data, tokens: int) -> str:
    """The name of the text the metrics choose on (:func:`_held_batches`), e.g. ``embedded train split,
    first 8,192 of 419,577 tokens``."""
    return train_slice(tok, data, sum(int(m.sum()) for _, m in _held_batches(model, tok, data, tokens)))


def present_sublayers(model, unit: str, om=None) -> list[bool]:
    """Per block, whether its ``unit`` sublayer is still there: not dropped from a layerlab block, and
    not zeroed by an earlier prune (weight and bias of its output projection) in a Hugging Face one. With
    ``om`` (the :class:`~layerlab.offload.Offloaded` that ``model`` belongs to) the projection's tensors are
    read from the checkpoint one at a time."""
    v = om.view if om is not None else view(model)
    out = []
    for b in v.blocks:
        if (b.attn_out if unit == "attn" else b.mlp_out) is None:
            out.append(False)
        elif v.arch_name == "layerlab":  # an existing layerlab sublayer counts, even with zero weights
            out.append(True)
        else:
            path = v.out_proj_path(b.index, unit)
            proj = b.module.get_submodule(path)
            if om is None:
                out.append(any(bool(p.any()) for p in proj.parameters(recurse=False)))
            else:
                names = [f"{om.blocks_prefix}.{b.index}.{path}.{n}" for n, _ in proj.named_parameters(recurse=False)]
                out.append(any(bool(om._read(n).any()) for n in names))
    return out


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
      token, mean over windows (Gromov et al., 2024);
    - ``influence``: per block, 1 - cos(x_l, x_l+1), mean over all real tokens (ShortGPT's BI).
    For a sublayer, from x_in (entering it) to x_out = x_in + F (leaving it), per block, None where the
    sublayer is gone: ``angular_distance`` d(x_in, x_out) of the last token, mean over windows, and
    ``influence`` 1 - cos(x_in, x_out), mean over all real tokens. The trace's ``mid`` (the stream between
    attention and MLP) is x_out of attention and x_in of the MLP. ``present`` (per block) overrides
    :func:`present_sublayers`, for an offloaded model whose weights are not in memory: the traced forwards
    then stream its blocks, one pass per batch.
    """
    v = view(model)
    L = v.num_layers
    if present is None:
        present = [True] * L if unit == "block" else present_sublayers(model, unit)
    S = L + 1 if unit == "block" else L
    ang = torch.zeros((S, S) if unit == "block" else S, dtype=torch.float64)
    cos = torch.zeros(L, dtype=torch.float64)
    seqs, toks = 0, 0
    for ids, mask in _held_batches(model, tok, data, tokens):
        with v.trace(sublayers=unit != "block") as t:
            v.forward(ids, mask)
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
            states = torch.stack([t.resid_in[0], *t.resid_out])[:, rows, last].float()  # (S, B, C): last tokens
            u = F.normalize(states, dim=-1)
            ang += angular(torch.einsum("sbc,tbc->stb", u, u)).sum(-1).double().cpu()
        seqs, toks = seqs + ids.shape[0], toks + int(m.sum())
    influence = [1 - float(c) / max(toks, 1) if p else None for c, p in zip(cos, present, strict=True)]
    if unit == "block":
        return {"angular_distance": (ang / max(seqs, 1)).tolist(), "influence": influence}
    return {"angular_distance": [float(a) / max(seqs, 1) if p else None for a, p in zip(ang, present, strict=True)],
            "influence": influence}


def by_angular(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    return angular_choice(stream_measures(model, tok, data, tokens, unit), n, unit)


def angular_choice(measures: dict, n: int, unit: str) -> tuple[list[int], dict]:
    """``angular``'s choice from :func:`stream_measures`."""
    d = measures["angular_distance"]
    if unit != "block":
        return _lowest(d, n), {"angular_distance": d}
    ends = [d[s][s + n] for s in range(len(d) - n)]  # d(x_l, x_l+n) for every start l
    start = min(range(len(ends)), key=ends.__getitem__)
    return list(range(start, start + n)), {"distance": ends[start], "distances": ends}


def by_bi(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    return bi_choice(stream_measures(model, tok, data, tokens, unit), n, unit)


def bi_choice(measures: dict, n: int, unit: str) -> tuple[list[int], dict]:
    """``bi``'s choice from :func:`stream_measures`."""
    bi = measures["influence"]
    return _lowest(bi, n), {"block_influence" if unit == "block" else "influence": bi}


@torch.no_grad()
def _skipped_loss(v: LayerView, batches_: list, skip: list[int], unit: str = "block") -> float:
    total, count = 0.0, 0
    with v.skip(*skip) if unit == "block" else v.skip_sublayers(unit, *skip):
        for ids, mask in batches_:
            part, n = masked_loss_sum(v.forward(ids, mask).logits, ids, mask)
            total, count = total + part, count + n
    return total / max(count, 1)


def by_loss(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    v = view(model)
    held = _held_batches(model, tok, data, tokens)
    present = [True] * v.num_layers if unit == "block" else present_sublayers(model, unit)
    removed: list[int] = []
    steps = []
    for _ in range(n):
        trials = {c: _skipped_loss(v, held, removed + [c], unit) for c in range(v.num_layers)
                  if present[c] and c not in removed}
        best = min(trials, key=trials.get)
        removed.append(best)
        steps.append({"removed": best, "loss": trials[best]})
    return sorted(removed), {"greedy": steps}


for _name, _fn in {"angular": by_angular, "bi": by_bi, "loss": by_loss}.items():
    METRICS.register(_name, _fn)  # declared in layerlab.registry, so that the CLI knows the names before torch


def blocks_config(model, keep: list[int], v: LayerView | None = None):
    """A copy of ``model``'s config for the model that keeps only blocks ``keep`` (renumbered 0..): the layer
    count, layerlab's placement schedule and sublayer drops, the per-block lists (``layer_types``,
    ``attention_layers``, ...) and the MoE dense-block keys, rewritten as an explicit list. Both the in-memory
    :func:`without_blocks` and the offloaded writer (:func:`layerlab.offload.write_pruned`) take it from here."""
    v = v if v is not None else view(model)
    config = copy.deepcopy(model.config)
    if config.model_type == "layerlab":
        placements = model.cfg.block_placements()
        if any(PLACEMENTS[p].depth_scale for p in placements):
            raise LayerlabError("pruning a depth-scaled (LNS) model would change the 1/sqrt(l) scale of every block "
                                "after the cut; not supported")
        kept = [placements[i] for i in keep]
        # a schedule (mix) is written out as a per-block list: the cut changes where its switch falls
        scheduled = isinstance(model.cfg.placement, str) and PLACEMENTS[model.cfg.placement].schedule is not None
        config.placement = kept[0] if len(set(kept)) == 1 and not scheduled else kept
        config.layers = len(keep)
        for key in ("drop_attn", "drop_mlp"):  # blocks that lack a sublayer keep lacking it, renumbered
            setattr(config, key, [keep.index(i) for i in getattr(model.cfg, key) if i in keep])
    else:
        L = config.num_hidden_layers
        config.num_hidden_layers = len(keep)
        skip = set(v.arch.dense_layers or ())
        for key, value in config.to_dict().items():  # per-block lists (layer_types, attention_layers, ...): cut
            if "layer" in key and key not in skip and isinstance(value, (list, tuple)) and len(value) == L:
                setattr(config, key, [value[i] for i in keep])
        if v.arch.dense_layers and hasattr(config, v.arch.dense_layers[0]):
            # which blocks are dense follows from a step and a list of indices; after the cut, list them all
            dense = [new for new, old in enumerate(keep) if v.router(old) is None]
            setattr(config, v.arch.dense_layers[0], dense)
            setattr(config, v.arch.dense_layers[1], 1)
    return config


def without_blocks(model, remove: list[int]):
    """A new model of the same class with the given blocks removed and the rest renumbered."""
    v = view(model)
    keep = [i for i in range(v.num_layers) if i not in set(remove)]
    config = blocks_config(model, keep, v)
    prefix = v.arch.blocks + "."
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) not in renumber:
                continue
            key = f"{prefix}{renumber[int(idx)]}.{rest}"
        state[key] = value
    dtype = next(model.parameters()).dtype
    try:  # built in the model's dtype, as from_pretrained builds it (a bf16 model stays bf16)
        build = getattr(type(model), "_from_config", None)
        smaller = build(config, dtype=dtype) if build is not None else type(model)(config).to(dtype)
    except Exception as e:  # noqa: BLE001  (a config whose per-block settings are not a plain list, say)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayerlabError(f"cannot remove blocks from this {config.model_type!r} config: {first}") from None
    _load(smaller, state)
    return smaller.eval()


def _load(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if [k for k in missing if k not in tied] or unexpected:
        raise LayerlabError(f"could not move the weights: missing {missing}, unexpected {unexpected}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _check_residual(v: LayerView, unit: str) -> None:
    bad = sorted({p for p in v.placements() if not PLACEMENTS[p].residual_sublayers})
    if bad:
        raise LayerlabError(f"--unit {unit} needs blocks that add each sublayer to the residual stream "
                            f"({', '.join(residual_placement_names())}); this model has {', '.join(bad)} blocks")


@torch.no_grad()
def without_sublayers(model, unit: str, remove: list[int]):
    """``(new model, zeroed weight names)``: ``model`` with the ``unit`` sublayer of blocks ``remove`` removed.

    A layerlab model is rebuilt without the sublayer's modules (config ``drop_attn``/``drop_mlp``) and
    the list is empty; a Hugging Face model is copied with the sublayer's output projection zeroed,
    weight and bias, and the list names those weights. Either way, the result computes exactly
    what ``view(model).skip_sublayers(unit, *remove)`` computes.
    """
    if unit not in SUBLAYERS:
        raise choices_error("sublayer", unit, SUBLAYERS)
    v = view(model)
    _check_residual(v, unit)
    present = present_sublayers(model, unit)
    for i in remove:
        if not 0 <= i < v.num_layers or not present[i]:
            raise LayerlabError(f"block {i} has no {UNIT_NAMES[unit]} sublayer to remove")
    if v.arch_name != "layerlab":
        smaller = copy.deepcopy(model)
        zeroed = []
        for i in sorted(remove):
            path = v.out_proj_path(i, unit)
            for name, p in smaller.get_submodule(f"{v.arch.blocks}.{i}.{path}").named_parameters(recurse=False):
                p.zero_()
                zeroed.append(f"{v.arch.blocks}.{i}.{path}.{name}")
        return smaller.eval(), zeroed
    config = copy.deepcopy(model.config)
    key = f"drop_{unit}"
    setattr(config, key, sorted(set(getattr(model.cfg, key)) | set(remove)))
    smaller = type(model)(config)
    wanted = smaller.state_dict()
    gone = tuple(f"blocks.{i}.{part}." for i in remove for part in _LAYERLAB_PARTS[unit])
    left = [k for k in model.state_dict() if k not in wanted and not k.startswith(gone)]
    if left:
        raise LayerlabError(f"removing the {UNIT_NAMES[unit]} sublayers would also lose {left}")
    _load(smaller, {k: t for k, t in model.state_dict().items() if k in wanted})
    return smaller.eval(), []


@contextmanager
def _keeping_zeroed(model) -> Iterator[None]:
    """While healing, hold every zeroed sublayer of a Hugging Face model at zero output.

    Healing would otherwise train the zeroed projection (``full``) or a LoRA adapter on it, and
    merging would un-zero it. With its output replaced by zeros, no gradient reaches the sublayer,
    so its weights, and those of LoRA's B (initialised to zero), stay exactly as they are.
    """
    v = view(model)
    with ExitStack() as stack:
        if v.arch_name != "layerlab" and v.sublayers_known:  # a layerlab model has no modules for a removed sublayer
            for unit in SUBLAYERS:
                gone = [i for i, here in enumerate(present_sublayers(model, unit)) if not here]
                if gone:
                    stack.enter_context(v.skip_sublayers(unit, *gone))
        yield


def _record(model, v, tok, data, measure_tokens: int, unit: str, chosen: list[int], zeroed: list[str]) -> dict:
    """The part of prune's record that says what was removed and how (both modes)."""
    record = {"unit": unit, "removed": [{"block": i, "unit": unit} for i in chosen],
              "chosen_on": choosing_slice(model, tok, data, measure_tokens)}
    if unit == "block":
        record["removed_blocks"] = chosen
    else:
        record["surgery"] = "zeroed" if zeroed else "removed"
    if zeroed:
        record["zeroed"] = zeroed
        paths = sorted({v.out_proj_path(i, unit) for i in chosen})
        record["note"] = (f"a {model.config.model_type} config cannot express a missing sublayer, so its output "
                          f"projection ({', '.join(paths)}, all its weights) is zeroed: plain transformers "
                          "loads the model, and its size on disk does not shrink")
    return record


def _stage(model, tok, data, tokens: int | None, om=None) -> dict:
    v = view(model)
    known = v.sublayers_known  # a discovered structure: how many sublayers is not known
    counts = {f"{u}_sublayers": sum(present_sublayers(model, u, om)) if known else None for u in SUBLAYERS}
    return {"layers": v.num_layers, **counts, "bytes": param_bytes(model),
            **lm_loss(model, tok, data, tokens)}


def prune(model_dir: str | Path, *, remove: int, metric: str = "angular", unit: str = "block", out: str | Path,
          data: str | Path | None = None, tokens: int | None = None, measure_tokens: int = MEASURE_TOKENS,
          heal_steps: int = 0, heal: str = "lora", progress: bool = False, dtype: str = "auto",
          offload: bool | None = None, max_memory: str | int | None = None,
          announce: Callable[[str], None] | None = None) -> dict:
    """Remove ``remove`` blocks (or, with ``unit`` ``attn``/``mlp``, sublayers) chosen by ``metric``,
    optionally heal, and write the model to ``out``; :func:`prune_lines` lays out the result.

    Returns the record also written to ``out/layerlab.json``: ``unit``, ``removed`` (a list of
    ``{"block", "unit"}``; for whole blocks also ``removed_blocks``), the metric's scores, and size,
    sublayer counts and validation loss/perplexity (on the first ``tokens`` of the validation split;
    default all of it) before pruning, after pruning and (with ``heal_steps``) after healing on the
    training split of ``data``. ``metric`` reads the first ``measure_tokens`` tokens of the training
    split. ``chosen_on`` (and with healing ``healed_on``) names the text read, as each stage's ``slice``
    names the text it is scored on. Where sublayers of a Hugging Face model were zeroed rather than
    removed, ``surgery`` is ``"zeroed"`` and ``zeroed`` names the weights; healing keeps them zero.

    The model loads in ``dtype`` (``"auto"``: the checkpoint's own; float32 when healing) and the output is
    written in it. With
    ``offload=True``, or ``None`` and weights larger than ``max_memory`` (as ``analyze`` decides; ``announce``
    gets the line saying which), the model is never built: see :func:`_prune_offloaded`. ``offload`` in the
    record says which mode ran.
    """
    _check_choices(unit, metric, heal, heal_steps)
    streamed, reason = input_mode(model_dir, dtype=dtype, offload=offload, max_memory=max_memory)
    args = {"model": str(model_dir), "remove": remove, "metric": metric, "unit": unit, "heal_steps": heal_steps,
            "heal": heal, "data": str(data) if data else "embedded", "tokens": tokens, "measure_tokens": measure_tokens,
            "dtype": dtype, "offload": streamed}
    if streamed:
        _check_offload(metric, unit, heal_steps)
        (_, tok, _), om = open_offloaded_input(model_dir, "prune", causal="writes causal LMs", dtype=dtype)
        if announce is not None:
            announce(f"{model_dir}: {reason}")
        return _prune_offloaded(om, tok, model_dir=model_dir, remove=remove, metric=metric, unit=unit, out=out,
                                data=data, tokens=tokens, measure_tokens=measure_tokens, args=args)
    # healing trains: with dtype auto it loads in float32, as before dtypes were kept (a bf16 optimizer step is lossy)
    model, tok, v = open_input(model_dir, "prune", causal="writes causal LMs",
                               dtype="float32" if heal_steps and dtype == "auto" else dtype)
    if announce is not None:
        announce(f"{model_dir}: {reason}")
    _check_remove(model, v, unit, remove)
    with staged_output(model_dir, out, "prune", args) as stage:  # --out checked before the slow work starts
        before = _stage(model, tok, data, tokens)
        chosen, scores = METRICS[metric](model, tok, remove, data, measure_tokens, unit=unit)
        if unit == "block":
            smaller, zeroed = without_blocks(model, chosen), []
        else:
            smaller, zeroed = without_sublayers(model, unit, chosen)
        stages = {"before": before, "pruned": _stage(smaller, tok, data, tokens)}
        if heal_steps:
            with _keeping_zeroed(smaller):
                smaller = run_heal(smaller, tok, steps=heal_steps, mode=heal, data=data, progress=progress,
                                   frozen=tuple(sorted({name.rpartition(".")[0] for name in zeroed})))
            if any(bool(smaller.get_parameter(name).any()) for name in zeroed):  # _keeping_zeroed failed
                raise LayerlabError("healing changed a zeroed sublayer; nothing was written")
            stages["healed"] = _stage(smaller, tok, data, tokens)
        stage.save_model(smaller)
        record = _record(model, v, tok, data, measure_tokens, unit, chosen, zeroed)
        if heal_steps:
            record["healed_on"] = train_slice(tok, data, HEAL_TOKENS)
        record.update(metric=metric, scores=scores, stages=list(stages), **stages,
                      after=stages["healed" if heal_steps else "pruned"], offload=False)
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
    return sorted(removed), {"greedy": steps}


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
                     measure_tokens: int, args: dict) -> dict:
    """:func:`prune` of a checkpoint streamed block by block (:class:`~layerlab.offload.Offloaded`): the model
    is never built, and at most one block is in memory.

    The choice reads the same first ``measure_tokens`` training tokens as in memory, through
    :func:`stream_measures` on the offloaded model (each traced forward streams the blocks), so ``angular``
    and ``bi`` choose exactly as in memory in one pass; ``loss`` (whole blocks) takes one pass per removed
    block with skip-streams (:func:`_greedy_loss_streamed`); ``loss`` for sublayers and healing (training
    needs the whole model) are refused in one line. The output is
    written by :func:`layerlab.offload.write_pruned`: tensors copied shard by shard, one at a time, renamed
    for the renumbered blocks (config from :func:`blocks_config`), or with the removed sublayers' output
    projections written as zeros (a layerlab model's sublayer modules left out, as ``drop_attn`` /
    ``drop_mlp`` say). The before and after losses are measured on offloaded models of the input and of
    the output."""
    from ..offload import Offloaded, _parameters_on_meta, write_pruned

    model, v = om.model, om.view
    _check_remove(model, v, unit, remove, om)
    with staged_output(model_dir, out, "prune", args) as stage:
        before = _stage(model, tok, data, tokens, om)
        present = [True] * v.num_layers if unit == "block" else present_sublayers(model, unit, om)
        if metric == "loss":
            chosen, scores = _greedy_loss_streamed(model, tok, remove, data, measure_tokens, v)
        else:
            measures = stream_measures(model, tok, data, measure_tokens, unit, present=present)
            chosen, scores = (angular_choice if metric == "angular" else bi_choice)(measures, remove, unit)
        zeroed, dropped = [], []
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
            for i in chosen:
                path = v.out_proj_path(i, unit)
                if v.arch_name == "layerlab":
                    dropped += [f"{om.blocks_prefix}.{i}.{part}." for part in _LAYERLAB_PARTS[unit]]
                else:
                    proj = v.blocks[i].module.get_submodule(path)
                    zeroed += [f"{v.arch.blocks}.{i}.{path}.{n}" for n, _ in proj.named_parameters(recurse=False)]
            if v.arch_name == "layerlab":
                config = copy.deepcopy(model.config)
                key = f"drop_{unit}"
                setattr(config, key, sorted(set(getattr(model.cfg, key)) | set(chosen)))
        write_pruned(om, stage.dir, keep=keep, zeroed=zeroed, dropped=dropped, config=config)
        copy_tokenizer(model_dir, stage.dir)
        pruned = Offloaded(stage.dir, dtype=om.dtype, device=om.device)
        stages = {"before": before, "pruned": _stage(pruned.model, tok, data, tokens, pruned)}
        del pruned
        record = _record(model, v, tok, data, measure_tokens, unit, chosen, zeroed)
        record.update(metric=metric, scores=scores, stages=list(stages), **stages, after=stages["pruned"],
                      offload=True)
        stage.record = record
    return record


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
    columns += [("MB", 10, lambda r: f"{r['bytes'] / 1e6:.2f}"), *loss_columns()]
    lines = [f"removed {what} by {metric}", f"chosen on the {record['chosen_on']}",
             *([f"healed on windows drawn from the {record['healed_on']}"] if "healed_on" in record else []),
             f"loss (nats/token) and perplexity on the {record['before']['slice']}",
             *table({name: record[name] for name in record["stages"]}, columns)]
    return lines + ([f"note: {record['note']}"] if "note" in record else [])
