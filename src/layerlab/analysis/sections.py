"""Opt-in analysis sections: measurements that intervene on the model or fit something to it, run after the
streaming pass on the same tokens, each one entry of :data:`layerlab.registry.SECTIONS`.

A section is a subclass of :class:`Section`. It declares its report keys, runs on a :class:`SectionContext`
(the adapter's view, the tokens the pass measured, the section's own options) and returns a
:class:`SectionOutput`: the values of its keys in the model's report entry, and the tensors it saves next to
the report (``artifacts``). report.html draws each section present in a report with the section's own
:meth:`Section.html`. ``analyze_model`` runs the sections it is asked for in the registry's order; adding one
is a registry entry and a module, never a branch in the pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..data import batches
from ..errors import LayerlabError
from ..registry import SECTIONS

if TYPE_CHECKING:  # annotations only
    from ..adapters import LayerView
    from ..report.html import Page


@dataclass
class SectionContext:
    """What a section runs on: one model, the tokens the analysis pass measured, and the section's options.

    ``ids`` are those token ids (the first ``--tokens`` of the split: the same slice the report's other numbers
    are measured on); :meth:`batches` cuts any list of ids into the pass's (input_ids, mask) batches on the
    model's device. ``loss`` is the model's full loss there (causal models; the pass's figure), None for an
    encoder. ``options`` holds the section's command-line options by name (absent ones: the section's defaults).
    """

    view: LayerView
    tokenizer: Any
    ids: list[int]
    tokens: int
    seq_len: int
    batch_size: int
    device: torch.device
    name: str
    loss: float | None = None
    progress: bool = False
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def batches(self, ids: list[int] | None = None, tokens: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """(input_ids, attention_mask) batches of ``ids`` (default: all of :attr:`ids`), at most ``tokens`` tokens
        (default: :attr:`tokens`), windowed as the analysis pass windows them, on the model's device."""
        ids = self.ids if ids is None else ids
        tokens = self.tokens if tokens is None else tokens
        for input_ids, mask in batches(self.tokenizer, ids, tokens, self.seq_len, self.batch_size,
                                       causal=self.view.causal):
            yield input_ids.to(self.device), mask.to(self.device)

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


@dataclass
class SectionOutput:
    """A section's result for one model: ``values`` (report key -> JSON-able value, for every key the section
    declares) and ``artifacts`` (a file stem -> the tensors to save as ``<stem>.safetensors`` next to the
    report; the model's entry names the file under ``artifacts``)."""

    values: dict[str, Any]
    artifacts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Section:
    """One opt-in analysis section. Subclasses set the class attributes and implement :meth:`run` and
    :meth:`html`; register with ``@SECTIONS.register(name)`` (and declare the name in layerlab.registry)."""

    name: ClassVar[str]  # its registry name: the command-line switch is --<name>
    keys: ClassVar[tuple[str, ...]]  # the model-entry keys of report.json it fills
    title: ClassVar[str]  # the heading of its part of report.html
    doc: ClassVar[str]  # one line for docs and --help
    needs_lm_head: ClassVar[bool] = False  # a model without a language-model head gets None for every key
    in_memory: ClassVar[bool] = True  # the section edits the block list, so an offloaded model is refused

    def skip_reason(self, view: LayerView) -> str | None:
        """Why the section does not apply to this model (its keys are then None), or None where it does."""
        if self.needs_lm_head and not view.has_lm_head:
            return f"{self.name}: {view.arch_name} models have no language-model head"
        return None

    def run(self, ctx: SectionContext) -> SectionOutput:
        raise NotImplementedError

    def html(self, page: Page, models: list[dict], names: list[str], colors: list[str]) -> None:
        """Draw the section's part of report.html for the models whose entries hold its keys."""
        raise NotImplementedError


def sections_for(names) -> list[Section]:
    """The sections ``names`` asks for, in the registry's order (an unknown name: the registry's one-line error)."""
    wanted = {SECTIONS.check(n) for n in names}
    return [SECTIONS[n]() for n in SECTIONS if n in wanted]


def check_sections(names, *, offloaded: bool) -> None:
    """Refuse, in one line and before anything loads, sections that cannot run as asked."""
    for section in sections_for(names):
        if offloaded and section.in_memory:
            raise LayerlabError(f"--{section.name} runs on a model held in memory; drop --offload (or raise "
                                "--max-memory) to use it")


def run_sections(options: dict[str, dict[str, Any]], ctx_kw: dict[str, Any],
                 announce=None) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Run each section named in ``options`` (name -> its options) on one model; returns the report values of
    all of them and their artifacts (stem -> tensors)."""
    values: dict[str, Any] = {}
    artifacts: dict[str, dict[str, torch.Tensor]] = {}
    for section in sections_for(options):
        ctx = SectionContext(**ctx_kw, options=dict(options.get(section.name) or {}))
        reason = section.skip_reason(ctx.view)
        if reason is not None:
            if announce is not None:
                announce(f"{ctx.name}: skipped {reason}")
            values.update(dict.fromkeys(section.keys))
            continue
        out = section.run(ctx)
        missing = set(section.keys) - set(out.values)
        if missing:
            raise RuntimeError(f"section {section.name} returned no value for {sorted(missing)}")
        values.update({k: out.values[k] for k in section.keys})
        artifacts.update(out.artifacts)
    return values, artifacts


def draw_sections(page: Page, models: list[dict], names: list[str], colors: list[str]) -> None:
    """Each registered section that any model of the report holds, in the registry's order (report.html)."""
    for name in SECTIONS:
        section = SECTIONS[name]()
        shown = [(m, n, c) for m, n, c in zip(models, names, colors)
                 if any(m.get(k) is not None for k in section.keys)]
        if shown:
            page.add(f"<h2 id=\"section-{name}\">{section.title}</h2>")
            section.html(page, *(list(x) for x in zip(*shown)))
