"""Streaming per-layer statistics over a traced forward, and the sample-based measures.

Shapes: B batch, T positions, C width, L blocks, S = L + 1 residual states (x_0 enters block 0,
x_L leaves the last block), N non-padding tokens of a batch.

Everything in :class:`StreamStats` and :class:`RemovalSums` is a running sum updated batch by
batch, so memory does not grow with the number of tokens. The measures that need a token sample
(effective rank, prompt entropy, curvature, intrinsic dimension, anisotropy) keep the first
``sample_tokens`` tokens in :class:`TokenSample` and are computed once at the end. Which metric
reads what is declared in the metric registry (``metrics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluate import mean_pooled

# The most float32 values a streaming reduction makes at once (a chunk of tokens of every state, or of the logits):
# 2^22 values, 16 MiB, whatever the batch, width, depth or vocabulary.
CHUNK_VALUES = 1 << 22


def angular(cos: torch.Tensor) -> torch.Tensor:
    """arccos(cos)/pi in [0, 1] (Gromov et al., 2024)."""
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last non-padding token of each row (right or left padding)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, -1).amax(dim=1)


def predicting_rows(mask: torch.Tensor, vocab: int) -> Iterator[torch.Tensor]:
    """The positions of a (B, T) batch whose token and next token are both real (t predicts t + 1), as row indices
    b * T + t of the batch flattened to (B * T, ...), in row-major order, in chunks of at most :data:`CHUNK_VALUES`
    // ``vocab`` rows: a chunk's float32 logits take at most 16 MiB. Row r's label is row r + 1's token."""
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:, :-1] = mask[:, 1:].bool() & mask[:, :-1].bool()
    rows = valid.reshape(-1).nonzero().squeeze(1)
    step = max(CHUNK_VALUES // max(vocab, 1), 1)
    for start in range(0, int(rows.numel()), step):
        yield rows[start:start + step]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B * T, ...) view of a (B, T, ...) tensor."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def chunked_loss_sum(read: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor, vocab: int) -> tuple[float, int]:
    """(sum of next-token cross-entropy, number of predictions) of the logits ``read(hidden[b, t])`` over the
    real tokens of a (B, T) batch, as :func:`layerlab.evaluate.masked_loss_sum` of the whole (B, T, V) logits
    gives it, computed a chunk of rows at a time (:func:`predicting_rows`)."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    n = 0
    h, y = _flat(hidden), labels.reshape(-1)
    for rows in predicting_rows(mask, vocab):
        total += F.cross_entropy(read(h.index_select(0, rows)).float(), y[rows + 1], reduction="sum").double()
        n += int(rows.numel())
    return float(total), n


@dataclass(frozen=True)
class StreamBatch:
    """One traced batch as a metric's own running sum (``Metric.sums``) sees it."""

    states: torch.Tensor  # (S, B, T, C) float32: x_0..x_L
    tokens: torch.Tensor  # (S, N, C): the non-padding tokens of each state
    mask: torch.Tensor  # (B, T) bool: the real tokens
    attn: list  # L attention outputs (B, T, C), None where a block has none
    mlp: list  # L MLP outputs (B, T, C)
    mids: list  # L streams entering the MLP (B, T, C)


class StreamStats:
    """Running sums of every streaming measure, for one model.

    ``sums`` adds running sums of the registered metrics: each maps a :class:`StreamBatch` to an (S,) or (L,)
    sum over the batch's tokens, and :meth:`results` gives its mean over all tokens under the same name.
    """

    def __init__(self, num_layers: int, sums: Mapping[str, Callable[[StreamBatch], torch.Tensor]] | None = None):
        L = num_layers
        S = L + 1
        self.L = L
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.tokens = 0
        self.sequences = 0
        self.ang_sum = z(S, S)  # all-token angular distance between states i and j
        self.ang_last_sum = z(S, S)  # last-token angular distance
        self.cos_next_sum = z(L)  # cos(x_l, x_l+1), all tokens
        self.rel_sum = z(L)  # ||x_l+1 - x_l|| / ||x_l||
        self.attn_rel_sum, self.attn_cos_sum = z(L), z(L)
        self.mlp_rel_sum, self.mlp_cos_sum = z(L), z(L)
        self.elems = 0  # tokens * C, for RMS and variance
        self.sum_x, self.sum_x2 = z(S), z(S)
        # max |.| over the non-padding tokens at each hook point; None where a block lacks the part, or the
        # model a final norm
        self.max_resid = z(S)
        self.max_attn: list[float | None] = [None] * L
        self.max_mlp: list[float | None] = [None] * L
        self.max_gate: list[float | None] = [None] * L
        self.max_final: float | None = None
        self.lens_ce_sum, self.lens_kl_sum = z(L), z(L)
        self.lens_tokens = 0
        self.loss_sum = 0.0
        self.sums = dict(sums or {})
        self.extra: dict[str, torch.Tensor] = {}  # the running sums of ``sums``, by name

    @torch.no_grad()
    def update(self, states: list[torch.Tensor], attn: list, mlp: list, mids: list, mask: torch.Tensor,
               gates: list | None = None, final: torch.Tensor | None = None) -> None:
        """Fold one batch in. ``states`` are x_0..x_L (B, T, C); ``mask`` (B, T) marks real tokens.

        ``attn``, ``mlp`` and ``mids`` are per block (B, T, C) or None (see :class:`StreamBatch`); ``gates`` per
        block the (B, T) max |.| of each token's MLP gate (:func:`layerlab.analysis.analyze.trace_gates`), None
        where a block has no MLP; ``final`` (B, T, C) the final norm's output. Every max |.| is taken over the
        real tokens only. The work runs on the states' device; only the reduced sums come back to the CPU, in
        one transfer.

        This is :meth:`begin`, :meth:`update_block` for every block and :meth:`finish`; the streaming pass calls
        those three itself, reducing each block's sublayer outputs as the block returns, so that they need not
        all be held at once.
        """
        self.begin(mask)
        for i in range(self.L):
            self.update_block(i, states[i], attn[i], mlp[i], mids[i], gates[i] if gates is not None else None)
        self.finish(states, final, attn=attn, mlp=mlp, mids=mids)

    def begin(self, mask: torch.Tensor) -> None:
        """Start a batch whose real tokens ``mask`` (B, T) marks."""
        m = mask.bool()
        flat = m.reshape(-1)
        self._mask = m
        self._idx = None if bool(flat.all()) else flat.nonzero().squeeze(1)  # the real tokens' rows of (B*T, ...)
        self._n = int(flat.sum())
        self._sub: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # per block entry: (|p|/|x| sum, cos sum, i)
        self._tops: list[torch.Tensor] = []  # every max |.| of the blocks, in the order of ``_slots``
        self._slots: list[tuple[str, int]] = []

    def _rows(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, ...) float32: the real tokens ``start:stop`` of ``x`` (B, T, ...), in order (a view, without a copy,
        when the batch has no padding and ``x`` is float32)."""
        B, T = self._mask.shape
        x = x.reshape(B * T, *x.shape[2:])
        x = x[start:stop] if self._idx is None else x.index_select(0, self._idx[start:stop])
        return x.float()

    @torch.no_grad()
    def update_block(self, i: int, inp: torch.Tensor | None, attn: torch.Tensor | None, mlp: torch.Tensor | None,
                     mid: torch.Tensor | None, gate: torch.Tensor | None = None) -> None:
        """Fold in block ``i`` of the batch :meth:`begin` started: the attention output ``attn`` against the
        block's input ``inp``, the MLP output ``mlp`` against the stream ``mid`` it starts from (|part| / |input|
        and cos(part, input) per token, each part's max |.|), and the gate's max (any may be None). What it
        keeps are 0-dim tensors on the batch's device, brought to the CPU by :meth:`finish`."""
        N = self._n
        for name, part, x in (("attn", attn, inp), ("mlp", mlp, mid)):
            if part is None:
                continue
            p = self._rows(part)  # (N, C)
            if N:
                self._tops.append(_max_abs(p))
                self._slots.append((f"max_{name}", i))
            if x is None:
                continue
            x = self._rows(x)
            pn = torch.linalg.vector_norm(p, dim=-1)
            xn = torch.linalg.vector_norm(x, dim=-1)
            # cos(p, x) from the norms already taken (F.cosine_similarity's formula, eps 1e-8 on the product,
            # without its second pass over both tensors)
            cos = torch.linalg.vecdot(p, x) / (pn * xn).clamp_min(1e-8)
            self._sub.append(((pn / xn.clamp_min(1e-12)).sum(), cos.sum(), name, i))
        if gate is not None and N:
            self._tops.append(_max_abs(self._rows(gate)))
            self._slots.append(("max_gate", i))

    @torch.no_grad()
    def finish(self, states: list[torch.Tensor], final: torch.Tensor | None = None, *, attn: list | None = None,
               mlp: list | None = None, mids: list | None = None) -> None:
        """Fold in the residual states x_0..x_L of the batch :meth:`begin` started (after its blocks), and the
        final norm's output ``final``; ``attn``, ``mlp`` and ``mids`` are read only by registered ``sums``.

        The states are read a chunk of tokens at a time (at most :data:`CHUNK_VALUES` float32 values of all
        states together), so no float32 copy of all L + 1 states of the batch exists at once. Within a chunk,
        the cosine of every pair of states comes from one batched product of the normalised states, and a
        state's norms serve its angular distances and its relative change."""
        m = self._mask
        B, T = m.shape
        N, S, C = self._n, len(states), int(states[0].shape[-1])
        dev = states[0].device
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)  # noqa: E731
        ang, cos_next, rel, sum_x, sum_x2 = z(S, S), z(S - 1), z(S - 1), z(S), z(S)
        top = torch.full((S,), -math.inf, dtype=torch.float64, device=dev)
        step = max(CHUNK_VALUES // max(S * C, 1), 1)
        for start in range(0, N, step):
            Xn = torch.stack([self._rows(s, start, start + step) for s in states])  # (S, n, C)
            norms = torch.linalg.vector_norm(Xn, dim=-1)  # (S, n)
            U = Xn / norms.clamp_min(1e-12).unsqueeze(-1)  # F.normalize's formula
            # all pairwise cosines between states, per token: (n, S, S), one batched product
            ang += angular(torch.bmm(U.transpose(0, 1), U.permute(1, 2, 0))).sum(0)
            # cos(x_l, x_l+1) as an elementwise product: 1 - cos is small, and the product's own rounding keeps it
            # as it was (the matmul's first off-diagonal differs by ~1e-7 of cos)
            cos_next += (U[:-1] * U[1:]).sum(-1).sum(-1)
            del U
            rel += (torch.linalg.vector_norm(Xn[1:] - Xn[:-1], dim=-1) / norms[:-1].clamp_min(1e-12)).sum(-1)
            sum_x += Xn.sum(dim=(1, 2))
            sum_x2 += norms.square().sum(-1)
            flat = Xn.reshape(S, -1)  # amax and amin: torch.aminmax over a dim is ~20x slower on the CPU
            top = torch.maximum(top, torch.maximum(flat.amax(dim=1), -flat.amin(dim=1)).double())
        if not N:
            top.zero_()
        last = last_token_index(m)  # (B,)
        rows_b = torch.arange(B, device=m.device)
        Ul = F.normalize(torch.stack([s[rows_b, last] for s in states]).float(), dim=-1)  # (S, B, C)
        ang_last = angular(torch.einsum("sbc,tbc->stb", Ul, Ul)).sum(-1)
        tops = list(self._tops)
        slots = list(self._slots)
        if final is not None and N:
            tops.append(_max_abs(self._rows(final)))
            slots.append(("max_final", -1))
        sub = self._sub
        # one transfer of everything reduced, in float64
        parts = [ang.reshape(-1), ang_last.reshape(-1), cos_next, rel, sum_x, sum_x2, top,
                 *(torch.stack(x) for x in ([e[0] for e in sub], [e[1] for e in sub], tops) if x)]
        sizes = [p.numel() for p in parts]
        out = torch.cat([p.double() for p in parts]).cpu().split(sizes)
        self.ang_sum += out[0].view(S, S)
        self.ang_last_sum += out[1].view(S, S)
        self.cos_next_sum += out[2]
        self.rel_sum += out[3]
        self.sum_x += out[4]
        self.sum_x2 += out[5]
        self.max_resid = torch.maximum(self.max_resid, out[6])
        k = 7
        if sub:
            accs = {"attn": (self.attn_rel_sum, self.attn_cos_sum), "mlp": (self.mlp_rel_sum, self.mlp_cos_sum)}
            for (_, _, name, i), r, c in zip(sub, out[k].tolist(), out[k + 1].tolist(), strict=True):
                accs[name][0][i] += r
                accs[name][1][i] += c
            k += 2
        for (name, i), value in zip(slots, out[k].tolist() if tops else [], strict=True):
            if name == "max_final":
                self.max_final = value if self.max_final is None else max(self.max_final, value)
            else:
                store = getattr(self, name)
                store[i] = value if store[i] is None else max(store[i], value)
        if self.sums:
            X = torch.stack([s.float() for s in states])  # (S, B, T, C)
            Xn = torch.stack([self._rows(s) for s in states])  # (S, N, C)
            batch = StreamBatch(X, Xn, m, list(attn or [None] * self.L), list(mlp or [None] * self.L),
                                list(mids or [None] * self.L))
            for name, fn in self.sums.items():
                total = fn(batch).double().cpu()
                self.extra[name] = self.extra[name] + total if name in self.extra else total
        self.elems += N * C
        self.tokens += N
        self.sequences += B

    @torch.no_grad()
    def update_lens(self, states: list[torch.Tensor], read: Callable, logits: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor) -> None:
        """Logit lens: CE of each block's output read through ``read`` (final norm + head), and KL
        to the model's own prediction ``logits`` (which is ``read`` of the last state). ``read`` sees only the
        predicting positions' states (it acts on each token alone), a chunk of rows at a time
        (:func:`predicting_rows`), so no logits of padding or of the last position are made, and the float32
        logits in memory are a few chunks' whatever the vocabulary and the batch."""
        dev = logits.device
        ce = torch.zeros(self.L + 1, dtype=torch.float64, device=dev)  # the last entry: the model's own loss
        kl = torch.zeros(self.L, dtype=torch.float64, device=dev)
        n = 0
        flat = [_flat(x) for x in states[1:]]
        z, labels = _flat(logits), labels.reshape(-1)
        for rows in predicting_rows(mask, logits.shape[-1]):
            y = labels[rows + 1]
            final = F.log_softmax(z.index_select(0, rows).float(), dim=-1)  # (n, V)
            p_final = final.exp()
            for i, x in enumerate(flat):
                logp = final if i == self.L - 1 else F.log_softmax(read(x.index_select(0, rows)).float(), dim=-1)
                ce[i] += F.nll_loss(logp, y, reduction="sum").double()
                kl[i] += (p_final * (final - logp)).sum().double()
            ce[self.L] += F.nll_loss(final, y, reduction="sum").double()
            n += int(y.numel())
        out = torch.cat([ce, kl]).cpu()
        self.lens_ce_sum += out[: self.L]
        self.loss_sum += float(out[self.L])
        self.lens_kl_sum += out[self.L + 1:]
        self.lens_tokens += n

    def results(self) -> dict:
        """Means of everything accumulated, as plain Python numbers."""
        n = max(self.tokens, 1)
        mean = self.sum_x / max(self.elems, 1)
        var = self.sum_x2 / max(self.elems, 1) - mean**2
        rms = (self.sum_x2 / max(self.elems, 1)).sqrt()
        ang = (self.ang_sum / n).tolist()
        ang_last = (self.ang_last_sum / max(self.sequences, 1)).tolist()
        S = self.L + 1
        upper = lambda M: [[M[i][j] if j >= i else None for j in range(S)] for i in range(S)]  # noqa: E731
        lens_n = max(self.lens_tokens, 1)
        return {
            "ang": upper(ang), "ang_last": upper(ang_last),
            "block_influence": (1 - self.cos_next_sum / n).tolist(),
            "relative_contribution": (self.rel_sum / n).tolist(),
            "attn_relative_contribution": (self.attn_rel_sum / n).tolist(),
            "attn_cosine": (self.attn_cos_sum / n).tolist(),
            "mlp_relative_contribution": (self.mlp_rel_sum / n).tolist(),
            "mlp_cosine": (self.mlp_cos_sum / n).tolist(),
            "rms": rms.tolist(), "var": var.tolist(),
            "max_resid": self.max_resid.tolist(), "max_attn": list(self.max_attn), "max_mlp": list(self.max_mlp),
            "max_gate": list(self.max_gate), "max_final": self.max_final,
            "lens_ce": (self.lens_ce_sum / lens_n).tolist() if self.lens_tokens else None,
            "lens_kl": (self.lens_kl_sum / lens_n).tolist() if self.lens_tokens else None,
            "loss": self.loss_sum / lens_n if self.lens_tokens else None,
            "tokens": self.tokens, "sequences": self.sequences,
            **{name: (total / n).tolist() for name, total in self.extra.items()},
        }


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    """max |x| (a 0-dim tensor) from its max and min, without an |x| copy; NaN if x holds one."""
    return torch.maximum(x.amax(), -x.amin())


_pooled = mean_pooled  # (B, C) mean of ``hidden`` (B, T, C) over the real tokens of each row


def output_loss_terms(causal: bool, out, input_ids: torch.Tensor, mask: torch.Tensor,
                      reference: torch.Tensor | None = None) -> tuple[float, int]:
    """(sum, count) of what a forward's output ``out`` measures, as layer removal measures it (:class:`RemovalSums`):
    for a causal LM the next-token cross-entropy of its logits over the predicting tokens; for an encoder
    1 - cos between its mean-pooled last hidden state and ``reference`` (B, C), the unaltered model's, per
    sequence. The analysis sections that alter the model (interventions, MoEfication) read their losses here."""
    if causal:
        return chunked_loss_sum(lambda x: x, out.logits, input_ids, mask, out.logits.shape[-1])
    pooled = _pooled(out.last_hidden_state, mask).float()
    return float((1 - F.cosine_similarity(pooled, reference.float())).sum()), int(mask.shape[0])


class RemovalSums:
    """Per block, how much the output changes when that block is skipped, over the first ``limit`` tokens:
    the loss increase (nats/token) for causal LMs, 1 - cos of the mean-pooled output for encoders
    (Gromov et al., 2024; Men et al., 2024, ShortGPT).

    One pass over the blocks serves every removal: within :meth:`streams`, each block j, right after its own
    forward and with the arguments it was called with (masks, rotary tables, ALiBi), also runs on every
    skip-stream s_i (i < j), the residual stream of the model with block i removed, and then starts s_j as its
    own input passed through. After the last block each s_i is read through the final norm and the head. That
    is L(L-1)/2 block forwards per batch, as many as replaying the traced prefix per skipped block, and every
    block is used while it is loaded, so an offloaded model (:mod:`layerlab.offload`) reads each block once.
    Extra memory: L streams of the removal batch, (L, B, T, C) in the model's dtype.
    """

    def __init__(self, num_layers: int, limit: int, causal: bool):
        self.sums = torch.zeros(num_layers, dtype=torch.float64)
        self.limit, self.causal = limit, causal
        self.seen = 0  # tokens measured so far
        self.norm = 0  # what the sums are divided by: predicted tokens (causal) or sequences (encoders)
        self.full = 0.0  # the unskipped model's loss sum (causal)
        self._streams: list[torch.Tensor] = []

    @property
    def active(self) -> bool:
        """Whether the next batch is measured (fewer than ``limit`` tokens were)."""
        return self.seen < self.limit

    @contextmanager
    def streams(self, view) -> Iterator[None]:
        """Advance the skip-streams through each block during the forwards in the block (a no-op once ``limit``
        tokens were measured). The hooks run first among a block's forward hooks, while its weights are there."""
        self._streams = []
        if not self.active:
            yield
            return
        handles = [b.module.register_forward_hook(self._advance, with_kwargs=True, prepend=True)
                   for b in view.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _advance(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        with _observers_off(module):
            for i, s in enumerate(self._streams):
                if args:
                    out = module.forward(s, *args[1:], **kwargs)
                else:
                    out = module.forward(**{**kwargs, "hidden_states": s})
                self._streams[i] = out[0] if isinstance(out, (tuple, list)) else out
        self._streams.append(x.detach())  # s_j: block j removed, its input passes through

    @torch.no_grad()
    def update(self, view, out, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold in the batch whose forward ran within :meth:`streams`; ``out`` is that forward's output."""
        streams, self._streams = self._streams, []
        if not self.active:
            return
        if len(streams) != len(self.sums):
            raise RuntimeError(f"layer removal saw {len(streams)} of {len(self.sums)} blocks run")
        if self.causal:
            vocab = out.logits.shape[-1]
            full, n = chunked_loss_sum(lambda x: x, out.logits, input_ids, mask, vocab)
            self.full += full
        else:
            base, n = _pooled(out.last_hidden_state, mask), int(mask.shape[0])
        for i, s in enumerate(streams):
            streams[i] = None  # each stream is freed once read
            if self.causal:
                self.sums[i] += chunked_loss_sum(view.logits_from_hidden, s, input_ids, mask, vocab)[0]
            else:
                last = view.final_norm(s) if view.final_norm is not None else s
                self.sums[i] += float((1 - F.cosine_similarity(_pooled(last, mask), base)).sum())
        self.seen += int(mask.sum())
        self.norm += n

    def results(self) -> list[float]:
        """The mean change per block."""
        shift = self.full if self.causal else 0.0
        return ((self.sums - shift) / max(self.norm, 1)).tolist()


@contextmanager
def _observers_off(block: torch.nn.Module) -> Iterator[None]:
    """Silence the forward hooks inside ``block`` (a trace's, the MLP gates') while it runs a skip-stream: they
    observe the model's own forward, and a skip-stream must not overwrite what they recorded."""
    saved = []
    for m in block.modules():
        if m is block:
            continue
        for attr in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(m, attr)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.update(items)


class TokenSample:
    """The first ``size`` non-padding tokens of each state, and the first ``max_sequences`` whole sequences for
    per-prompt measures, kept on the CPU in the states' dtype (a bf16 model's sample is bf16).

    Both come from the start of the stream in order, so the tokens are the sequences' tokens followed by those
    of later rows, each token stored once: ``seqs[i]`` holds the sequences, ``rows[i]`` the tokens after them."""

    def __init__(self, num_states: int, size: int, max_sequences: int):
        self.size, self.max_sequences = size, max_sequences
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(num_states)]
        self.seqs: list[list[torch.Tensor]] = [[] for _ in range(num_states)]
        self.count = 0  # sample tokens kept: min(size, tokens seen)

    @torch.no_grad()
    def update(self, states: list[torch.Tensor], mask: torch.Tensor) -> None:
        m = mask.bool()
        for b in range(m.shape[0]):
            as_sequence = len(self.seqs[0]) < self.max_sequences
            if not as_sequence and self.count >= self.size:
                break
            n = int(m[b].sum())
            for i, s in enumerate(states):
                x = s[b][m[b]]
                if as_sequence:
                    self.seqs[i].append(x.cpu())
                else:
                    self.rows[i].append(x[: self.size - self.count].cpu())
            self.count = min(self.size, self.count + n)

    def matrix(self, i: int) -> torch.Tensor:
        """(N, C) float32: the first ``size`` sampled tokens of state ``i``."""
        parts = self.seqs[i] + self.rows[i]
        return torch.cat(parts)[: self.size].float() if parts else torch.zeros(0, 0)

    def sequences(self, i: int) -> list[torch.Tensor]:
        """The sampled sequences of state ``i``, each (T, C) float32."""
        return [x.float() for x in self.seqs[i]]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small LAPACK decompositions on one thread.

    Measured here (2 cores, another process busy): a 256x256 ``eigvalsh`` took 1.7 s with
    torch's two threads and 5.5 ms with one; the multithreaded path spins against any other load.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def effective_rank(Z: torch.Tensor) -> float:
    """exp(Shannon entropy of the normalised singular values) (Roy & Vetterli, 2007).

    Exactly k for a matrix with k equal non-zero singular values.
    """
    s = torch.linalg.svdvals(Z.double())
    s = s[s > s.max() * 1e-12] if s.numel() else s
    if s.numel() == 0:
        return float("nan")
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def prompt_entropy(Z: torch.Tensor) -> float:
    """Matrix-based (von Neumann, alpha = 1) entropy of one prompt's token Gram matrix Z Z^T / tr,
    divided by its maximum log(min(T, C)) so that 1 means fully spread (Skean et al., 2025).

    That is -sum p_i log p_i with p_i = s_i^2 / sum s^2 over the singular values s of the (T, C) matrix Z,
    uncentred, as the paper defines it; alpha = 1 and the log(min(N, D)) ("maxEntropy") normalisation are
    the defaults of the paper's code (OFSkean/information_flow, ``compute_entropy``), which also clamps the
    Gram matrix's negative entries to 0 before the eigendecomposition; that step is not the paper's
    definition and is not done here."""
    Z = Z.double()
    if Z.shape[0] < 2:
        return float("nan")
    # Z Z^T and Z^T Z share their non-zero eigenvalues: the smaller one is decomposed (a 256-token prompt of a
    # 128-wide model: 128 x 128)
    eig = torch.linalg.eigvalsh(Z @ Z.T if Z.shape[0] <= Z.shape[1] else Z.T @ Z).clamp_min(0)
    p = eig / eig.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(min(Z.shape)))


def curvature(Z: torch.Tensor) -> float:
    """Mean angle (radians) between successive steps z_k+1 - z_k of a prompt's trajectory
    (Hosseini & Fedorenko, 2023; Skean et al., 2025)."""
    v = Z[1:] - Z[:-1]
    if v.shape[0] < 2:
        return float("nan")
    cos = F.cosine_similarity(v[1:], v[:-1], dim=-1)
    return float(torch.arccos(cos.clamp(-1, 1)).mean())


def anisotropy(Z: torch.Tensor) -> float:
    """Mean cosine similarity between distinct tokens (Ethayarajh, 2019)."""
    n = Z.shape[0]
    if n < 2:
        return float("nan")
    U = F.normalize(Z.double(), dim=-1)
    # the sum of the Gram matrix U U^T without forming it: sum_ij u_i.u_j = |sum_i u_i|^2, its trace sum_i |u_i|^2
    total = U.sum(0)
    return float((total @ total - (U * U).sum()) / (n * (n - 1)))


# TwoNN's heuristic: the largest 10% of the ratios r2/r1 are left out of the fit (Facco et al., 2017; the default
# of scikit-dimension's TwoNN, ``discard_fraction=0.1``, which the tests use as the reference)
TWONN_DISCARD = 0.1


def distinct_rows(X: np.ndarray) -> np.ndarray:
    """The rows of a float array that differ from every earlier row, in their order (0.0 and -0.0 count as equal):
    the rows ``np.unique(X, axis=0)`` keeps, without its lexicographic sort (3.4 ms against 1.0 ms for 1024 x 256
    float64 rows, measured here)."""
    X = X + 0.0  # -0.0 + 0.0 is 0.0: equal rows get equal bytes
    first: dict[bytes, int] = {}
    keep = [i for i, row in enumerate(map(bytes, X)) if first.setdefault(row, i) == i]
    return X if len(keep) == len(X) else X[keep]


# two_nearest's block of points: 256 x 256 float64 squared distances (512 KiB) stay in a core's cache
NEIGHBOUR_BLOCK = 256


def two_nearest(Y: torch.Tensor, block: int = NEIGHBOUR_BLOCK) -> torch.Tensor:
    """(n, 2): the squared distances from each row of ``Y`` (n, C) to its nearest and second-nearest other row,
    ascending; each is |x|^2 + |y|^2 - 2 x.y clipped at 0.

    The distance matrix is made a block of points against a block at a time, and only the blocks on and above
    its diagonal: block (a, b) gives the candidates of block a's points along its rows and those of block b's
    along its columns, and each point keeps the two smallest of its candidates. That is 10 of the 16 block
    products for 1024 points, and no n x n matrix: 8.5 ms against 18.5 ms for the whole matrix and its ``topk``
    (1024 x 256 float64, one thread, measured here). The values equal the whole matrix's up to the last bit of
    x.y, which one product may round differently from its transpose."""
    n = Y.shape[0]
    sq = (Y * Y).sum(1)
    starts = range(0, n, block)
    found: list[list[torch.Tensor]] = [[] for _ in starts]
    for a, s in enumerate(starts):
        for b in range(a, len(starts)):
            e = starts[b]
            d2 = torch.add(sq[s:s + block, None], sq[None, e:e + block])
            d2 = d2.sub_(Y[s:s + block] @ Y[e:e + block].T, alpha=2).clamp_min_(0)
            if a == b:
                d2.fill_diagonal_(math.inf)  # a point is not its own neighbour
            k = min(2, d2.shape[1])
            found[a].append(d2.topk(k, dim=1, largest=False).values)
            if a != b:
                found[b].append(d2.topk(min(2, d2.shape[0]), dim=0, largest=False).values.T)
    near = [torch.cat(f, 1) for f in found]
    return torch.cat([f.topk(2, dim=1, largest=False).values for f in near]) if near else Y.new_zeros(0, 2)


def intrinsic_dimension(Z: torch.Tensor) -> float:
    """TwoNN intrinsic dimension (Facco et al., 2017, "Estimating the intrinsic dimension of datasets by a minimal
    neighborhood information").

    The ratios mu = r2 / r1 of each point's second to first nearest-neighbour distance follow a Pareto law with
    shape d, so -log(1 - F(mu)) = d log mu: d is the slope of the least-squares line through the origin of
    -log(1 - F_emp(mu)) against log mu, over the smallest (1 - :data:`TWONN_DISCARD`) of the N ratios, with
    F_emp(mu_(i)) = i / N. The distances are squared distances |x|^2 + |y|^2 - 2 x.y in float64, clipped at 0,
    the two nearest found block by block (:func:`two_nearest`); points that coincide are counted once, and a
    ratio with r1 = 0 is dropped. Written here rather than called from scikit-dimension, whose import (numba)
    took 1.6 s and 232 MiB of resident memory, a tenth of a 1.1B checkpoint's analysis peak;
    ``tests/test_analysis_speed_equivalence.py`` checks it against scikit-dimension's ``TwoNN`` to 1e-9."""
    X = distinct_rows(Z.double().numpy())  # TwoNN needs distinct points
    if X.shape[0] < 10:
        return float("nan")
    r = two_nearest(torch.from_numpy(X)).sqrt_().numpy()  # (n, 2): r1 <= r2
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = r[:, 1] / r[:, 0]
    mu = mu[np.isfinite(mu)]
    n = len(mu)
    keep = int(n * (1 - TWONN_DISCARD))
    if keep < 2:
        return float("nan")
    x = np.log(np.sort(mu)[:keep])
    y = -np.log(1 - np.arange(1, keep + 1) / n)
    xx = float(x @ x)
    return float(x @ y) / xx if xx > 0 else float("nan")
