"""The training loop: a layer-wise optimizer, warmup + cosine, clipping, evaluation, telemetry, exact resume.

One process, or several under DDP or FSDP (``torchrun`` or ``nproc``): see :mod:`layerlab.train.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import RESUMABLE_CHANGES, ModelConfig, RunSpec, TrainConfig, check_fields, resolve
from ..data import VAL_FRACTION, TokenData, build_tokenizer, head_documents, load_tokenizer
from ..errors import LayerlabError
from ..evaluate import lm_loss
from ..io import MANIFEST, cache_dir, load_causal_lm, read_json, write_manifest
from ..model import LayerlabForCausalLM, build_model, num_params
from ..norms import is_batch_norm, set_norm_schedule
from . import distributed, telemetry
from .checkpoint import load_optimizer_state, load_weights, read_state, save_checkpoint, truncate_metrics
from .optimizers import build_optimizer

METRICS = "metrics.jsonl"


class TrainingDiverged(LayerlabError):
    """The loss became NaN or Inf."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float
    val_bpb: float
    params: int
    interrupted: bool = False
    main: bool = True  # rank 0 of the run's processes, the one that writes and reports
    slice: str = "validation windows seen during training"  # the text val_loss was measured on


def _result(run_dir: Path, step: int, results: dict[str, Any], params: int, main: bool) -> TrainResult:
    """The result a run reports: its final figure (``val_slice`` names the text), else its last in-run one."""
    nan = float("nan")
    return TrainResult(run_dir, step, results.get("val_loss", nan), results.get("val_bpb", nan), params, main=main,
                       slice=results.get("val_slice", TrainResult.slice))


def final_validation(run_dir: Path, tokenizer, data, device) -> dict[str, Any]:
    """A finished run's figure of merit, as ``layerlab eval RUN`` computes it: the saved model on the whole
    validation split, in the evaluation's windows. The curve in metrics.jsonl comes from ``eval_batches``
    windows of the context length during training, a cheaper and, for large corpora, smaller sample."""
    r = lm_loss(load_causal_lm(run_dir, device=str(device)), tokenizer, data, split="validation")
    return {"val_loss": r["loss"], "val_bpb": r["bits_per_byte"], "val_tokens": r["tokens"], "val_slice": r["slice"]}


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


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def _step_seed(seed: int, step: int) -> int:
    # Every step draws its batch and dropout masks from its own seed, so a resumed run
    # replays exactly the batches and masks of an uninterrupted one without saving RNG state.
    return (seed * 1_000_003 + step) % (2**63)


def _differences(a: dict, b: dict, ignore: set[str]) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if k not in ignore
            and a.get(k) != b.get(k)]


# The model fields outside the base name, each with how it reads in a run name (named only where it differs from
# the preset's value; ``vocab_size`` follows the tokenizer, and a test checks that no other field is missing).
_NAME_PARTS: dict[str, Callable[[Any], str]] = {
    "context": lambda v: f"ctx{v}",
    "heads": lambda v: f"h{v}",
    "mlp": str,
    "mlp_hidden": lambda v: f"ff{v}",
    "positions": str,
    "rope_theta": lambda v: f"theta{v:g}",
    "tie_embeddings": lambda v: "tied" if v else "untied",
    "bias": lambda v: "bias" if v else "nobias",
    "head_bias": lambda v: "headbias" if v else "noheadbias",
    "dropout": lambda v: f"drop{v:g}",
    "norm_eps": lambda v: f"eps{v:g}",
    "mix_alpha": lambda v: f"alpha{v:g}",
    "init": str,
    "init_std": lambda v: f"std{v:g}",
    "drop_attn": lambda v: "noattn" + ".".join(map(str, v)),
    "drop_mlp": lambda v: "nomlp" + ".".join(map(str, v)),
}


def _placement_name(placement: str | list[str]) -> str:
    """A placement, or a per-block schedule run-length encoded (``pre,pre,post`` is ``pre2.post``)."""
    if isinstance(placement, str):
        return placement
    runs: list[list] = []
    for p in placement:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return ".".join(p + (str(n) if n > 1 else "") for p, n in runs)


def default_run_dir(spec: RunSpec) -> Path:
    """``runs/<preset>-<placement>-<norm>-L<layers>-d<width>``, then every other model field that differs from the
    preset's (or, without a preset, the defaults'), so two configs that train different models never share a
    directory by default: ``--mlp swiglu --positions rope`` gives ``runs/tiny-pre-layernorm-L4-d256-swiglu-rope``."""
    m = spec.model
    try:
        base = resolve(spec.preset).model if spec.preset else ModelConfig()
    except LayerlabError:  # a preset that no longer exists: name every field that differs from the defaults
        base = ModelConfig()
    name = f"{spec.preset or 'custom'}-{_placement_name(m.placement)}-{m.norm}-L{m.layers}-d{m.width}"
    # every field, even one this model does not read (rope_theta without rope): plan_run compares them all, and
    # would refuse the directory of a run that differs in it
    extra = [part(getattr(m, f)) for f, part in _NAME_PARTS.items() if getattr(m, f) != getattr(base, f)]
    return Path("runs") / "-".join([name, *extra])


def _check_out_dir(run_dir: Path) -> None:
    """A run directory that can be created (or is one): not a file, nor under one, nor in a read-only folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LayerlabError(f"{run_dir} is a file, not a run directory; choose another --out")
    parent = run_dir
    while not parent.exists():
        parent = parent.parent
    if parent != run_dir:
        if not parent.is_dir():
            raise LayerlabError(f"cannot create run directory {run_dir}: {parent} is a file; choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LayerlabError(f"cannot create run directory {run_dir}: {parent} is not writable; "
                                "choose another --out")


def _saved_spec(run_dir: Path) -> RunSpec:
    manifest = read_json(run_dir / MANIFEST)
    if manifest.get("command") != "train":
        raise LayerlabError(f"{run_dir} is not a layerlab training run ({MANIFEST} says {manifest.get('command')!r})")
    try:
        args = manifest["args"]
        # the length its LR schedule was laid out for, which later changes of ``steps`` keep (see _train)
        extra = {"schedule_steps": int(manifest.get("schedule_steps", args["train"]["steps"]))}
        return RunSpec(ModelConfig(**args["model"]), TrainConfig(**args["train"]), preset=args.get("preset"),
                       extra=extra)
    except (KeyError, TypeError, ValueError) as e:
        raise LayerlabError(f"{run_dir / MANIFEST} does not hold a readable run config ({e})") from None


def _comparable(spec: RunSpec) -> dict[str, Any]:
    return {**{k: v for k, v in spec.model.to_dict().items() if k != "vocab_size"}, **spec.train.to_dict()}


def plan_run(preset: str | None, config: str | Path | None, overrides: dict[str, Any] | None,
             out: str | Path | None, resume: str | Path | None) -> tuple[RunSpec, Path, bool]:
    """Decide the spec and directory of a run, and whether it continues an existing one.

    ``--resume DIR`` continues DIR with its saved config; fields given again must agree,
    except those in ``RESUMABLE_CHANGES`` (e.g. ``steps``, to extend a run: its LR schedule
    keeps its length, see :func:`_train`). ``--out DIR`` on an existing run of the same config
    continues it too; any other existing, non-empty directory, or a file, is refused.
    """
    if resume is not None:
        run_dir = Path(resume)
        if out is not None and Path(out).resolve() != run_dir.resolve():
            raise LayerlabError("--resume continues a run in its own directory; drop --out or make it the same")
        if not (run_dir / MANIFEST).exists():
            raise LayerlabError(f"cannot resume {run_dir}: not a layerlab run directory ({MANIFEST} missing)")
        saved = _saved_spec(run_dir)
        saved_fields = _comparable(saved)
        if preset is None and config is None:
            asked = check_fields(overrides or {}, source="command line")
        else:
            asked = _comparable(resolve(preset, config, overrides))
        changed = {k: v for k, v in asked.items() if k in saved_fields and saved_fields[k] != v}
        spec = saved
        bad = sorted(k for k in changed if k not in RESUMABLE_CHANGES)
        if bad:
            diffs = ", ".join(f"{k}: saved {saved_fields[k]!r}, asked {changed[k]!r}" for k in bad)
            raise LayerlabError(f"cannot resume {run_dir}: incompatible config ({diffs})")
        for k, v in changed.items():
            setattr(spec.train, k, v)
        return spec, run_dir, True

    spec = resolve(preset, config, overrides)
    run_dir = Path(out) if out is not None else default_run_dir(spec)
    _check_out_dir(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MANIFEST).exists():
            raise LayerlabError(f"output directory {run_dir} exists and is not a layerlab run; choose another --out")
        saved = _saved_spec(run_dir)
        diffs = _differences(_comparable(saved), _comparable(spec), RESUMABLE_CHANGES)
        if diffs:
            raise LayerlabError(
                f"output directory {run_dir} holds a run of a different config ({'; '.join(diffs[:4])}); "
                "choose another --out"
            )
        for k in RESUMABLE_CHANGES & set(TrainConfig.__dataclass_fields__):
            setattr(saved.train, k, getattr(spec.train, k))
        return saved, run_dir, True
    return spec, run_dir, False


class _Log:
    """Appends one JSON object per logged step to metrics.jsonl (or nothing, on ranks other than 0)."""

    def __init__(self, path: Path | None):
        self.f = path.open("a") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


@torch.no_grad()
def evaluate(model, data: TokenData, tc: TrainConfig, context: int, device, autocast,
             d: distributed.Dist | None = None) -> float:
    """Mean cross-entropy (nats/token) over the first ``eval_batches`` validation windows.

    With several processes each takes its share of every batch's rows; losses and token counts are summed.
    """
    d = d or distributed.Dist()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.iter_eval_batches(tc.batch_size, context, tc.eval_batches):
        keep = True
        if d.active:
            xs, ys = x.tensor_split(d.world)[d.rank], y.tensor_split(d.world)[d.rank]
            # a short last batch may leave a rank no rows: it still runs a forward (FSDP's gathers need every
            # rank) on one row, and drops the result
            keep = len(xs) > 0
            x, y = (xs, ys) if keep else (x[:1], y[:1])
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x).logits
        if keep:
            total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                           reduction="sum"))
            count += y.numel()
    model.train(was_training)
    if d.active:
        total, count = d.reduce([total, count])
    return total / count


class _CtrlC:
    """Ctrl-C (SIGINT) during training: a request to stop at the end of the current step.

    Python's own handler raises KeyboardInterrupt wherever the signal lands: after ``optimizer.step()`` but before
    the step counter moves, after LLR's ``begin_step`` moved its ramp, after a forward that counted down PRepBN's
    schedule. A checkpoint taken there holds parts of two steps, and the resumed run diverges. So the first
    Ctrl-C only sets ``requested``; the loop finishes the step, saves it and stops. A second one raises
    KeyboardInterrupt at once, for a user who will not wait: the loop then saves only a state that is wholly one
    step's. Once the final save has begun (``saving``), Ctrl-C is ignored: it takes moments and is atomic.
    Outside the main thread no handler can be installed; KeyboardInterrupt then meets the same rule.
    """

    def __init__(self, echo):
        self.echo = echo
        self.requested = False
        self.saving = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread of the main interpreter
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def _handle(self, signum, frame) -> None:
        if self.saving:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.echo("Ctrl-C: stopping after this step, with a checkpoint (Ctrl-C again stops at once, keeping the "
                  "last complete checkpoint)")


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(), disable=not enabled, transient=False,
    )


def train(preset: str | None = None, config: str | Path | None = None, overrides: dict[str, Any] | None = None,
          out: str | Path | None = None, resume: str | Path | None = None, progress: bool = True,
          echo=print, nproc: int = 1) -> TrainResult:
    """Train a layerlab GPT; the run directory is a Hugging Face model directory.

    ``preset`` < ``config`` (YAML) < ``overrides`` (field: value) give the config; with none of
    them, preset ``tiny``. Returns the final step, validation loss and bits per byte.

    ``nproc`` > 1 trains in that many new processes on this machine (DDP, or FSDP with ``parallel: fsdp``) and
    returns rank 0's result; under ``torchrun`` each process calls ``train`` with ``nproc`` 1. Either way the
    result does not depend on the number of processes (see :mod:`layerlab.train.distributed`).
    """
    if nproc != 1:
        if distributed.in_group():
            raise LayerlabError("--nproc starts its own processes; under torchrun leave it out")
        spec, _, _ = plan_run(preset, config, overrides, out, resume)
        distributed.check(spec.train, nproc)  # before any process starts
        if nproc > 1:
            kwargs = dict(preset=preset, config=config, overrides=overrides, out=out, resume=resume,
                          progress=progress)
            return distributed.launch(nproc, train, kwargs, echo=echo)
    spec, run_dir, continuing = plan_run(preset, config, overrides, out, resume)
    d = distributed.init(spec.train)
    try:
        return _train(spec, run_dir, continuing, d, progress, echo if d.main else lambda *a, **k: None)
    finally:
        d.close()


def _train(spec: RunSpec, run_dir: Path, continuing: bool, d: distributed.Dist, progress: bool,
           echo) -> TrainResult:
    mc, tc = spec.model, spec.train
    device = d.device if d.active else pick_device(tc.device)
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    use_compile = tc.compile if tc.compile is not None else device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    # ---- tokenizer and data (every rank reads the run directory before rank 0 writes to it)
    state = read_state(run_dir) if continuing else None
    if state is not None:
        tokenizer = load_tokenizer(run_dir)
    else:
        # BPE merges are learnt from the training part only, so validation text never shapes them
        tokenizer = d.broadcast(build_tokenizer(tc.tokenizer, lambda: head_documents(tc.data, 1 - VAL_FRACTION))
                                if d.main else None)
    with d.rank0_first():  # rank 0 writes the token cache, the others read it
        data = TokenData.prepare(tc.data, tokenizer, cache_dir(), val_fraction=VAL_FRACTION)
    data.check_length(mc.context)
    mc.vocab_size = max(64 * math.ceil(tokenizer.vocab_size / 64), 64)  # padded for matmul speed

    # ---- model and optimizer
    start = int(state["step"]) if state else 0
    # A run's LR schedule (warmup + cosine) is laid out once, over the steps it started with, and keeps that length
    # when ``steps`` changes on resume: steps beyond it train at the schedule's final LR (lr * min_lr_ratio), and a
    # shortened run stops where it is asked to. Laying the cosine out again over the new total would move the LR
    # of the steps still to come away from where the run stands (after a finished 20-step run, `--steps 30` jumped
    # from the floor back to half the peak LR, and the loss spiked), and the run would then follow neither
    # config. Refusing would leave no way to train a finished model further. Kept this way, every step already
    # taken stays as it was, the LR is continuous, the extended run resumes exactly, and its manifest records the
    # length in ``schedule_steps``. A run whose schedule should span the new total is a new run (a note says so).
    schedule_steps = tc.steps
    if start > 0:  # before its first step a run may still be laid out anew
        schedule_steps = int(state.get("schedule_steps") or spec.extra.get("schedule_steps", tc.steps))
    sched = tc if schedule_steps == tc.steps else dataclasses.replace(tc, steps=schedule_steps)
    torch.manual_seed(tc.seed)
    model: LayerlabForCausalLM = build_model(mc)
    set_norm_schedule(model, schedule_steps * tc.grad_accum)
    n_params = num_params(model)
    results: dict[str, Any] = dict(state.get("results", {})) if state else {}
    if start >= tc.steps:  # nothing to do: the finished run's manifest and optimizer state stay untouched
        echo(f"{run_dir} is already trained to step {start} of {tc.steps}")
        return _result(run_dir, start, read_json(run_dir / MANIFEST).get("results", {}), n_params, d.main)
    if state is not None:
        start = load_weights(run_dir, model)
    par = distributed.Parallel(model, d, tc, use_compile)  # FSDP shards it in place, block by block onto device
    model.to(device)
    # groups per block and weight-decay kind, one rule (optimizers.py); LLR's window follows the schedule's length
    optimizer = build_optimizer(model, sched)
    if state is not None:
        load_optimizer_state(run_dir, optimizer, prepare=par.shard_optimizer_state)
    d.barrier()  # every rank has read the checkpoint: rank 0 may write
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            tokenizer.save(run_dir)
            (run_dir / METRICS).unlink(missing_ok=True)
        truncate_metrics(run_dir / METRICS, start)
    schedule = {} if schedule_steps == tc.steps else {"schedule_steps": schedule_steps}

    def manifest(status: str) -> None:
        if d.main:
            write_manifest(run_dir, "train", spec.to_dict(), status=status, params=n_params, processes=d.world,
                           data={"source": tc.data or "embedded", "tokens": data.n_tokens, "bytes": data.n_bytes,
                                 "tokenizer": tokenizer.name}, optimizer=optimizer.describe(), results=results,
                           **schedule)

    def save(step: int) -> None:
        """Rank 0 writes a checkpoint of ``step`` from its own replica (DDP) or the gathered state (FSDP)."""
        model_out, optimizer_out = par.full_state(optimizer)  # under FSDP every rank gathers
        if d.main:
            save_checkpoint(run_dir, model_out, optimizer_out, step, {"results": results, **schedule})

    manifest("running")
    where = f"{d.world} processes ({tc.parallel}) on {device.type}" if d.active else str(device)
    echo(f"{'resuming' if start else 'training'} {n_params / 1e6:.2f}M params on {where} "
         f"({mc.layers} layers, width {mc.width}, {mc.norm}, {mc.placement}) -> {run_dir}")
    if schedule_steps != tc.steps:
        floor = tc.lr * tc.min_lr_ratio
        if tc.steps > schedule_steps:
            what = (f"steps {schedule_steps + 1}-{tc.steps} train at its final LR {floor:.3g} "
                    f"(lr x min_lr_ratio)")
        else:
            what = f"the run stops at step {tc.steps}, at LR {lr_at(tc.steps - 1, sched):.3g}, before its floor"
        echo(f"note: the LR schedule of {run_dir} (warmup {tc.warmup}, cosine to {floor:.3g}) was laid out for "
             f"{schedule_steps} steps and keeps that length: {what}. For a schedule over {tc.steps} steps, "
             f"start a new run: layerlab train --steps {tc.steps} --out NEW_DIR")
    if d.active and is_batch_norm(mc.norm):
        echo(f"note: {mc.norm} normalizes over each process's {tc.batch_size // d.world} rows, not the global "
             f"batch: the run depends on the number of processes")

    log = _Log(run_dir / METRICS if d.main else None)
    tokens_per_step = tc.batch_size * mc.context * tc.grad_accum
    bpb = 1 / (math.log(2) * data.bytes_per_token)
    model.train()
    step = start
    interrupted = graceful = False
    last_val = results.get("val_loss")
    # What a checkpoint written now would hold: ``clean`` while model, optimizer, rule and records are all those
    # of the end of step ``step``; from ``begin_step`` of step ``taking`` until its log line they are not.
    saved_step: int | None = start if state is not None else None
    clean, taking = True, start
    stop_voted = False  # every process has heard that a Ctrl-C was requested: all stop after the same step
    again = f"continue with: layerlab train --resume {run_dir}"
    ctrl_c = _CtrlC(echo)
    with ctrl_c:
        try:
            with _progress(progress and d.main) as bar:
                task = bar.add_task("train", total=tc.steps, completed=start, loss="-", val="-", tps="-")
                if start == 0:  # the step-0 validation loss, as a baseline for "did it learn"
                    results["val_loss_step0"] = evaluate(model, data, tc, mc.context, device, autocast, d)
                    log.write({"step": 0, "val_loss": results["val_loss_step0"],
                               "val_bpb": results["val_loss_step0"] * bpb})
                t_last, tok_since = time.perf_counter(), 0
                while step < tc.steps:
                    # a step boundary: one process may act on its own Ctrl-C at once, several on the vote
                    if stop_voted or (not d.active and ctrl_c.requested):
                        break
                    lr = lr_at(step, sched)
                    clean, taking = False, step + 1  # begin_step may move LLR's ramp, a forward a norm's buffers
                    optimizer.begin_step(step)  # e.g. LISA's draw of blocks, LLR's alphas: before the forward
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    torch.manual_seed(_step_seed(tc.seed, step))
                    gen = torch.Generator().manual_seed(_step_seed(tc.seed, step))
                    want_tel = tc.telemetry_every > 0 and (step + 1) % tc.telemetry_every == 0
                    loss_sum = 0.0
                    stats_ctx = telemetry.residual_stats(model) if want_tel else nullcontext({})
                    step_fn = par.module()  # after begin_step: DDP follows LISA's choice of trainable blocks
                    with stats_ctx as stats:
                        for micro in range(tc.grad_accum):
                            # every rank draws the same global batch and trains on its share of the rows
                            x, y = data.get_batch("train", tc.batch_size, mc.context, gen)
                            x, y = d.rows(x), d.rows(y)
                            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                            with par.accumulating(last=micro == tc.grad_accum - 1):
                                with autocast():
                                    logits = step_fn(x).logits
                                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
                                (loss / tc.grad_accum).backward()
                            loss_sum += float(loss.detach())
                    # the mean loss over the processes, and whether any of them has had a Ctrl-C, in one reduction
                    loss_val, votes = d.reduce([loss_sum / tc.grad_accum, float(ctrl_c.requested)])
                    loss_val = loss_val / d.world if d.active else loss_val
                    stop_voted = votes > 0
                    if not math.isfinite(loss_val):
                        saved = read_state(run_dir)
                        kept = (f"last good checkpoint (step {saved['step']}) kept" if saved
                                else "no checkpoint was saved")
                        raise TrainingDiverged(f"loss became {loss_val} at step {step + 1}; stopped, {kept} "
                                               f"in {run_dir}")
                    record: dict[str, Any] = {}
                    if want_tel:
                        record["grad_norm_block"] = par.grad_norms()
                        before = par.snapshot()
                    grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
                    optimizer.step()
                    optimizer.zero_grad()
                    step += 1
                    tok_since += tokens_per_step
                    if want_tel:
                        record["update_ratio_block"] = par.update_ratios(before)
                        stats = d.residual_stats(stats)
                        record["resid_rms_block"] = stats["resid_rms"]
                        record["max_abs_block"] = stats["max_abs"]
                    if step % tc.eval_every == 0 or step == tc.steps:
                        last_val = evaluate(model, data, tc, mc.context, device, autocast, d)
                        record.update(val_loss=last_val, val_bpb=last_val * bpb)
                        results.update(val_loss=last_val, val_bpb=last_val * bpb, step=step)
                    if step % tc.log_every == 0 or record or step == tc.steps:
                        now = time.perf_counter()
                        tps = tok_since / max(now - t_last, 1e-9)
                        t_last, tok_since = now, 0
                        log.write({"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                                   "tokens": step * tokens_per_step, "tok_per_s": tps, **optimizer.telemetry(),
                                   **record})
                        bar.update(task, loss=f"{loss_val:.3f}", tps=f"{tps:,.0f}")
                    if "val_loss" in record:
                        bar.update(task, val=f"{last_val:.3f}")
                    bar.update(task, completed=step)
                    clean = True
                    if step % tc.save_every == 0 or step == tc.steps:
                        save(step)
                        saved_step = step
                        d.barrier()
                if step < tc.steps:  # stopped by Ctrl-C at a step boundary, on every process at the same one
                    ctrl_c.saving = True
                    if saved_step != step:
                        save(step)
                        saved_step = step
                    interrupted = graceful = True
                    echo(f"interrupted: checkpoint of step {step} saved; {again}")
        except KeyboardInterrupt:  # a second Ctrl-C, or one that came where no handler could be installed
            ctrl_c.saving = True
            if clean and saved_step != step and par.kind != "fsdp" and d.main:
                # its own replica is complete: no other rank is needed (FSDP's shards would need every rank)
                save_checkpoint(run_dir, *par.full_state(optimizer), step, {"results": results, **schedule})
                saved_step = step
            interrupted = saved_step != tc.steps  # after the last step's checkpoint, the run is finished
            if interrupted and saved_step == step:
                echo(f"interrupted: checkpoint of step {step} saved; {again}")
            elif interrupted:
                if d.main:  # the manifest reports the results of the checkpoint that is kept
                    kept_state = read_state(run_dir)
                    results.clear()
                    results.update(kept_state.get("results", {}) if kept_state else {})
                why = ("an FSDP run gathers a checkpoint only at the end of a step (press Ctrl-C once)"
                       if clean else f"step {taking} was half done")
                kept = f"the checkpoint of step {saved_step} is kept" if saved_step is not None else \
                    "no checkpoint was saved yet, so it starts over"
                echo(f"interrupted at once: {why}; {kept}; {again}")
        finally:
            log.close()
        if not interrupted and d.main:
            try:
                results.update(final_validation(run_dir, tokenizer, tc.data, device))
            except KeyboardInterrupt:  # the checkpoint is whole: only the figure is missing
                echo("interrupted: the final validation figure is skipped; `layerlab eval RUN` computes it")
        ctrl_c.saving = True  # a Ctrl-C now would only cut the manifest short
        manifest("interrupted" if interrupted else "finished")
    if graceful:  # no process exits before rank 0 has written: --nproc stops the others when one exits
        d.barrier()
    if interrupted:
        raise SystemExit(130)
    return _result(run_dir, step, results, n_params, d.main)
