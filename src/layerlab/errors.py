"""The one exception type that the CLI turns into a one-line message, the errors for unknown names, and the
checks of plain arguments that both the CLI (before anything heavy loads) and the library make."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LayerlabError(Exception):
    """A problem with the user's input: printed as ``error: <message>``, no traceback."""


def close_match(name: object, valid: Iterable[str]) -> str | None:
    """The one of ``valid`` that a misspelt ``name`` most likely meant, or None when none is close."""
    matches = difflib.get_close_matches(str(name), list(valid), n=1)
    return matches[0] if matches else None


def choices_error(kind: str, name: object, valid: Iterable[str]) -> LayerlabError:
    """An error for an unknown registry name that lists the valid ones, and the closest one if any."""
    valid = list(valid)
    error = f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}"
    if (close := close_match(name, valid)) is not None:
        error += f"; did you mean {close!r}?"
    return LayerlabError(error)


def check_loss_tokens(tokens: int | None) -> None:
    """A loss needs at least two tokens: one to read and one to predict (None: all of them)."""
    if tokens is not None and tokens < 2:
        raise LayerlabError(f"--tokens must be at least 2 (one to read, one to predict), got {tokens}")


def check_prompt(prompt: str) -> None:
    """Generation needs text to continue."""
    if not prompt:
        raise LayerlabError("the prompt is empty: give --prompt some text (the default is a newline)")
