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
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters import SUBLAYERS, LayerView, view
from ..analysis.stats import angular, last_token_index
from ..data import batches, window_length
from ..defaults import MEASURE_TOKENS
from ..errors import LayerlabError, choices_error
from ..evaluate import lm_loss, masked_loss_sum
from ..registry import HEAL_MODES, PLACEMENTS, residual_placement_names
from ..registry import PRUNE_METRICS as METRICS
from ..registry import PRUNE_UNITS as UNITS
from .common import loss_columns, open_input, param_bytes, staged_output, table
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


def present_sublayers(model, unit: str) -> list[bool]:
    """Per block, whether its ``unit`` sublayer is still there: not dropped from a layerlab block, and
    not zeroed by an earlier prune (weight and bias of its output projection) in a Hugging Face one."""
    v = view(model)
    out = []
    for b in v.blocks:
        if (b.attn_out if unit == "attn" else b.mlp_out) is None:
            out.append(False)
        elif v.arch_name == "layerlab":  # an existing layerlab sublayer counts, even with zero weights
            out.append(True)
        else:
            proj = b.module.get_submodule(v.out_proj_path(b.index, unit))
            out.append(any(bool(p.any()) for p in proj.parameters(recurse=False)))
    return out


def _lowest(scores: list[float | None], n: int) -> list[int]:
    """Indices of the n smallest scores, ignoring None (sublayers already gone), in block order."""
    order = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    return sorted(i for _, i in order[:n])


@torch.no_grad()
def stream_measures(model, tok, data, tokens: int, unit: str = "block") -> dict:
    """How far each block (``unit`` ``block``) or each block's ``unit`` sublayer turns the residual stream,
    on the first ``tokens`` tokens of the training split (:func:`_held_batches`).

    For blocks, with x_0..x_L the streams between blocks:
    - ``angular_distance``: the (L+1) x (L+1) matrix d(x_i, x_j) = arccos(cos(x_i, x_j))/pi of the last
      token, mean over windows (Gromov et al., 2024);
    - ``influence``: per block, 1 - cos(x_l, x_l+1), mean over all real tokens (ShortGPT's BI).
    For a sublayer, from x_in (entering it) to x_out = x_in + F (leaving it), per block, None where the
    sublayer is gone: ``angular_distance`` d(x_in, x_out) of the last token, mean over windows, and
    ``influence`` 1 - cos(x_in, x_out), mean over all real tokens. The trace's ``mid`` (the stream between
    attention and MLP) is x_out of attention and x_in of the MLP.
    """
    v = view(model)
    L = v.num_layers
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
    d = stream_measures(model, tok, data, tokens, unit)["angular_distance"]
    if unit != "block":
        return _lowest(d, n), {"angular_distance": d}
    ends = [d[s][s + n] for s in range(len(d) - n)]  # d(x_l, x_l+n) for every start l
    start = min(range(len(ends)), key=ends.__getitem__)
    return list(range(start, start + n)), {"distance": ends[start], "distances": ends}


def by_bi(model, tok, n: int, data, tokens: int, unit: str = "block") -> tuple[list[int], dict]:
    bi = stream_measures(model, tok, data, tokens, unit)["influence"]
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


def without_blocks(model, remove: list[int]):
    """A new model of the same class with the given blocks removed and the rest renumbered."""
    v = view(model)
    keep = [i for i in range(v.num_layers) if i not in set(remove)]
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
    try:
        smaller = type(model)(config)
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


def _stage(model, tok, data, tokens: int | None) -> dict:
    known = view(model).sublayers_known  # a discovered structure: how many sublayers is not known
    counts = {f"{u}_sublayers": sum(present_sublayers(model, u)) if known else None for u in SUBLAYERS}
    return {"layers": view(model).num_layers, **counts, "bytes": param_bytes(model),
            **lm_loss(model, tok, data, tokens)}


def prune(model_dir: str | Path, *, remove: int, metric: str = "angular", unit: str = "block", out: str | Path,
          data: str | Path | None = None, tokens: int | None = None, measure_tokens: int = MEASURE_TOKENS,
          heal_steps: int = 0, heal: str = "lora", progress: bool = False) -> dict:
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
    """
    _check_choices(unit, metric, heal, heal_steps)
    model, tok, v = open_input(model_dir, "prune", causal="writes causal LMs")
    _check_remove(model, v, unit, remove)
    args = {"model": str(model_dir), "remove": remove, "metric": metric, "unit": unit, "heal_steps": heal_steps,
            "heal": heal, "data": str(data) if data else "embedded", "tokens": tokens, "measure_tokens": measure_tokens}
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
        record = {"unit": unit, "removed": [{"block": i, "unit": unit} for i in chosen],
                  "chosen_on": choosing_slice(model, tok, data, measure_tokens)}
        if heal_steps:
            record["healed_on"] = train_slice(tok, data, HEAL_TOKENS)
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
        record.update(metric=metric, scores=scores, stages=list(stages), **stages,
                      after=stages["healed" if heal_steps else "pruned"])
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


def _check_remove(model, v: LayerView, unit: str, remove: int) -> None:
    if unit == "block" and not 1 <= remove < v.num_layers:
        raise LayerlabError(f"--remove must be between 1 and {v.num_layers - 1} for a {v.num_layers}-layer model, "
                            f"got {remove}")
    if unit != "block":
        v.require_sublayers(f"prune --unit {unit}")
        _check_residual(v, unit)
        have = sum(present_sublayers(model, unit))
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
