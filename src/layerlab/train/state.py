"""What the steps of a run share (:class:`Run`), and the pieces of its set-up that :func:`layerlab.train.loop._setup`
puts together: the device, the tokenizer and data, and the length of the LR schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, TrainConfig
from ..data import VAL_FRACTION, TokenData, build_tokenizer, head_documents, load_tokenizer
from ..errors import LayerlabError
from ..io import cache_dir
from ..model import LayerlabForCausalLM
from ..recipe import RunSpec
from . import distributed
from .optimizers import Layerwise


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LayerlabError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerlabError("device cuda was asked for, but CUDA is not available")
    return dev


@dataclass
class Run:
    """What the steps of a run share, once :func:`layerlab.train.loop._setup` has built it."""

    spec: RunSpec
    run_dir: Path
    d: distributed.Dist
    echo: Callable[..., None]
    device: torch.device
    bf16: bool
    tokenizer: Any
    data: TokenData
    model: LayerlabForCausalLM
    par: distributed.Parallel
    optimizer: Layerwise
    sched: TrainConfig  # the config the LR schedule is laid out with: its ``steps`` is the schedule's length
    start: int  # the step it starts from
    resumed: bool  # from a checkpoint
    results: dict[str, Any]  # the figures its manifest and checkpoints report
    n_params: int

    @property
    def tc(self) -> TrainConfig:
        return self.spec.train

    @property
    def mc(self) -> ModelConfig:
        return self.spec.model

    @property
    def schedule(self) -> dict[str, int]:
        """The schedule's length, where it differs from ``steps``, for the manifest and the checkpoints."""
        return {} if self.sched.steps == self.tc.steps else {"schedule_steps": self.sched.steps}

    @property
    def tokens_per_step(self) -> int:
        return self.tc.batch_size * self.mc.context * self.tc.grad_accum

    @property
    def bpb(self) -> float:
        """The factor from a loss in nats per token to bits per byte."""
        return 1 / (math.log(2) * self.data.bytes_per_token)

    @property
    def again(self) -> str:
        return f"continue with: layerlab train --resume {self.run_dir}"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def tokens(tc: TrainConfig, mc: ModelConfig, run_dir: Path, state: dict | None,
           d: distributed.Dist) -> tuple[Any, TokenData]:
    """The run's tokenizer (its saved one when resuming) and data; sets the model's vocabulary size to fit.
    Every rank reads the run directory before rank 0 writes to it."""
    if state is not None:
        tokenizer = load_tokenizer(run_dir)
    elif tc.init_from:  # the model directory's own tokenizer (grow and convert copy their input's)
        tokenizer = load_tokenizer(Path(tc.init_from))
    else:
        # BPE merges are learnt from the training part only, so validation text never shapes them
        tokenizer = d.broadcast(build_tokenizer(tc.tokenizer, lambda: head_documents(tc.data, 1 - VAL_FRACTION))
                                if d.main else None)
    with d.rank0_first():  # rank 0 writes the token cache, the others read it
        data = TokenData.prepare(tc.data, tokenizer, cache_dir(), val_fraction=VAL_FRACTION)
    data.check_length(mc.context)
    vocab = max(64 * math.ceil(tokenizer.vocab_size / 64), 64)  # padded for matmul speed
    if tc.init_from and state is None and vocab != mc.vocab_size:
        raise LayerlabError(f"--init-from {tc.init_from}: its tokenizer gives a vocabulary of {vocab} (padded), its "
                            f"model has {mc.vocab_size} rows")
    mc.vocab_size = vocab
    return tokenizer, data


def schedule_of(spec: RunSpec, state: dict | None, start: int) -> TrainConfig:
    """The train config with the ``steps`` the run's LR schedule is laid out over.

    A run's LR schedule (warmup + cosine) is laid out once, over the steps it started with, and keeps that length
    when ``steps`` changes on resume: steps beyond it train at the schedule's final LR (lr * min_lr_ratio), and a
    shortened run stops where it is asked to. Laying the cosine out again over the new total would move the LR
    of the steps still to come away from where the run stands (after a finished 20-step run, `--steps 30` jumped
    from the floor back to half the peak LR, and the loss spiked), and the run would then follow neither
    config. Refusing would leave no way to train a finished model further. Kept this way, every step already
    taken stays as it was, the LR is continuous, the extended run resumes exactly, and its manifest records the
    length in ``schedule_steps``. A run whose schedule should span the new total is a new run (a note says so).
    """
    tc = spec.train
    schedule_steps = tc.steps
    if start > 0:  # before its first step a run may still be laid out anew
        schedule_steps = int(state.get("schedule_steps") or spec.extra.get("schedule_steps", tc.steps))
    return tc if schedule_steps == tc.steps else tc.model_copy(update={"steps": schedule_steps})
