"""Text generation from a model directory, and self-speculative greedy decoding.

Self-speculative greedy decoding (LayerSkip; Elhoushi et al., 2024, "LayerSkip: Enabling Early Exit Inference and
Self-Speculative Decoding", Sec. 4.2).

The draft is the model cut after block E: blocks 0..E, then the model's own final norm and head (no extra
parameters). It proposes ``draft`` tokens greedily, one at a time; the full model then verifies them in one forward
and keeps the longest prefix it agrees with, plus its own next token, so that the output is exactly greedy
decoding's. The KV cache is shared, as the paper's: blocks 0..E's keys and values and their output at block E
(the "exit query cache") computed while drafting are reused by the verification, which therefore runs only
blocks E+1..L-1 over the drafted positions (plus blocks 0..E over the last drafted token, which the draft never
fed). On a rejection every cache layer is cut back to the accepted length. Our own implementation, following the
method of facebookresearch/LayerSkip (``self_speculation/self_speculation_generator.py``).

``E`` is the block index that the ``lenses`` report section uses for its early-exit estimate (row ``block`` i:
the draft runs blocks 0..i), so its ``early_exit_accept`` is the acceptance rate to compare with.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from .adapters import load_model
from .data import stream_tokenizer
from .errors import LayerlabError, check_prompt
from .model import rope_cos_sin


def sample(model_dir: str | Path, prompt: str, *, tokens: int = 200, temperature: float = 0.8, top_k: int = 50,
           seed: int = 0, echo: Callable[[str], None] | None = None, exit_block: int | None = None,
           draft: int = 4) -> str:
    """The prompt followed by ``tokens`` generated tokens (greedy when temperature is 0).

    With ``exit_block`` E the continuation is decoded greedily by self-speculation (LayerSkip; see
    :func:`self_speculative_greedy`): drafts of ``draft`` tokens by blocks 0..E, verified by the whole model. The plain
    greedy decoding is run as well, and ``echo`` is told the acceptance rate, both speeds in tokens/s, and whether
    the two outputs are equal.

    Prompt and continuation must fit the model's context: the continuation is shortened to the room
    the prompt leaves, and a prompt that fills the context keeps only its tail. ``echo`` is told when
    either happens.
    """
    if tokens < 1:
        raise LayerlabError(f"--tokens must be at least 1, got {tokens}")
    if temperature < 0:
        raise LayerlabError(f"--temperature must be >= 0, got {temperature}")
    if exit_block is not None and temperature != 0:
        raise LayerlabError(f"--exit-block decodes greedily: pass --temperature 0, not {temperature}")
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
    if exit_block is not None:
        check_exit_block(model, exit_block, draft)
    plain = lambda: model.generate(  # noqa: E731
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_k=None if greedy else top_k,
        pad_token_id=tok.eos_id, eos_token_id=None,
    )
    if exit_block is not None:  # warm both paths up, so that neither timing pays for first-call setup
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       pad_token_id=tok.eos_id, eos_token_id=None)
        self_speculative_greedy(model, ids, min(2, tokens), exit_block, draft)
    out, plain_s = timed(plain)
    if exit_block is not None:
        spec, spec_s = timed(lambda: self_speculative_greedy(model, ids, tokens, exit_block, draft))
        same = torch.equal(spec.ids, out)
        if echo is not None:
            echo(speculative_line(spec, exit_block, draft, len(model.blocks), tokens, plain_s, spec_s, same))
        out = spec.ids
    return prompt + tok.decode(out[0, ids.shape[1]:].cpu().numpy())


def speculative_line(spec: SpeculativeResult, exit_block: int, draft: int, depth: int, tokens: int,
                     plain_s: float, spec_s: float, same: bool) -> str:
    """The one-line report of a self-speculative decoding against plain greedy decoding."""
    return (f"self-speculative decoding, exit after block {exit_block} of 0..{depth - 1}, drafts of {draft}: "
            f"{spec.accepted}/{spec.drafted} draft tokens accepted ({spec.acceptance:.3f}), {spec.steps} "
            f"verifications; {tokens / spec_s:.1f} tokens/s against {tokens / plain_s:.1f} tokens/s for plain "
            f"greedy decoding ({plain_s / spec_s:.2f}x); output "
            + ("equal to plain greedy decoding" if same else "DIFFERS from plain greedy decoding (float rounding "
               "of batched verification)"))


# ---------------------------------------------------------------- self-speculative decoding (LayerSkip)


@dataclass
class SpeculativeResult:
    """What :func:`self_speculative_greedy` generated and how often the draft was right."""

    ids: torch.Tensor  # (1, T + tokens): prompt and continuation
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens the full model agreed with
    steps: int  # verification forwards

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def check_exit_block(model, exit_block: int, draft: int) -> None:
    """One-line errors for an exit block outside 0..L-1, a draft length under 1, or a model that is not layerlab's."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "ln_f"):
        raise LayerlabError(f"--exit-block needs a layerlab model; this one is {type(model).__name__}")
    if not 0 <= exit_block < len(blocks):
        raise LayerlabError(f"--exit-block {exit_block} is beyond the depth: the model has blocks 0..{len(blocks) - 1}")
    if draft < 1:
        raise LayerlabError(f"--draft must be at least 1, got {draft}")


class _Runner:
    """Runs a range of the model's blocks over new positions, with the model's own embedding, positions, rope,
    mask and cache (the same steps as ``LayerlabForCausalLM.forward``, split at a block)."""

    def __init__(self, model):
        self.m = model
        self.cache = DynamicCache(config=model.config)

    def layer_len(self, i: int) -> int:
        return self.cache.layers[i].get_seq_length() if i < len(self.cache.layers) else 0

    def embed(self, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, positions) for ``ids`` (1, T) at positions start..start+T-1."""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.m.embed(ids)
        if self.m.pos is not None:
            x = x + self.m.pos(pos[None])
        return self.m.drop(x), pos

    def blocks(self, x: torch.Tensor, pos: torch.Tensor, lo: int, hi: int, history: dict) -> torch.Tensor:
        """Blocks lo..hi-1 over x (1, T, C) at positions ``pos``; ``history`` holds the earlier block outputs of
        these positions (DenseFormer's averages read them) and gains this range's."""
        m, T = self.m, x.shape[1]
        rope = None if m.pos is not None else rope_cos_sin(pos, m.cfg.head_dim, m.cfg.rope_theta)
        past = int(pos[0])
        mask = m._mask(None, 1, T, past, x.device)
        for block in m.blocks[lo:hi]:
            x = block(x, rope=rope, cache=self.cache, mask=mask, history=history)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.m.lm_head(self.m.ln_f(x))

    def cut(self, length: int) -> None:
        """Every cache layer back to its first ``length`` positions."""
        for layer in self.cache.layers:
            extra = layer.get_seq_length() - length if layer.is_initialized else 0
            if extra > 0:
                layer.crop(-extra)


def _cat(histories: list[dict]) -> dict:
    return {k: torch.cat([h[k] for h in histories], dim=1) for k in histories[0]}


@torch.no_grad()
def self_speculative_greedy(model, ids: torch.Tensor, tokens: int, exit_block: int, draft: int = 4
                            ) -> SpeculativeResult:
    """Greedy continuation of ``ids`` (1, T) by ``tokens`` tokens: drafts of ``draft`` tokens by blocks
    0..``exit_block`` verified by the whole model, sharing one KV cache. Equal to plain greedy decoding up to
    float rounding of batched against one-token matmuls (the verification runs the drafted positions together)."""
    check_exit_block(model, exit_block, draft)
    if ids.shape[0] != 1:
        raise LayerlabError("self-speculative decoding takes one sequence")
    if ids.shape[1] + tokens > model.cfg.context:
        raise LayerlabError(f"{ids.shape[1]} prompt tokens and {tokens} new ones exceed the context of "
                            f"{model.cfg.context}")
    r, L, E = _Runner(model), len(model.blocks), exit_block + 1  # the draft runs blocks 0..E-1
    seq = ids
    # the prompt but its last token fills the cache of every block; the last token is then "pending"
    if seq.shape[1] > 1:
        x, pos = r.embed(seq[:, :-1], 0)
        r.blocks(x, pos, 0, L, {0: x})
    drafted = accepted = steps = 0
    while seq.shape[1] - ids.shape[1] < tokens:
        n = seq.shape[1]  # the cache holds positions 0..n-2; token n-1 is pending
        d = min(draft, tokens - (n - ids.shape[1]) - 1)  # the verification adds one token of its own
        exits, hists, proposals = [], [], []
        tok = seq[:, -1:]
        for i in range(d):  # draft: one token at a time through blocks 0..E-1
            x, pos = r.embed(tok, n - 1 + i)
            h = {0: x}
            x = r.blocks(x, pos, 0, E, h)
            exits.append(x)
            hists.append(h)
            tok = r.head(x[:, -1:]).argmax(-1)
            proposals.append(tok)
        # verify: the last proposal through blocks 0..E-1, then blocks E..L-1 over all d + 1 positions
        x, pos = r.embed(tok, n - 1 + d)
        h = {0: x}
        exits.append(r.blocks(x, pos, 0, E, h))
        hists.append(h)
        pos = torch.arange(n - 1, n + d, device=seq.device)
        out = r.head(r.blocks(torch.cat(exits, dim=1), pos, E, L, _cat(hists)))  # (1, d + 1, V)
        best = out.argmax(-1)  # (1, d + 1): the full model's token after each input
        drafts = torch.cat(proposals, dim=1) if proposals else best[:, :0]
        agree = (best[:, :d] == drafts)[0].long()
        k = int(agree.cumprod(0).sum()) if d else 0  # the longest agreeing prefix
        seq = torch.cat([seq, drafts[:, :k], best[:, k:k + 1]], dim=1)
        r.cut(seq.shape[1] - 1)  # keep inputs up to the new pending token
        drafted, accepted, steps = drafted + d, accepted + k, steps + 1
    return SpeculativeResult(seq[:, : ids.shape[1] + tokens], drafted, accepted, steps)


@torch.no_grad()
def timed(fn) -> tuple[object, float]:
    """fn()'s result and the seconds it took."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
