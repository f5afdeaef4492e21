"""Run directories: a Hugging Face model directory plus optimizer state, written atomically.

Layout of a run directory::

    config.json, generation_config.json, model.safetensors   the model (Hugging Face format)
    tokenizer.json, tokenizer_config.json, ...               the tokenizer (Hugging Face format)
    optimizer.pt        optimizer state, loaded with weights_only=True (no arbitrary unpickling)
    trainer_state.json  step, and the sha256 of the model and optimizer files it belongs to
    metrics.jsonl       one JSON object per logged step
    layerlab.json       the run's config, versions and results

A checkpoint is first written in full to a temporary folder inside the run directory; each
file is then renamed into place and ``trainer_state.json`` last. Its hashes tie it to the
files it describes, so a checkpoint torn by a crash between renames is detected on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import LayerlabError
from ..io import atomic_write_json, read_json, sha256_file

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
WEIGHTS = "model.safetensors"


def save_checkpoint(run_dir: Path, model, optimizer, step: int, extra: dict | None = None) -> None:
    """Write model, optimizer and step atomically into ``run_dir``."""
    from transformers.utils import logging as hf_logging

    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=run_dir))
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per checkpoint would bury the run's own progress
    try:
        model.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        names = sorted(p.name for p in tmp.iterdir())
        state = {
            "step": step,
            "hashes": {n: sha256_file(tmp / n) for n in (WEIGHTS, OPTIMIZER)},
            **(extra or {}),
        }
        for name in names:
            os.replace(tmp / name, run_dir / name)
        atomic_write_json(run_dir / STATE, state)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)


def read_state(run_dir: Path) -> dict | None:
    """The trainer state of a run directory, or None if it has no checkpoint yet."""
    if not (run_dir / STATE).exists():
        return None
    return read_json(run_dir / STATE)


def load_checkpoint(run_dir: Path, model, optimizer) -> int:
    """Load weights and optimizer state saved by :func:`save_checkpoint`; return the step."""
    state = read_state(run_dir)
    if state is None:
        raise LayerlabError(f"{run_dir} has no checkpoint to resume ({STATE} is missing)")
    for name, digest in state.get("hashes", {}).items():
        if not (run_dir / name).exists() or sha256_file(run_dir / name) != digest:
            raise LayerlabError(
                f"checkpoint in {run_dir} is inconsistent: {name} does not match {STATE} "
                "(was a save interrupted?)"
            )
    try:
        weights = load_file(run_dir / WEIGHTS)
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise LayerlabError(f"cannot read {run_dir / WEIGHTS}: {e}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in model.all_tied_weights_keys]
    if missing or unexpected:
        raise LayerlabError(f"checkpoint in {run_dir} does not fit the model: missing {missing}, extra {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    optimizer.load_state_dict(torch.load(run_dir / OPTIMIZER, map_location="cpu", weights_only=True))
    return int(state["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines after ``step`` so a resumed run's log reads as one uninterrupted run."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)
