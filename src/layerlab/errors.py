"""The one exception type that the CLI turns into a one-line message, the errors for unknown names and for a
model directory without a tokenizer, and the checks of plain arguments that both the CLI (before anything heavy
loads) and the library make."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

# The files transformers 5's AutoTokenizer reads from a model directory (``tokenization_utils_base``: the
# tokenizer class's ``vocab_files_names`` plus tokenizer.json, tokenizer_config.json, special_tokens_map.json,
# added_tokens.json). The first five hold a vocabulary; the rest only configure one.
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model")
TOKENIZER_FILES = (*VOCAB_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
EXPECTED_TOKENIZER_FILES = ("tokenizer.json, or vocab.json + merges.txt (BPE), vocab.txt (WordPiece) or "
                            "tokenizer.model (SentencePiece), with tokenizer_config.json")


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


def no_tokenizer_error(directory: str | Path) -> LayerlabError:
    """The one-line error for a model directory whose tokenizer is missing or empty, naming the files."""
    directory = Path(directory)
    found = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    vocab = [name for name in found if name in VOCAB_FILES]
    if vocab:
        holds = "holds" if len(vocab) == 1 else "hold"
        what = f"an empty tokenizer: {' + '.join(vocab)} {holds} no token but special ones"
    else:
        what = "no tokenizer files" + (f" (only {', '.join(found)})" if found else "")
    return LayerlabError(f"{directory} has {what}; expected {EXPECTED_TOKENIZER_FILES}: copy them from the model "
                         "it came from (only convert --to rmsnorm|crmsnorm, without --data, works without them)")
