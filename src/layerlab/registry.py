"""Registries of extensions whose names must be known before torch loads.

A :class:`Registry` maps names to objects, like a dict. An entry is either registered with its object
(``@NORMS.register("rmsnorm")`` on the class) or declared here as ``"module:attr"``, which names it
without importing it: the configs, the CLI's choice lists and its one-line errors read the names, and
a typo in ``--norm`` is answered before the seconds torch takes to import. The object is imported on
first use, and the module's own ``register`` then confirms the declaration (a test resolves them all).

This module imports nothing heavy; keep it that way.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import LayerlabError, choices_error


class Registry(Mapping[str, Any]):
    """Name -> object for one kind of extension; ``kind`` names it in errors ("unknown norm 'x'; valid: ...")."""

    def __init__(self, kind: str, declared: dict[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, Any] = dict(declared or {})

    def register(self, name: str, obj: Any = None) -> Any:
        """Add ``obj`` under ``name``; without ``obj``, a decorator. A declared ``"module:attr"`` entry must
        name this object: registering something else under a declared name is an error."""
        if obj is None:
            return lambda o: self.register(name, o)
        declared = self._entries.get(name)
        if isinstance(declared, str) and declared != f"{obj.__module__}:{obj.__qualname__}":
            raise LayerlabError(f"{self.kind} {name!r} is declared as {declared}, not "
                                f"{obj.__module__}:{obj.__qualname__}")
        self._entries[name] = obj
        return obj

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(name)
        entry = self._entries[name]
        if isinstance(entry, str):  # declared: import the module, whose register() swaps in the object
            module, _, attr = entry.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry = obj
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else the one-line error that lists the valid names and the closest one."""
        if name not in self._entries:
            raise choices_error(self.kind, name, list(self._entries))
        return name

    def get_checked(self, name: str) -> Any:
        """The object under ``name``, or the one-line error of :meth:`check`."""
        return self[self.check(name)]


# Every norm is built as ``NORMS[name](dim, *, eps)`` (layerlab.norms, where each class is defined and cited).
NORMS = Registry("norm", {
    "layernorm": "layerlab.norms:LayerNorm",
    "rmsnorm": "layerlab.norms:RMSNorm",
    "crmsnorm": "layerlab.norms:CRMSNorm",
    "dyt": "layerlab.norms:DyT",
    "seednorm": "layerlab.norms:SeeDNorm",
    "powernorm": "layerlab.norms:PowerNorm",
    "batchnorm": "layerlab.norms:BatchNorm",
    "prepbn": "layerlab.norms:PRepBN",
    "unified": "layerlab.norms:UnifiedNorm",
    "none": "layerlab.norms:NoNorm",
})

# Every optimizer is built as ``OPTIMIZERS[name](model, train_config)`` (layerlab.train.optimizers).
OPTIMIZERS: Registry = Registry("optimizer", {
    "adamw": "layerlab.train.optimizers:Layerwise",
    "lamb": "layerlab.train.optimizers:LAMB",
    "lars": "layerlab.train.optimizers:LARS",
    "llr": "layerlab.train.optimizers:LLR",
    "noise": "layerlab.train.optimizers:NoiseAdaptive",
    "lisa": "layerlab.train.optimizers:LISA",
})

@dataclass(frozen=True)
class Placement:
    """Where one block puts its norms: everything the config, the model, the adapters, prune and the optimizers
    ask of a placement. ``forward`` names the block's forward in ``layerlab.model`` (or is the function itself,
    ``(block, x, attn_kw) -> x``); a placement with a ``schedule`` is not one block's but a per-block list."""

    doc: str
    forward: str | Callable = "pre"
    out_norms: bool = False  # a norm on each sublayer's output (Peri-LN)
    inner_norm: bool = False  # a norm inside each sublayer, before its output projection (Sub-LN)
    depth_scale: bool = False  # the norm outputs of block l are scaled by 1/sqrt(l); no depth-scaled init (LNS)
    residual_sublayers: bool = True  # x + F(...): each sublayer adds to the stream, so a block may lack one
    final_norm: bool = True  # a model whose last block is this one ends with a norm before the head
    schedule: Callable[[int, float], list[str]] | None = None  # (layers, mix_alpha) -> each block's placement
    # (layers) -> the init gain of the sublayers' value / output projections and FFN weights, in place of the
    # depth-scaled init (Magneto's sqrt(log 2N) for Sub-LN)
    init_gain: Callable[[int], float] | None = None


def _magneto_gain(layers: int) -> float:
    """gamma = sqrt(log 2N) for a decoder-only model of N blocks (Wang et al., 2022, Foundation Transformers, Sec. 2.2;
    microsoft/torchscale's decoder, ``init_scale = sqrt(log(decoder_layers * 2))`` on fc1, fc2, v_proj, out_proj)."""
    return math.sqrt(math.log(2 * layers))


def _mix_schedule(layers: int, alpha: float) -> list[str]:
    """Post-LN for the first floor(alpha * L) blocks, Pre-LN after (Li et al., 2024, Mix-LN)."""
    n_post = int(alpha * layers)
    return ["post"] * n_post + ["pre"] * (layers - n_post)


PLACEMENTS = Registry("placement", {
    "post": Placement("Post-LN: Norm(x + F(x)) (Vaswani et al., 2017)", forward="post", residual_sublayers=False,
                      final_norm=False),
    "pre": Placement("Pre-LN: x + F(Norm(x)) (Xiong et al., 2020)"),
    "peri": Placement("Peri-LN: x + Norm(F(Norm(x))) (Kim et al., 2025)", forward="peri", out_norms=True),
    "mix": Placement("Mix-LN: Post-LN for the first floor(alpha L) blocks, Pre-LN after (Li et al., 2024)",
                     schedule=_mix_schedule),
    "lns": Placement("LayerNorm Scaling: Pre-LN with norm outputs of block l scaled by 1/sqrt(l) (Sun et al., "
                     "2025, The Curse of Depth)", depth_scale=True),
    "sandwich": Placement("Sub-LN: Pre-LN plus a norm before each sublayer's output projection (Wang et al., 2022, "
                          "Magneto), with Magneto's sqrt(log 2N) init gain", inner_norm=True, init_gain=_magneto_gain),
})
PLACEMENT_ALIASES = {"subln": "sandwich"}


def block_placement_names() -> list[str]:
    """The placements that describe one block (every entry but the schedules), for per-block schedules."""
    return [name for name, p in PLACEMENTS.items() if p.schedule is None]


def residual_placement_names() -> list[str]:
    """The one-block placements whose sublayers add to the residual stream, so that a block may lack one."""
    return [name for name in block_placement_names() if PLACEMENTS[name].residual_sublayers]


@dataclass(frozen=True)
class BlockForm:
    """How a block's two sublayers meet the residual stream. ``forwards`` maps the forward a placement names
    (:attr:`Placement.forward`) to this form's forward in ``layerlab.model`` (or the function itself); a
    placement whose forward is not a key is refused with this form. ``form`` is the adapters' name for it
    (``layerlab.adapters.archs.FORMS``); ``shared_norm``: one input norm (``ln1``) feeds both sublayers."""

    doc: str
    forwards: dict[str, str | Callable] | None = None  # None: the placement's own forward (every placement)
    form: str = "sequential"
    shared_norm: bool = False

    def forward_for(self, placement: Placement) -> str | Callable | None:
        """The block forward for ``placement`` in this form; None where they do not combine."""
        return placement.forward if self.forwards is None else self.forwards.get(placement.forward)


BLOCKS = Registry("block form", {
    "sequential": BlockForm("x = x + Attn(Norm(x)); x = x + MLP(Norm(x)) (Vaswani et al., 2017; GPT-2)"),
    "parallel": BlockForm("x + Attn(Norm(x)) + MLP(Norm(x)), one norm feeding both sublayers (GPT-J, Wang & "
                          "Komatsuzaki, 2021; PaLM, Chowdhery et al., 2022)",
                          forwards={"pre": "parallel", "peri": "parallel_peri"}, form="parallel",
                          shared_norm=True),
    "parallel2": BlockForm("x + Attn(Norm1(x)) + MLP(Norm2(x)), a norm per sublayer (GPT-NeoX / Pythia's "
                           "use_parallel_residual; Black et al., 2022)",
                           forwards={"pre": "parallel", "peri": "parallel_peri"}, form="parallel"),
})


def block_form_placements(form: str) -> list[str]:
    """The one-block placements that ``form`` combines with."""
    f = BLOCKS[form]
    return [name for name in block_placement_names() if f.forward_for(PLACEMENTS[name]) is not None]


@dataclass(frozen=True)
class Wiring:
    """How the blocks feed each other in depth. ``mixer`` names the module class in ``layerlab.model`` that every
    block ends with, ``(cfg, index) -> module``, called as ``mixer(out, history)`` on the block's output and the
    outputs of the blocks before it (``history[0]`` the embedding); None: the block's output is the next input."""

    doc: str
    mixer: str | None = None


WIRINGS = Registry("wiring", {
    "residual": Wiring("each block's output is the next block's input"),
    "denseformer": Wiring("DenseFormer: after block i, a learned depth-weighted average (DWA) of the embedding and "
                          "the outputs of blocks 0..i, initialised to the identity, with dilation and period "
                          "(Pagliardini et al., 2024)", mixer="DepthWeightedAverage"),
})


def _ffn_each(layers: int) -> list[int]:
    return list(range(layers))


def _ffn_one(layers: int) -> list[int]:
    return [0] * layers


@dataclass(frozen=True)
class FFNSharing:
    """Which FFN each block runs: ``groups(layers)`` gives block i's FFN index; an FFN that several blocks run is
    stored once, at the model's top level (``shared_ffn``), and each of those blocks' ``mlp`` calls it."""

    doc: str
    groups: Callable[[int], list[int]]


# Every block's MLP is built as ``MLPS[cfg.mlp](cfg, inner_norm=...)``: the dense MLP (GELU, or SwiGLU; Shazeer,
# 2020), or a mixture of experts with top-k routing (layerlab.moe: Switch Transformers, Mixtral).
MLPS = Registry("mlp", {
    "gelu": "layerlab.model:MLP",
    "swiglu": "layerlab.model:MLP",
    "moe": "layerlab.moe:MoEMLP",
})

FFN_SHARINGS = Registry("FFN sharing", {
    "none": FFNSharing("every block has its own FFN", _ffn_each),
    "all": FFNSharing("one FFN shared by every block, each block keeping its norms (Pires et al., 2023, One Wide "
                      "Feedforward is All You Need); widen it with ffn_mult", _ffn_one),
})


# The compressors' choices (layerlab.compress), checked by the CLI before the model loads.
PRUNE_METRICS = Registry("metric", {  # each (model, tokenizer, n, data, tokens, unit=...) -> (blocks, scores)
    "angular": "layerlab.compress.prune:by_angular",
    "bi": "layerlab.compress.prune:by_bi",
    "loss": "layerlab.compress.prune:by_loss",
})
SUBLAYERS = ("attn", "mlp")  # the sublayers of a block, as the adapters name them
PRUNE_UNITS = ("block", *SUBLAYERS)
HEAL_MODES = ("lora", "full")
QUANT_IMPORTANCE = ("lim", "zd", "loss")
CONVERT_TARGETS = ("rmsnorm", "crmsnorm", "no-norm", "recursive")  # recursive: layerlab.recursive
EXPORT_TARGETS = ("gpt2", "folded")  # layerlab export --to: plain HF GPT-2, or its batch norms folded away

# The capability probes (layerlab.probes, where each is defined and cited), each built as
# ``PROBES[name](tokenizer, n, seed, data) -> items``; ``--tasks`` takes a comma-separated list of them, or ``all``.
PROBES = Registry("probe", {
    "add": "layerlab.probes:add",
    "brackets": "layerlab.probes:brackets",
    "copy": "layerlab.probes:copy",
    "recall": "layerlab.probes:recall",
    "next_token": "layerlab.probes:next_token",
})
# The opt-in sections of ``layerlab analyze`` (layerlab.analysis.sections): each a Section subclass that runs
# after the streaming pass, named on the command line as ``--<name>``, in this order in the report.
SECTIONS = Registry("analysis section", {
    "interventions": "layerlab.analysis.interventions:Interventions",
    "lenses": "layerlab.analysis.lenses:Lenses",
    "ffn": "layerlab.analysis.ffn:FFNAnatomy",
})

PROBE_ITEMS = 200  # items per probe (next_token: positions of the held-out text)


def probe_tasks(spec: str | None) -> list[str]:
    """The probe names of a ``--tasks`` value: comma-separated names, or ``all`` (every probe); an empty or
    unknown name is the registry's one-line error."""
    names = [t.strip() for t in (spec or "").split(",")]
    if names == ["all"]:
        return list(PROBES)
    return list(dict.fromkeys(PROBES.check(t) for t in names))

__all__ = ["BLOCKS", "CONVERT_TARGETS", "EXPORT_TARGETS", "FFN_SHARINGS", "HEAL_MODES", "MLPS", "NORMS", "OPTIMIZERS",
           "PLACEMENTS", "WIRINGS", "BlockForm", "FFNSharing", "Wiring", "block_form_placements",
           "PLACEMENT_ALIASES", "PROBES", "PROBE_ITEMS", "PRUNE_METRICS", "PRUNE_UNITS", "QUANT_IMPORTANCE",
           "SECTIONS", "SUBLAYERS", "Placement", "Registry", "block_placement_names", "probe_tasks",
           "residual_placement_names"]
