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

from ..evaluate import masked_loss_sum


def angular(cos: torch.Tensor) -> torch.Tensor:
    """arccos(cos)/pi in [0, 1] (Gromov et al., 2024)."""
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last non-padding token of each row (right or left padding)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, -1).amax(dim=1)


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
        real tokens only. The work runs on the states' device; only the reduced sums come back to the CPU.
        """
        m = mask.bool()
        X = torch.stack([s.float() for s in states])  # (S, B, T, C)
        C = X.shape[-1]
        Xn = X[:, m]  # (S, N, C): non-padding tokens only
        N = Xn.shape[1]
        U = F.normalize(Xn, dim=-1)
        # all pairwise cosines between states, per token: (S, S, N) -> angular distances summed over tokens
        self.ang_sum += angular(torch.einsum("snc,tnc->stn", U, U)).sum(-1).double().cpu()
        last = last_token_index(mask)  # (B,)
        Ul = F.normalize(X[:, torch.arange(X.shape[1]), last], dim=-1)  # (S, B, C)
        self.ang_last_sum += angular(torch.einsum("sbc,tbc->stb", Ul, Ul)).sum(-1).double().cpu()
        self.cos_next_sum += (U[:-1] * U[1:]).sum(-1).sum(-1).double().cpu()
        norms = Xn.norm(dim=-1).clamp_min(1e-12)  # (S, N)
        self.rel_sum += ((Xn[1:] - Xn[:-1]).norm(dim=-1) / norms[:-1]).sum(-1).double().cpu()
        for i in range(self.L):
            for part, inp, rel, cos in ((attn[i], states[i], self.attn_rel_sum, self.attn_cos_sum),
                                        (mlp[i], mids[i], self.mlp_rel_sum, self.mlp_cos_sum)):
                if part is None or inp is None:
                    continue
                p, x = part.float()[m], inp.float()[m]  # (N, C)
                rel[i] += float((p.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
                cos[i] += float(F.cosine_similarity(p, x, dim=-1).sum())
            self.max_attn[i] = _running_max(self.max_attn[i], attn[i], m)
            self.max_mlp[i] = _running_max(self.max_mlp[i], mlp[i], m)
            self.max_gate[i] = _running_max(self.max_gate[i], gates[i] if gates is not None else None, m)
        self.max_final = _running_max(self.max_final, final, m)
        self.sum_x += Xn.sum(dim=(1, 2)).double().cpu()
        self.sum_x2 += Xn.pow(2).sum(dim=(1, 2)).double().cpu()
        self.max_resid = torch.maximum(self.max_resid, Xn.abs().amax(dim=(1, 2)).double().cpu())
        if self.sums:
            batch = StreamBatch(X, Xn, m, attn, mlp, mids)
            for name, fn in self.sums.items():
                total = fn(batch).double().cpu()
                self.extra[name] = self.extra[name] + total if name in self.extra else total
        self.elems += N * C
        self.tokens += N
        self.sequences += int(m.shape[0])

    @torch.no_grad()
    def update_lens(self, states: list[torch.Tensor], read: Callable, logits: torch.Tensor, labels: torch.Tensor,
                    mask: torch.Tensor) -> None:
        """Logit lens: CE of each block's output read through ``read`` (final norm + head), and KL
        to the model's own prediction ``logits`` (which is ``read`` of the last state). One layer's
        logits exist at a time, so a large vocabulary fits."""
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()  # position t predicts t+1
        y = labels[:, 1:][valid]
        final = F.log_softmax(logits[:, :-1][valid].float(), dim=-1)  # (N, V)
        p_final = final.exp()
        for i, s in enumerate(states[1:]):
            logp = final if i == self.L - 1 else F.log_softmax(read(s)[:, :-1][valid].float(), dim=-1)
            self.lens_ce_sum[i] += float(F.nll_loss(logp, y, reduction="sum"))
            self.lens_kl_sum[i] += float((p_final * (final - logp)).sum())
        self.loss_sum += float(F.nll_loss(final, y, reduction="sum"))
        self.lens_tokens += int(y.numel())

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


def _running_max(current: float | None, x: torch.Tensor | None, mask: torch.Tensor) -> float | None:
    """The larger of ``current`` and max |x| over the real tokens (``x`` (B, T, ...) and ``mask`` (B, T));
    None while neither exists (a block without that part)."""
    if x is None or not bool(mask.any()):
        return current
    top = float(x[mask].abs().amax())
    return top if current is None else max(current, top)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C) mean of ``hidden`` (B, T, C) over the real tokens of each row."""
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


class RemovalSums:
    """Per block, how much the output changes when that block is skipped, over the first ``limit`` tokens:
    the loss increase (nats/token) for causal LMs, 1 - cos of the mean-pooled output for encoders.

    One extra forward per block and batch, each replaying the traced prefix before the skipped block.
    """

    def __init__(self, num_layers: int, limit: int, causal: bool):
        self.sums = torch.zeros(num_layers, dtype=torch.float64)
        self.limit, self.causal = limit, causal
        self.seen = 0  # tokens measured so far
        self.norm = 0  # what the sums are divided by: predicted tokens (causal) or sequences (encoders)
        self.full = 0.0  # the unskipped model's loss sum (causal)

    @torch.no_grad()
    def update(self, view, trace, out, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Fold one batch in, while fewer than ``limit`` tokens were measured; ``out`` is the traced forward's."""
        if self.seen >= self.limit:
            return
        if self.causal:
            full, n = masked_loss_sum(out.logits, input_ids, mask)
            self.full += full
        else:
            base, n = _pooled(out.last_hidden_state, mask), int(mask.shape[0])
        for i in range(len(self.sums)):
            with view.skip(i, replay=trace):
                o = view.forward(input_ids, mask)
            if self.causal:
                self.sums[i] += masked_loss_sum(o.logits, input_ids, mask)[0]
            else:
                self.sums[i] += float((1 - F.cosine_similarity(_pooled(o.last_hidden_state, mask), base)).sum())
        self.seen += int(mask.sum())
        self.norm += n

    def results(self) -> list[float]:
        """The mean change per block."""
        shift = self.full if self.causal else 0.0
        return ((self.sums - shift) / max(self.norm, 1)).tolist()


class TokenSample:
    """The first ``size`` non-padding tokens of each state, and whole sequences for per-prompt measures."""

    def __init__(self, num_states: int, size: int, max_sequences: int):
        self.size, self.max_sequences = size, max_sequences
        self.rows: list[list[torch.Tensor]] = [[] for _ in range(num_states)]
        self.seqs: list[list[torch.Tensor]] = [[] for _ in range(num_states)]
        self.count = 0

    @torch.no_grad()
    def update(self, states: list[torch.Tensor], mask: torch.Tensor) -> None:
        m = mask.bool()
        if self.count < self.size:
            take = self.size - self.count
            for i, s in enumerate(states):
                self.rows[i].append(s.float()[m][:take].cpu())
            self.count += min(take, int(m.sum()))
        if len(self.seqs[0]) < self.max_sequences:
            for b in range(m.shape[0]):
                if len(self.seqs[0]) >= self.max_sequences:
                    break
                for i, s in enumerate(states):
                    self.seqs[i].append(s[b][m[b]].float().cpu())

    def matrix(self, i: int) -> torch.Tensor:
        return torch.cat(self.rows[i]) if self.rows[i] else torch.zeros(0, 0)


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
    eig = torch.linalg.eigvalsh(Z @ Z.T).clamp_min(0)
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
    G = U @ U.T
    return float((G.sum() - G.diagonal().sum()) / (n * (n - 1)))


def intrinsic_dimension(Z: torch.Tensor) -> float:
    """TwoNN intrinsic dimension (Facco et al., 2017) through scikit-dimension."""
    import skdim  # slow to import (numba): only when asked

    X = Z.double().numpy()
    X = np.unique(X, axis=0)  # TwoNN needs distinct points
    if X.shape[0] < 10:
        return float("nan")
    try:
        return float(skdim.id.TwoNN().fit(X).dimension_)
    except (ValueError, FloatingPointError):
        return float("nan")
