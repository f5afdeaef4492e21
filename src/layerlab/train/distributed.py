"""Training in several processes: DDP, or FSDP over the blocks, started by ``torchrun`` or by ``--nproc``.

    torchrun --nproc_per_node 2 -m layerlab train --preset debug
    layerlab train --preset debug --nproc 2                     # starts the 2 processes itself
    layerlab train --preset small --nproc 8 --parallel fsdp     # blocks sharded over the processes

A run's result does not depend on the number of processes N, up to float rounding:

* ``batch_size`` is the global batch. Every rank draws the same global batch from the same seeded generator as a
  one-process run, and trains on its contiguous 1/N of the rows (``batch_size`` must be divisible by N).
* A rank's loss is the mean over its rows' tokens; DDP and FSDP average gradients over the ranks, and the mean of
  N means over equal numbers of tokens is the global mean, so the gradient is the one-process gradient.
* Logged values are global: the loss and residual-stream statistics are all-reduced, gradient norms and update
  ratios are measured on synchronized gradients and weights, evaluation splits each validation batch over the
  ranks and sums losses and token counts.
* Per-block optimizer rules see the same weights and gradients on every rank (LLR's spectra, the noise EMAs,
  LAMB/LARS trust ratios) or draw from seeded generators (LISA), so every rank makes the same choice.
* Rank 0 alone writes: ``metrics.jsonl``, checkpoints, ``layerlab.json``, the progress bar.
* Checkpoints hold full weights and the unsharded optimizer state, in the one-process format, so a run saved by
  N processes (DDP or FSDP) resumes under any M, 1 included. torch's state-dict helpers
  (``torch.distributed.checkpoint.state_dict``) gather them and cut them back to each rank's shards; the
  optimizer state they key by parameter name is kept numbered as ``Optimizer.state_dict`` numbers it.

Not independent of N: dropout masks (each rank draws them for its own rows) and norms with batch statistics
(batchnorm, powernorm, prepbn, unified normalize over each rank's rows, as BatchNorm does under DDP without
SyncBatchNorm).

DDP hooks the parameters that require grad when it is built; LISA changes that set every ``lisa_every`` steps,
so the wrapper is rebuilt when the set changes (no weights move). FSDP is FSDP2's ``fully_shard`` on each block,
then on the whole model; it runs adamw, lamb, lars and lisa (llr and noise read whole per-block tensors).
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LayerlabError
from . import telemetry

if TYPE_CHECKING:
    from ..config import TrainConfig

MAX_NPROC_ENV = "LAYERLAB_MAX_NPROC"  # overrides the CPU core count that --nproc is checked against
FSDP_OPTIMIZERS = ("adamw", "lamb", "lars", "lisa")


# ---------------------------------------------------------------------------------------------------- checks
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def capacity(device: str) -> tuple[int, str]:
    """How many processes this machine may run for ``device``, and what counts: its CUDA devices, or its CPU
    cores (``$LAYERLAB_MAX_NPROC`` overrides the latter, e.g. to test several processes on one core)."""
    if _wants_cuda(device):
        return torch.cuda.device_count(), "CUDA devices of this machine"
    override = os.environ.get(MAX_NPROC_ENV)
    if override:
        try:
            return int(override), f"processes that ${MAX_NPROC_ENV} allows"
        except ValueError:
            raise LayerlabError(f"${MAX_NPROC_ENV} must be an integer, got {override!r}") from None
    return _cores(), "CPU cores of this machine"


def check(tc: TrainConfig, world: int, local_world: int | None = None, flag: str = "--nproc") -> None:
    """One-line errors for a run of ``world`` processes, ``local_world`` of them on this machine."""
    if world < 1:
        raise LayerlabError(f"{flag} must be at least 1, got {world}")
    if world == 1:
        return
    local_world = world if local_world is None else local_world
    n, what = capacity(tc.device)
    if local_world > n:
        raise LayerlabError(f"{flag} {local_world} is more than the {n} {what}")
    if tc.batch_size % world:
        raise LayerlabError(f"batch_size {tc.batch_size} is not divisible by {world} processes: each trains on an "
                            f"equal share of the global batch; choose a multiple of {world}")
    if tc.parallel == "fsdp" and tc.optimizer not in FSDP_OPTIMIZERS:
        raise LayerlabError(f"optimizer {tc.optimizer} does not run under parallel fsdp (it reads whole per-block "
                            f"tensors); use parallel ddp, or one of {', '.join(FSDP_OPTIMIZERS)}")
    if re.fullmatch(r"cuda:\d+", tc.device):
        raise LayerlabError(f"device {tc.device} names one GPU, but each of the {world} processes uses its own "
                            "(cuda:LOCAL_RANK); use --device cuda")


# ---------------------------------------------------------------------------------------------------- the group
@dataclass
class Dist:
    """This process's place among the run's processes; by default the only one (rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device | None = None
    owns_group: bool = False  # it started the process group, so it ends it

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and reports."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (its size divisible by the world size)."""
        if not self.active:
            return x
        n = x.size(0) // self.world
        return x[self.rank * n: (self.rank + 1) * n]

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` summed (or maxed) over the ranks, in float64."""
        if not self.active:
            return list(values)
        on_cuda = self.device is not None and self.device.type == "cuda"  # nccl reduces CUDA tensors, gloo CPU ones
        t = torch.tensor(values, dtype=torch.float64, device=self.device if on_cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (gloo has no AVG: a sum, divided)."""
        return self.reduce([value])[0] / self.world if self.active else value

    def residual_stats(self, stats: dict[str, list[float]]) -> dict[str, list[float]]:
        """Global residual RMS and max |x| from each rank's (equal-sized) share of the batch."""
        if not self.active:
            return stats
        mean_sq = [v / self.world for v in self.reduce([r * r for r in stats["resid_rms"]])]
        return {"resid_rms": [math.sqrt(v) for v in mean_sq], "max_abs": self.reduce(stats["max_abs"], op="max")}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def rank0_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. to write a cache the others then read)."""
        if self.main:
            yield
        self.barrier()
        if not self.main:
            yield

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise LayerlabError(f"${name} must be an integer, got {value!r}") from None


def in_group() -> bool:
    """Whether this process is one of several (torchrun's environment, or a process group already started)."""
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or \
        _env_int("WORLD_SIZE", 1) > 1


def init(tc: TrainConfig) -> Dist:
    """Join the run's processes as torchrun (or ``--nproc``) describes them: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE; one process if unset. Checks the run fits, picks this rank's device (cuda:LOCAL_RANK, or
    the CPU with its share of the cores) and starts the process group (nccl on CUDA, gloo on CPU) unless the
    caller already has."""
    started = dist.is_available() and dist.is_initialized()
    if started:
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world == 1:
        return Dist()
    local_rank, local_world = _env_int("LOCAL_RANK", rank), _env_int("LOCAL_WORLD_SIZE", world)
    check(tc, world, local_world, flag="--nproc_per_node")  # --nproc checked it before starting the processes
    if _wants_cuda(tc.device):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, _cores() // local_world))
    if not started:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank, local_world, device, owns_group=not started)


# ---------------------------------------------------------------------------------------------------- the model
def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def scalar(t: torch.Tensor) -> float:
    """A 0-d tensor or DTensor (e.g. FSDP's clipped gradient norm) as a float."""
    from torch.distributed.tensor import DTensor

    return float(t.full_tensor() if isinstance(t, DTensor) else t)


class _Gathered:
    """A sharded model's full weights, saved as the model itself would save them."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        self.model, self.state = model, {k: v for k, v in state.items() if k not in tied}

    def save_pretrained(self, directory) -> None:
        self.model.save_pretrained(directory, state_dict=self.state)


class Parallel:
    """The model as the training step runs it: as it is (one process), under DDP, or sharded by FSDP.

    ``model`` stays the plain model: evaluation and telemetry call it directly (under DDP it holds the same
    synchronized weights on every rank; under FSDP ``fully_shard`` has sharded it in place).
    """

    def __init__(self, model: nn.Module, d: Dist, tc: TrainConfig, compile: bool):
        self.model, self.d, self.compile = model, d, compile
        self.kind = tc.parallel if d.active else None
        self._ddp: nn.Module | None = None
        self._trainable: tuple[bool, ...] | None = None
        self._step: nn.Module | None = None
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(d.device.type, (d.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)

    def module(self) -> nn.Module:
        """The module for this step's training forward.

        Under DDP it is rebuilt whenever the set of parameters that require grad changed (LISA's draws): DDP
        expects a gradient for every parameter that required one when it was built.
        """
        if self.kind == "ddp":
            trainable = tuple(p.requires_grad for p in self.model.parameters())
            if trainable != self._trainable:
                from torch.nn.parallel import DistributedDataParallel as DDP

                if self._ddp is not None:
                    self._ddp._remove_autograd_hooks()
                ids = [self.d.device.index] if self.d.device.type == "cuda" else None
                # the weights are already equal on every rank after the first build: no need to broadcast them
                self._ddp = DDP(self.model, device_ids=ids, init_sync=self._trainable is None)
                self._trainable, self._step = trainable, None
        if self._step is None:
            m = self._ddp if self._ddp is not None else self.model
            self._step = torch.compile(m) if self.compile else m
        return self._step

    def accumulating(self, last: bool):
        """Context for one micro-batch's backward: DDP all-reduces gradients only after the last one."""
        return self._ddp.no_sync() if self._ddp is not None and not last else nullcontext()

    # per-block telemetry: under FSDP each rank holds a shard, so squared norms are summed over the ranks
    def _block_sq(self, blocks: list[list[torch.Tensor]]) -> list[float]:
        return self.d.reduce([sum(float(_local(t).detach().float().pow(2).sum()) for t in ts) for ts in blocks])

    def grad_norms(self) -> list[float]:
        if self.kind != "fsdp":
            return telemetry.grad_norms(self.model)
        grads = [[p.grad for p in ps if p.grad is not None] for ps in telemetry.block_params(self.model)]
        return [math.sqrt(s) for s in self._block_sq(grads)]

    def snapshot(self) -> list[list[torch.Tensor]]:
        if self.kind != "fsdp":
            return telemetry.snapshot(self.model)
        return [[_local(p).detach().clone() for p in ps] for ps in telemetry.block_params(self.model)]

    def update_ratios(self, before: list[list[torch.Tensor]]) -> list[float]:
        if self.kind != "fsdp":
            return telemetry.update_ratios(self.model, before)
        deltas = [[_local(p).detach() - o for p, o in zip(ps, old, strict=True)]
                  for ps, old in zip(telemetry.block_params(self.model), before, strict=True)]
        return [math.sqrt(d) / max(math.sqrt(w), 1e-12)
                for d, w in zip(self._block_sq(deltas), self._block_sq(before), strict=True)]

    # Checkpoints hold the one-process format whatever the number of processes. Several processes go through
    # torch's state-dict helpers (torch.distributed.checkpoint.state_dict, imported only then: half a second).
    def full_state(self, optimizer) -> tuple[Any, Any]:
        """What rank 0 saves: an object with ``save_pretrained`` and the optimizer's state dict, both in the
        one-process format; (None, None) on other ranks. Under FSDP every rank must call it (it gathers)."""
        if not self.d.active:
            return self.model, optimizer.state_dict()
        weights = self.full_weights()
        state = self._full_optimizer_state(optimizer)
        return (weights, {"optimizer": state, "rule": optimizer.rule_state()}) if self.d.main else (None, None)

    def full_weights(self) -> Any:
        """What rank 0 saves of the weights alone (a kept step): an object with ``save_pretrained``; None on other
        ranks. Under FSDP every rank must call it (it gathers)."""
        if self.kind != "fsdp":
            return self.model if self.d.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0 only
        weights = _Gathered(self.model, get_model_state_dict(self.model, options=full))
        return weights if self.d.main else None

    def _full_optimizer_state(self, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = optimizer.optimizer
        if not inner.state:
            # Before the first step there is nothing to gather, and the helper would first create the state by
            # a step with zero gradients (``_init_optim_state``): a run resumed from it would count that step.
            return inner.state_dict()
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0 only (others: {})
        return _by_index(get_optimizer_state_dict(self.model, inner, options=full))

    def load_optimizer_state(self, optimizer, state: dict[str, Any]) -> None:
        """Load a one-process optimizer state (checked by :func:`~layerlab.train.checkpoint.load_optimizer_state`);
        under DDP or FSDP through torch's helper, which cuts each full tensor to this rank's shard."""
        if not self.d.active:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = optimizer.optimizer
        names = {p: n for n, p in self.model.named_parameters()}  # tied weights once, as the helper names them
        named = _by_name(state["optimizer"], [[names[p] for p in g["params"]] for g in inner.param_groups])
        # strict=False: a parameter may have no state yet (a block LISA has not drawn, a checkpoint of step 0)
        set_optimizer_state_dict(self.model, inner, named,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        # The helper first creates every parameter's state by a step with zero gradients and keeps it where the
        # checkpoint has none: dropped, so that such a parameter's first real step counts as its first.
        for p, name in names.items():
            if name not in named["state"]:
                inner.state.pop(p, None)
        optimizer.load_rule_state(state["rule"])


def _by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter names (torch's helpers) in ``Optimizer.state_dict``'s layout,
    which ``optimizer.pt`` keeps: parameters numbered in the order of the groups. Empty (other ranks) stays so."""
    if not state:
        return state
    index = {name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {"state": {index[n]: entry for n, entry in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """The inverse of :func:`_by_index` for an optimizer whose groups hold the parameters ``names``: the saved
    numbers map onto them in order, as ``Optimizer.load_state_dict`` maps them, after the same checks."""
    groups = state["param_groups"]
    if len(groups) != len(names):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(n) for g, n in zip(groups, names, strict=True)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                         "group")
    name_of = dict(zip((i for g in groups for i in g["params"]), (n for ns in names for n in ns), strict=True))
    return {"state": {name_of[i]: entry for i, entry in state["state"].items()},
            "param_groups": [{**g, "params": list(n)} for g, n in zip(groups, names, strict=True)]}


# ---------------------------------------------------------------------------------------------------- --nproc
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Relay:
    """A worker's ``echo``: sends the message to the launching process, which prints it with its own echo."""

    def __init__(self, queue):
        self.queue = queue

    def __call__(self, *args, **kwargs) -> None:
        self.queue.put(("echo", args, kwargs))


def _worker(rank: int, fn: Callable[..., Any], kwargs: dict[str, Any], nproc: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    try:
        result = fn(**kwargs, echo=_Relay(queue) if rank == 0 else (lambda *a, **k: None))
    except LayerlabError as e:
        queue.put(("error", e, None))
        sys.exit(2)
    if rank == 0:
        queue.put(("result", result, None))


def launch(nproc: int, fn: Callable[..., Any], kwargs: dict[str, Any], echo: Callable[..., None] = print) -> Any:
    """Run ``fn(**kwargs, echo=...)`` in ``nproc`` new processes of one process group on this machine, as torchrun
    would start them; return rank 0's result. Rank 0's messages go to ``echo``. A worker's
    :class:`~layerlab.errors.LayerlabError` is raised here; an interrupted run (exit status 130) exits with it."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    procs = mp.start_processes(_worker, args=(fn, kwargs, nproc, _free_port(), queue), nprocs=nproc, join=False,
                               start_method="spawn")
    out: dict[str, Any] = {}

    def drain() -> None:
        while not queue.empty():
            kind, value, extra = queue.get()
            if kind == "echo":
                echo(*value, **extra)
            else:
                out.setdefault(kind, value)

    interrupts = 0
    try:
        while True:
            try:
                done = procs.join(timeout=0.2)
            except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them save their checkpoint
                interrupts += 1
                if interrupts > 1:
                    raise
                continue
            drain()
            if done:
                break
    # the common base of both, ProcessException, is not exported by torch.multiprocessing
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # join() has stopped the others
        drain()
        if "error" in out:
            raise out["error"] from None
        if getattr(e, "exit_code", None) == 130:
            raise SystemExit(130) from None
        raise
    drain()
    return out.get("result")
