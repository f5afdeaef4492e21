"""Text generation from a model directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import load_model
from .data import stream_tokenizer
from .errors import LayerlabError, check_prompt


def sample(model_dir: str | Path, prompt: str, *, tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
           seed: int = 0, echo: Callable[[str], None] | None = None) -> str:
    """The prompt followed by ``tokens`` generated tokens (greedy when temperature is 0).

    Prompt and continuation must fit the model's context: the continuation is shortened to the room
    the prompt leaves, and a prompt that fills the context keeps only its tail. ``echo`` is told when
    either happens.
    """
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    if temperature < 0:
        raise LayerlabError(f"--temperature must be >= 0, got {temperature}")
    check_prompt(prompt)
    model, hf_tokenizer, v = load_model(model_dir, dtype="auto")
    if not v.causal:
        raise LayerlabError(f"{model_dir} is an encoder ({v.arch_name}): sample needs a causal LM")
    tok = stream_tokenizer(hf_tokenizer)  # encode/decode as training saw them, with the eos id
    ids = torch.tensor(tok.encode(prompt).astype("int64"))[None]  # (1, T)
    if ids.shape[1] == 0:
        raise LayerlabError(f"the prompt {prompt!r} encodes to no tokens")
    asked, prompt_len = tokens, ids.shape[1]
    context = getattr(model.config, "max_position_embeddings", None) or prompt_len + tokens
    if prompt_len + tokens > context:
        # the prompt keeps priority; only a prompt that leaves no room for half the context loses its head
        tokens = min(tokens, max(context - prompt_len, context // 2))
        ids = ids[:, -(context - tokens):]
        if echo is not None:
            cut = f"; the prompt was cut to its last {ids.shape[1]} of {prompt_len} tokens" \
                if ids.shape[1] < prompt_len else ""
            echo(f"note: generating {tokens} tokens, not {asked}: the model's context of {context} tokens holds "
                 f"the prompt and the continuation together{cut}")
    torch.manual_seed(seed)
    greedy = temperature == 0
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_k=None if greedy else top_k,
        pad_token_id=tok.eos_id, eos_token_id=None,
    )
    return prompt + tok.decode(out[0, ids.shape[1]:].cpu().numpy())
