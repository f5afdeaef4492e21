"""Trained lenses and an early-exit estimate: the ``--lenses`` analysis section.

Per block l = 0..L-1 (h_l the residual stream leaving block l; h_L below is the last block's output, h_{L-1} in
this indexing, which the model's final norm and head read), three readings of h_l through the model's own final
norm and unembedding (:meth:`LayerView.logits_from_hidden`):

- the **logit lens**: h_l itself (nostalgebraist, 2020; what the analysis pass reports as ``lens_kl``);
- the **linear shortcut** (Din et al., 2023, "Jump to Conclusions"): A_l h_l, with A_l the least-squares map from
  h_l to h_L, no bias, as the paper fits it (A_l = argmin sum ||A h_l - h_L||^2 over the fit tokens). It is
  solved in float64 from the normal equations (H^T H) A^T = H^T Y; only where H^T H is not positive definite (a
  stream confined to a subspace) is a ridge added, 1e-10 of its mean diagonal, raised tenfold until the Cholesky
  factorisation succeeds;
- the **tuned lens** (Belrose et al., 2023): an affine translator h + A_l h + b_l, A_l and b_l initialised to zero
  (the logit lens), trained to minimise KL(final || lens) at the same position. The optimizer is the public
  tuned-lens code's default (AlignmentResearch/tuned-lens, ``scripts/ingredients.py`` and ``train_loop.py``): SGD
  with Nesterov momentum 0.9, learning rate 1.0 x (1 - 0.9), weight decay 1e-3, a linear decay to zero, the gradient
  norm clipped to 1 over all translators, 250 steps. Scaled to a CPU: each step reads :data:`STEP_TOKENS` fit
  tokens drawn at random (seeded by ``--seed``) instead of the paper's 2^18, and ``--lens-steps`` sets the steps.
  The public code's re-centring of the translators after each step (``normalize_``) is left out. The fit
  tokens' states are held in memory: L x N x C float32 values (12 blocks x 3,686 tokens x 128: 23 MB).

The last block's lenses are the identity: all three are then the model itself (KL 0, top-1 agreement 1).

**Split.** The tokens the pass measured are cut in two: the first 90% fit the lenses, the last 10% (at least one
full window of ``seq_len``; the fit part too, or a one-line error) evaluate them. On the held-out tokens, per block
and lens: the KL from the final distribution, the cross-entropy against the next token, and the top-1 agreement
with the final prediction, over the positions that predict a real next token
(:func:`~layerlab.analysis.stats.predicting_rows`, as the pass's logit lens).

**Early exit** (LayerSkip, Elhoushi et al., 2024): a self-speculative draft from the first E = l + 1 blocks reads
the stream with the model's own final norm and head, which is the logit lens; its top-1 agreement a with the full
model is the chance that a greedy draft token is accepted. With acceptance i.i.d. per token, a draft of d tokens
yields (1 - a^(d+1)) / (1 - a) tokens per verification, and the expected walltime improvement is
(1 - a^(d+1)) / ((1 - a)(d c + 1)) with c = E / L the cost of a draft step against a full step (Leviathan et al.,
2023, "Fast Inference from Transformers via Speculative Decoding", Theorem 3.8 and Eq. 1). Per exit block the draft
length d in 1..:data:`MAX_DRAFT` that maximises it is reported with it. The formula counts verification as a full
forward; LayerSkip's reuse of the draft's cache would raise it a little. The same estimate from the tuned lens's
agreement is reported too (its translator costs a C x C product per token more, not counted).

Fitted lenses are saved as ``lenses.safetensors`` (:func:`lens_tensors`) and read back with ``--lenses-from``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LayerlabError
from ..registry import SECTIONS
from .sections import Section, SectionContext, SectionOutput
from .stats import CHUNK_VALUES, _flat, predicting_rows

FIT_SHARE = 0.9  # the first 90% of the tokens fit the lenses, the rest evaluate them
# the tuned lens's optimizer (AlignmentResearch/tuned-lens defaults: Optimizer and Train in scripts/)
TUNED_STEPS = 250
TUNED_LR = 1.0  # lr_scale; SGD's step is lr * (1 - momentum), which the public code found best at 1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3
CLIP = 1.0
STEP_TOKENS = 512  # fit tokens per step (the paper: 2^18 on GPUs)
MAX_DRAFT = 16  # the longest draft the early-exit estimate considers
LENS_KINDS = ("logit", "linear", "tuned")
KEYS = ("logit_kl", "linear_kl", "tuned_kl", "logit_ce", "linear_ce", "tuned_ce", "logit_top1", "linear_top1",
        "tuned_top1", "early_exit_accept", "early_exit_draft", "early_exit_tokens_per_draft", "early_exit_speedup",
        "tuned_early_exit_speedup")


@dataclass
class FittedLenses:
    """Per block l: the linear shortcut's matrix (C, C) and the tuned lens's full affine map W h + b, W = I + A."""

    linear: list[torch.Tensor]
    tuned_weight: list[torch.Tensor]
    tuned_bias: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.linear)

    @property
    def width(self) -> int:
        return int(self.linear[0].shape[0])

    def apply(self, kind: str, i: int, h: torch.Tensor) -> torch.Tensor:
        """The ``kind`` lens's stream at block ``i``: (N, C) -> (N, C), in float32."""
        h = h.float()
        if kind == "linear":
            return h @ self.linear[i].T
        if kind == "tuned":
            return h @ self.tuned_weight[i].T + self.tuned_bias[i]
        return h


def lens_tensors(lenses: FittedLenses) -> dict[str, torch.Tensor]:
    """The safetensors of fitted lenses: ``linear.{i}.weight``, ``tuned.{i}.weight`` (the full map, I + A) and
    ``tuned.{i}.bias`` per block, with ``hidden_size`` and ``num_layers`` as one-element int64 tensors."""
    out: dict[str, torch.Tensor] = {"hidden_size": torch.tensor([lenses.width]),
                                    "num_layers": torch.tensor([lenses.num_layers])}
    for i in range(lenses.num_layers):
        out[f"linear.{i}.weight"] = lenses.linear[i].float().cpu()
        out[f"tuned.{i}.weight"] = lenses.tuned_weight[i].float().cpu()
        out[f"tuned.{i}.bias"] = lenses.tuned_bias[i].float().cpu()
    return out


def lens_file(path: str | Path, name: str | None = None) -> Path:
    """The lenses file ``--lenses-from`` names: the file itself, or in a report directory the model's own
    (``lenses-<name>.safetensors``, as a report of several models names them) or else ``lenses.safetensors``."""
    from .analyze import artifact_slug

    path = Path(path)
    if path.is_dir():
        own = path / f"lenses-{artifact_slug(name)}.safetensors" if name else None
        path = own if own is not None and own.is_file() else path / "lenses.safetensors"
    if not path.is_file():
        raise LayerlabError(f"--lenses-from: no lenses file at {path}")
    if path.suffix != ".safetensors":
        raise LayerlabError(f"--lenses-from reads a .safetensors file (or a report directory), got {path.name}")
    return path


def check_lens_source(path: str | Path) -> None:
    """Refuse, in one line, a ``--lenses-from`` that is neither a .safetensors file nor a directory holding one
    of lenses (before any model loads; :func:`lens_file` picks the model's own file later)."""
    path = Path(path)
    if path.is_dir() and any(path.glob("lenses*.safetensors")):
        return
    lens_file(path)


def load_lenses(path: str | Path, num_layers: int, width: int | None = None, name: str | None = None,
                device: torch.device | str = "cpu") -> FittedLenses:
    """Fitted lenses from ``path`` (see :func:`lens_file`), checked against the model's blocks and width (None:
    checked later, against the first states). safetensors only: nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = lens_file(path, name)
    try:
        t = load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise LayerlabError(f"--lenses-from: {path} is not a readable safetensors file ({e})") from None
    if "num_layers" not in t or "hidden_size" not in t:
        raise LayerlabError(f"--lenses-from: {path} holds no lenses (no num_layers / hidden_size tensors)")
    n, c = int(t["num_layers"].reshape(-1)[0]), int(t["hidden_size"].reshape(-1)[0])
    if n != num_layers or (width is not None and c != width):
        raise LayerlabError(f"--lenses-from: {path.name} was fitted on {n} blocks of width {c}; this model has "
                            f"{num_layers} blocks" + (f" of width {width}" if width is not None else ""))
    try:
        lenses = FittedLenses([t[f"linear.{i}.weight"].float() for i in range(n)],
                              [t[f"tuned.{i}.weight"].float() for i in range(n)],
                              [t[f"tuned.{i}.bias"].float() for i in range(n)])
    except KeyError as e:
        raise LayerlabError(f"--lenses-from: {path.name} lacks the tensor {e.args[0]}") from None
    if any(w.shape != (c, c) for w in lenses.linear + lenses.tuned_weight) or any(
            b.shape != (c,) for b in lenses.tuned_bias):
        raise LayerlabError(f"--lenses-from: {path.name} holds maps of another shape than ({c}, {c})")
    return lenses


def split_tokens(ctx: SectionContext) -> tuple[list[int], list[int]]:
    """(fit ids, held-out ids): the first 90% of the pass's tokens and the rest, the held-out part at least one
    window of ``seq_len`` tokens, and the fit part too."""
    n = min(ctx.tokens, len(ctx.ids))
    held = max(math.ceil(n * (1 - FIT_SHARE)), ctx.seq_len)
    if n - held < ctx.seq_len:
        raise LayerlabError(f"--lenses needs at least {2 * ctx.seq_len} tokens (a window of {ctx.seq_len} to fit "
                            f"on and one held out), got {n}; raise --tokens or lower --seq-len")
    return ctx.ids[: n - held], ctx.ids[n - held: n]


@torch.no_grad()
def block_states(ctx: SectionContext, ids: list[int]) -> list[torch.Tensor]:
    """Per block l, h_l at every real token of ``ids`` in the pass's windows: L tensors (N, C), float32."""
    view = ctx.view
    out: list[list[torch.Tensor]] = [[] for _ in range(view.num_layers)]
    with view.trace(sublayers=False) as t:
        for input_ids, mask in ctx.batches(ids, len(ids)):
            view.forward(input_ids, mask)
            keep = mask.reshape(-1).bool()
            for i in range(view.num_layers):
                out[i].append(_flat(t.resid_out[i])[keep].float())
    return [torch.cat(x) for x in out]


def fit_linear(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A (C, C) minimising ||h A^T - y||^2 (Din et al., 2023: no bias), from the float64 normal equations; a ridge
    of 1e-10 x the mean diagonal, raised tenfold at a time, only where H^T H is not positive definite."""
    h, y = h.double(), y.double()
    gram, cross = h.T @ h, h.T @ y  # (C, C) each
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = float(gram.diagonal().mean().clamp_min(1e-300))
    ridge = 0.0
    while True:
        factor, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            break
        ridge = 1e-10 * scale if ridge == 0 else ridge * 10
    return torch.cholesky_solve(cross, factor).T.float()  # (C_out, C_in)


def _read(view, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities of the model's final norm and head on the (N, C) stream ``h``."""
    return F.log_softmax(view.logits_from_hidden(h.to(dtype)).float(), dim=-1)


def train_tuned(view, states: list[torch.Tensor], steps: int, seed: int, dtype: torch.dtype,
                progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tuned lens's translators (I + A_l, b_l) for blocks 0..L-2, trained on the fit states (see the module
    docstring for the optimizer); the last block's is the identity.

    All translators are one (L-1, C, C) weight and one (L-1, C) bias, read a group of blocks and rows at a time
    whose float32 logits hold at most :data:`CHUNK_VALUES` values; the loss is the sum over blocks of the mean KL,
    as the public code sums each layer's loss into one backward."""
    L, n = len(states), int(states[0].shape[0])
    C, device = int(states[0].shape[1]), states[0].device
    weight = torch.zeros(L - 1, C, C, device=device, requires_grad=True)  # A_l
    bias = torch.zeros(L - 1, C, device=device, requires_grad=True)  # b_l
    eye = torch.eye(C, device=device)
    if L > 1 and steps > 0:
        opt = torch.optim.SGD([weight, bias], lr=TUNED_LR * (1 - MOMENTUM), momentum=MOMENTUM, nesterov=True,
                              weight_decay=WEIGHT_DECAY)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        gen = torch.Generator().manual_seed(seed)
        batch = min(STEP_TOKENS, n)
        vocab = _vocab(view)
        rows_per = min(batch, max(CHUNK_VALUES // vocab, 1))
        blocks_per = max(1, min(L - 1, CHUNK_VALUES // (vocab * rows_per)))
        stacked = torch.stack(states[:-1])  # (L-1, N, C)
        bar = _bar(steps, "tuned lens", progress)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randperm(n, generator=gen)[:batch].to(device)
                gw, gb = torch.zeros_like(weight), torch.zeros_like(bias)
                for start in range(0, batch, rows_per):
                    rows = idx[start:start + rows_per]
                    with torch.no_grad():
                        target = _read(view, states[L - 1].index_select(0, rows), dtype)  # (R, V)
                        p_target = target.exp()
                    for b0 in range(0, L - 1, blocks_per):
                        b1 = min(b0 + blocks_per, L - 1)
                        h = stacked[b0:b1].index_select(1, rows)  # (G, R, C)
                        z = h + torch.baddbmm(bias[b0:b1, None, :], h, weight[b0:b1].transpose(1, 2))
                        logp = _read(view, z, dtype)  # (G, R, V)
                        kl = (p_target * (target - logp)).sum(-1).sum() / batch
                        dw, db = torch.autograd.grad(kl, [weight, bias])
                        gw += dw
                        gb += db
                weight.grad, bias.grad = gw, gb
                torch.nn.utils.clip_grad_norm_([weight, bias], CLIP)
                opt.step()
                sched.step()
                bar.update(1)
        bar.close()
    tuned_w = [eye + w for w in weight.detach()] + [eye.clone()]
    tuned_b = list(bias.detach()) + [torch.zeros(C, device=device)]
    return tuned_w, tuned_b


def _vocab(view) -> int:
    unembed = view.unembed
    weight = getattr(unembed, "weight", None)
    return int(weight.shape[0]) if weight is not None else 1 << 16


def _bar(total: int, desc: str, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not on, leave=False)


def fit_lenses(ctx: SectionContext, ids: list[int], steps: int) -> FittedLenses:
    """The linear shortcut and the tuned lens of every block, fitted on ``ids``."""
    states = block_states(ctx, ids)
    L, C = len(states), int(states[0].shape[1])
    if states[0].shape[0] < 2:
        raise LayerlabError("--lenses: the fit split holds fewer than 2 tokens")
    eye = torch.eye(C, device=states[0].device)
    linear = [fit_linear(states[i], states[L - 1]) for i in range(L - 1)] + [eye]
    tuned_w, tuned_b = train_tuned(ctx.view, states, steps, ctx.seed, _dtype(ctx.view), ctx.progress)
    return FittedLenses(linear, tuned_w, tuned_b)


def _dtype(view) -> torch.dtype:
    return next(view.model.parameters()).dtype


@torch.no_grad()
def evaluate_lenses(ctx: SectionContext, ids: list[int], lenses: FittedLenses) -> dict[str, np.ndarray]:
    """Per lens kind and block, on ``ids``: mean KL(final || lens), mean cross-entropy against the next token, and
    the share of positions whose top-1 token is the final one; over the positions that predict a real token."""
    view, dtype, L = ctx.view, _dtype(ctx.view), ctx.view.num_layers
    sums = {f"{k}_{m}": torch.zeros(L, dtype=torch.float64) for k in LENS_KINDS for m in ("kl", "ce", "top1")}
    n = 0
    with view.trace(sublayers=False) as t:
        for input_ids, mask in ctx.batches(ids, len(ids)):
            view.forward(input_ids, mask)
            states = [_flat(t.resid_out[i]) for i in range(L)]
            if states[0].shape[-1] != lenses.width:
                raise LayerlabError(f"--lenses-from: the lenses were fitted on width {lenses.width}; this model's "
                                    f"is {states[0].shape[-1]}")
            labels = input_ids.reshape(-1)
            vocab = _vocab(view)
            for rows in predicting_rows(mask, vocab):
                y = labels[rows + 1]
                final = _read(view, states[L - 1].index_select(0, rows), dtype)
                p_final, top = final.exp(), final.argmax(-1)
                for i in range(L):
                    h = states[i].index_select(0, rows)
                    for kind in LENS_KINDS:
                        logp = final if i == L - 1 else _read(view, lenses.apply(kind, i, h), dtype)
                        sums[f"{kind}_kl"][i] += float((p_final * (final - logp)).sum())
                        sums[f"{kind}_ce"][i] += float(F.nll_loss(logp, y, reduction="sum"))
                        sums[f"{kind}_top1"][i] += float((logp.argmax(-1) == top).sum())
                n += int(rows.numel())
    if n == 0:
        raise LayerlabError("--lenses: the held-out split predicts no token")
    return {k: (v / n).numpy() for k, v in sums.items()}


def speculative_speedup(accept: float, cost: float, draft: int) -> float:
    """Expected walltime improvement of speculative decoding with acceptance rate ``accept`` (i.i.d. per token),
    draft length ``draft`` and a draft step costing ``cost`` of a full step: (1 - a^(d+1)) / ((1 - a)(d c + 1))
    (Leviathan et al., 2023, Theorem 3.8)."""
    return tokens_per_draft(accept, draft) / (draft * cost + 1)


def tokens_per_draft(accept: float, draft: int) -> float:
    """Expected tokens one verification yields from a draft of ``draft`` tokens: (1 - a^(d+1)) / (1 - a), which is
    d + 1 at a = 1 (Leviathan et al., 2023, Eq. 1)."""
    if accept >= 1.0:
        return float(draft + 1)
    return (1 - accept ** (draft + 1)) / (1 - accept)


def best_draft(accept: float, cost: float) -> int:
    """The draft length in 1..MAX_DRAFT with the highest :func:`speculative_speedup` (the shortest among equals)."""
    speed = [speculative_speedup(accept, cost, d) for d in range(1, MAX_DRAFT + 1)]
    return 1 + int(np.argmax(speed))


def lens_rows(metrics: dict[str, np.ndarray]) -> list[dict]:
    """The report's per-block entries of ``lenses`` from the evaluated metrics, with the early-exit estimate."""
    L = len(metrics["logit_kl"])
    rows = []
    for i in range(L):
        row = {"block": i, **{k: float(metrics[k][i]) for k in metrics}}
        cost = (i + 1) / L  # the draft runs blocks 0..i of L
        a = row["logit_top1"]
        d = best_draft(a, cost)
        row.update(early_exit_accept=a, early_exit_draft=d, early_exit_tokens_per_draft=tokens_per_draft(a, d),
                   early_exit_speedup=speculative_speedup(a, cost, d))
        a_tuned = row["tuned_top1"]
        row["tuned_early_exit_speedup"] = speculative_speedup(a_tuned, cost, best_draft(a_tuned, cost))
        rows.append({"block": i, **{k: row[k] for k in KEYS}})
    return rows


@SECTIONS.register("lenses")
class Lenses(Section):
    name = "lenses"
    keys = ("lenses",)
    title = "Trained lenses and early exit"
    doc = ("logit lens, linear shortcut (Din et al., 2023) and tuned lens (Belrose et al., 2023) per block, fitted "
           "on the first 90% of the tokens and evaluated on the rest, with the early-exit speedup (LayerSkip)")
    needs_lm_head = True

    def run(self, ctx: SectionContext) -> SectionOutput:
        fit_ids, held_ids = split_tokens(ctx)
        source = ctx.option("from")
        if source is not None:
            lenses = load_lenses(source, ctx.view.num_layers, name=ctx.name, device=ctx.device)
        else:
            steps = int(ctx.option("steps", TUNED_STEPS))
            if steps < 0:
                raise LayerlabError(f"--lens-steps must be at least 0, got {steps}")
            lenses = fit_lenses(ctx, fit_ids, steps)
        metrics = evaluate_lenses(ctx, held_ids, lenses)
        return SectionOutput({"lenses": lens_rows(metrics)}, artifacts={"lenses": lens_tensors(lenses)})

    def html(self, page, models, names, colors) -> None:
        styles = {"logit": ("-", "logit lens"), "linear": ("--", "linear shortcut"), "tuned": (":", "tuned lens")}
        page.add("<p>Each block's residual stream read through the model's final norm and head: as it is (logit "
                 "lens), through a least-squares map to the last block's stream (linear shortcut, Din et al., 2023), "
                 "and through a trained affine translator (tuned lens, Belrose et al., 2023). Fitted on the first "
                 "90% of the tokens, measured on the held-out rest.</p>")
        depth = max(len(m["lenses"]) for m in models)
        for key, title, ylabel, log in (
                ("kl", "KL from the final distribution (held-out)", "KL (nats)", True),
                ("top1", "Top-1 agreement with the final prediction (held-out)", "agreement", False)):
            fig = page.new_figure(6.5, 3.4)
            ax = fig.subplots()
            for model, color in zip(models, colors):
                x = [r["block"] for r in model["lenses"]]
                for kind, (style, _) in styles.items():
                    y = np.array([r[f"{kind}_{key}"] for r in model["lenses"]], dtype=float)
                    if log:
                        y[y <= 0] = np.nan
                    ax.plot(x, y, style, color=color, lw=1.6, marker="o", ms=3)
            _finish(page, ax, ylabel, depth, styles, names, colors)
            if log:
                ax.set_yscale("log")
                page.readable_log_ticks(ax)
            alt = f"{title} against block, for the logit lens, the linear shortcut and the tuned lens"
            caption = ("The last block reads the model itself (KL 0, agreement 1); the log axis leaves it out."
                       if log else "Share of held-out positions where the lens's top token is the model's.")
            page.figure(title, fig, alt, caption)
        fig = page.new_figure(6.5, 3.4)
        ax = fig.subplots()
        for model, color in zip(models, colors):
            x = [r["block"] for r in model["lenses"]]
            ax.plot(x, [r["early_exit_speedup"] for r in model["lenses"]], "-", color=color, lw=1.6, marker="o",
                    ms=3)
            ax.plot(x, [r["tuned_early_exit_speedup"] for r in model["lenses"]], ":", color=color, lw=1.6,
                    marker="o", ms=3)
        ax.axhline(1.0, color="0.55", lw=0.8, zorder=0)
        _finish(page, ax, "speedup (x)", depth,
                {"logit": ("-", "draft with the model's head"), "tuned": (":", "draft with the tuned lens")}, names,
                colors, xlabel="exit block E (drafts from blocks 0..E)")
        page.figure("Early exit: implied speedup by exit block", fig,
                    "implied self-speculative decoding speedup against exit block",
                    "Leviathan et al. (2023): (1 - a^(d+1)) / ((1 - a)(d c + 1)), a the held-out top-1 agreement at "
                    "the exit block, c = (E + 1) / L, d the best draft length in 1..16. Above 1: drafting from the "
                    "first blocks would pay.")
        rows = []
        for model, name in zip(models, names):
            best = max(model["lenses"], key=lambda r: r["early_exit_speedup"])
            rows.append(f"<tr><td>{page.esc(name)}</td><td>{best['block']}</td>"
                        f"<td>{best['early_exit_accept']:.3f}</td><td>{best['early_exit_draft']}</td>"
                        f"<td>{best['early_exit_tokens_per_draft']:.2f}</td>"
                        f"<td>{best['early_exit_speedup']:.2f}</td></tr>")
        page.add("<div class=\"scroll\"><table class=\"numbers\"><thead><tr><th>model</th><th>best exit block</th>"
                 "<th>acceptance</th><th>draft length</th><th>tokens per draft</th><th>speedup</th></tr></thead>"
                 "<tbody>" + "".join(rows) + "</tbody></table></div>")


def _finish(page, ax, ylabel, depth, styles, names, colors, xlabel="block") -> None:
    """Labels, grid, integer block ticks (at most ~16), and one legend: the line styles (lenses) and, for several
    models, their colours, in the look of :func:`layerlab.report.plots.family_figure`'s panels."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.25", ls=style, lw=1.6) for style, _ in styles.values()]
    labels = [label for _, label in styles.values()]
    if len(names) > 1:
        handles += [Line2D([], [], color=c, lw=2.5) for c in colors]
        labels += [page.mpl_text(n) for n in names]
    ax.legend(handles, labels, fontsize=7.5, framealpha=0.85)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, lw=0.6)
    page.block_ticks(ax, depth, False, set())
