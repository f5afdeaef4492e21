"""Layer interventions (``analyze --interventions``): the experiments of "Transformer Layers as Painters"
(Sun et al., 2024; github.com/floatingbigcat/transformer_layers_as_painters) on the middle blocks of any model
the adapter supports.

Each experiment is an *arrangement*: the sequence of blocks the model runs, written as a list whose entries are
block indices, run in that order, or tuples of block indices, a **parallel group**: each block of the group
reads the same input and the group's output is the mean of the blocks' outputs (each block's own output, the
residual stream it would leave, x + its update, as the paper averages them), so a group of n blocks gives
x + mean_i f_i(x). A group repeated k times in a row is the looped parallel step applied k times.

The middle blocks are ``--middle a:b`` (a Python slice of the blocks), by default all but the first and last
10% of the L blocks: k = floor(L / 10 + 1/2) blocks (10%, rounded to the nearest block, halves up, at least one)
are kept at each end, fewer only where fewer than 2 blocks would be left in the middle (L < 4 keeps none). On
the M middle blocks [a, b), the experiments are:

- ``skip`` (Painters' "skip"): for n = 1..M, the n centred middle blocks removed;
- ``middle repeat`` (Painters' "middle repeat"): for n = 2..M, the n centred middle blocks replaced by n runs of
  their centre block (the lower of the two centre blocks where n is even);
- ``reverse``: for n = 2..M, the n centred middle blocks in reverse order;
- ``shuffle``: for n = 2..M, the n centred middle blocks in a random order other than their own, 3 distinct draws
  per n (the single other order of 2 blocks) from a generator seeded with ``--seed`` and n;
- ``parallel``: for n = 2..M, the n centred middle blocks as one parallel group;
- ``looped parallel x2`` / ``x3``: that group applied 2 and 3 times, each step reading the previous step's mean
  (the paper feeds the averaged output back into the parallel blocks a fixed number of times);
- ``swap``: each adjacent pair (i, i + 1) of middle blocks exchanged;
- ``repeat``: block j run M times in place of all M middle blocks, for each middle block j.

"The n centred middle blocks" are [s, s + n) with s = a + (M - n) // 2. Every experiment runs through the
adapter without copying the model: the entries of the block ModuleList are replaced for the duration by the
model's own block modules in the new order (a parallel group by a stand-in module that calls them), unused
slots by pass-through stand-ins, so that the list keeps its length; the original list is put back in a
``finally``. Forwards run in eval mode without a cache (:meth:`LayerView.forward`), so attention modules that
keep their ``layer_idx`` for the KV cache run correctly in another slot.

The measure is the pass's layer-removal measure: for a causal LM the mean next-token cross-entropy (nats/token)
over the first min(--tokens, 4096) tokens the pass measured, ``loss_delta`` that minus the unaltered model's
loss on the same tokens; for an encoder 1 - cos between the mean-pooled final hidden states of the altered and
the unaltered model, averaged over sequences (the unaltered model's is 0), as
:class:`layerlab.analysis.stats.RemovalSums` measures it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..adapters.core import _first, _Identity
from ..errors import LayerlabError
from ..io import progress_bar
from ..registry import SECTIONS
from .sections import Section, SectionContext, SectionOutput
from .stats import _pooled, output_loss_terms

MAX_TOKENS = 4096  # the experiments measure at most this many of the pass's tokens
SHUFFLE_DRAWS = 3
LOOPS = (2, 3)  # the looped parallel step is applied this many times
EDGE_FRACTION = 0.1  # the share of the blocks kept unaltered at each end by default

# an arrangement: block indices in the order run; a tuple is a parallel group (its blocks' outputs averaged)
Arrangement = list


def default_middle(num_layers: int) -> tuple[int, int]:
    """[a, b): all but the first and last 10% of the blocks (10% of L rounded to the nearest block, halves up,
    at least one kept at each end while that leaves at least 2 in the middle)."""
    if num_layers < 2:
        raise LayerlabError(f"--interventions needs a model of at least 2 blocks; this one has {num_layers}")
    k = max(1, math.floor(num_layers * EDGE_FRACTION + 0.5))
    while k > 0 and num_layers - 2 * k < 2:
        k -= 1
    return k, num_layers - k


def check_middle(spec: str) -> tuple[int | None, int | None]:
    """The (a, b) of a ``--middle a:b`` (either may be empty: None), or a one-line error where it is not a:b."""
    m = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", str(spec))
    if m is None:
        raise LayerlabError(f"--middle {spec!r} is not a:b, a slice of the blocks such as 2:10 (Python's: -2 "
                            "counts from the end, an empty side is the start or the end)")
    return tuple(None if g is None else int(g) for g in m.groups())


def middle_range(num_layers: int, spec: str | None = None) -> tuple[int, int]:
    """The middle blocks [a, b) that ``--middle spec`` names (Python slice semantics, but an index beyond the
    blocks is an error, not clipped), or :func:`default_middle` without one. At least 2 blocks."""
    if spec is None:
        return default_middle(num_layers)
    a, b = check_middle(spec)
    L = num_layers
    for v in (a, b):
        if v is not None and not -L <= v <= L:
            raise LayerlabError(f"--middle {spec} is out of range for a model of {L} blocks (indices -{L}..{L})")
    a = 0 if a is None else a + L if a < 0 else a
    b = L if b is None else b + L if b < 0 else b
    if b - a < 2:
        raise LayerlabError(f"--middle {spec} selects {max(b - a, 0)} of the {L} blocks; the interventions need at "
                            "least 2 middle blocks")
    return a, b


def centred(a: int, b: int, n: int) -> list[int]:
    """The n middle blocks of [a, b) centred in it: [s, s + n), s = a + (M - n) // 2."""
    s = a + (b - a - n) // 2
    return list(range(s, s + n))


def _shuffles(window: list[int], seed: int) -> list[list[int]]:
    """:data:`SHUFFLE_DRAWS` distinct random orders of ``window``, each other than its own (all of them where
    fewer exist: the one swap of 2 blocks), drawn by a generator seeded from ``seed`` and len(window)."""
    g = torch.Generator().manual_seed(seed * 1009 + len(window))
    out: list[list[int]] = []
    while len(out) < min(SHUFFLE_DRAWS, math.factorial(len(window)) - 1):
        order = [window[i] for i in torch.randperm(len(window), generator=g).tolist()]
        if order != window and order not in out:
            out.append(order)
    return out


def experiments(num_layers: int, a: int, b: int, seed: int = 0) -> list[tuple[str, int, Arrangement]]:
    """Every experiment on the middle blocks [a, b) of a model of ``num_layers`` blocks, as
    (experiment, number of middle blocks altered, arrangement of all the blocks); see the module's docstring."""
    M = b - a
    head, tail = list(range(a)), list(range(b, num_layers))

    def around(start: int, stop: int, middle: list) -> Arrangement:
        return head + list(range(a, start)) + middle + list(range(stop, b)) + tail

    out: list[tuple[str, int, Arrangement]] = []
    for n in range(1, M + 1):
        w = centred(a, b, n)
        lo, hi = w[0], w[-1] + 1
        out.append(("skip", n, around(lo, hi, [])))
        if n < 2:
            continue
        out.append(("middle repeat", n, around(lo, hi, [w[(n - 1) // 2]] * n)))
        out.append(("reverse", n, around(lo, hi, w[::-1])))
        out.extend(("shuffle", n, around(lo, hi, order)) for order in _shuffles(w, seed))
        out.append(("parallel", n, around(lo, hi, [tuple(w)])))
        out.extend((f"looped parallel x{k}", n, around(lo, hi, [tuple(w)] * k)) for k in LOOPS)
    for i in range(a, b - 1):
        out.append(("swap", 2, around(i, i + 2, [i + 1, i])))
    for j in range(a, b):
        out.append(("repeat", M, around(a, b, [j] * M)))
    return out


class _Parallel(nn.Module):
    """A block stand-in: ``blocks`` each run on the same input, with the call's other arguments, and the mean of
    their outputs returned; ``loops`` times, each step reading the previous step's mean (looped parallel)."""

    def __init__(self, blocks: list[nn.Module], loops: int, as_tuple: bool):
        super().__init__()
        self.blocks = blocks  # a plain list: the stand-in does not own (or register) the model's blocks
        self.loops, self.as_tuple = loops, as_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        for _ in range(self.loops):
            outs = []
            for block in self.blocks:
                out = block(x, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": x})
                outs.append(_first(out).float())
            x = (torch.stack(outs).sum(0) / len(outs)).to(x.dtype)  # (B, T, C): the mean of the blocks' outputs
        return (x,) if self.as_tuple else x


def _modules(blocks: list[nn.Module], arrangement: Arrangement, as_tuple: bool) -> list[nn.Module]:
    """The modules that run ``arrangement``: the model's blocks, a run of one parallel group as one stand-in."""
    out: list[nn.Module] = []
    i = 0
    while i < len(arrangement):
        entry = arrangement[i]
        if isinstance(entry, tuple):
            k = 1
            while i + k < len(arrangement) and arrangement[i + k] == entry:
                k += 1
            out.append(_Parallel([blocks[j] for j in entry], k, as_tuple))
            i += k
        else:
            out.append(blocks[entry])
            i += 1
    return out


@contextmanager
def arranged(view, arrangement: Arrangement, as_tuple: bool) -> Iterator[None]:
    """Run the model with its blocks in ``arrangement`` (see the module's docstring), without copying it: the
    entries of the block ModuleList are replaced for the duration and put back in a ``finally``. The list keeps
    its length: the arrangement's modules come first where they differ, then pass-through stand-ins where the
    arrangement is shorter (slots after the last one that differs keep their blocks, so the blocks after the
    middle run in their own slots). ``as_tuple``: the blocks return tuples (older Hugging Face layers)."""
    container = view.root.get_submodule(view.arch.blocks)
    original = list(container)
    L = len(original)
    modules = _modules(original, arrangement, as_tuple)
    if len(modules) > L:
        raise LayerlabError(f"an arrangement of {len(modules)} block calls does not fit the {L} slots")
    keep = 0  # the blocks at the end that stay in their own slots
    while keep < len(modules) and modules[len(modules) - 1 - keep] is original[L - 1 - keep]:
        keep += 1
    new = modules[: len(modules) - keep]
    new += [_Identity(as_tuple) for _ in range(L - len(modules))] + original[L - keep:]
    try:
        for i, m in enumerate(new):
            if m is not original[i]:
                container[i] = m
        yield
    finally:
        for i, m in enumerate(original):
            container[i] = m


class _Measure:
    """The experiments' measure on fixed batches: the mean next-token loss (causal LMs), or 1 - cos of the
    mean-pooled output against the unaltered model's (encoders); :meth:`baseline` runs the unaltered model."""

    def __init__(self, view, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.view, self.batches = view, batches
        self.base: list[torch.Tensor] = []  # encoders: the unaltered model's pooled output per batch, (B, C)
        self.as_tuple = False

    def baseline(self) -> float:
        seen = []
        hook = self.view.blocks[0].module.register_forward_hook(
            lambda m, a, out: seen.append(isinstance(out, tuple)))
        try:
            loss = self(record=True)
        finally:
            hook.remove()
        self.as_tuple = bool(seen and seen[0])
        return loss

    def __call__(self, record: bool = False) -> float:
        total, norm = 0.0, 0
        for k, (ids, mask) in enumerate(self.batches):
            out = self.view.forward(ids, mask)
            if record and not self.view.causal:
                self.base.append(_pooled(out.last_hidden_state, mask).float())  # (B, C)
            s, n = output_loss_terms(self.view.causal, out, ids, mask, None if self.view.causal else self.base[k])
            total, norm = total + s, norm + n
        return total / max(norm, 1)


def run_interventions(view, batches: list[tuple[torch.Tensor, torch.Tensor]], a: int, b: int, seed: int = 0,
                      progress: bool = False, name: str = "") -> list[dict]:
    """The ``interventions`` entries of a model on ``batches``: the unaltered model (experiment ``none``) and
    each of :func:`experiments` on the middle blocks [a, b): {experiment, altered, blocks, loss, loss_delta}."""
    measure = _Measure(view, batches)
    base = measure.baseline()
    L = view.num_layers
    rows = [{"experiment": "none", "altered": 0, "blocks": list(range(L)), "loss": base, "loss_delta": 0.0}]
    todo = experiments(L, a, b, seed)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{name}: interventions" if name else "interventions", total=len(todo))
        for experiment, n, arrangement in todo:
            with arranged(view, arrangement, measure.as_tuple):
                loss = measure()
            rows.append({"experiment": experiment, "altered": n,
                         "blocks": [list(e) if isinstance(e, tuple) else e for e in arrangement],
                         "loss": loss, "loss_delta": loss - base})
            bar.advance(task)
    return rows


@SECTIONS.register("interventions")
class Interventions(Section):
    """Painters' experiments (Sun et al., 2024) on the middle blocks; see the module's docstring."""

    name = "interventions"
    keys = ("interventions",)
    title = "Layer interventions"
    doc = "Layer interventions"

    def skip_reason(self, view) -> str | None:
        """A DenseFormer's blocks each average the outputs of the blocks before them by index (layerlab.model's
        depth-weighted average), so a block moved to another slot would average the wrong streams."""
        if getattr(getattr(view.model, "cfg", None), "wiring", "residual") != "residual":
            return f"{self.name}: blocks cannot be reordered under wiring {view.model.cfg.wiring!r}"
        return super().skip_reason(view)

    def run(self, ctx: SectionContext) -> SectionOutput:
        a, b = middle_range(ctx.view.num_layers, ctx.option("middle"))
        batches = list(ctx.batches(tokens=min(ctx.tokens, MAX_TOKENS)))
        rows = run_interventions(ctx.view, batches, a, b, seed=ctx.seed, progress=ctx.progress, name=ctx.name)
        return SectionOutput({"interventions": rows})

    def html(self, page, models, names, colors) -> None:
        page.add('<p class="muted">Transformer Layers as Painters (Sun et al., 2024): the middle blocks skipped, '
                 "repeated, reversed, shuffled (mean of 3 draws, the band their range), run in parallel with their "
                 "outputs averaged (once, or looped 2 or 3 times), adjacent pairs swapped, and one block run in place "
                 "of all of them. A causal model's change is the next-token loss against the unaltered model's "
                 "(nats/token); an encoder's is 1 - cos of the mean-pooled output.</p>")
        for model, name, color in zip(models, names, colors, strict=True):
            rows = model.get("interventions")
            if not rows:
                continue
            causal = model.get("causal", True)
            page.add(f"<p>{page.swatch(color)}<b>{page.esc(name)}</b></p>")
            what = "loss change" if causal else "1 - cos of the pooled output"
            page.figure(None, _figure(page, rows, name, causal), f"{name}: {what} against the number of middle blocks "
                        "altered, per experiment; and per middle block, the swap of adjacent blocks and the repeat "
                        "of one block", None)
            page.add(_table(rows, causal, page.esc))


def _sweeps(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    """experiment -> altered -> its loss deltas (several for shuffle), for the experiments swept over n."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["experiment"] in ("none", "swap", "repeat") or r.get("loss_delta") is None:
            continue
        out.setdefault(r["experiment"], {}).setdefault(int(r["altered"]), []).append(float(r["loss_delta"]))
    return out


def _positions(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """swap and repeat: (the middle block, their loss deltas); a swap is placed at the first block of its pair."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for experiment in ("swap", "repeat"):
        xs, ys = [], []
        for r in rows:
            if r["experiment"] != experiment:
                continue
            middle = [e for i, e in enumerate(r["blocks"]) if e != i]  # where it differs from the unaltered
            xs.append(min(middle) if experiment == "swap" else middle[0])
            ys.append(float(r["loss_delta"]))
        if xs:
            out[experiment] = (xs, ys)
    return out


STYLES = {"skip": ("#1f77b4", "o"), "middle repeat": ("#ff7f0e", "s"), "reverse": ("#2ca02c", "^"),
          "shuffle": ("#d62728", "D"), "parallel": ("#9467bd", "v"), "looped parallel x2": ("#8c564b", "<"),
          "looped parallel x3": ("#e377c2", ">"), "swap": ("#7f7f7f", "o"), "repeat": ("#bcbd22", "s")}


def _figure(page, rows: list[dict], name: str, causal: bool):
    from matplotlib.ticker import MaxNLocator

    fig = page.new_figure(11.0, 3.4)  # the report's figure conventions (layerlab.report.plots)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    ylabel = "loss change (nats/token)" if causal else "1 - cos of the pooled output"
    for experiment, by_n in _sweeps(rows).items():
        color, marker = STYLES.get(experiment, ("#333333", "."))
        ns = sorted(by_n)
        mean = np.array([np.mean(by_n[n]) for n in ns])
        left.plot(ns, mean, marker=marker, ms=3.5, lw=1.3, color=color, label=experiment)
        if experiment == "shuffle":
            left.fill_between(ns, [min(by_n[n]) for n in ns], [max(by_n[n]) for n in ns], color=color, alpha=0.18,
                              lw=0)
    left.axhline(0.0, color="#888888", lw=0.8, ls="--")
    left.set_xlabel("middle blocks altered (n)", fontsize=9)
    left.set_ylabel(ylabel, fontsize=9)
    left.set_title(page.mpl_text(name) + ": change against the number of blocks altered", fontsize=10)
    left.legend(fontsize=7.5, framealpha=0.85, ncols=2)
    for experiment, (xs, ys) in _positions(rows).items():
        color, marker = STYLES[experiment]
        label = "swap (block, block + 1)" if experiment == "swap" else "repeat block in place of all"
        right.plot(xs, ys, marker=marker, ms=3.5, lw=1.3, color=color, label=label)
    right.axhline(0.0, color="#888888", lw=0.8, ls="--")
    right.set_xlabel("middle block", fontsize=9)
    right.set_ylabel(ylabel, fontsize=9)
    right.set_title("per middle block", fontsize=10)
    right.legend(fontsize=7.5, framealpha=0.85)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # block counts and indices
        ax.grid(True, alpha=0.3, lw=0.6)
        ax.tick_params(labelsize=8)
    return fig


def _table(rows: list[dict], causal: bool, esc) -> str:
    """Two compact grids of the loss deltas: experiment x blocks altered (shuffle: the mean, its range in the
    cell's title), and swap / repeat x middle block; the unaltered loss above them."""
    base = next((r["loss"] for r in rows if r["experiment"] == "none"), None)
    fmt = lambda v: "" if v is None else f"{v:+.4f}".replace("-0.0000", "+0.0000")  # noqa: E731
    out = []
    if base is not None and causal:
        out.append(f'<p class="muted">unaltered loss {base:.4f} nats/token; cells: the change</p>')
    else:
        out.append('<p class="muted">cells: 1 - cos of the mean-pooled output against the unaltered model\'s</p>')
    sweeps = _sweeps(rows)
    ns = sorted({n for by_n in sweeps.values() for n in by_n})
    head = "".join(f"<th>{n}</th>" for n in ns)
    body = []
    for experiment, by_n in sweeps.items():
        cells = []
        for n in ns:
            v = by_n.get(n)
            if not v:
                cells.append("<td></td>")
            elif len(v) > 1:
                cells.append(f'<td title="{len(v)} draws: {min(v):+.4f} .. {max(v):+.4f}">{fmt(float(np.mean(v)))}'
                             "</td>")
            else:
                cells.append(f"<td>{fmt(v[0])}</td>")
        body.append(f"<tr><th>{esc(experiment)}</th>{''.join(cells)}</tr>")
    out.append('<div class="scroll"><table class="numbers interventions"><thead><tr><th>blocks altered</th>'
               f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    positions = _positions(rows)
    if positions:
        blocks = sorted({x for xs, _ in positions.values() for x in xs})
        head = "".join(f"<th>{b}</th>" for b in blocks)
        body = []
        for experiment, (xs, ys) in positions.items():
            by = dict(zip(xs, ys, strict=True))
            label = "swap block, block + 1" if experiment == "swap" else "repeat block (all middle)"
            body.append(f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{fmt(by.get(b))}</td>" for b in blocks)
                        + "</tr>")
        out.append('<div class="scroll"><table class="numbers interventions"><thead><tr><th>middle block</th>'
                   f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    return "".join(out)
