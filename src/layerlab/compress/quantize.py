"""``quantize``: layer-wise mixed-precision weight quantization with a fractional average width.

Every block's linear weights get one width from the candidates (default 2, 3, 4, 8 bits),
group-wise (:mod:`.packed`), within a budget of ``--bits`` on the weight-count-weighted average
width. In a mixture-of-experts block the experts' 3-d weights (``gate_up_proj``, ``down_proj``: most of
the block) are quantized too, at the block's width, each expert's matrix row by row
(:class:`~layerlab.packed.PackedExperts`), and count in the average and the sizes; the router stays in
full precision, as norms do. Which block gets which width depends on its importance:

- ``lim``: Layer Input Modification, 1 - cos(block input, block output) averaged over tokens;
  higher means more important (Dumitru et al., 2024, Layer-Wise Quantization, LWQ);
- ``zd``: the Z-score Distribution, the share of a block's weights with |z| > 1 (each matrix
  standardised by its own mean and std; an MoE's experts count as one matrix per expert and weight,
  as each is one linear map); *smaller* means more important (LWQ);
- ``loss``: the measured loss increase of quantizing each block alone at each width, with the
  widths then chosen by Hubara et al.'s integer program (2021, Improving Post Training Neural
  Quantization: Layer-wise Calibration and Integer Programming): minimise the summed increase
  subject to the size staying within the budget, the per-layer deltas assumed additive.

``lim`` and ``zd`` rank the blocks the way LWQ does: the two candidate widths around
``--bits`` are used, the most important blocks get the higher one, and the average is exactly
``--bits`` wherever that is reachable (:func:`allocate` with ``fill``). ``loss`` is the integer
program itself (:func:`allocate`): it uses less than the budget when a lower width measures
better, so its average can fall below ``--bits``; the record and the table give the average
actually used next to the budget. Both are solved exactly (see :func:`allocate`).

Measurements (LIM and the loss deltas) read the first ``calibration_tokens`` tokens of the
training split of ``--data`` (the token stream that ``train`` sees, less its last 10%); the reported
perplexities read the validation split, the rest of that stream, as ``eval`` does, so the choice is
never fitted on the text it is judged on. ZD reads the weights only. Embeddings, the unembedding,
norms and MoE routers stay in full precision.

The output is compressed-tensors' pack-quantized format by default (one config group per block, symmetric
codes: :mod:`layerlab.packed`), which plain transformers loads with the ``compressed-tensors`` package, without
layerlab; a GPT-2, whose ``Conv1D`` layers compressed-tensors does not quantize, is written as ``model_type
opt``, GPT-2's computation with ``nn.Linear`` layers (:mod:`.gpt2_linear`). ``output="layerlab"`` (and any model
or widths that format cannot hold) writes layerlab's packed min-max codes instead. The candidates are quantized
the way the written format stores them, so the chosen widths and every reported loss are those of the weights
written.

The model loads in the checkpoint's own dtype by default. With ``lim`` or ``zd``, a checkpoint larger than
``max_memory`` (or any, with ``offload=True``) is streamed block by block (:mod:`layerlab.offload`) and written
one block at a time (:func:`_quantize_offloaded`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch

from ..adapters import view
from ..allocator import param_bytes
from ..analysis.analyze import check_trace
from ..data import batches, window_length
from ..defaults import CALIBRATION_TOKENS, QUANT_GROUP, QUANT_WIDTHS
from ..errors import LayerlabError, choices_error
from ..evaluate import masked_loss_sum
from ..io import progress_bar
from ..packed import (
    COMPRESSED,
    OUTPUT_FORMATS,
    QUANT_METHOD,
    PackedExperts,
    PackedLinear,
    check_experts,
    compressed_tensors_config,
    compressed_tensors_unsupported,
    expert_weights,
    is_experts,
    is_linear,
    linear_weight,
    quant_config_class,
    row_group,
    set_module,
)
from ..probes import measure_spec, probe_spec, stage_lines
from ..registry import PROBE_ITEMS
from ..registry import QUANT_IMPORTANCE as IMPORTANCE
from . import gpt2_linear
from .bitwidths import allocate, average_bits, bracket, ranked_cost
from .common import (
    Quality,
    copy_tokenizer,
    input_mode,
    open_input,
    open_offloaded_input,
    quality_columns,
    quality_heading,
    staged_output,
    table,
)
from .heal import train_ids, train_slice

DEFAULT_WIDTHS, DEFAULT_GROUP = QUANT_WIDTHS, QUANT_GROUP


# ---------------------------------------------------------------------------- the model's quantizable layers
def block_linears(model) -> list[dict[str, torch.nn.Module]]:
    """For each block, its quantizable modules keyed by their path from the model root: the linear layers, and
    a mixture-of-experts block's experts module (its 3-d weights; the router is not a linear layer)."""
    v = view(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [{names[id(m)]: m for _, m in b.module.named_modules() if is_linear(m) or is_experts(m)}
            for b in v.blocks]


def weight_matrices(module: torch.nn.Module) -> list[torch.Tensor]:
    """The (out, in) weight matrices a quantizable module holds: a linear layer's one, or every expert's
    matrix of each of an experts module's 3-d weights."""
    if is_experts(module):
        return [w.detach()[e] for w in expert_weights(module).values() for e in range(w.shape[0])]
    return [linear_weight(module)[0]]


class Quantizer:
    """Builds and caches each layer's :class:`PackedLinear` (or an experts module's :class:`PackedExperts`)
    at each width, for the ``output`` format (:data:`~layerlab.packed.OUTPUT_FORMATS`; set it before the first
    :meth:`packed`): what the allocation is measured on is what gets written."""

    def __init__(self, model, group: int, output: str = QUANT_METHOD):
        self.model, self.group, self.output = model, group, output
        self.blocks = block_linears(model)
        self.original = {name: m for b in self.blocks for name, m in b.items()}
        for name, m in self.original.items():
            if is_experts(m):
                check_experts(m, name)  # an experts form it cannot pack: refused before any slow work
        self._cache: dict[tuple[str, int], PackedLinear | PackedExperts] = {}

    def packed(self, name: str, bits: int) -> PackedLinear | PackedExperts:
        if (name, bits) not in self._cache:
            m = self.original[name]
            if is_experts(m):
                p = PackedExperts.from_module(m, bits=bits, group=self.group)
            else:
                w, b = linear_weight(m)
                p = PackedLinear.from_weight(w, b, bits=bits, group=row_group(w.shape[1], self.group),
                                             output=self.output)
            self._cache[(name, bits)] = p.eval()
        return self._cache[(name, bits)]

    def sizes(self) -> list[int]:
        """Weights per block (an experts module's 3-d weights included)."""
        return [sum(w.numel() for m in b.values() for w in weight_matrices(m)) for b in self.blocks]

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

    def rest_bytes(self) -> int:
        """Bytes of the parameters kept in full precision (everything outside the quantizable layers); shapes
        and dtypes only, so an offloaded model's ``meta`` parameters count too."""
        packed_ids = {id(p) for m in self.original.values() for p in m.parameters()}
        return sum(p.numel() * p.element_size()
                   for p in {id(p): p for p in self.model.parameters()}.values() if id(p) not in packed_ids)

    def storage_bytes(self, widths: list[int]) -> int:
        """Bytes of the whole model with ``widths``: packed layers plus everything kept in full precision."""
        return self.rest_bytes() + sum(self.packed(name, bits).storage_bytes()
                                       for b, bits in zip(self.blocks, widths, strict=True) for name in b)

    def forget(self, block: int) -> None:
        """Drop block ``block``'s cached packed layers."""
        names = set(self.blocks[block])
        for key in [k for k in self._cache if k[0] in names]:
            del self._cache[key]

    @contextmanager
    def streamed(self, om, widths: list[int]) -> Iterator[dict[str, tuple[int, dict]]]:
        """While inside, every block of the offloaded model ``om`` (:class:`~layerlab.offload.Offloaded`, whose
        model this quantizer was built on) runs quantized at ``widths``: right after a block is read its layers
        are packed (:meth:`packed`, the in-memory path's code) and put in place, and right before it is freed
        the originals go back and the packed layers are dropped, so one block's packed layers are held at a
        time. Yields {module path: (storage bytes, spec)} of the layers packed so far."""
        seen: dict[str, tuple[int, dict]] = {}

        def after_load(i: int) -> None:
            for name in self.blocks[i]:
                p = self.packed(name, widths[i])
                seen[name] = (p.storage_bytes(), p.spec())
                set_module(om.model, name, p)

        def before_free(i: int) -> None:
            self.restore(om.model, [i])
            self.forget(i)

        om.after_load, om.before_free = after_load, before_free
        try:
            yield seen
        finally:
            om.after_load = om.before_free = None


# ---------------------------------------------------------------------------- importance
def _calibration(model, tokenizer, data, tokens: int, seq_len: int | None = None, batch_size: int = 8):
    """(ids, mask) batches of whole windows from the first ``tokens`` tokens of the training split (one
    shorter window if there is no whole one), on the model's device. An encoder's windows are [CLS] ... [SEP],
    as ``analyze`` reads them (:func:`~layerlab.data.batches`)."""
    causal = view(model).causal
    seq_len = window_length(model.config, causal, seq_len=seq_len)
    ids = train_ids(tokenizer, data, limit=max(tokens, seq_len))
    if len(ids) < 2:
        raise LayerlabError("data too short: fewer than 2 training tokens to calibrate on")
    device = next(model.parameters()).device
    if not causal:
        return [(x.to(device), m.to(device))
                for x, m in batches(tokenizer, ids.tolist(), tokens, seq_len, batch_size, causal=False)]
    rows = [ids[s:s + seq_len] for s in range(0, len(ids) - 1, seq_len)]
    rows = [r for r in rows if len(r) == seq_len] or [ids[:seq_len]]
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
def lim_scores(model, held) -> tuple[list[float], dict | None]:
    """LIM per block: 1 - mean over tokens of cos(block input, block output); and analyze's fidelity certificate
    (:func:`~layerlab.analysis.analyze.check_fidelity`) of the first batch's traced stream, checked before
    anything is kept (a mismatch is an error naming the first block that diverged)."""
    v = view(model)
    sums = [0.0] * v.num_layers
    count, fidelity = 0, None
    for ids, mask in held:
        with v.trace(sublayers=False) as t:
            out = v.forward(ids, mask)
        if fidelity is None:  # outside the trace: the plain forward must not be recorded
            fidelity = check_trace(v, ids, mask, t, out)
        del out  # a batch's logits are not kept past the check
        for i in range(v.num_layers):
            cos = torch.nn.functional.cosine_similarity(t.resid_in[i].float(), t.resid_out[i].float(), dim=-1)
            sums[i] += float(cos[mask.bool()].sum())
        count += int(mask.sum())
    return [1 - s / count for s in sums], fidelity


def zd_scores(q: Quantizer, hold: Callable[[int], AbstractContextManager] | None = None) -> list[float]:
    """ZD per block: the share of the block's linear weights more than one std from their matrix's mean. An
    experts module's 3-d weight is standardised per expert: each expert's (out, in) matrix by its own mean and
    std, as a linear layer's is (the experts are separate linear maps, and their scales can differ). ``hold(i)``
    (an offloaded model's :meth:`~layerlab.offload.Offloaded.block`) holds block i's weights while they are read."""
    out = []
    for i, b in enumerate(q.blocks):
        outliers, total = 0, 0
        with hold(i) if hold is not None else nullcontext():
            for w in (matrix.float() for m in b.values() for matrix in weight_matrices(m)):
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


# ---------------------------------------------------------------------------- the command
def quantize(model_dir: str | Path, *, bits: float, out: str | Path, importance: str = "lim",
             widths: tuple[int, ...] = DEFAULT_WIDTHS, group: int = DEFAULT_GROUP, data: str | Path | None = None,
             tokens: int | None = None, calibration_tokens: int = CALIBRATION_TOKENS, seed: int = 0,
             baselines: bool = True, progress: bool = False, dtype: str = "auto", offload: bool | None = None,
             max_memory: str | int | None = None, announce: Callable[[str], None] | None = None,
             output: str = COMPRESSED, tasks: str | list[str] | None = None, probe_items: int = PROBE_ITEMS,
             probe_seed: int = 0) -> dict:
    """Quantize every block to one of ``widths`` within an average of ``bits``, chosen by ``importance``; write
    the packed model to ``out``. Returns the record (also in ``out/layerlab.json``) with every allocation's
    size, average width and loss (an encoder: ``embedding_cosine`` to the input model's,
    :class:`~.common.Quality`); ``budget_bits`` is ``bits``, ``after["avg_bits"]`` the average used (below the
    budget only for ``loss``, see :func:`allocate`), ``chosen_on`` the text the importance was measured
    on (None for ``zd``, which reads the weights only); :func:`quantize_lines` lays out its table.

    ``output`` is the written format (:data:`~layerlab.packed.OUTPUT_FORMATS`): ``"compressed-tensors"``
    (the default; plain transformers loads it, with the ``compressed-tensors`` package) or ``"layerlab"`` (the
    packed min-max codes; loads after ``import layerlab``). Where the model or the widths are ones the
    compressed-tensors format cannot hold (:func:`~layerlab.packed.compressed_tensors_unsupported`,
    :func:`~.gpt2_linear.unsupported`), the layerlab format is written instead, and the record's ``format`` and
    ``format_note`` (printed by :func:`quantize_lines`) say why. A GPT-2 in compressed-tensors is written as
    ``model_type opt`` (:mod:`.gpt2_linear`): the record's ``written_model_type`` is ``"opt"`` (None when the
    input's own type is written) and ``format_note`` says why. The quantizer is the written format's (symmetric
    codes for compressed-tensors, min-max ones for layerlab), so every measured loss is that of the weights
    written.

    The model loads in ``dtype`` (``"auto"``: the checkpoint's own). With ``offload=True``, or ``None`` and
    weights larger than ``max_memory`` (as ``analyze`` decides; ``announce`` gets the line saying which), it is
    streamed block by block and never built: :func:`_quantize_offloaded`. ``offload`` in the record says which
    mode ran. With ``tasks`` (probe names, or ``"all"``), the input's row and the chosen allocation's also hold the
    offline capability probes (:mod:`layerlab.probes`; ``probe_items`` items each from ``probe_seed``; the
    baselines are not probed, to keep the cost at two stages)."""
    widths = _check(bits, importance, widths, group, output)
    probes = probe_spec(tasks, probe_items, probe_seed)
    streamed, reason = input_mode(model_dir, dtype=dtype, offload=offload, max_memory=max_memory)
    args = {"model": str(model_dir), "bits": bits, "importance": importance, "widths": list(widths), "group": group,
            "seed": seed, "data": str(data) if data else "embedded", "tokens": tokens,
            "calibration_tokens": calibration_tokens, "dtype": dtype, "offload": streamed, "format": output,
            **({"probes": probes} if probes else {})}
    if streamed:
        if importance not in OFFLOAD_IMPORTANCE:
            raise LayerlabError(f"quantize in offload mode ranks blocks by {' or '.join(OFFLOAD_IMPORTANCE)}; "
                                f"--importance {importance} runs a quantized forward of the whole model per block "
                                "and width: use --no-offload")
        (_, tok, _), om = open_offloaded_input(model_dir, "quantize", dtype=dtype)
        _check_encoder(om.view, importance, probes)
        if announce is not None:
            announce(f"{model_dir}: {reason}")
        return _quantize_offloaded(om, tok, model_dir=model_dir, out=out, bits=bits, importance=importance,
                                   widths=widths, group=group, data=data, tokens=tokens,
                                   calibration_tokens=calibration_tokens, seed=seed, baselines=baselines, args=args,
                                   output=output, probes=probes)
    model, tok, v = open_input(model_dir, "quantize", dtype=dtype)
    _check_encoder(v, importance, probes)
    if announce is not None:
        announce(f"{model_dir}: {reason}")
    quality = Quality(v.causal)  # an encoder's rows: its embeddings' cosine to the input's
    with staged_output(model_dir, out, "quantize", args) as stage:  # --out checked before the slow work starts
        q = Quantizer(model, group)
        q.output, note = _output_format(q, widths, output)
        sizes = q.sizes()
        held = _calibration(model, tok, data, calibration_tokens) if importance != "zd" else []
        scores, cost = _importance(q, model, held, importance, bits, widths, progress)
        chosen = allocate(sizes, bits, widths, cost, fill=importance != "loss")  # LWQ fills the budget
        runs = {**(_baselines(sizes, bits, widths, seed) if baselines else {}), importance: chosen}
        before = {"avg_bits": None, "bytes": param_bytes(model), **_measure(model, tok, data, tokens, quality, probes)}
        rows = {"original": before}
        for name, alloc in runs.items():
            qm = q.quantized_copy(alloc)
            rows[name] = {"allocation": alloc, "avg_bits": average_bits(sizes, alloc), "bytes": q.storage_bytes(alloc),
                          **_measure(qm, tok, data, tokens, quality, probes if name == importance else None)}
            del qm
        q.restore(model)
        final = q.quantized_copy(chosen)
        specs = {name: q.packed(name, w).spec() for b, w in zip(q.blocks, chosen, strict=True) for name in b}
        qc = _quant_config(q, specs, group, bits, average_bits(sizes, chosen))
        if _as_opt(q):  # a GPT-2 in compressed-tensors: written as OPT, its layers nn.Linear
            _write_opt(stage, final, qc)
        else:
            final.config.quantization_config = qc
            stage.save_model(final)
        rows[importance]["disk_bytes"] = _disk(stage.dir)
        stage.record = _record(tok, data, held, importance, scores, chosen, bits, widths, group, sizes, rows, before,
                               model_dir, offload=False, output=q.output, note=note)
    return stage.record


def _check_encoder(v, importance: str, probes: dict | None) -> None:
    """What reads a language model's loss or predictions is refused for an encoder, in one line."""
    if not v.causal and (importance == "loss" or probes):
        what = "--importance loss ranks blocks by language-model loss" if importance == "loss" else \
            "--tasks probe a causal LM"
        raise LayerlabError(f"{what}; this model is an encoder (quantize it by --importance lim or zd, without "
                            "--tasks)")


OFFLOAD_IMPORTANCE = ("lim", "zd")  # one streamed pass (LIM) or one read of each block's weights (ZD)


def _quantize_offloaded(om, tok, *, model_dir, out, bits: float, importance: str, widths: tuple[int, ...],
                        group: int, data, tokens: int | None, calibration_tokens: int, seed: int, baselines: bool,
                        args: dict, output: str = COMPRESSED, probes: dict | None = None) -> dict:
    """:func:`quantize` of a checkpoint streamed block by block (:class:`~layerlab.offload.Offloaded`): the model
    is never built, and at most one block (with its packed layers) is in memory.

    LIM is :func:`lim_scores` on the offloaded model (each traced forward streams the blocks: one pass over the
    calibration tokens); ZD is :func:`zd_scores` with each block held while its weights are read; then the same
    :func:`allocate`. Each allocation's loss is measured by a streamed forward in which every block, once read,
    has its layers packed by :meth:`Quantizer.packed` (the in-memory code) and put in place
    (:meth:`Quantizer.streamed`), so it computes what the in-memory quantized copy computes; its size is the
    full-precision rest plus the packed layers' storage. The output is written block by block: the tensors
    outside the blocks copied from the checkpoint, then per block its packed layers and other tensors, one
    shard per block (:func:`layerlab.offload.write_shards`), in the format and with the ``quantization_config``
    the in-memory path writes. Packing runs once per block each time a block is read, so each evaluated
    allocation packs every block once per evaluation batch (the in-memory path packs once and caches)."""
    from ..offload import outside_blocks, tensor_entry, write_config, write_shards

    model, v = om.model, om.view
    q = Quantizer(model, group)
    q.output, note = _output_format(q, widths, output)
    sizes = q.sizes()
    rest = q.rest_bytes()
    with staged_output(model_dir, out, "quantize", args) as stage:
        held = _calibration(model, tok, data, calibration_tokens) if importance != "zd" else []
        scores, cost = _importance(q, model, held, importance, bits, widths, False, hold=om.block)
        chosen = allocate(sizes, bits, widths, cost, fill=True)
        runs = {**(_baselines(sizes, bits, widths, seed) if baselines else {}), importance: chosen}
        quality = Quality(v.causal)
        before = {"avg_bits": None, "bytes": param_bytes(model), **_measure(model, tok, data, tokens, quality, probes)}
        rows = {"original": before}
        for name, alloc in runs.items():
            with q.streamed(om, alloc) as seen:  # every forward reads every block, so all are packed
                loss = _measure(model, tok, data, tokens, quality, probes if name == importance else None)
            rows[name] = {"allocation": alloc, "avg_bits": average_bits(sizes, alloc),
                          "bytes": rest + sum(b for b, _ in seen.values()), **loss}
        specs: dict[str, dict] = {}
        as_opt = _as_opt(q)  # a GPT-2 in compressed-tensors: written as OPT (names, c_attn split, positions)

        def stored(name: str, t: torch.Tensor) -> list:
            pairs = gpt2_linear.opt_tensors(name, t) if as_opt else [(om.saved_name(name), t)]
            return [tensor_entry(n, x) for n, x in pairs]

        def shards():
            yield _opt_outside(om) if as_opt else outside_blocks(om)
            with q.streamed(om, chosen) as seen:
                for i in range(v.num_layers):
                    with om.block(i) as block:
                        specs.update({n: seen[n][1] for n in q.blocks[i]})
                        prefix = f"{om.blocks_prefix}.{i}."
                        yield [e for k, t in block.state_dict().items() for e in stored(prefix + k, t)]

        write_shards(stage.dir, shards(), count=1 + v.num_layers)
        qc = _quant_config(q, specs, group, bits, average_bits(sizes, chosen))
        if as_opt:
            skeleton = gpt2_linear.skeleton(model, qc)
            write_config(skeleton, stage.dir, skeleton.config, om.dtype)
        else:
            config = copy.deepcopy(model.config)
            config.quantization_config = qc
            write_config(model, stage.dir, config, om.dtype)
        copy_tokenizer(model_dir, stage.dir)
        rows[importance]["disk_bytes"] = _disk(stage.dir)
        stage.record = _record(tok, data, held, importance, scores, chosen, bits, widths, group, sizes, rows, before,
                               model_dir, offload=True, output=q.output, note=note)
    return stage.record


def _measure(model, tok, data, tokens: int | None, quality: Quality, probes: dict | None = None) -> dict:
    """The before/after measurement of every row of quantize's table (the input, each evaluated allocation):
    ``quality``, loss and perplexity on the validation split (an encoder's: its embeddings' cosine to the
    input's), and with ``probes`` ({tasks, n, seed}) the capability probes (:func:`layerlab.probes.measure`). One
    place, for both modes."""
    row = quality(model, tok, data, tokens)
    if probes:
        row["probes"] = measure_spec(model, tok, probes, data)
    return row


def _output_format(q: Quantizer, widths: tuple[int, ...], output: str) -> tuple[str, str | None]:
    """The format written for ``output``, and a note on it (None when there is nothing to add): why it is not the
    one asked for (the compressed-tensors format falls back to layerlab's where the model or the widths are ones
    it cannot hold), or, for a GPT-2 in compressed-tensors, that it is written as ``opt`` (:mod:`.gpt2_linear`)."""
    if output != COMPRESSED:
        return output, None
    gpt2 = gpt2_linear.is_gpt2(q.model)
    why = gpt2_linear.unsupported(q.model.config) if gpt2 else None
    why = why or compressed_tensors_unsupported(q.original, widths, q.group, conv1d=gpt2)
    if why is None:
        return COMPRESSED, GPT2_NOTE if gpt2 else None
    return QUANT_METHOD, f"written in the layerlab format: the compressed-tensors format cannot hold {why}"


GPT2_NOTE = (f"a GPT-2 written as model_type {gpt2_linear.OPT} (OPT's pre-LayerNorm decoder: GPT-2's computation "
             "with nn.Linear layers), since compressed-tensors does not quantize GPT-2's Conv1D layers")


def _as_opt(q: Quantizer) -> bool:
    """Whether the model is written as OPT (:mod:`.gpt2_linear`): a GPT-2 in the compressed-tensors format."""
    return q.output == COMPRESSED and gpt2_linear.is_gpt2(q.model)


def _write_opt(stage, model, quantization_config) -> None:
    """Write the quantized GPT-2 ``model`` (its block layers packed) as OPT into ``stage`` (what
    ``stage.save_model`` writes for any other model): its tensors mapped by :func:`~.gpt2_linear.opt_state_dict`,
    the config and generation config of :func:`~.gpt2_linear.skeleton`, the input's tokenizer."""
    from ..offload import tensor_entry, write_config, write_shards

    write_shards(stage.dir, [[tensor_entry(n, t.contiguous())
                              for n, t in gpt2_linear.opt_state_dict(model).items()]])
    skeleton = gpt2_linear.skeleton(model, quantization_config)
    write_config(skeleton, stage.dir, skeleton.config, model.dtype)
    copy_tokenizer(stage.model_dir, stage.dir)


def _opt_outside(om) -> list:
    """The entries of an offloaded GPT-2's tensors outside the blocks, as OPT stores them: renamed copies, the
    position table read and given OPT's two leading rows, the head left out when tied."""
    from ..offload import outside_blocks, tensor_entry

    out = []
    for e in outside_blocks(om):
        key = e.name
        if key.removeprefix("transformer.") == "lm_head.weight" and om.model.config.tie_word_embeddings:
            continue
        if key.removeprefix("transformer.").startswith("wpe."):
            out += [tensor_entry(n, t) for n, t in gpt2_linear.opt_tensors(key, om.checkpoint.get(key).to(om.dtype))]
            continue
        e.name = gpt2_linear.opt_name(key)  # a rename: the bytes are copied as they are
        out.append(e)
    return out


def _quant_config(q: Quantizer, specs: dict[str, dict], group: int, bits: float, avg: float):
    """The written ``quantization_config`` (both modes): compressed-tensors' (one config group per block) or
    layerlab's (each packed module's spec); both record the budget and the average width used."""
    if q.output == COMPRESSED:
        blocks = [{n: specs[n] for n in b} for b in q.blocks]
        if _as_opt(q):  # the layers' paths in the OPT form (c_attn is q_proj, k_proj and v_proj)
            blocks = [{o: s for n, s in b.items() for o in gpt2_linear.opt_modules(n)} for b in blocks]
        return compressed_tensors_config(blocks, budget_bits=bits, avg_bits=avg)
    return quant_config_class()(modules=specs, group=group, budget_bits=bits, avg_bits=avg)


def _record(tok, data, held, importance: str, scores, chosen: list[int], bits: float, widths, group: int,
            sizes: list[int], rows: dict, before: dict, model_dir, *, offload: bool, output: str,
            note: str | None) -> dict:
    """quantize's record (both modes)."""
    chosen_on = train_slice(tok, data, sum(int(mask.sum()) for _, mask in held)) if held else None  # real tokens
    # the fidelity certificate of the traced stream LIM reads (zd reads weights, loss whole-model losses: None)
    fidelity = scores.get("fidelity")
    scores = {k: v for k, v in scores.items() if k != "fidelity"}
    return {"importance": importance, "chosen_on": chosen_on, "fidelity": fidelity, "scores": scores,
            "allocation": chosen,
            "budget_bits": bits, "widths": list(widths), "group": group, "weights_per_block": sizes, "runs": rows,
            "before": before, "after": rows[importance], "input_disk_bytes": _disk(model_dir), "offload": offload,
            "format": output, "format_note": note,
            "written_model_type": gpt2_linear.OPT if note == GPT2_NOTE else None}


def _check(bits: float, importance: str, widths: tuple[int, ...], group: int,
           output: str = COMPRESSED) -> tuple[int, ...]:
    """The candidate widths, sorted; or a one-line error for any argument out of its range."""
    widths = tuple(sorted(set(int(w) for w in widths)))
    if importance not in IMPORTANCE:
        raise choices_error("importance", importance, IMPORTANCE)
    if output not in OUTPUT_FORMATS:
        raise choices_error("format", output, OUTPUT_FORMATS)
    if not widths or any(not 1 <= w <= 8 for w in widths):
        raise LayerlabError(f"--widths must be integers from 1 to 8, got {list(widths)}")
    if not widths[0] <= bits <= widths[-1]:
        raise LayerlabError(f"--bits must be between {widths[0]} and {widths[-1]} (the candidate widths "
                            f"{', '.join(map(str, widths))}), got {bits}")
    if group < 8 or group % 8:
        raise LayerlabError(f"--group must be a positive multiple of 8, got {group}")
    return widths


def _importance(q: Quantizer, model, held, importance: str, bits: float, widths: tuple[int, ...],
                progress: bool, hold: Callable[[int], AbstractContextManager] | None = None) -> tuple[dict, list]:
    """The ordering's scores, and the per-block, per-width cost the allocator minimises (``hold``: see
    :func:`zd_scores`)."""
    if importance == "loss":
        deltas = loss_deltas(q, held, widths, progress)
        return {"loss_delta": [{str(b): d for b, d in row.items()} for row in deltas]}, deltas
    if importance == "lim":
        lim, fidelity = lim_scores(model, held)
        scores = {"lim": lim, "fidelity": fidelity}  # _record lifts the certificate out of the scores
    else:
        scores = {"zd": zd_scores(q, hold)}
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
        runs["random order"] = allocate(sizes, bits, widths, ranked_cost([rng.random() for _ in sizes], bits, widths),
                                        fill=True)
    return runs


def quantize_lines(record: dict) -> list[str]:
    """What ``layerlab quantize`` prints: the widths chosen, the average used against the budget, the texts
    chosen and scored on, the table, the size on disk."""
    key = "loss" if "loss" in record["before"] else "embedding_cosine"  # an encoder's rows have no loss
    base = record["before"][key]
    columns = [("avg bits", 9, lambda r: f"{r['avg_bits']:.3f}" if r["avg_bits"] is not None else "fp"),
               ("MB", 9, lambda r: f"{r['bytes'] / 1e6:.3f}"), *quality_columns(list(record["runs"].values()), 9),
               ("Δloss" if key == "loss" else "Δcos", 9, lambda r: f"{r[key] - base:+.4f}")]
    chosen_on, used = record["chosen_on"], record["after"]["avg_bits"]
    return [f"widths per block by {record['importance']}: {record['allocation']}",
            *_format_lines(record),
            f"average {used:.3f} bits per block weight, of a budget of {record['budget_bits']:g}",
            f"chosen on the {chosen_on}" if chosen_on else "chosen on the weights alone (no text)",
            quality_heading(record["before"]), *table(record["runs"], columns, name_width=16),
            f"on disk: {record['after']['disk_bytes'] / 1e6:.3f} MB of weights "
            f"(the input: {record['input_disk_bytes'] / 1e6:.3f} MB)", *stage_lines(record["runs"])]


def _format_lines(record: dict) -> list[str]:
    """The written format, in one line, and the note on it where there is one (a GPT-2 written as OPT); none for
    a record from before the format was recorded."""
    if record.get("format") == COMPRESSED:
        note = [record["format_note"]] if record.get("format_note") else []
        return [f"written as compressed-tensors (pack-quantized, symmetric, group {record['group']}): "
                "transformers loads it with the compressed-tensors package, without layerlab", *note]
    if record.get("format") == QUANT_METHOD:
        return [record.get("format_note") or "written in the layerlab format: loads after import layerlab"]
    return []


def _disk(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
