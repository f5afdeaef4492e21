"""Language-model loss, perplexity and bits per byte of a model on one named slice of text.

One definition serves every command that reports a loss (``train``'s final figure, ``eval``, and the
before/after tables of ``prune``, ``quantize`` and ``convert``): the text is a split of the token stream
that training sees (:func:`layerlab.data.split_ids`), cut into consecutive windows of
``layerlab.data.DEFAULT_SEQ_LEN`` tokens (or the context, if shorter), each predicting its next token; by default the
whole validation split, which takes seconds for the models layerlab trains on a CPU. Every result
carries ``slice``, the name of the text it was measured on, and the commands print it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .adapters import load_model, view
from .data import default_split, describe_slice, split_ids, stream_tokenizer, window_length
from .errors import LayerlabError, check_loss_tokens


def masked_loss_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token cross-entropy, number of predictions) over the real tokens of a (B, T) batch."""
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    ce = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:][valid], reduction="sum")
    return float(ce), int(valid.sum())


@torch.no_grad()
def lm_loss(model, tokenizer, data: str | Path | None = None, tokens: int | None = None, split: str = "validation",
            seq_len: int | None = None, batch_size: int = 8) -> dict:
    """Mean next-token cross-entropy (nats/token) over the first ``tokens`` tokens of ``split`` of ``data``
    (default: all of it; every token after the first is predicted), with perplexity, bits per byte, and
    ``slice``, the text's name. ``tokens`` in the result counts the tokens read, ``predictions`` the scored."""
    v = view(model)
    if not v.causal or not v.has_lm_head:
        raise LayerlabError(f"{v.arch_name} models have no language-model loss to evaluate")
    check_loss_tokens(tokens)
    tokenizer = stream_tokenizer(tokenizer)  # once: a transformers tokenizer is copied to build it
    stream = split_ids(tokenizer, data, split)
    available = len(stream)
    if available < 2:
        raise LayerlabError(f"data too short: the {split} split holds fewer than 2 tokens")
    used = available if tokens is None else min(tokens, available)
    n = used - 1  # predictions
    ids = torch.from_numpy(np.asarray(stream[:used], dtype=np.int64))
    seq_len = window_length(model.config, seq_len=seq_len)
    device = next(model.parameters()).device
    starts = list(range(0, n, seq_len))
    full = [s for s in starts if s + seq_len <= n]  # whole windows go in batches, a short last one alone
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in starts[len(full):]]
    total = 0.0
    for group in groups:
        width = min(seq_len, n - group[0])
        x = torch.stack([ids[s:s + width] for s in group]).to(device)  # (B, T)
        y = torch.stack([ids[s + 1:s + width + 1] for s in group]).to(device)
        logits = v.forward(x, torch.ones_like(x)).logits  # (B, T, V)
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum"))
    loss = total / n
    text = tokenizer.decode(ids[1:].numpy())  # the predicted tokens' text
    n_bytes = max(len(text.encode("utf-8")), 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": loss / math.log(2) * n / n_bytes,
            "tokens": used, "predictions": n, "slice": describe_slice(data, split, used, available)}


def evaluate(model_dir: str | Path, data: str | Path | None = None, tokens: int | None = None,
             split: str | None = None) -> dict:
    """:func:`lm_loss` of a model directory; ``split`` defaults to :func:`default_split` of ``data``."""
    check_loss_tokens(tokens)
    model, tok, _ = load_model(model_dir)
    return lm_loss(model, tok, data, tokens, split=split or default_split(data))
