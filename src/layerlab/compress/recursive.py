"""``layerlab convert MODEL --to recursive``: a recursive model (:mod:`layerlab.recursive`) initialised from a trained
plain layerlab model, then uptrained. Bae et al., 2024 (ICLR 2025), "Relaxed Recursive Transformers: Effective
Parameter Sharing with Layer-wise LoRA": the shared weights from the Average / Stepwise / Lower initialisations
(Sec. 3.1, CYCLE sharing), each block's LoRA from the truncated SVD of its residual to them (Sec. 3.2), then
uptraining of every weight (:func:`layerlab.compress.heal.heal`, mode ``full``).

:func:`layerlab.compress.convert.convert` calls :func:`convert_to_recursive` for ``to="recursive"``, handing it its
own row and equality measures (``_stage``, ``max_logit_diff``), so that this module does not import it back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data import window_length
from ..errors import LayerlabError, choices_error
from ..model import LayerlabForCausalLM, build_model, carry_ids
from ..probes import stage_lines
from ..recursive import INITS, LOOP_LINEARS, _get, init_sources, unique_blocks
from .common import loss_columns, open_input, staged_output, table
from .heal import HEAL_TOKENS, heal, train_slice


@torch.no_grad()
def to_recursive(model, loops: int, rank: int, init: str = "average"):
    """The recursive model of ``loops`` N and LoRA rank ``rank`` initialised from a plain layerlab model: unique
    block k's weights are the mean of :func:`init_sources` (``init``), every block keeps its own norms, biases and
    the embeddings and head are copied, and block i's LoRA is the truncated SVD of W_i - W_{i % K} (computed in
    float64; Bae et al., Sec. 3.2). At full rank the result computes the original function (to float rounding)."""
    if init not in INITS:
        raise choices_error("recursive init", init, INITS)
    cfg = model.cfg
    if loops < 2:
        raise LayerlabError(f"--loops must be at least 2 to share blocks, got {loops}")
    if rank < 0:
        raise LayerlabError(f"--lora-rank must be non-negative, got {rank}")
    new_cfg = ModelConfig(**{**cfg.to_dict(), "loops": loops, "loop_lora_rank": rank})  # one-line errors
    new = build_model(new_cfg)
    old_state, want = model.state_dict(), new.state_dict()
    state = {}
    L, K = cfg.layers, unique_blocks(cfg.layers, loops)
    for k in range(K):
        for path in LOOP_LINEARS:
            key = f"{path}.weight"
            if f"loop_shared.{k}.{key}" not in want:
                continue
            ws = [old_state[f"blocks.{j}.{key}"].double() for j in init_sources(L, loops, k, init)]
            state[f"loop_shared.{k}.{key}"] = torch.stack(ws).mean(0)
    for name in want:  # norms, biases, embeddings, head (and any DenseFormer weights): block i's own, copied
        if name not in state and not name.endswith((".lora_A", ".lora_B")):
            state[name] = old_state[name].clone()
    for i in range(L):
        for path in LOOP_LINEARS:
            lin = _get(new.blocks[i], path)
            if lin is None:
                continue
            shared = state[f"loop_shared.{i % K}.{path}.weight"]
            if lin.rank:
                U, S, Vh = torch.linalg.svd(old_state[f"blocks.{i}.{path}.weight"].double() - shared,
                                            full_matrices=False)
                r = lin.rank
                state[f"blocks.{i}.{path}.lora_B"] = U[:, :r] * S[:r]  # (out, r): U_r S_r
                state[f"blocks.{i}.{path}.lora_A"] = Vh[:r].clone()  # (r, in): V_r^T
    dtype = next(model.parameters()).dtype
    new.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return carry_ids(model, new).to(next(model.parameters()).device).eval()


def convert_to_recursive(model_dir: str | Path, *, out: str | Path, loops: int | None, rank: int, init: str,
                         heal_steps: int, data: str | Path | None, tokens: int | None, lr: float, seed: int,
                         progress: bool, probes: dict | None, measure: Callable, logit_diff: Callable,
                         check_batch: int) -> dict:
    """``layerlab convert MODEL --to recursive``: :func:`to_recursive`, then ``heal_steps`` of uptraining (every
    weight; :func:`layerlab.compress.heal.heal`, mode ``full``, at ``lr``) on the training part of ``data``, written
    to ``out`` (``lr`` checked by convert). The record holds the parameter counts and the validation loss of the
    original (``before``), the recursive model as initialised (``recursive``) and, after healing, ``healed``; and
    the largest |logit difference| of the initialised model against the original (zero to rounding at full rank).
    ``measure`` and ``logit_diff`` are convert's ``_stage`` and ``max_logit_diff``, ``check_batch`` the windows the
    latter reads without a tokenizer."""
    if loops is None:
        raise LayerlabError("convert --to recursive needs --loops N (the times the unique blocks are looped)")
    if loops < 2:
        raise LayerlabError(f"--loops must be at least 2 to share blocks, got {loops}")
    if rank < 0:
        raise LayerlabError(f"--lora-rank must be non-negative, got {rank}")
    if init not in INITS:
        raise choices_error("recursive init", init, INITS)
    if heal_steps < 0:
        raise LayerlabError(f"--heal-steps must be >= 0, got {heal_steps}")
    model, tok, _ = open_input(model_dir, "convert", need_tokenizer=heal_steps > 0 or data is not None
                               or tokens is not None)
    if not isinstance(model, LayerlabForCausalLM):
        raise LayerlabError(f"convert --to recursive takes a layerlab model; this is a "
                            f"{getattr(model.config, 'model_type', type(model).__name__)!r} model")
    if model.cfg.layers % loops:
        raise LayerlabError(f"--loops {loops} does not divide the model's {model.cfg.layers} blocks")
    args = {"model": str(model_dir), "to": "recursive", "loops": loops, "lora_rank": rank, "init": init,
            "heal_steps": heal_steps, "lr": lr, "seed": seed, "data": str(data) if data else "embedded",
            "tokens": tokens}
    decisions = [f"CYCLE sharing: block i runs unique block i % {model.cfg.layers // loops}; unique blocks "
                 f"initialised by {init!r}; per-block LoRA of rank {rank} from the truncated SVD of each block's "
                 "residual to its shared weights; norms and biases kept per block"]
    if tok is None:
        args.update(data=None)
        decisions.append("the input has no tokenizer: equality checked on random token ids, no loss measured")
    with staged_output(model_dir, out, "convert", args) as stage:
        stages = {"before": measure(model, tok, data, tokens, probes)}
        new = to_recursive(model, loops, rank, init)
        record: dict = {"to": "recursive", "source": "layerlab", "loops": loops, "lora_rank": rank, "init": init,
                        "max_abs_logit_diff": logit_diff(model, new, tok, data, seed=seed)}
        if tok is None:
            record["checked_on"] = f"{check_batch} x {window_length(model.config)} random token ids (seed {seed})"
        stages["recursive"] = measure(new, tok, data, tokens, probes)
        if heal_steps:
            new = heal(new, tok, steps=heal_steps, mode="full", data=data, lr=lr, seed=seed, progress=progress)
            record["healed_on"] = train_slice(tok, data, HEAL_TOKENS)
            stages["healed"] = measure(new, tok, data, tokens, probes)
        record["heal_steps"] = heal_steps
        record.update(decisions=decisions, stages=list(stages), **stages)
        stage.save_model(new)
        stage.record = record
    return record


def recursive_lines(record: dict) -> list[str]:
    """What ``layerlab convert --to recursive`` prints: the sharing, how far the initialised model is from the
    original, and the table of sizes (and losses, when the input has a tokenizer) per stage."""
    lines = [f"converted layerlab ({record['before']['params']:,d} parameters) to a recursive model: "
             f"{record['loops']} loops, LoRA rank {record['lora_rank']}, init {record['init']}",
             f"max |logit difference| of the initialised model against the original"
             f"{' on ' + record['checked_on'] if 'checked_on' in record else ''}: {record['max_abs_logit_diff']:.2e}"]
    columns = [("params", 12, lambda r: f"{r['params']:,d}"), ("MB", 10, lambda r: f"{r['bytes'] / 1e6:.2f}")]
    rows = {name: record[name] for name in record["stages"]}
    if record["heal_steps"]:
        lines.append(f"uptrained {record['heal_steps']} steps (every weight) on windows drawn from the "
                     f"{record['healed_on']}")
    if "loss" not in record["before"]:
        return [*lines, "no loss measured: the input has no tokenizer to read text with",
                *table(rows, columns, name_width=10)]
    return [*lines, f"loss (nats/token) and perplexity on the {record['before']['slice']}",
            *table(rows, [*columns, *loss_columns()], name_width=10), *stage_lines(rows)]
