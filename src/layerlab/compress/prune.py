"""``prune``: remove whole blocks chosen by a layer measurement, and write a smaller model.

Metrics (one registry, each ``(model, tokenizer, n, data, tokens) -> (blocks, scores)``):
- ``angular``: the contiguous n blocks whose removal joins the closest residual states,
  argmin_l d(x_l, x_l+n) on the last token (Gromov et al., 2024, The Unreasonable
  Ineffectiveness of the Deeper Layers);
- ``bi``: the n blocks of lowest Block Influence 1 - E cos(x_l, x_l+1) (Men et al., 2024, ShortGPT);
- ``loss``: greedily, n times, the block whose removal (with those already removed) raises the
  measured loss least (Fan et al., 2024 / Gromov et al.'s baseline).

The result has the same architecture with fewer blocks: the config's layer count (and, for
layerlab, the placement schedule; for Llama-style models, ``layer_types``) is cut to match, the
weights are renumbered, and the model is rebuilt, so a Hugging Face GPT-2 or Llama directory stays
loadable by plain transformers.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..adapters import LayerView, view
from ..analysis.analyze import analysis_text_ids, analyze_model, batches, load_for_analysis, masked_loss_sum
from ..errors import LayerlabError, choices_error
from ..evaluate import lm_loss
from ..io import output_dir, write_manifest

DEFAULT_TOKENS = 8192


def _analysis(model, tok, data, tokens) -> dict:
    return analyze_model(model, tok, name="m", path=None, data=data, tokens=tokens, removal_tokens=0,
                         spectra=False, intrinsic=False, progress=False)


def by_angular(model, tok, n: int, data, tokens: int) -> tuple[list[int], dict]:
    entry = _analysis(model, tok, data, tokens)
    best = entry["best_block_to_prune"][str(n)]
    return list(range(best["start"], best["start"] + n)), {"distance": best["distance"]}


def by_bi(model, tok, n: int, data, tokens: int) -> tuple[list[int], dict]:
    entry = _analysis(model, tok, data, tokens)
    bi = [lay["block_influence"] for lay in entry["layers"]]
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    return sorted(order[:n]), {"block_influence": bi}


@torch.no_grad()
def _skipped_loss(v: LayerView, batches_: list, skip: list[int]) -> float:
    total, count = 0.0, 0
    with v.skip(*skip):
        for ids, mask in batches_:
            part, n = masked_loss_sum(v.forward(ids, mask).logits, ids, mask)
            total, count = total + part, count + n
    return total / max(count, 1)


def by_loss(model, tok, n: int, data, tokens: int) -> tuple[list[int], dict]:
    v = view(model)
    seq_len = min(256, getattr(model.config, "max_position_embeddings", None) or 256)
    device = next(model.parameters()).device
    held = [(i.to(device), m.to(device)) for i, m in batches(v, tok, analysis_text_ids(tok, data, tokens),
                                                             tokens, seq_len, 8)]
    removed: list[int] = []
    steps = []
    for _ in range(n):
        trials = {c: _skipped_loss(v, held, removed + [c]) for c in range(v.num_layers) if c not in removed}
        best = min(trials, key=trials.get)
        removed.append(best)
        steps.append({"removed": best, "loss": trials[best]})
    return sorted(removed), {"greedy": steps}


METRICS: dict[str, Callable] = {"angular": by_angular, "bi": by_bi, "loss": by_loss}


def _num_layers_key(config) -> str:
    return "layers" if config.model_type == "layerlab" else "num_hidden_layers"


def without_blocks(model, remove: list[int]):
    """A new model of the same class with the given blocks removed and the rest renumbered."""
    v = view(model)
    keep = [i for i in range(v.num_layers) if i not in set(remove)]
    config = copy.deepcopy(model.config)
    if config.model_type == "layerlab":
        placements = model.cfg.block_placements()
        if "lns" in placements:
            raise LayerlabError("pruning an LNS model would change the 1/sqrt(l) scale of every block after "
                                "the cut; not supported")
        kept = [placements[i] for i in keep]
        config.placement = kept[0] if len(set(kept)) == 1 and model.cfg.placement != "mix" else kept
        config.layers = len(keep)
    else:
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
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
    smaller = type(model)(config)
    missing, unexpected = smaller.load_state_dict(state, strict=False)
    tied = set(getattr(smaller, "all_tied_weights_keys", {}) or {})
    if [k for k in missing if k not in tied] or unexpected:
        raise LayerlabError(f"could not renumber the weights: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        smaller.tie_weights()
    return smaller.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    """Copy the tokenizer files byte for byte, so the output tokenizes exactly as the input."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)


def _size(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def prune(model_dir: str | Path, *, remove: int, metric: str = "angular", out: str | Path,
          data: str | Path | None = None, tokens: int = DEFAULT_TOKENS, heal_steps: int = 0, heal: str = "lora",
          progress: bool = False, echo=print) -> dict:
    """Remove ``remove`` blocks chosen by ``metric``, optionally heal, and write the model to ``out``.

    Returns the record also written to ``out/layerlab.json``: the blocks removed, the metric's
    scores, and size and validation loss/perplexity before pruning, after pruning and (with
    ``heal_steps``) after healing on the training part of ``data``.
    """
    from .heal import HEAL_MODES
    from .heal import heal as run_heal

    if metric not in METRICS:
        raise choices_error("metric", metric, list(METRICS))
    if heal not in HEAL_MODES:
        raise choices_error("heal mode", heal, HEAL_MODES)
    if heal_steps < 0:
        raise LayerlabError(f"--heal-steps must be >= 0, got {heal_steps}")
    model, tok = load_for_analysis(model_dir)
    v = view(model)
    if not v.causal:
        raise LayerlabError("prune writes causal LMs; this model is an encoder")
    if not 1 <= remove < v.num_layers:
        raise LayerlabError(f"--remove must be between 1 and {v.num_layers - 1} for a {v.num_layers}-layer model, "
                            f"got {remove}")
    with output_dir(out, protect=(model_dir,)) as tmp:  # checked before the slow work starts
        before = lm_loss(model, tok, data, tokens)
        blocks, scores = METRICS[metric](model, tok, remove, data, tokens)
        smaller = without_blocks(model, blocks)
        stages = {"before": {"layers": v.num_layers, "bytes": _size(model), **before},
                  "pruned": {"layers": v.num_layers - remove, "bytes": _size(smaller),
                             **lm_loss(smaller, tok, data, tokens)}}
        if heal_steps:
            smaller = run_heal(smaller, tok, steps=heal_steps, mode=heal, data=data, progress=progress)
            stages["healed"] = {"layers": v.num_layers - remove, "bytes": _size(smaller),
                                **lm_loss(smaller, tok, data, tokens)}
        smaller.save_pretrained(tmp)
        copy_tokenizer(model_dir, tmp)
        record = {"removed_blocks": blocks, "metric": metric, "scores": scores, **stages,
                  "after": stages["healed" if heal_steps else "pruned"]}
        write_manifest(tmp, "prune", {"model": str(model_dir), "remove": remove, "metric": metric,
                                      "heal_steps": heal_steps, "heal": heal,
                                      "data": str(data) if data else "embedded", "tokens": tokens}, **record)
    echo(f"removed blocks {blocks} by {metric}")
    echo(f"{'':8s}{'layers':>8s}{'MB':>10s}{'loss':>10s}{'ppl':>10s}")
    for name in stages:
        r = stages[name]
        echo(f"{name:8s}{r['layers']:8d}{r['bytes'] / 1e6:10.2f}{r['loss']:10.4f}{r['perplexity']:10.2f}")
    return record
