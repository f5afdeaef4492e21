"""The one exception type that the CLI turns into a one-line message."""


class LayerlabError(Exception):
    """A problem with the user's input: printed as ``error: <message>``, no traceback."""


def choices_error(kind: str, name: object, valid: list[str] | tuple[str, ...]) -> LayerlabError:
    """An error for an unknown registry name that lists the valid ones."""
    return LayerlabError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
