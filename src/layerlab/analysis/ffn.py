"""FFN anatomy (``--ffn``): each block's MLP read as key-value memories, and carved into experts.

Key-value memories (Geva et al., 2021, "Transformer Feed-Forward Layers Are Key-Value Memories"): an MLP computes
FFN(x) = sum_i a_i(x) v_i, where key k_i is row i of the input projection, value v_i column i of the output
projection and a_i(x) = act(x . k_i) the memory coefficient (for a gated MLP, the gated product
act(x . g_i) * (x . u_i), the key being the gate row; :meth:`layerlab.adapters.LayerView.ffn`). Per block, for the
``top`` keys of highest mean coefficient over the tokens: their trigger contexts (the prefixes where the coefficient
is largest), the top tokens of their value projected through the output embedding E v_i (the paper projects the
value with the output embedding matrix directly, without the final norm, and so does this), and the agreement
rate: the share of (key, trigger context) pairs where the value's top token is the context's next token. The paper
finds it rises with depth. An encoder has no next-token head: its values are read through the input embedding
matrix (BERT's MLM decoder is tied to it), and agreement compares with the token at the trigger position.

MoEfication (Zhang et al., 2022) and training-free carving (CMoE, Pei et al., 2025): the F neurons of each MLP are
split into k = ``experts`` equal-size experts by balanced k-means on the key vectors (parameter clustering), and
each token keeps only its top-e experts (the other neurons' coefficients set to zero by a forward pre-hook on the
output projection: one MLP at a time, the rest dense, nothing copied), chosen by an oracle router (the experts
holding the most |a| for that token) or by MoEfication's centroid router (score = x . mean key of the expert +
mean key bias, the expert's mean pre-activation). CMoE first makes the neurons most often among a token's
strongest its shared experts: k // 8 of them (at least one where k >= 2), as CMoE's released configuration,
2 shared of 16 experts; a neuron counts as active on a token where it is among the F / k largest |a| there, an
expert's worth (CMoE marks a fixed top-K). The other neurons form k - shared balanced clusters routed by their
centroids; at a budget of e experts a token uses the shared ones and its top e - shared routed ones. The loss is
the next-token loss (nats/token) for causal models and, for encoders, the removal-effect measure of the analysis
pass (:class:`layerlab.analysis.stats.RemovalSums`): 1 - cos of the mean-pooled output against the dense model's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from html import escape

import torch
import torch.nn.functional as F

from ..errors import LayerlabError
from ..registry import SECTIONS
from .sections import Section, SectionContext, SectionOutput
from .stats import _pooled, output_loss_terms

TOP_CONTEXTS = 10  # trigger contexts kept per key (Geva et al. read the top 25 of far more text)
PREFIX_TOKENS = 12  # tokens of a trigger context shown, ending at the trigger token
VALUE_TOKENS = 5  # top tokens of a value's projection
MASS = 0.9  # the activation mass the sparsity figure covers
FRACTIONS = (0.125, 0.25, 0.5)  # e / k, the experts each token keeps
KMEANS_ITERS = 20
# tokens of the MoEfication losses: each block, router and budget is one forward of the blocks from that one on
# (those before it replay the dense forward), as --removal-tokens bounds the removal measurement
MOE_TOKENS = 2048
ROUTERS = ("oracle", "centroid", "cmoe")


def balanced_kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """(n,) cluster of each row of ``x`` (n, d): k clusters of equal size (n // k, the first n % k one larger),
    by k-means whose assignment step fills each cluster to its capacity (MoEfication's balanced k-means,
    Zhang et al., 2022; Malinen & Franti, 2014). Seeded: the initial centroids are k rows drawn with ``seed``.

    Assignment: every unassigned row proposes to its nearest cluster it has not proposed to yet; each cluster
    accepts the closest proposers up to its remaining capacity. A rejected row was rejected by a cluster that is
    then full, so after k rounds every row has a cluster (the capacities sum to n)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise LayerlabError(f"--ffn-experts must be between 1 and the MLP's {n} neurons, got {k}")
    x = x.float()
    cap0 = torch.full((k,), n // k, dtype=torch.long)
    cap0[: n % k] += 1
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    sq = x.square().sum(1, keepdim=True)
    for _ in range(iters):
        dist = sq - 2 * x @ centroids.t() + centroids.square().sum(1)  # (n, k) squared distances
        pref = dist.argsort(dim=1)
        new = torch.full((n,), -1, dtype=torch.long)
        cap = cap0.clone()
        for r in range(k):
            free = (new < 0).nonzero().squeeze(1)
            if not free.numel():
                break
            choice = pref[free, r]
            for c in range(k):
                rows = free[choice == c]
                if rows.numel() and cap[c] > 0:
                    take = rows[dist[rows, c].argsort()[: int(cap[c])]]
                    new[take] = c
                    cap[c] -= take.numel()
        if torch.equal(new, assign):
            break
        assign = new
        onehot = F.one_hot(assign, k).float()  # (n, k)
        centroids = (onehot.t() @ x) / onehot.sum(0)[:, None]
    return assign


def experts_kept(k: int, fraction: float) -> int:
    """e: the experts a token keeps at ``fraction`` = e / k (at least one)."""
    return max(1, round(k * fraction))


def mass_fraction(a: torch.Tensor, mass: float = MASS) -> torch.Tensor:
    """(rows,) the fraction of the F neurons needed to cover ``mass`` of each row's total |activation| (rows, F),
    the largest first; 0 for a row whose activations are all zero."""
    s = a.abs().float().sort(dim=1, descending=True).values.cumsum(1)
    total = s[:, -1:]
    need = (s < mass * total).sum(1) + 1
    return torch.where(total.squeeze(1) > 0, need.float() / a.shape[1], torch.zeros_like(need, dtype=torch.float))


class _Carving:
    """One block's experts: ``assign`` (F,) the MoEfication expert of each neuron, the CMoE split (``shared``
    (F,) bool, ``routed`` (F,) the routed expert, -1 for shared), and each router's centroids and biases."""

    def __init__(self, ffn, k: int, rates: torch.Tensor, seed: int):
        keys = ffn.keys.float()
        F_ = keys.shape[0]
        bias = ffn.key_bias.float() if ffn.key_bias is not None else torch.zeros(F_, device=keys.device)
        self.k = k
        self.assign = balanced_kmeans(keys.cpu(), k, seed).to(keys.device)
        self.onehot = F.one_hot(self.assign, k).float()  # (F, k)
        size = self.onehot.sum(0)
        self.centroids = (self.onehot.t() @ keys) / size[:, None]  # (k, C)
        self.cbias = (self.onehot.t() @ bias) / size
        self.n_shared = k // 8 if k >= 8 else (1 if k >= 2 else 0)
        shared_n = self.n_shared * (F_ // k)
        self.shared = torch.zeros(F_, dtype=torch.bool, device=keys.device)
        if shared_n:
            self.shared[rates.to(keys.device).topk(shared_n).indices] = True
        rest = (~self.shared).nonzero().squeeze(1)
        kr = k - self.n_shared
        self.routed = torch.full((F_,), -1, dtype=torch.long, device=keys.device)
        self.routed[rest] = balanced_kmeans(keys[rest].cpu(), kr, seed).to(keys.device)
        self.r_onehot = F.one_hot(self.routed[rest], kr).float()
        self.rest = rest
        rsize = self.r_onehot.sum(0)
        self.r_centroids = (self.r_onehot.t() @ keys[rest]) / rsize[:, None]
        self.r_bias = (self.r_onehot.t() @ bias[rest]) / rsize

    def mask(self, router: str, e: int, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(rows, F) 0/1 mask of the neurons each row of ``a`` (rows, F) keeps; ``x`` (rows, C) the MLP's input."""
        if router == "oracle":  # the experts holding most of the row's |activation|
            keep = _top(a.abs().float() @ self.onehot, e)
            return keep[:, self.assign]
        if router == "centroid":
            keep = _top(x.float() @ self.centroids.t() + self.cbias, e)
            return keep[:, self.assign]
        m = self.shared.float().expand(a.shape[0], -1).clone()
        er = min(e - self.n_shared, self.k - self.n_shared)
        if er > 0:
            keep = _top(x.float() @ self.r_centroids.t() + self.r_bias, er)  # (rows, k - shared)
            m[:, self.rest] = keep[:, self.routed[self.rest]]
        return m


def _top(scores: torch.Tensor, e: int) -> torch.Tensor:
    """(rows, k) 0/1: each row's ``e`` highest scores."""
    return torch.zeros_like(scores).scatter_(1, scores.topk(e, dim=1).indices, 1.0)


class _Observer:
    """One pass's running figures of one block's hidden activation a (rows, F): per-neuron sums, the running
    top-:data:`TOP_CONTEXTS` coefficients and their token positions, the 90%-mass fraction, CMoE's activity."""

    def __init__(self, F_: int, k: int, device):
        self.sum = torch.zeros(F_, dtype=torch.float64, device=device)
        self.rows = 0
        self.top_val = torch.full((0, F_), -math.inf, device=device)
        self.top_pos = torch.zeros((0, F_), dtype=torch.long, device=device)
        self.mass = 0.0
        self.active = torch.zeros(F_, dtype=torch.float64, device=device)
        self.k_active = max(1, F_ // k)

    def update(self, a: torch.Tensor, real: torch.Tensor, cand: torch.Tensor, offset: int) -> None:
        """``a`` (B*T, F) flat; ``real`` the flat indices of the real tokens, ``cand`` those a trigger may be."""
        ar = a.index_select(0, real).float()
        self.sum += ar.sum(0).double()
        self.rows += ar.shape[0]
        self.mass += float(mass_fraction(ar).sum())
        top = ar.abs().topk(min(self.k_active, ar.shape[1]), dim=1).indices
        self.active += torch.zeros_like(ar).scatter_(1, top, 1.0).sum(0).double()
        ac = a.index_select(0, cand).float()
        vals = torch.cat([self.top_val, ac])
        pos = torch.cat([self.top_pos, (cand + offset)[:, None].expand_as(ac)])
        best = vals.topk(min(TOP_CONTEXTS, vals.shape[0]), dim=0)
        self.top_val, self.top_pos = best.values, pos.gather(0, best.indices)


def _real_and_candidates(mask: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the real tokens and of the trigger candidates (causal: those with a real next token)."""
    real = mask.reshape(-1).bool().nonzero().squeeze(1)
    if not causal:
        return real, real
    nxt = torch.zeros_like(mask, dtype=torch.bool)
    nxt[:, :-1] = mask[:, 1:].bool() & mask[:, :-1].bool()
    return real, nxt.reshape(-1).nonzero().squeeze(1)


def _observe(ctx: SectionContext, ffns: dict, k: int):
    """The streaming pass: one forward per batch, each block's hidden activation reduced by a pre-hook on its output
    projection as it is computed. Returns the observers and the (rows, T) token ids and mask of the batches."""
    v = ctx.view
    obs: dict[int, _Observer] = {}
    state: dict = {}
    handles = []

    def hook(i):
        def fn(module, args):
            a = args[0].detach()
            a = a.reshape(-1, a.shape[-1])
            if i not in obs:
                obs[i] = _Observer(a.shape[-1], k, a.device)
            obs[i].update(a, state["real"], state["cand"], state["offset"])

        return fn

    for i, f in ffns.items():
        handles.append(f.output.register_forward_pre_hook(hook(i)))
    ids, masks, offset = [], [], 0
    try:
        for input_ids, mask in ctx.batches():
            state.update(zip(("real", "cand"), _real_and_candidates(mask, v.causal), strict=True), offset=offset)
            v.forward(input_ids, mask)
            ids.append(input_ids.cpu())
            masks.append(mask.cpu())
            offset += input_ids.numel()
    finally:
        for h in handles:
            h.remove()
    return obs, torch.cat(ids), torch.cat(masks)


def _embedding(v) -> tuple[torch.Tensor, str]:
    """The matrix values are read through, and its name: the unembedding where there is a head (Geva et al.:
    the output embedding, no final norm), else the input embedding (tied to BERT's MLM decoder)."""
    if v.has_lm_head:
        return v.unembed.weight.detach(), "output embedding"
    return v.model.get_input_embeddings().weight.detach(), "input embedding"


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([int(t) for t in ids])


def memories(ctx: SectionContext, ffns: dict, obs: dict, ids: torch.Tensor, mask: torch.Tensor,
             top: int) -> list[dict | None]:
    """The report's ``ffn_memories``: per block, the ``top`` keys by mean coefficient with their trigger contexts,
    value tokens and agreement (see the module's docstring)."""
    v, tok = ctx.view, ctx.tokenizer
    E, through = _embedding(v)
    T = ids.shape[1]
    flat = ids.reshape(-1)
    causal = v.causal
    # how often each token occurs among the real tokens: the agreement a value whose top token is t would get
    # against contexts drawn at random
    freq = torch.bincount(flat[mask.reshape(-1).bool()], minlength=E.shape[0]).double()
    out: list[dict | None] = []
    for i in range(v.num_layers):
        if i not in ffns or i not in obs:
            out.append(None)
            continue
        o, f = obs[i], ffns[i]
        mean = o.sum / max(o.rows, 1)
        keys = mean.topk(min(top, mean.numel())).indices
        logits = f.values[keys.to(f.values.device)].to(E.dtype) @ E.t()  # (top, V): E v_i
        vt = logits.topk(VALUE_TOKENS, dim=1).indices.cpu()
        rows, hits, total, base = [], 0, 0, 0.0
        for j, key in enumerate(keys.tolist()):
            contexts, khits, ktotal = [], 0, 0
            for val, pos in zip(o.top_val[:, key].tolist(), o.top_pos[:, key].tolist(), strict=True):
                if not math.isfinite(val):
                    continue
                r, t = divmod(pos, T)
                target = int(ids[r, t + 1]) if causal else int(ids[r, t])
                khits += int(target == int(vt[j, 0]))
                ktotal += 1
                contexts.append({"prefix": _decode(tok, ids[r, max(0, t + 1 - PREFIX_TOKENS):t + 1].tolist()),
                                 "next": _decode(tok, [target]), "activation": val})
            hits, total = hits + khits, total + ktotal
            base += float(freq[int(vt[j, 0])] / max(float(freq.sum()), 1.0))
            rows.append({"key": key, "mean_activation": float(mean[key]),
                         "value_tokens": [_decode(tok, [t]) for t in vt[j].tolist()],
                         "agreement": khits / ktotal if ktotal else None, "contexts": contexts})
        out.append({"block": i, "neurons": int(mean.numel()), "gated": f.gated, "projected_through": through,
                    "compared_with": "next token" if causal else "trigger token",
                    "agreement": hits / total if total else None,
                    "agreement_baseline": base / len(rows) if rows else None, "keys": rows})
    return out


def moefy(v, ffn, carving: _Carving, router: str, e: int):
    """A context manager: block ``ffn``'s MLP keeps only each token's top-``e`` experts under ``router`` (forward
    pre-hooks: one records the MLP's input, the other masks the hidden activation the output projection reads)."""
    @contextmanager
    def cm():
        seen = {}

        def grab(module, args):
            seen["x"] = args[0]

        def apply(module, args):
            a = args[0]
            flat = a.reshape(-1, a.shape[-1])
            x = seen["x"].reshape(-1, seen["x"].shape[-1])
            m = carving.mask(router, e, flat, x).to(a.dtype)
            return ((flat * m).view_as(a), *args[1:])

        hs = [ffn.input.register_forward_pre_hook(grab), ffn.output.register_forward_pre_hook(apply)]
        try:
            yield
        finally:
            for h in hs:
                h.remove()

    return cm()


def moefication(ctx: SectionContext, ffns: dict, obs: dict, k: int) -> list[dict | None]:
    """The report's ``moefication``: per block, the 90%-mass fraction and the loss with each router and budget."""
    v = ctx.view
    carvings = {i: _Carving(f, k, obs[i].active, ctx.seed) for i, f in ffns.items() if i in obs}
    budgets = [experts_kept(k, fr) for fr in FRACTIONS]
    runs = [(i, r, e) for i in carvings for e in dict.fromkeys(budgets) for r in ROUTERS]
    sums = {key: 0.0 for key in runs}
    dense_sum, n = 0.0, 0
    for input_ids, mask in ctx.batches(tokens=min(ctx.tokens, MOE_TOKENS)):
        with v.trace(sublayers=False) as t:
            out = v.forward(input_ids, mask)
        pooled = None if v.causal else _pooled(out.last_hidden_state, mask)
        s, c = output_loss_terms(v.causal, out, input_ids, mask, pooled)
        dense_sum, n = dense_sum + s, n + c
        del out
        for i, r, e in runs:
            with v.replay_prefix(i, t), moefy(v, ffns[i], carvings[i], r, e):
                sums[(i, r, e)] += output_loss_terms(v.causal, v.forward(input_ids, mask), input_ids, mask, pooled)[0]
        del t
    dense = dense_sum / max(n, 1)
    result: list[dict | None] = []
    for i in range(v.num_layers):
        if i not in carvings:
            result.append(None)
            continue
        c, o = carvings[i], obs[i]
        losses = []
        for fr, e in zip(FRACTIONS, budgets, strict=True):
            entry = {"fraction": fr, "experts": e}
            for r in ROUTERS:
                entry[r] = sums[(i, r, e)] / max(n, 1)
                entry[f"{r}_delta"] = entry[r] - dense
            losses.append(entry)
        result.append({"block": i, "neurons": int(c.assign.numel()), "experts": k,
                       "expert_size": int(c.assign.numel()) // k, "shared_experts": c.n_shared,
                       "mass90_fraction": o.mass / max(o.rows, 1), "dense_loss": dense,
                       "loss": "next-token loss" if v.causal else "1 - cos of the pooled output", "losses": losses})
    return result


@SECTIONS.register("ffn")
class FFNAnatomy(Section):
    name = "ffn"
    keys = ("ffn_memories", "moefication",)
    title = "FFN anatomy"
    doc = ("FFN anatomy: key-value memories (Geva et al., 2021) and MoEfication with oracle, centroid and CMoE "
           "routers (Zhang et al., 2022; Pei et al., 2025)")

    def skip_reason(self, view) -> str | None:
        if not any(view.ffn(i) is not None for i in range(view.num_layers)):
            return f"ffn: no block of this {view.arch_name} model has a dense MLP the adapter can read"
        return None

    def run(self, ctx: SectionContext) -> SectionOutput:
        top, k = int(ctx.option("top", 8)), int(ctx.option("experts", 16))
        if top < 1:
            raise LayerlabError(f"--ffn-top must be at least 1, got {top}")
        v = ctx.view
        ffns = {i: f for i in range(v.num_layers) if (f := v.ffn(i)) is not None}
        outputs = [id(f.output) for f in ffns.values()]
        if len(set(outputs)) < len(outputs):  # a hook on a shared projection would see every block's call
            raise LayerlabError("--ffn reads each block's own MLP; this model runs one FFN in several blocks "
                                "(ffn_sharing), which it cannot tell apart")
        for f in ffns.values():  # refuse before any forward
            if not 1 <= k <= f.keys.shape[0]:
                raise LayerlabError(f"--ffn-experts must be between 1 and the MLP's {f.keys.shape[0]} neurons, "
                                    f"got {k}")
        obs, ids, mask = _observe(ctx, ffns, k)
        return SectionOutput({"ffn_memories": memories(ctx, ffns, obs, ids, mask, top),
                              "moefication": moefication(ctx, ffns, obs, k)})

    def html(self, page, models, names, colors) -> None:
        fig = _figure(page, models, names, colors)
        esc = page.esc
        if fig is not None:
            page.figure(None, fig, "FFN anatomy by block: key-value agreement, the share of neurons holding 90% "
                        "of the activation mass, and the loss with top-e experts",
                        "Left: agreement between a value's top token and the next token (encoders: the trigger "
                        "token) of its key's top trigger contexts, over the keys shown below (dotted: the rate a "
                        "random token would agree). Middle: the fraction of neurons covering 90% of each token's "
                        "|activation|. Right: the loss increase when each token keeps e of k experts in one MLP "
                        "(oracle, centroid and CMoE routers; one line per budget e/k).")
        for m, name in zip(models, names, strict=True):
            mem = m.get("ffn_memories") or []
            page.add(f"<h3>Key-value memories: {esc(name)}</h3>")
            for b in mem:
                if b is None:
                    continue
                agree = "n/a" if b["agreement"] is None else f"{b['agreement']:.2f}"
                rows = []
                for key in b["keys"]:
                    ctxs = "<br>".join(f"{_shown(c['prefix'])} &rarr; <b>{_shown(c['next'])}</b> "
                                       f"({c['activation']:.3g})"
                                       for c in key["contexts"][:3])
                    left = 'style="text-align:left"'
                    rows.append(f"<tr><td>{key['key']}</td><td>{key['mean_activation']:.3g}</td>"
                                f"<td {left}>{' | '.join(_shown(t) for t in key['value_tokens'])}</td>"
                                f"<td {left}>{ctxs}</td></tr>")
                page.add(f"<details><summary>block {b['block']}: agreement {agree} ({esc(b['compared_with'])}; "
                         f"values through the {esc(b['projected_through'])})</summary><div class=\"scroll\">"
                         "<table class=\"numbers\"><thead><tr><th>key</th><th>mean a</th><th>value's top tokens</th>"
                         "<th>top trigger contexts (&rarr; compared token, activation)</th></tr></thead><tbody>"
                         + "".join(rows) + "</tbody></table></div></details>")


def _shown(text: str) -> str:
    """Token text for the page, escaped, with its spaces and line breaks visible (a value's top token is often
    one of them)."""
    return escape(str(text), quote=True).replace(" ", "\u2423").replace("\n", "\u21b5")


def _figure(page, models, names, colors):
    """Agreement, the 90%-mass fraction and the MoEfication loss increase by block; None with nothing to draw."""
    from matplotlib.ticker import MaxNLocator


    drawn = [(m, n, c) for m, n, c in zip(models, names, colors, strict=True)
             if any(b is not None for b in (m.get("moefication") or []) + (m.get("ffn_memories") or []))]
    if not drawn:
        return None
    fig = page.new_figure(11.0, 4.2)  # the report's figure conventions (layerlab.report.plots)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    styles = {"oracle": "-", "centroid": "--", "cmoe": ":"}
    for m, name, color in drawn:
        mem = [b for b in m.get("ffn_memories") or [] if b is not None and b["agreement"] is not None]
        if mem:
            ax1.plot([b["block"] for b in mem], [b["agreement"] for b in mem], "o-", color=color,
                     label=page.mpl_text(name))
            ax1.plot([b["block"] for b in mem], [b["agreement_baseline"] for b in mem], ":", color=color)
        moe = [b for b in m.get("moefication") or [] if b is not None]
        if moe:
            blocks = [b["block"] for b in moe]
            ax2.plot(blocks, [b["mass90_fraction"] for b in moe], "o-", color=color, label=page.mpl_text(name))
            for j in range(len(moe[0]["losses"])):
                shade = f"C{j}" if len(drawn) == 1 else color
                for r, ls in styles.items():
                    e = moe[0]["losses"][j]
                    ax3.plot(blocks, [b["losses"][j][f"{r}_delta"] for b in moe], ls, color=shade,
                             label=f"{r} e/k={e['fraction']:g}" if len(drawn) == 1 else None)
    ax1.set(title="value-key agreement", xlabel="block", ylabel="agreement")
    ax2.set(title="neurons for 90% of |a|", xlabel="block", ylabel="fraction of neurons")
    ax3.set(title="loss increase, top-e of k experts", xlabel="block", ylabel="loss - dense")
    ax3.set_yscale("symlog", linthresh=1e-3)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend(fontsize=7)
    if ax3.get_legend_handles_labels()[0]:
        ax3.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    return fig
