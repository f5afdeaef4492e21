"""Language-model loss, perplexity and bits per byte of a model directory on held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .adapters import view
from .analysis.analyze import analysis_text_ids, batches, load_for_analysis, masked_loss_sum
from .errors import LayerlabError

DEFAULT_EVAL_TOKENS = 16384


@torch.no_grad()
def lm_loss(model, tokenizer, data: str | Path | None = None, tokens: int = DEFAULT_EVAL_TOKENS,
            seq_len: int | None = None, batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy over ``tokens`` tokens of the validation split of ``data`` (its
    last 10%; default: the embedded corpus'), with perplexity and bits per byte. The windows are the
    analysis' windows."""
    v = view(model)
    if not v.causal or not v.has_lm_head:
        raise LayerlabError(f"{v.arch_name} models have no language-model loss to evaluate")
    ids = analysis_text_ids(tokenizer, data, tokens, split="validation")
    if len(ids) < 2:
        raise LayerlabError("data too short: fewer than 2 tokens to evaluate")
    seq_len = seq_len or min(256, getattr(model.config, "max_position_embeddings", None) or 256)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for input_ids, mask in batches(v, tokenizer, ids, tokens, seq_len, batch_size):
        input_ids, mask = input_ids.to(device), mask.to(device)
        part, n = masked_loss_sum(v.forward(input_ids, mask).logits, input_ids, mask)
        total, count = total + part, count + n
    used = ids[: min(len(ids), tokens)]
    loss = total / max(count, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count}
    if hasattr(tokenizer, "decode"):  # nats/token -> bits/byte through the evaluated text's bytes per token
        n_bytes = len(tokenizer.decode(used).encode("utf-8"))
        result["bits_per_byte"] = loss / math.log(2) * len(used) / max(n_bytes, 1)
    return result


def evaluate(model_dir: str | Path, data: str | Path | None = None, tokens: int = DEFAULT_EVAL_TOKENS) -> dict:
    """:func:`lm_loss` of a model directory."""
    model, tok = load_for_analysis(model_dir)
    return lm_loss(model, tok, data, tokens)
