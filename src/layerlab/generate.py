"""Text generation from a model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from .data import load_tokenizer
from .errors import LayerlabError
from .io import load_causal_lm


def sample(model_dir: str | Path, prompt: str, *, tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
           seed: int = 0) -> str:
    """The prompt followed by ``tokens`` generated tokens (greedy when temperature is 0)."""
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    if temperature < 0:
        raise LayerlabError(f"--temperature must be >= 0, got {temperature}")
    model = load_causal_lm(model_dir)
    tok = load_tokenizer(Path(model_dir))
    ids = torch.tensor(tok.encode(prompt).astype("int64"))[None]  # (1, T)
    context = getattr(model.config, "max_position_embeddings", None) or ids.shape[1] + tokens
    tokens = min(tokens, context - 1)
    ids = ids[:, -(context - tokens):]  # keep the prompt's tail so prompt + new tokens fit the context
    torch.manual_seed(seed)
    greedy = temperature == 0
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_k=None if greedy else top_k,
        pad_token_id=tok.eos_id, eos_token_id=None,
    )
    return prompt + tok.decode(out[0, ids.shape[1]:].tolist())
