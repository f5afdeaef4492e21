"""Trained lenses and early exit (work in progress: filled in by its section's change)."""

from __future__ import annotations

from ..registry import SECTIONS
from .sections import Section, SectionContext, SectionOutput


@SECTIONS.register("lenses")
class Lenses(Section):
    name = "lenses"
    keys = ("lenses",)
    title = "Trained lenses and early exit"
    doc = "Trained lenses and early exit"

    def run(self, ctx: SectionContext) -> SectionOutput:
        raise NotImplementedError

    def html(self, page, models, names, colors) -> None:
        raise NotImplementedError
