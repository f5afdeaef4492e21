"""A run's live logs: ``metrics.jsonl`` always, and the same records as TensorBoard scalars with ``log: tensorboard``.

Every record :func:`layerlab.train.loop._finish_step` logs goes to each sink, rank 0 only. A TensorBoard sink writes
each number of the record as a scalar with the step as x: ``loss``, ``lr``, ``grad_norm``, ``tok_per_s``,
``val_loss`` and ``val_bpb`` under their own names, and each per-block list of the telemetry (``grad_norm_block``,
``update_ratio_block``, ``resid_rms_block``, ``max_abs_block``, the optimizer's ``lr_scale_block`` ...) as one
scalar per block, ``grad_norm_block/03``. ``log: none`` (the default) opens no sink and imports nothing.

A resumed run purges the events past its checkpoint (TensorBoard's ``purge_step``), as ``metrics.jsonl`` drops its
lines past it, so that either log reads as one uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import LayerlabError

TB_DIR = "tb"
# not curves: the step is the x axis, and tokens a multiple of it
_NOT_SCALARS = {"step", "tokens"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by TensorBoard tag: a number under its key, a ``*_block`` list one per block (``key/07``,
    zero-padded to the number of blocks); missing values (an LLR alpha not measured yet) are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif key.endswith("_block") and isinstance(value, list):
            width = len(str(max(len(value) - 1, 0)))
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{key}/{i:0{width}d}"] = float(v)
    return out


_MISSING = "log: tensorboard needs the tensorboard package: pip install 'layerlab[tensorboard]'"


def check(log: str) -> None:
    """The package a ``log`` sink writes with is installed, or a one-line error before the run writes anything."""
    if log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise LayerlabError(_MISSING)


class TensorBoard:
    """Scalars of every record as TensorBoard events in ``RUN/tb/`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, run_dir: Path, start: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise LayerlabError(_MISSING) from None
        # a resumed run drops the events after its checkpoint: the previous process may have logged steps it lost
        self.writer = SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=start + 1 if start else None,
                                    flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


SINKS = {"tensorboard": TensorBoard}


def reset(run_dir: Path) -> None:
    """A run that starts at step 0 drops the TensorBoard events of an earlier attempt that saved no checkpoint."""
    shutil.rmtree(run_dir / TB_DIR, ignore_errors=True)


class Log:
    """Appends one JSON object per logged step to metrics.jsonl, and hands it to the ``log`` sink (on rank 0; on
    the other ranks, with ``path`` None, it does nothing)."""

    def __init__(self, path: Path | None, log: str = "none", start: int = 0):
        self.f = path.open("a") if path is not None else None
        self.sinks = [SINKS[log](path.parent, start)] if path is not None and log != "none" else []

    def write(self, record: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        for sink in self.sinks:
            sink.close()
