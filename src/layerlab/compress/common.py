"""What every compressor shares: open the input and refuse what it cannot take, stage the output in a
temporary directory that becomes ``--out`` only when everything is written, record what was done in
``layerlab.json``, and lay out the before/after table. A compressor is then its own measurement and surgery,
and returns its record; the CLI prints the lines :func:`table` lays out (library code never prints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import Loaded, load_model
from ..errors import LayerlabError
from ..io import copy_tokenizer, output_dir, write_manifest
from ..model import refuse_design
from ..packed import refuse_quantized


def open_input(model_dir: str | Path, command: str, *, need_tokenizer: bool = True,
               dtype: str | torch.dtype = torch.float32) -> Loaded:
    """The input model, tokenizer and view, loaded in ``dtype`` (``"auto"``: the checkpoint's own); a quantized
    model is refused (what a command cannot do to an encoder, it refuses itself). A model without a tokenizer is
    refused too, unless ``need_tokenizer`` is False (the command reads no text): its tokenizer is then None."""
    if isinstance(dtype, str) and dtype != "auto":
        from ..offload import resolve_dtype

        dtype = resolve_dtype(dtype, None, None)
    loaded = load_model(model_dir, need_tokenizer=need_tokenizer, dtype=dtype)
    refuse_quantized(loaded.model, model_dir, command)
    refuse_design(loaded.model, command)
    return loaded


def input_mode(model_dir: str | Path, *, dtype: str = "auto", offload: bool | None = False,
               max_memory: str | int | None = None) -> tuple[bool, str]:
    """Whether a compressor streams its input block by block (:mod:`layerlab.offload`), and the one line that
    says why: with ``offload=True``, or with ``offload=None`` when the weights (in ``dtype``; ``"auto"``, the
    checkpoint's own) exceed ``max_memory``, exactly as ``analyze`` decides (:func:`layerlab.offload.choose_offload`).
    An unknown ``--dtype`` or a ``--max-memory`` below one block is one line."""
    from ..io import check_model_dir
    from ..offload import choose_offload, resolve_dtype

    if dtype != "auto":
        resolve_dtype(dtype, None, None)
    check_model_dir(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return choose_offload(model_dir, offload, max_memory, dtype, device)


def open_offloaded_input(model_dir: str | Path, command: str, *, dtype: str = "auto"):
    """``(Loaded, Offloaded)``: the input streamed block by block, as ``analyze`` opens it (its ``open_model``: a
    family with an adapter entry, safetensors, the tokenizer); its parameters are on ``meta`` except the
    embedding, final norm and head, and its forward streams the blocks. A quantized model is refused as
    :func:`open_input` refuses it."""
    from ..analysis.analyze import open_model
    from ..offload import raw_config

    if getattr(raw_config(model_dir), "quantization_config", None) is not None:
        raise LayerlabError(f"{model_dir} is already quantized" + (
            "" if command == "quantize" else f"; {command} the full-precision model, then quantize"))
    model, tok, om = open_model(Path(model_dir), dtype, True, None, None)
    refuse_quantized(model, model_dir, command)
    refuse_design(model, command)
    return Loaded(model, tok, om.view), om


@dataclass
class Staging:
    """The output being written: ``dir`` becomes ``--out`` when the block completes; ``record`` goes into its
    ``layerlab.json`` beside ``args``."""

    dir: Path
    model_dir: Path
    args: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)

    def save_model(self, model) -> None:
        """The model in Hugging Face format, with the input's tokenizer files."""
        model.save_pretrained(self.dir)
        copy_tokenizer(self.model_dir, self.dir)


@contextmanager
def staged_output(model_dir: str | Path, out: str | Path, command: str, args: dict[str, Any]) -> Iterator[Staging]:
    """Stage ``command``'s output for ``out`` (refused if it exists or lies inside the input), and write its
    manifest last: an interrupted or failed command leaves nothing behind, and the input is never touched."""
    with output_dir(out, protect=(model_dir,)) as tmp:
        staging = Staging(tmp, Path(model_dir), args)
        yield staging
        write_manifest(tmp, command, args, **staging.record)


Column = tuple[str, int, Callable[[dict], str]]  # header, width, the cell of a row


def table(rows: dict[str, dict[str, Any]], columns: list[Column], name_width: int = 8) -> list[str]:
    """A before/after table: one line per stage in ``rows``, one column per ``(header, width, cell)``, where
    ``cell(row)`` formats the row's value, right-aligned to ``width`` characters."""
    lines = [f"{'':{name_width}s}" + "".join(f"{header:>{width}s}" for header, width, _ in columns)]
    for name, row in rows.items():
        lines.append(f"{name:{name_width}s}" + "".join(f"{cell(row):>{width}s}" for _, width, cell in columns))
    return lines


def loss_columns(width: int = 10) -> list[Column]:
    """The loss and perplexity columns every compressor's table ends with."""
    return [("loss", width, lambda r: f"{r['loss']:.4f}"), ("ppl", width, lambda r: f"{r['perplexity']:.2f}")]


class Quality:
    """The measure in every row of a compressor's before/after table: a causal LM's validation loss and
    perplexity (:func:`~layerlab.evaluate.lm_loss`); an encoder's, which has no language-model loss, the cosine of
    its sentence embeddings to the input model's on the same windows
    (:func:`~layerlab.evaluate.embedding_similarity`), the first model measured (the input) giving the
    reference."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.reference: torch.Tensor | None = None

    def __call__(self, model, tok, data, tokens: int | None) -> dict:
        from ..evaluate import embedding_similarity, lm_loss

        if self.causal:
            return lm_loss(model, tok, data, tokens)
        row, emb = embedding_similarity(model, tok, data, tokens, reference=self.reference)
        if self.reference is None:
            self.reference = emb
        return row


def quality_columns(rows: list[dict], width: int = 10) -> list[Column]:
    """The table's last columns: :func:`loss_columns` for a causal LM's rows; the embedding cosine to the input
    (:class:`Quality`) for an encoder's."""
    if rows and all("embedding_cosine" in r for r in rows):
        return [("cos to input", max(width, 13), lambda r: f"{r['embedding_cosine']:.6f}")]
    return loss_columns(width)


def quality_heading(row: dict) -> str:
    """The line above the table: what its last columns measure, on which text (``row``: any of its rows)."""
    if "embedding_cosine" in row:
        return f"cosine of each window's mean-pooled embedding to the input model's, on the {row['slice']}"
    return f"loss (nats/token) and perplexity on the {row['slice']}"
