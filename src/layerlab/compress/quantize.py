"""``quantize``: layer-wise mixed-precision weight quantization with a fractional average width.

Every block's linear weights get one width from the candidates (default 2, 3, 4, 8 bits),
group-wise (:mod:`.packed`), so that the weight-count-weighted average is exactly ``--bits``
where that average is reachable. Which block gets which width depends on its importance:

- ``lim``: Layer Input Modification, 1 - cos(block input, block output) averaged over tokens;
  higher means more important (Dumitru et al., 2024, Layer-Wise Quantization, LWQ);
- ``zd``: the Z-score Distribution, the share of a block's weights with |z| > 1 (each matrix
  standardised by its own mean and std); *smaller* means more important (LWQ);
- ``loss``: the measured loss increase of quantizing each block alone at each width, with the
  widths then chosen to minimise the summed increase under the size budget by an exact
  integer program (Hubara et al., 2021, Improving Post Training Neural Quantization: the
  per-layer loss deltas are assumed additive).

``lim`` and ``zd`` rank the blocks the way LWQ does: the two candidate widths around
``--bits`` are used, and the most important blocks get the higher one. All three end in the
same solver (:func:`allocate`): a multiple-choice knapsack solved exactly by dynamic
programming over the bit budget, with the budget met with equality.

Measurements (LIM and the loss deltas) use the training part of ``--data`` (the first 90%);
the reported perplexities use the validation part, as ``eval`` does, so the choice is not fitted
on the text it is judged on. Embeddings, the unembedding and norms stay in full precision.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import torch

from ..adapters import view
from ..data import window_length
from ..defaults import CALIBRATION_TOKENS, QUANT_GROUP, QUANT_WIDTHS
from ..errors import LayerlabError, choices_error
from ..evaluate import lm_loss, masked_loss_sum
from ..io import progress_bar
from ..packed import PackedLinear, is_linear, linear_weight, padded, quant_config_class, set_module
from ..registry import QUANT_IMPORTANCE as IMPORTANCE
from .common import loss_columns, open_input, param_bytes, staged_output, table
from .heal import train_ids

DEFAULT_WIDTHS, DEFAULT_GROUP = QUANT_WIDTHS, QUANT_GROUP
MAX_STATES = 4_000_000  # knapsack table cells; beyond this, layer sizes are rounded to coarser units


# ---------------------------------------------------------------------------- the model's quantizable layers
def block_linears(model) -> list[dict[str, torch.nn.Module]]:
    """For each block, its linear layers keyed by their path from the model root."""
    v = view(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [{names[id(m)]: m for _, m in b.module.named_modules() if is_linear(m)} for b in v.blocks]


def _group(in_features: int, group: int) -> int:
    """The group size used for a layer: ``group``, or the whole (8-aligned) row when it is shorter."""
    return min(group, padded(in_features, 8))


class Quantizer:
    """Builds and caches each layer's :class:`PackedLinear` at each width."""

    def __init__(self, model, group: int):
        self.model, self.group = model, group
        self.blocks = block_linears(model)
        self.original = {name: m for b in self.blocks for name, m in b.items()}
        self._cache: dict[tuple[str, int], PackedLinear] = {}

    def packed(self, name: str, bits: int) -> PackedLinear:
        if (name, bits) not in self._cache:
            w, b = linear_weight(self.original[name])
            self._cache[(name, bits)] = PackedLinear.from_weight(w, b, bits=bits,
                                                                 group=_group(w.shape[1], self.group)).eval()
        return self._cache[(name, bits)]

    def sizes(self) -> list[int]:
        """Weights per block."""
        return [sum(linear_weight(m)[0].numel() for m in b.values()) for b in self.blocks]

    def apply(self, model, widths: list[int]) -> None:
        """Put the packed layers for ``widths`` (one per block) into ``model`` (in place)."""
        for b, bits in zip(self.blocks, widths, strict=True):
            for name in b:
                set_module(model, name, self.packed(name, bits))

    def restore(self, model, blocks: list[int] | None = None) -> None:
        for i in range(len(self.blocks)) if blocks is None else blocks:
            for name, m in self.blocks[i].items():
                set_module(model, name, m)

    def quantized_copy(self, widths: list[int]):
        self.restore(self.model)
        q = copy.deepcopy(self.model)
        self.apply(q, widths)
        return q

    def storage_bytes(self, widths: list[int]) -> int:
        """Bytes of the whole model with ``widths``: packed layers plus everything kept in full precision."""
        packed_ids = {id(p) for m in self.original.values() for p in m.parameters()}
        rest = sum(p.numel() * p.element_size()
                   for p in {id(p): p for p in self.model.parameters()}.values() if id(p) not in packed_ids)
        return rest + sum(self.packed(name, bits).storage_bytes()
                          for b, bits in zip(self.blocks, widths, strict=True) for name in b)


# ---------------------------------------------------------------------------- importance
def _calibration(model, tokenizer, data, tokens: int, seq_len: int | None = None, batch_size: int = 8):
    seq_len = window_length(model.config, seq_len=seq_len)
    ids = train_ids(tokenizer, data, limit=max(tokens, seq_len))
    if len(ids) < 2:
        raise LayerlabError("data too short: fewer than 2 training tokens to calibrate on")
    rows = [ids[s:s + seq_len] for s in range(0, len(ids) - 1, seq_len)]
    rows = [r for r in rows if len(r) == seq_len] or [ids[:seq_len]]
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(rows), batch_size):
        x = torch.stack(rows[i:i + batch_size]).to(device)
        out.append((x, torch.ones_like(x)))
    return out


@torch.no_grad()
def _loss(model, held) -> float:
    v = view(model)
    total, count = 0.0, 0
    for ids, mask in held:
        part, n = masked_loss_sum(v.forward(ids, mask).logits, ids, mask)
        total, count = total + part, count + n
    return total / max(count, 1)


@torch.no_grad()
def lim_scores(model, held) -> list[float]:
    """LIM per block: 1 - mean over tokens of cos(block input, block output)."""
    v = view(model)
    sums = [0.0] * v.num_layers
    count = 0
    with v.trace(sublayers=False) as t:
        for ids, mask in held:
            v.forward(ids, mask)
            for i in range(v.num_layers):
                cos = torch.nn.functional.cosine_similarity(t.resid_in[i].float(), t.resid_out[i].float(), dim=-1)
                sums[i] += float(cos[mask.bool()].sum())
            count += int(mask.sum())
    return [1 - s / count for s in sums]


def zd_scores(q: Quantizer) -> list[float]:
    """ZD per block: the share of the block's linear weights more than one std from their matrix's mean."""
    out = []
    for b in q.blocks:
        outliers, total = 0, 0
        for m in b.values():
            w = linear_weight(m)[0].float()
            std = w.std()
            if std > 0:
                outliers += int(((w - w.mean()).abs() > std).sum())
            total += w.numel()
        out.append(outliers / max(total, 1))
    return out


@torch.no_grad()
def loss_deltas(q: Quantizer, held, widths: tuple[int, ...], progress: bool = False) -> list[dict[int, float]]:
    """Loss increase of quantizing each block alone at each width (the others in full precision)."""

    base = _loss(q.model, held)
    deltas = []
    with progress_bar(progress) as bar:
        task = bar.add_task("loss per block and width", total=len(q.blocks) * len(widths))
        for i, b in enumerate(q.blocks):
            row = {}
            for bits in widths:
                for name in b:
                    set_module(q.model, name, q.packed(name, bits))
                row[bits] = _loss(q.model, held) - base
                q.restore(q.model, [i])
                bar.advance(task)
            deltas.append(row)
    return deltas


# ---------------------------------------------------------------------------- allocation
def allocate(sizes: list[int], bits: float, widths: tuple[int, ...], cost: list[dict[int, float]]) -> list[int]:
    """One width per layer minimising the summed ``cost[layer][width]``, with the size-weighted
    average width equal to ``bits`` (or, when no choice reaches it exactly, the largest average
    below it). Widths missing from a layer's ``cost`` are not allowed for it.

    Exact: a multiple-choice knapsack over the bit budget solved by dynamic programming, with
    sizes in units of their greatest common divisor (so equal-sized blocks cost one unit each).
    """
    if not sizes:
        return []
    unit = math.gcd(*sizes)
    units = [s // unit for s in sizes]
    budget = math.floor(bits * sum(units) + 1e-9)
    if (budget + 1) * len(sizes) > MAX_STATES:  # very unequal layers: coarser units, slightly inexact budget
        scale = (budget + 1) * len(sizes) / MAX_STATES
        units = [max(1, round(u / scale)) for u in units]
        budget = math.floor(bits * sum(units) + 1e-9)
    inf = float("inf")
    best = [0.0] + [inf] * budget  # best[s]: least cost of the layers so far with exactly s bit-units
    choice: list[list[int]] = []
    for u, c in zip(units, cost, strict=True):
        new = [inf] * (budget + 1)
        pick = [0] * (budget + 1)
        for s, prev in enumerate(best):
            if prev == inf:
                continue
            for w in widths:
                if w not in c:
                    continue
                t = s + u * w
                if t <= budget and prev + c[w] < new[t]:
                    new[t], pick[t] = prev + c[w], w
        best = new
        choice.append(pick)
    reachable = [s for s in range(budget, -1, -1) if best[s] < inf]
    if not reachable:
        raise LayerlabError(f"no assignment of widths {list(widths)} reaches an average of at most {bits} bits")
    s = reachable[0]
    out = []
    for u, pick in zip(reversed(units), reversed(choice), strict=True):
        out.append(pick[s])
        s -= u * pick[s]
    return out[::-1]


def bracket(bits: float, widths: tuple[int, ...]) -> tuple[int, int]:
    """The candidate widths just below and just above ``bits``."""
    return max(w for w in widths if w <= bits + 1e-9), min(w for w in widths if w >= bits - 1e-9)


def ranked_cost(importance: list[float], bits: float, widths: tuple[int, ...]) -> list[dict[int, float]]:
    """LWQ's rule as a knapsack cost: only the two widths around ``bits``; leaving a block at the
    lower one costs its importance, so the most important blocks get the higher width."""
    lo, hi = bracket(bits, widths)
    if lo == hi:
        return [{lo: 0.0} for _ in importance]
    m = min(importance)
    return [{lo: imp - m + 1e-9, hi: 0.0} for imp in importance]


def average_bits(sizes: list[int], alloc: list[int]) -> float:
    return sum(s * b for s, b in zip(sizes, alloc, strict=True)) / sum(sizes)




# ---------------------------------------------------------------------------- the command
def quantize(model_dir: str | Path, *, bits: float, out: str | Path, importance: str = "lim",
             widths: tuple[int, ...] = DEFAULT_WIDTHS, group: int = DEFAULT_GROUP, data: str | Path | None = None,
             tokens: int | None = None, calibration_tokens: int = CALIBRATION_TOKENS, seed: int = 0,
             baselines: bool = True, progress: bool = False) -> dict:
    """Quantize every block to one of ``widths`` so the average is ``bits``, ordered by ``importance``; write
    the packed model to ``out``. Returns the record (also in ``out/layerlab.json``) with every allocation's
    size and loss; :func:`quantize_lines` lays out its table."""
    widths = _check(bits, importance, widths, group)
    model, tok, v = open_input(model_dir, "quantize", causal="reports language-model perplexity")
    args = {"model": str(model_dir), "bits": bits, "importance": importance, "widths": list(widths), "group": group,
            "seed": seed, "data": str(data) if data else "embedded", "tokens": tokens,
            "calibration_tokens": calibration_tokens}
    with staged_output(model_dir, out, "quantize", args) as stage:  # --out checked before the slow work starts
        q = Quantizer(model, group)
        sizes = q.sizes()
        held = _calibration(model, tok, data, calibration_tokens)
        scores, cost = _importance(q, model, held, importance, bits, widths, progress)
        chosen = allocate(sizes, bits, widths, cost)
        runs = {**(_baselines(sizes, bits, widths, seed) if baselines else {}), importance: chosen}
        before = {"avg_bits": None, "bytes": param_bytes(model), **lm_loss(model, tok, data, tokens)}
        rows = {"original": before}
        for name, alloc in runs.items():
            qm = q.quantized_copy(alloc)
            rows[name] = {"allocation": alloc, "avg_bits": average_bits(sizes, alloc),
                          "bytes": q.storage_bytes(alloc), **lm_loss(qm, tok, data, tokens)}
            del qm
        q.restore(model)
        final = q.quantized_copy(chosen)
        specs = {}
        for b, w in zip(q.blocks, chosen, strict=True):
            for name in b:
                p = q.packed(name, w)
                specs[name] = {"bits": w, "format": p.fmt, "in": p.in_features, "out": p.out_features,
                               "bias": p.bias is not None, "group": p.group}
        final.config.quantization_config = quant_config_class()(modules=specs, group=group,
                                                                avg_bits=average_bits(sizes, chosen))
        stage.save_model(final)
        rows[importance]["disk_bytes"] = _disk(stage.dir)
        stage.record = {"importance": importance, "scores": scores, "allocation": chosen, "widths": list(widths),
                        "group": group, "weights_per_block": sizes, "runs": rows, "before": before,
                        "after": rows[importance], "input_disk_bytes": _disk(model_dir)}
    return stage.record


def _check(bits: float, importance: str, widths: tuple[int, ...], group: int) -> tuple[int, ...]:
    """The candidate widths, sorted; or a one-line error for any argument out of its range."""
    widths = tuple(sorted(set(int(w) for w in widths)))
    if importance not in IMPORTANCE:
        raise choices_error("importance", importance, IMPORTANCE)
    if not widths or any(not 1 <= w <= 8 for w in widths):
        raise LayerlabError(f"--widths must be integers from 1 to 8, got {list(widths)}")
    if not widths[0] <= bits <= widths[-1]:
        raise LayerlabError(f"--bits must be between {widths[0]} and {widths[-1]} (the candidate widths "
                            f"{', '.join(map(str, widths))}), got {bits}")
    if group < 8 or group % 8:
        raise LayerlabError(f"--group must be a positive multiple of 8, got {group}")
    return widths


def _importance(q: Quantizer, model, held, importance: str, bits: float, widths: tuple[int, ...],
                progress: bool) -> tuple[dict, list]:
    """The ordering's scores, and the per-block, per-width cost the allocator minimises."""
    if importance == "loss":
        deltas = loss_deltas(q, held, widths, progress)
        return {"loss_delta": [{str(b): d for b, d in row.items()} for row in deltas]}, deltas
    scores = {importance: lim_scores(model, held) if importance == "lim" else zd_scores(q)}
    # higher LIM is more important; for ZD smaller is (LWQ)
    imp = scores["lim"] if importance == "lim" else [1 - z for z in scores["zd"]]
    return scores, ranked_cost(imp, bits, widths)


def _baselines(sizes: list[int], bits: float, widths: tuple[int, ...], seed: int) -> dict[str, list[int]]:
    """Uniform floor and ceiling, and a seeded random ordering at the same average."""
    lo, hi = bracket(bits, widths)
    runs = {f"uniform {lo}": [lo] * len(sizes)}
    if hi != lo:
        runs[f"uniform {hi}"] = [hi] * len(sizes)
        rng = random.Random(seed)
        runs["random order"] = allocate(sizes, bits, widths, ranked_cost([rng.random() for _ in sizes], bits, widths))
    return runs


def quantize_lines(record: dict) -> list[str]:
    """What ``layerlab quantize`` prints: the widths chosen, the table on its named slice, the size on disk."""
    base = record["before"]["loss"]
    columns = [("avg bits", 9, lambda r: f"{r['avg_bits']:.3f}" if r["avg_bits"] is not None else "fp"),
               ("MB", 9, lambda r: f"{r['bytes'] / 1e6:.3f}"), *loss_columns(9),
               ("Δloss", 9, lambda r: f"{r['loss'] - base:+.4f}")]
    return [f"widths per block by {record['importance']}: {record['allocation']}",
            f"loss (nats/token) and perplexity on the {record['before']['slice']}",
            *table(record["runs"], columns, name_width=16),
            f"on disk: {record['after']['disk_bytes'] / 1e6:.3f} MB of weights "
            f"(the input: {record['input_disk_bytes'] / 1e6:.3f} MB)"]


def _disk(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
