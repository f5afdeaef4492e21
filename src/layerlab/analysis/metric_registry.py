"""The metric registry's types: a per-layer metric is one :class:`Metric` entry that says everything about it.

An entry declares

- ``kind``: the accumulator it reads (:data:`KINDS`): running sums over every token, the token sample, or
  the block's weight matrices;
- ``compute``: how its per-layer value comes from what those accumulators gathered, one call shape for all,
  ``compute(r: LayerResults) -> value``; a streaming metric that needs a running sum the pass does not keep
  yet brings it as ``sums`` (a per-batch reduction that the pass adds up), so that it too is one entry;
- ``key``: its ``report.json`` key in every layer's entry;
- ``plots``: the figure (a family of :data:`FAMILIES`), panel and legend label that draw it in report.html;
- ``table``: whether report.html's per-layer table has its column;
- ``doc`` and ``paper``: a one-line description and the paper it follows, from which the key list of
  docs/report-format.md is generated (:mod:`layerlab.analysis.metric_docs`).

``analyze`` fills each layer's entry in the registry's order; the report's figures, its table and the docs
all read the registry. The built-in entries are in :mod:`layerlab.analysis.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import LayerlabError, choices_error
from ..registry import Registry

if TYPE_CHECKING:  # annotations only
    from .spectra import MatrixSpectrum
    from .stats import StreamBatch, TokenSample


@dataclass(frozen=True)
class Kind:
    """An accumulator of the analysis pass, as the docs name it."""

    name: str
    source: str  # what its metrics are measured from, for the docs
    switch: str | None = None  # the analyze_model keyword that turns off every metric of this kind


# ``source`` may name analyze's sample sizes, {sample_tokens}, {sample_sequences} and {removal_tokens}.
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("stream", "running sums over every token"),
    Kind("sample", "the token sample: the first {sample_tokens} tokens, or the first {sample_sequences} sequences"),
    Kind("removal", "a skip-stream per block, carried through the later blocks in the same pass (L(L-1)/2 block "
                    "forwards), over the first --removal-tokens tokens ({removal_tokens})"),
    Kind("weights", "the block's weight matrices, once per checkpoint", switch="spectra"),
)}

# The analyze_model keywords that can turn metrics off (a metric's own ``switch``, or its kind's).
SWITCHES = ("spectra", "intrinsic")

# Per-layer keys that are not measurements: they name the block, and lead every layer's entry.
LAYER_FIELDS = ("index", "placement")


@dataclass(frozen=True)
class Family:
    """One figure of report.html: the panels of the metrics that name it, under a title and a caption."""

    title: str
    caption: str
    ncols: int = 3
    row_height: float = 2.9  # inches per row of panels
    own_section: bool = False  # drawn under its own heading after the heatmaps, not among the depth plots


@dataclass(frozen=True)
class Plot:
    """Where a metric is drawn: a panel (by title) of a figure (a family's title), as one labelled line.

    Metrics that name the same panel share its axes, in registry order; the panel's axis settings (``ylabel``,
    ``log``, ``hline``, ``embedding_key``, ``final_key``, ``loss_line``) are those of its first plot.
    """

    family: str
    panel: str
    label: str
    part: str | None = None  # for a metric whose value is a dict: the entry drawn ("max_abs" -> "resid")
    style: str = "-"  # matplotlib line style
    ylabel: str = ""
    log: bool = False
    hline: float | None = None  # a grey reference line
    embedding_key: str | None = None  # also draw model["embedding"][key] at x = -1 ("emb")
    final_key: str | None = None  # also draw model[key] at x = num_layers (the final norm)
    loss_line: bool = False  # a dashed line at each model's full loss


def series_key(key: str, plot: Plot) -> str:
    """The per-layer key a plot of metric ``key`` reads: the key, or ``key.part`` for a dict-valued metric."""
    return f"{key}.{plot.part}" if plot.part else key


@dataclass
class LayerResults:
    """What the analysis pass gathered for block ``index``: the one argument of every metric's ``compute``.

    ``block`` holds the per-block running means (an (L,) result at ``index``, an (S, S) matrix at
    ``[index][index + 1]``), ``entering`` and ``leaving`` the per-state ones of x_l and x_l+1 (an (S,)
    result at ``index`` and ``index + 1``), ``model`` the model-wide ones (tokens, sequences, loss); a
    quantity that was not measured (no LM head: ``lens_ce``) is None in ``block``. ``tokens`` and
    ``sequences`` are the token sample of x_l+1, ``matrices`` the block's weight spectra (None when off).
    """

    index: int
    causal: bool
    block: dict[str, Any] = field(default_factory=dict)
    entering: dict[str, Any] = field(default_factory=dict)
    leaving: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    sample: TokenSample | None = None
    matrices: list[MatrixSpectrum] | None = None

    @cached_property
    def tokens(self) -> torch.Tensor:
        """(N, C) float32: the sampled non-padding tokens of x_l+1 (empty when no sample was kept)."""
        return self.sample.matrix(self.index + 1) if self.sample is not None else torch.zeros(0, 0)

    @property
    def sequences(self) -> list[torch.Tensor]:
        """The sampled whole sequences of x_l+1, each (T, C)."""
        return self.sample.sequences(self.index + 1) if self.sample is not None else []


# A metric's own running sum: from one traced batch, an (S,) per-state or (L,) per-block sum over its tokens.
Sums = Callable[["StreamBatch"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """One per-layer metric: its accumulator, computation, report key, plots, table column and docs."""

    key: str
    kind: str
    compute: Callable[[LayerResults], Any]
    doc: str  # one line: what the value is
    paper: str = ""  # the paper it follows, as "Author et al., year (Title)"
    example: Any = None  # the value shown in docs/report-format.md's example
    plots: tuple[Plot, ...] = ()
    table: bool = True  # a column of report.html's per-layer table
    switch: str | None = None  # the analyze_model keyword (of SWITCHES) that turns it off
    sums: Sums | None = None  # a running sum of its own (kind "stream"); its mean is r.block/leaving[key]


class _Registry(Registry):
    """A :class:`~layerlab.registry.Registry` whose entries can be taken out again (see :func:`registered`)."""

    def remove(self, name: str) -> None:
        del self._entries[self.check(name)]


METRICS = _Registry("per-layer metric")
FAMILIES = _Registry("plot family")


def register_family(family: Family) -> Family:
    """Add a figure of report.html; metrics name it by its title."""
    if family.title in FAMILIES:
        raise LayerlabError(f"plot family {family.title!r} is already registered")
    return FAMILIES.register(family.title, family)


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` at the end of the registry (the order of each layer's entry, the table and the panels)."""
    key = metric.key
    if key in METRICS or key in LAYER_FIELDS:
        raise LayerlabError(f"per-layer key {key!r} is already taken")
    if metric.kind not in KINDS:
        raise choices_error("accumulator kind", metric.kind, KINDS)
    if metric.switch is not None and metric.switch not in SWITCHES:
        raise choices_error("switch", metric.switch, SWITCHES)
    for plot in metric.plots:
        FAMILIES.check(plot.family)
    if metric.sums is not None and metric.kind != "stream":
        raise LayerlabError(f"metric {key!r}: only a 'stream' metric keeps running sums, not {metric.kind!r}")
    if not metric.doc.strip() or "\n" in metric.doc:
        raise LayerlabError(f"metric {key!r} needs a one-line description")
    return METRICS.register(key, metric)


@contextmanager
def registered(*metrics: Metric, families: tuple[Family, ...] = ()) -> Iterator[None]:
    """Register ``metrics`` (and ``families``) for the duration of a ``with`` block, then remove them."""
    added_families: list[str] = []
    added: list[str] = []
    try:
        for family in families:
            added_families.append(register_family(family).title)
        for metric in metrics:
            added.append(register_metric(metric).key)
        yield
    finally:
        for key in added:
            METRICS.remove(key)
        for title in added_families:
            FAMILIES.remove(title)


def stream_sums() -> dict[str, Sums]:
    """The running sums that registered metrics add to the streaming pass, by metric key."""
    return {key: m.sums for key, m in METRICS.items() if m.sums is not None}


def layer_results(res: Mapping[str, Any], num_layers: int, causal: bool, sample: TokenSample | None = None,
                  spectra: list[MatrixSpectrum] | None = None) -> list[LayerResults]:
    """Split the pass's results into one :class:`LayerResults` per block.

    ``res`` maps names to an (S, S) matrix (read at [l][l+1]), an (S,) per-state list, an (L,) per-block list,
    None (not measured) or a model-wide scalar; S = L + 1. ``spectra`` lists every matrix's spectrum.
    """
    L, S = num_layers, num_layers + 1
    out = [LayerResults(i, causal, sample=sample, matrices=None if spectra is None else []) for i in range(L)]
    for name, value in res.items():
        for i, r in enumerate(out):
            if value is None:
                r.block[name] = None
            elif not isinstance(value, list):
                r.model[name] = value
            elif len(value) == S and isinstance(value[0], list):
                r.block[name] = value[i][i + 1]
            elif len(value) == S:
                r.entering[name], r.leaving[name] = value[i], value[i + 1]
            elif len(value) == L:
                r.block[name] = value[i]
            else:
                raise LayerlabError(f"result {name!r} has {len(value)} entries; expected {L} blocks or {S} states")
    for s in spectra or []:
        if not 0 <= s.block < L:
            raise LayerlabError(f"spectrum of block {s.block} ({s.name}) is outside 0..{L - 1}")
        out[s.block].matrices.append(s)
    return out


def is_off(metric: Metric, off: Collection[str]) -> bool:
    """Whether ``metric`` is turned off by the switches in ``off`` (its own, or its kind's)."""
    return metric.switch in off or KINDS[metric.kind].switch in off


def measure_layer(r: LayerResults, off: Collection[str] = ()) -> dict[str, Any]:
    """Every registered metric of one layer, by key in registry order; a metric turned off is None."""
    return {key: None if is_off(m, off) else m.compute(r) for key, m in METRICS.items()}


def nanmean(values: list[float]) -> float:
    """The mean of the finite values, NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
