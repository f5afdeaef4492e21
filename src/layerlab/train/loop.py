"""The training loop: a layer-wise optimizer, warmup + cosine, clipping, evaluation, telemetry, exact resume.

One process, or several under DDP or FSDP (``torchrun`` or ``nproc``): see :mod:`layerlab.train.distributed`.
:func:`train` plans the run (:mod:`layerlab.train.plan`) and sets it up (:func:`_setup`: data, model and
optimizer, from its checkpoint if it has one, in a :class:`~layerlab.train.state.Run`); :func:`_steps` runs its
steps, :func:`_one_step` taking one and :func:`_finish_step` evaluating, logging and saving it, under the Ctrl-C
rules of :mod:`layerlab.train.interrupt`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import grow
from ..adapters import load_model
from ..config import TrainConfig
from ..data import TokenData
from ..errors import LayerlabError
from ..evaluate import lm_loss
from ..io import MANIFEST, read_json, write_manifest
from ..model import LayerlabForCausalLM, build_model, design_note, num_params
from ..msg import has_masks
from ..norms import is_batch_norm, set_norm_schedule
from ..recipe import RunSpec
from . import distributed, logs, telemetry
from .checkpoint import (
    load_optimizer_state,
    load_weights,
    read_state,
    save_checkpoint,
    save_step,
    truncate_metrics,
    truncate_steps,
)
from .interrupt import CtrlC
from .logs import Log as _Log  # metrics.jsonl and the live log of ``log``
from .optimizers import build_optimizer
from .plan import plan_run
from .state import Run, pick_device, schedule_of, tokens

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
    r = lm_loss(load_model(run_dir, device=str(device)).model, tokenizer, data, split="validation")
    return {"val_loss": r["loss"], "val_bpb": r["bits_per_byte"], "val_tokens": r["tokens"], "val_slice": r["slice"]}


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


@torch.no_grad()
def curve_loss(model, data: TokenData, tc: TrainConfig, context: int, device, autocast,
             d: distributed.Dist | None = None) -> float:
    """The training curve's validation point: mean cross-entropy (nats/token) over the first ``eval_batches``
    validation windows of the context length (the run's final figure is :func:`final_validation`'s).

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


def _progress(enabled: bool):
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
        logs.check(spec.train.log)
        if nproc > 1:
            kwargs = dict(preset=preset, config=config, overrides=overrides, out=out, resume=resume,
                          progress=progress)
            return distributed.launch(nproc, train, kwargs, echo=echo)
    spec, run_dir, continuing = plan_run(preset, config, overrides, out, resume)
    logs.check(spec.train.log)  # before anything is written
    d = distributed.init(spec.train)
    try:
        return _train(spec, run_dir, continuing, d, progress, echo if d.main else lambda *a, **k: None)
    finally:
        d.close()


# ---------------------------------------------------------------------------------------------------- set-up
def _setup(spec: RunSpec, run_dir: Path, continuing: bool, d: distributed.Dist, echo) -> Run | TrainResult:
    """Data, model and optimizer of a run, from its checkpoint if it has one; or the result of a finished run,
    whose manifest and optimizer state stay untouched."""
    mc, tc = spec.model, spec.train
    device = d.device if d.active else pick_device(tc.device)
    state = read_state(run_dir) if continuing else None
    tokenizer, data = tokens(tc, mc, run_dir, state, d)
    start = int(state["step"]) if state else 0
    sched = schedule_of(spec, state, start)
    torch.manual_seed(tc.seed)
    model: LayerlabForCausalLM = build_model(mc)
    if tc.init_from and state is None:  # the model directory's weights (its architecture is mc: recipe.resolve)
        grow.load_init(model, tc.init_from)
    if tc.grow_at or has_masks(mc):  # growth in the run (layerlab.grow), or masks to ramp: checked, and the
        grow.check_run(mc, tc, d)  # checkpoint's grown (or unmasked) structure rebuilt
        model = grow.replay(model, tc, start)
    set_norm_schedule(model, sched.steps * tc.grad_accum)
    add_layer_dropout(model, tc.layer_dropout, tc.layer_dropout_schedule)  # LayerSkip; off in eval mode
    n_params = num_params(model)
    if start >= tc.steps:
        echo(f"{run_dir} is already trained to step {start} of {tc.steps}")
        return _result(run_dir, start, read_json(run_dir / MANIFEST).get("results", {}), n_params, d.main)
    if state is not None:
        start = load_weights(run_dir, model)
    use_compile = tc.compile if tc.compile is not None else device.type == "cuda"
    par = distributed.Parallel(model, d, tc, use_compile)  # FSDP shards it in place, block by block onto device
    model.to(device)
    # groups per block and weight-decay kind, one rule (optimizers.py); LLR's window follows the schedule's length
    optimizer = build_optimizer(model, sched)
    if state is not None:
        load_optimizer_state(run_dir, optimizer, load=par.load_optimizer_state)
    d.barrier()  # every rank has read the checkpoint: rank 0 may write
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            tokenizer.save(run_dir)
            (run_dir / METRICS).unlink(missing_ok=True)
            logs.reset(run_dir)
        truncate_metrics(run_dir / METRICS, start)
        truncate_steps(run_dir, start if start else -1)  # kept steps past the checkpoint: the run redoes them
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    results = dict(state.get("results", {})) if state else {}
    return Run(spec, run_dir, d, echo, device, bf16, tokenizer, data, model, par, optimizer, sched, start,
               resumed=state is not None, results=results, n_params=n_params)


def _announce(run: Run) -> None:
    """What trains where; notes on an LR schedule that keeps its length, and on norms over per-process rows."""
    mc, tc, d, echo = run.mc, run.tc, run.d, run.echo
    where = f"{d.world} processes ({tc.parallel}) on {run.device.type}" if d.active else str(run.device)
    echo(f"{'resuming' if run.start else 'training'} {run.n_params / 1e6:.2f}M params on {where} "
         f"({mc.layers} layers, width {mc.width}, {mc.norm}, {mc.placement}{design_note(mc)}) -> {run.run_dir}")
    schedule_steps = run.sched.steps
    if schedule_steps != tc.steps:
        floor = tc.lr * tc.min_lr_ratio
        if tc.steps > schedule_steps:
            what = (f"steps {schedule_steps + 1}-{tc.steps} train at its final LR {floor:.3g} "
                    f"(lr x min_lr_ratio)")
        else:
            what = f"the run stops at step {tc.steps}, at LR {lr_at(tc.steps - 1, run.sched):.3g}, before its floor"
        echo(f"note: the LR schedule of {run.run_dir} (warmup {tc.warmup}, cosine to {floor:.3g}) was laid out for "
             f"{schedule_steps} steps and keeps that length: {what}. For a schedule over {tc.steps} steps, "
             f"start a new run: layerlab train --steps {tc.steps} --out NEW_DIR")
    if tc.log == "tensorboard":
        echo(f"TensorBoard scalars: tensorboard --logdir {run.run_dir / logs.TB_DIR}")
    if d.active and is_batch_norm(mc.norm):
        echo(f"note: {mc.norm} normalizes over each process's {tc.batch_size // d.world} rows, not the global "
             f"batch: the run depends on the number of processes")


def _manifest(run: Run, status: str) -> None:
    if run.d.main:
        tc = run.tc
        write_manifest(run.run_dir, "train", run.spec.to_dict(), status=status, params=run.n_params,
                       processes=run.d.world, data={"source": tc.data or "embedded", "tokens": run.data.n_tokens,
                                                    "bytes": run.data.n_bytes, "tokenizer": run.tokenizer.name},
                       optimizer=run.optimizer.describe(), results=run.results, **run.schedule)


def _keeps(tc: TrainConfig, step: int) -> bool:
    """Whether ``step``'s weights are kept in RUN/steps/: step 0, every ``keep_every``-th and the last."""
    return tc.keep_every > 0 and (step % tc.keep_every == 0 or step == tc.steps)


def _keep(run: Run, step: int) -> None:
    """Rank 0 keeps the weights of ``step`` as a model directory (:func:`~layerlab.train.checkpoint.save_step`)
    from its own replica (DDP) or the gathered weights (FSDP, where every rank gathers). Saving draws no random
    numbers and moves no weights: a run with kept steps trains exactly as one without."""
    weights = run.par.full_weights()
    if run.d.main:
        save_step(run.run_dir, weights, run.tokenizer, step, run.spec.to_dict(), tokens=step * run.tokens_per_step)


def _save(run: Run, step: int) -> None:
    """Rank 0 writes a checkpoint of ``step`` from its own replica (DDP) or the gathered state (FSDP)."""
    model_out, optimizer_out = run.par.full_state(run.optimizer)  # under FSDP every rank gathers
    if run.d.main:
        save_checkpoint(run.run_dir, model_out, optimizer_out, step, {"results": run.results, **run.schedule})


# ---------------------------------------------------------------------------------------------------- steps
@dataclass
class _Progress:
    """Where the loop stands, and where it reports (``log``: metrics.jsonl on rank 0; ``bar``: the progress bar).

    What a checkpoint written now would hold: ``clean`` while model, optimizer, rule and records are all those
    of the end of step ``step``; from ``begin_step`` of step ``taking`` until its log line they are not.
    """

    step: int
    saved_step: int | None  # the step of the checkpoint on disk
    taking: int
    last_val: float | None
    log: _Log
    clean: bool = True
    stop_voted: bool = False  # every process has heard that a Ctrl-C was requested: all stop after the same step
    interrupted: bool = False
    graceful: bool = False  # stopped at a step boundary by the first Ctrl-C, every process after the same step
    bar: Any = None
    task: Any = None
    t_last: float = 0.0
    tok_since: int = 0  # tokens trained since ``t_last``


# ---------------------------------------------------------------- LayerSkip (Elhoushi et al., 2024)
# "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding", Sec. 4; the curriculum and the loss
# scales as in facebookresearch/LayerSkip's torchtune recipe (early_exit_loss.py). Our own code.


def layer_drop_rates(layers: int, p_max: float, schedule: str = "exp") -> list[float]:
    """Block i's skip probability p_max * D(i): D(i) = e^(i ln2 / (L-1)) - 1 (the paper's Eq. 2, "exp") or
    i / (L-1) ("linear"); both 0 at block 0 and 1 at block L-1."""
    if layers == 1:
        return [0.0]
    if schedule == "exp":
        return [p_max * (math.exp(i * math.log(2) / (layers - 1)) - 1) for i in range(layers)]
    return [p_max * i / (layers - 1) for i in range(layers)]


def _skip_block(rate: float):
    """A forward hook that, in training, replaces the block's output by its input for each sequence with
    probability ``rate`` (the block is dropped for that sequence; no rescaling, as the paper)."""

    def hook(block, args, kwargs, out):
        if not block.training or rate <= 0:
            return out
        x = args[0] if args else kwargs["x"]
        keep = (torch.rand(x.shape[0], 1, 1, device=x.device) >= rate).to(out.dtype)  # (B, 1, 1)
        return keep * out + (1 - keep) * x

    return hook


def add_layer_dropout(model: LayerlabForCausalLM, p_max: float, schedule: str = "exp") -> list:
    """Hooks that drop block i with :func:`layer_drop_rates`' probability in training; returns their handles."""
    if p_max <= 0:
        return []
    if model.cfg.wiring != "residual":
        raise LayerlabError(f"layer_dropout needs the residual wiring; this model has wiring={model.cfg.wiring!r}")
    rates = layer_drop_rates(len(model.blocks), p_max, schedule)
    return [b.register_forward_hook(_skip_block(r), with_kwargs=True) for b, r in zip(model.blocks, rates, strict=True)]


def early_exit_blocks(layers: int, step: int, steps: int, curriculum: str, rotation: int = 2) -> list[int]:
    """The blocks whose early-exit loss counts at step ``step`` (0-based) of ``steps``; the last always.

    gradual: block i from the step where 2 t / T >= (L - i) / L (the deepest first, all by half the run);
    rotational: the blocks i with (i - t) % R == 0, the set moving up one block a step; none: every block."""
    if curriculum == "gradual":
        on = [i for i in range(layers) if 2 * step / max(steps, 1) >= (layers - i) / layers]
    elif curriculum == "rotational":
        on = [i for i in range(layers) if (i - step) % rotation == 0]
    else:
        on = list(range(layers))
    return sorted(set(on) | {layers - 1})


def early_exit_weights(layers: int, blocks: list[int], scale: float = 1.0) -> dict[int, float]:
    """The loss weight of each enabled block: e(i) = 1 + 2 + ... + (i+1), times ``scale`` below the last block,
    normalised to sum to 1 (the paper's e~(t, i), Sec. 4.2)."""
    raw = {i: (i + 1) * (i + 2) / 2 * (scale if i < layers - 1 else 1.0) for i in blocks}
    total = sum(raw.values())
    return {i: w / total for i, w in raw.items()}


def _early_exit_loss(run: Run, step_fn, x: torch.Tensor, y: torch.Tensor, step: int):
    """The LayerSkip loss of one micro-batch, and the last block's (the ordinary) loss, for the log."""
    tc, model = run.tc, run.model
    L = len(model.blocks)
    weights = early_exit_weights(L, early_exit_blocks(L, step, run.sched.steps, tc.early_exit_curriculum,
                                                      tc.early_exit_rotation), tc.early_exit_scale)
    with run.autocast():
        out = step_fn(x, output_hidden_states=True)
    ce = lambda logits: F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))  # noqa: E731
    last = ce(out.logits)
    total = weights[L - 1] * last + _aux(out)
    for i, w in weights.items():
        if i < L - 1:  # hidden_states[i + 1] is block i's output; the last entry is already after the final norm
            with run.autocast():
                logits = model.lm_head(model.ln_f(out.hidden_states[i + 1]))
            total = total + w * ce(logits)
    return total, last


def _aux(out) -> torch.Tensor | float:
    """The design's auxiliary loss in a forward's output (:class:`~layerlab.model.LayerlabOutput`), else 0: it joins
    the objective, never the logged loss."""
    aux = getattr(out, "aux_loss", None)
    return aux if aux is not None else 0.0


def _forward_backward(run: Run, gen: torch.Generator, want_tel: bool, step: int = 0
                      ) -> tuple[float, dict[str, list[float]]]:
    """The step's micro-batches, forward and backward (DDP reduces the gradients after the last one): the sum of
    their losses on this rank's rows and, if ``want_tel``, this rank's residual-stream statistics. With
    ``early_exit_loss`` the backward takes LayerSkip's weighted loss over the blocks, and the sum is of the
    last block's loss, as without it."""
    tc, mc, d = run.tc, run.mc, run.d
    loss_sum = 0.0
    stats_ctx = telemetry.residual_stats(run.model) if want_tel else nullcontext({})
    step_fn = run.par.module()  # after begin_step: DDP follows LISA's choice of trainable blocks
    with stats_ctx as stats:
        for micro in range(tc.grad_accum):
            # every rank draws the same global batch and trains on its share of the rows
            x, y = run.data.get_batch("train", tc.batch_size, mc.context, gen)
            x, y = d.rows(x), d.rows(y)
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            with run.par.accumulating(last=micro == tc.grad_accum - 1):
                if tc.early_exit_loss:
                    objective, loss = _early_exit_loss(run, step_fn, x, y, step)
                else:
                    with run.autocast():
                        out = step_fn(x)
                    loss = F.cross_entropy(out.logits.float().view(-1, out.logits.size(-1)), y.view(-1))
                    objective = loss + _aux(out)
                (objective / tc.grad_accum).backward()
            loss_sum += float(loss.detach())
    return loss_sum, stats


def _one_step(run: Run, at: _Progress, ctrl_c: CtrlC) -> tuple[float, float, float, dict[str, Any]]:
    """Step ``at.step`` up to its update: its LR and the rule's ``begin_step``, forward and backward, clipping,
    the update. Returns the LR, the global loss, the gradient norm and the step's telemetry."""
    tc, d, step = run.tc, run.d, at.step
    lr = lr_at(step, run.sched)
    at.clean, at.taking = False, step + 1  # begin_step may move LLR's ramp, a forward a norm's buffers
    run.optimizer.begin_step(step)  # e.g. LISA's draw of blocks, LLR's alphas: before the forward
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    torch.manual_seed(_step_seed(tc.seed, step))
    gen = torch.Generator().manual_seed(_step_seed(tc.seed, step))
    want_tel = tc.telemetry_every > 0 and (step + 1) % tc.telemetry_every == 0
    # the step only matters to the early-exit curriculum (the three-argument call is what tests substitute)
    loss_sum, stats = _forward_backward(run, gen, want_tel, step) if tc.early_exit_loss else \
        _forward_backward(run, gen, want_tel)
    # the mean loss over the processes, and whether any of them has had a Ctrl-C, in one reduction
    loss, votes = d.reduce([loss_sum / tc.grad_accum, float(ctrl_c.requested)])
    loss = loss / d.world if d.active else loss
    at.stop_voted = votes > 0
    if not math.isfinite(loss):
        saved = read_state(run.run_dir)
        kept = f"last good checkpoint (step {saved['step']}) kept" if saved else "no checkpoint was saved"
        raise TrainingDiverged(f"loss became {loss} at step {step + 1}; stopped, {kept} in {run.run_dir}")
    record: dict[str, Any] = {}
    if want_tel:
        record["grad_norm_block"] = run.par.grad_norms()
        before = run.par.snapshot()
    grad_norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad()
    at.step += 1
    at.tok_since += run.tokens_per_step
    if want_tel:
        record["update_ratio_block"] = run.par.update_ratios(before)
        record.update(telemetry.router_record(stats.get("router_counts"), d.reduce))  # mlp moe: the router load
        stats = d.residual_stats(stats)
        record["resid_rms_block"] = stats["resid_rms"]
        record["max_abs_block"] = stats["max_abs"]
    return lr, loss, grad_norm, record


def _finish_step(run: Run, at: _Progress, lr: float, loss: float, grad_norm: float, record: dict[str, Any]) -> None:
    """After the update of step ``at.step``: its evaluation, log line and progress, then its checkpoint."""
    tc, step = run.tc, at.step
    if step % tc.eval_every == 0 or step == tc.steps:
        at.last_val = curve_loss(run.model, run.data, tc, run.mc.context, run.device, run.autocast, run.d)
        record.update(val_loss=at.last_val, val_bpb=at.last_val * run.bpb)
        run.results.update(val_loss=at.last_val, val_bpb=at.last_val * run.bpb, step=step)
    if step % tc.log_every == 0 or record or step == tc.steps:
        now = time.perf_counter()
        tps = at.tok_since / max(now - at.t_last, 1e-9)
        at.t_last, at.tok_since = now, 0
        at.log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": step * run.tokens_per_step, "tok_per_s": tps, **run.optimizer.telemetry(), **record})
        at.bar.update(at.task, loss=f"{loss:.3f}", tps=f"{tps:,.0f}")
    if "val_loss" in record:
        at.bar.update(at.task, val=f"{at.last_val:.3f}")
    at.bar.update(at.task, completed=step)
    if _keeps(tc, step):  # before the checkpoint, so that a run resumed from this step's one has it
        _keep(run, step)
    at.clean = True
    if step % tc.save_every == 0 or step == tc.steps:
        _save(run, step)
        at.saved_step = step
        run.d.barrier()


def _steps(run: Run, at: _Progress, ctrl_c: CtrlC, progress: bool) -> None:
    """The step-0 evaluation of a new run, then the steps to the last, or to the step boundary where a Ctrl-C
    stops every process (its checkpoint then written)."""
    tc, d = run.tc, run.d
    with _progress(progress and d.main) as at.bar:
        at.task = at.bar.add_task("train", total=tc.steps, completed=run.start, loss="-", val="-", tps="-")
        if run.start == 0:  # the step-0 validation loss, as a baseline for "did it learn"
            run.results["val_loss_step0"] = curve_loss(run.model, run.data, tc, run.mc.context, run.device,
                                                     run.autocast, d)
            at.log.write({"step": 0, "val_loss": run.results["val_loss_step0"],
                          "val_bpb": run.results["val_loss_step0"] * run.bpb})
            if _keeps(tc, 0):
                _keep(run, 0)
        at.t_last, at.tok_since = time.perf_counter(), 0
        while at.step < tc.steps:
            # a step boundary: one process may act on its own Ctrl-C at once, several on the vote
            if at.stop_voted or (not d.active and ctrl_c.requested):
                break
            grow.before_step(run, at, add_layer_dropout)  # --grow-at: growth, and MSG's masks, for this step
            _finish_step(run, at, *_one_step(run, at, ctrl_c))
        if at.step < tc.steps:  # stopped by Ctrl-C at a step boundary, on every process at the same one
            ctrl_c.saving = True
            if at.saved_step != at.step:
                _save(run, at.step)
                at.saved_step = at.step
            at.interrupted = at.graceful = True
            run.echo(f"interrupted: checkpoint of step {at.step} saved; {run.again}")


def _stopped_at_once(run: Run, at: _Progress, ctrl_c: CtrlC) -> None:
    """A second Ctrl-C, or one that came where no handler could be installed: the run keeps a checkpoint that is
    wholly one step's, this one's if the step is whole (and no other rank is needed to write it)."""
    ctrl_c.saving = True
    d = run.d
    if at.clean and at.saved_step != at.step and run.par.kind != "fsdp" and d.main:
        # its own replica is complete: no other rank is needed (FSDP's shards would need every rank)
        _save(run, at.step)
        at.saved_step = at.step
    at.interrupted = at.saved_step != run.tc.steps  # after the last step's checkpoint, the run is finished
    if at.interrupted and at.saved_step == at.step:
        run.echo(f"interrupted: checkpoint of step {at.step} saved; {run.again}")
    elif at.interrupted:
        if d.main:  # the manifest reports the results of the checkpoint that is kept
            kept_state = read_state(run.run_dir)
            run.results.clear()
            run.results.update(kept_state.get("results", {}) if kept_state else {})
        why = ("an FSDP run gathers a checkpoint only at the end of a step (press Ctrl-C once)"
               if at.clean else f"step {at.taking} was half done")
        kept = f"the checkpoint of step {at.saved_step} is kept" if at.saved_step is not None else \
            "no checkpoint was saved yet, so it starts over"
        run.echo(f"interrupted at once: {why}; {kept}; {run.again}")


def _train(spec: RunSpec, run_dir: Path, continuing: bool, d: distributed.Dist, progress: bool,
           echo) -> TrainResult:
    run = _setup(spec, run_dir, continuing, d, echo)
    if isinstance(run, TrainResult):  # nothing to do: already trained to its last step
        return run
    _manifest(run, "running")
    _announce(run)
    at = _Progress(step=run.start, saved_step=run.start if run.resumed else None, taking=run.start,
                   last_val=run.results.get("val_loss"),
                   log=_Log(run_dir / METRICS if d.main else None, run.tc.log, run.start))
    run.model.train()
    ctrl_c = CtrlC(echo)
    with ctrl_c:
        try:
            _steps(run, at, ctrl_c, progress)
        except KeyboardInterrupt:  # a second Ctrl-C, or one that came where no handler could be installed
            _stopped_at_once(run, at, ctrl_c)
        finally:
            at.log.close()
        if not at.interrupted and d.main:
            try:
                run.results.update(final_validation(run_dir, run.tokenizer, run.tc.data, run.device))
            except KeyboardInterrupt:  # the checkpoint is whole: only the figure is missing
                echo("interrupted: the final validation figure is skipped; `layerlab eval RUN` computes it")
        ctrl_c.saving = True  # a Ctrl-C now would only cut the manifest short
        _manifest(run, "interrupted" if at.interrupted else "finished")
    if at.graceful:  # no process exits before rank 0 has written: --nproc stops the others when one exits
        d.barrier()
    if at.interrupted:
        raise SystemExit(130)
    return _result(run_dir, at.step, run.results, run.n_params, d.main)
