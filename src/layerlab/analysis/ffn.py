"""FFN anatomy (work in progress: filled in by its section's change)."""

from __future__ import annotations

from ..registry import SECTIONS
from .sections import Section, SectionContext, SectionOutput


@SECTIONS.register("ffn")
class FFNAnatomy(Section):
    name = "ffn"
    keys = ("ffn_memories", "moefication",)
    title = "FFN anatomy"
    doc = "FFN anatomy"

    def run(self, ctx: SectionContext) -> SectionOutput:
        raise NotImplementedError

    def html(self, page, models, names, colors) -> None:
        raise NotImplementedError
