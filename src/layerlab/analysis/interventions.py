"""Layer interventions (work in progress: filled in by its section's change)."""

from __future__ import annotations

from ..registry import SECTIONS
from .sections import Section, SectionContext, SectionOutput


@SECTIONS.register("interventions")
class Interventions(Section):
    name = "interventions"
    keys = ("interventions",)
    title = "Layer interventions"
    doc = "Layer interventions"

    def run(self, ctx: SectionContext) -> SectionOutput:
        raise NotImplementedError

    def html(self, page, models, names, colors) -> None:
        raise NotImplementedError
