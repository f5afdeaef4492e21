"""Run directories: a Hugging Face model directory plus optimizer state, written atomically.

Layout of a run directory::

    config.json, generation_config.json, model.safetensors   the model (Hugging Face format)
    tokenizer.json, tokenizer_config.json, ...               the tokenizer (Hugging Face format)
    optimizer.pt        optimizer state, loaded with weights_only=True (no arbitrary unpickling)
    trainer_state.json  step, and the sha256 of the model and optimizer files it belongs to
    metrics.jsonl       one JSON object per logged step
    layerlab.json       the run's config, versions and results
    steps/step0000100/  with ``keep_every``: the weights of a kept step, a model directory of its own
    tb/                 with ``log: tensorboard``: the records of metrics.jsonl as TensorBoard events

A checkpoint is first written in full to a temporary folder inside the run directory; each
file is then renamed into place and ``trainer_state.json`` last, with Ctrl-C held off until
the last rename is done, so an interrupt leaves either the old checkpoint or the new one. Its
hashes tie it to the files it describes, so a checkpoint torn by a crash between renames is
detected on resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import LayerlabError
from ..io import atomic_write_json, current_umask, read_json, sha256_file, write_manifest
from ..model import load_weights_into

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
WEIGHTS = "model.safetensors"
STEPS = "steps"  # the kept steps (``keep_every``): RUN/steps/step0000100/, one model directory each
_STEP_DIR = re.compile(r"step(\d+)")


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold off SIGINT (Ctrl-C) during the block, then deliver it to the handler that was there before.

    A KeyboardInterrupt between the renames of :func:`save_checkpoint` would leave the files of two checkpoints
    side by side, which resume refuses. Signals can be caught only in the main thread; elsewhere this does nothing.
    """
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if caught:
            signal.raise_signal(signal.SIGINT)  # now the previous handler runs: it may raise KeyboardInterrupt


def save_checkpoint(run_dir: Path, model, optimizer, step: int, extra: dict | None = None) -> None:
    """Write model, optimizer and step atomically into ``run_dir``.

    ``model`` is anything with ``save_pretrained``; ``optimizer`` anything with ``state_dict()``, or that state
    dict itself (as :meth:`~layerlab.train.distributed.Parallel.full_state` returns it).
    """
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=run_dir))
    try:
        with _no_hf_bar():
            model.save_pretrained(tmp)
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / OPTIMIZER)
        names = sorted(p.name for p in tmp.iterdir())
        state = {
            "step": step,
            "hashes": {n: sha256_file(tmp / n) for n in (WEIGHTS, OPTIMIZER)},
            **(extra or {}),
        }
        with sigint_deferred():  # a Ctrl-C that came meanwhile is raised once the folder is gone too
            try:
                for name in names:
                    os.replace(tmp / name, run_dir / name)
                atomic_write_json(run_dir / STATE, state)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _no_hf_bar() -> Iterator[None]:
    """transformers' progress bar off: a bar per save would bury the run's own progress."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def step_dir(run_dir: Path, step: int) -> Path:
    """Where the weights of ``step`` are kept: ``RUN/steps/step0000100``."""
    return Path(run_dir) / STEPS / f"step{step:07d}"


def save_step(run_dir: Path, model, tokenizer, step: int, args: dict, **fields) -> Path:
    """Keep the weights of ``step`` as a model directory ``RUN/steps/stepNNNNNNN`` (config, safetensors, tokenizer,
    and a ``layerlab.json`` of command ``train-step`` with the run's ``args`` and ``fields``), written atomically.

    The folder is written in full beside its place, then renamed into it, with Ctrl-C held off, so it is either
    whole or absent; one already there (a step the run redoes after a resume) is replaced. Weights only: a kept
    step is for analysis, not for resuming (the run directory's checkpoint is).
    """
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    old = final.with_name(f".{final.name}.old")
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: the permissions mkdir would give
        with _no_hf_bar():
            model.save_pretrained(tmp)
        tokenizer.save(tmp)
        write_manifest(tmp, "train-step", args, step=step, **fields)
        shutil.rmtree(old, ignore_errors=True)
        with sigint_deferred():
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def truncate_steps(run_dir: Path, step: int) -> None:
    """Drop the kept steps after ``step`` (and folders a crash left half-written), so a resumed run's kept steps
    read as one uninterrupted run's."""
    folder = Path(run_dir) / STEPS
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if (m and int(m.group(1)) > step) or (p.name.startswith(".step") and p.is_dir()):
            shutil.rmtree(p, ignore_errors=True)


def read_state(run_dir: Path) -> dict | None:
    """The trainer state of a run directory, or None if it has no checkpoint yet."""
    if not (run_dir / STATE).exists():
        return None
    return read_json(run_dir / STATE)


def load_weights(run_dir: Path, model) -> int:
    """Check the checkpoint's files against their hashes, load its weights into ``model``; return the step."""
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
    load_weights_into(model, weights, f"checkpoint in {run_dir} does not fit the model")
    return int(state["step"])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_shapes(state: dict, optimizer) -> None:
    """Tensors of a parameter's state must have its shape: torch checks the group sizes only."""
    names = {id(p): n for n, p in optimizer.model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, entry in state["optimizer"]["state"].items():
        p = params[int(i)]
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                raise LayerlabError(f"its {key} for {names.get(id(p), f'parameter {i}')} has shape "
                                    f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")


def load_optimizer_state(run_dir: Path, optimizer, load=None) -> None:
    """Load ``optimizer.pt`` into ``optimizer`` (a :class:`~layerlab.train.optimizers.Layerwise`).

    Its tensors' shapes are checked; ``load(optimizer, state)`` then loads it in place of
    ``optimizer.load_state_dict(state)`` (several processes load it through torch's helpers, FSDP cutting it to
    this rank's shards). A state that does not fit the optimizer is a one-line error naming the cause.
    """
    path = run_dir / OPTIMIZER
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a missing, truncated or foreign file
        raise LayerlabError(f"cannot read {path}: {_first_line(e)}") from None
    name = getattr(optimizer, "name", "this")
    try:
        if not isinstance(state, dict):
            raise LayerlabError(f"it holds a {type(state).__name__}, not an optimizer state")
        if set(state) == {"state", "param_groups"}:  # a plain torch state: saved before the optimizer registry
            raise LayerlabError("it was saved by a layerlab from before the optimizer registry (0.1.0 of 2026-11), "
                                "whose checkpoints do not resume")
        if set(state) != {"optimizer", "rule"}:
            raise LayerlabError(f"unknown format (keys {', '.join(sorted(map(str, state)))})")
        _check_shapes(state, optimizer)
        if load is None:
            optimizer.load_state_dict(state)
        else:
            load(optimizer, state)
    except (LayerlabError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
        raise LayerlabError(f"cannot resume {run_dir}: {OPTIMIZER} does not fit the {name} optimizer of this run "
                            f"({_first_line(e)})") from None


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
