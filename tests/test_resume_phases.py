"""Ctrl-C at any point of a step: the run resumed from what it saved is bit-identical to the uninterrupted one.

Each case wraps one function the loop calls (the LR, LLR's ``begin_step``, the forward, the backward, clipping,
``optimizer.step``, ``zero_grad``, telemetry, evaluation, the metrics log, the checkpoint save, a rename inside the
save) and, the first time it runs during step ``AT``, either sends SIGINT to this process (a Ctrl-C) or raises
KeyboardInterrupt right there (what a second Ctrl-C does, and what Python's own SIGINT handler did).
"""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerlab.model import LayerlabForCausalLM
from layerlab.train import checkpoint as ckpt_mod
from layerlab.train import distributed, optimizers, train
from layerlab.train import loop as loop_mod

# Every phase writes something that a checkpoint of the wrong step would carry: dropout draws its masks per step,
# PRepBN's forward counts down a buffer saved with the weights, LLR's begin_step moves its ramp at steps 0 and 5.
OVER = {"steps": 9, "eval_every": 3, "save_every": 3, "log_every": 1, "telemetry_every": 3, "dropout": 0.1,
        "norm": "prepbn", "optimizer": "llr", "llr_every": 5, "llr_ramp": 2, "llr_until": 1.0}
AT = 5  # 0-based: step 5 ends with telemetry, an evaluation and a checkpoint (of step 6); the one before is of step 3
QUIET = {"progress": False, "echo": lambda *a, **k: None}


class Trigger:
    """Interrupts once, the first time it is called while the loop is in step ``AT`` (or before any step)."""

    def __init__(self, mode: str, before_training: bool = False):
        self.mode, self.before_training = mode, before_training
        self.step: int | None = None  # the step the loop is in, as its call of lr_at says
        self.fired = False

    def __call__(self) -> None:
        armed = self.step is None if self.before_training else self.step is not None and self.step >= AT
        if self.fired or not armed:
            return
        self.fired = True
        if self.mode == "signal":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise KeyboardInterrupt


def _after(m, owner, name, hit, when=lambda *a, **k: True):
    """Patch ``owner.name`` to call the original, then ``hit()`` (if ``when`` holds for the call's arguments)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args, **kwargs):
            hit()
        return out

    m.setattr(owner, name, wrapper)


def _patch(m, phase: str, hit: Trigger) -> None:
    real_lr = loop_mod.lr_at

    def lr_at(step, tc):
        hit.step = step
        if phase == "lr":
            hit()
        return real_lr(step, tc)

    m.setattr(loop_mod, "lr_at", lr_at)
    if phase == "begin_step":
        _after(m, optimizers.LLR, "begin_step", hit)
    elif phase == "forward":
        _after(m, LayerlabForCausalLM, "forward", hit, when=lambda self, *a, **k: self.training)
    elif phase == "backward":
        _after(m, torch.Tensor, "backward", hit)
    elif phase == "clip":
        _after(m, torch.nn.utils, "clip_grad_norm_", hit)
    elif phase == "optimizer_step":  # the update is done, the step counter not yet moved
        _after(m, optimizers.Layerwise, "step", hit)
    elif phase == "zero_grad":
        _after(m, optimizers.Layerwise, "zero_grad", hit)
    elif phase == "telemetry":
        _after(m, distributed.Parallel, "update_ratios", hit)
    elif phase in ("eval0", "evaluate"):
        _after(m, loop_mod, "curve_loss", hit)
    elif phase == "log":
        _after(m, loop_mod._Log, "write", hit)
    elif phase == "save_start":
        real_save = loop_mod.save_checkpoint

        def save(*args, **kwargs):
            hit()
            return real_save(*args, **kwargs)

        m.setattr(loop_mod, "save_checkpoint", save)
    elif phase == "save_rename":  # between the renames that put a checkpoint's files in place
        _after(m, ckpt_mod.os, "replace", hit, when=lambda src, dst: os.path.basename(dst) == "model.safetensors")
    elif phase == "save_end":
        _after(m, loop_mod, "save_checkpoint", hit)
    elif phase != "lr":
        raise ValueError(phase)


PHASES = ["eval0", "lr", "begin_step", "forward", "backward", "clip", "optimizer_step", "zero_grad", "telemetry",
          "evaluate", "log", "save_start", "save_rename", "save_end"]


def _records(run_dir) -> list[dict]:
    """The metrics log without its timings."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]


def _same(a, b) -> bool:
    """Equal, bit for bit, through nested containers; NaN equals NaN."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("phases") / "full"
    return train(preset="debug", overrides=dict(OVER), out=out, **QUIET)


def _expected_checkpoint(mode: str, phase: str) -> int:
    """The step of the checkpoint an interrupt there leaves."""
    if phase == "eval0":
        return 0
    if mode == "signal":  # the step in progress finishes, is saved, and the run stops
        return AT + 1
    if phase == "lr":  # nothing of step AT has happened yet: the state is that of step AT
        return AT
    if phase.startswith("save"):  # step AT+1 is complete: its checkpoint is (re)written
        return AT + 1
    return 3  # step AT is half done: nothing consistent to save, the checkpoint of step 3 is kept


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", ["signal", "raise"])
def test_interrupt_anywhere_in_a_step_resumes_exactly(full, tmp_path, mode, phase):
    cut = tmp_path / "cut"
    hit = Trigger(mode, before_training=phase == "eval0")
    said: list[str] = []
    with pytest.MonkeyPatch.context() as m:
        _patch(m, phase, hit)
        with pytest.raises(SystemExit) as e:
            train(preset="debug", overrides=dict(OVER), out=cut, progress=False, echo=said.append)
    assert hit.fired and e.value.code == 130
    saved = json.loads((cut / "trainer_state.json").read_text())["step"]
    assert saved == _expected_checkpoint(mode, phase), said
    assert json.loads((cut / "layerlab.json").read_text())["status"] == "interrupted"
    again = f"continue with: layerlab train --resume {cut}"
    if mode == "signal":
        assert said[-2].startswith("Ctrl-C: stopping after this step, with a checkpoint")
    if saved == 3:
        assert said[-1] == f"interrupted at once: step {AT + 1} was half done; the checkpoint of step 3 is kept; " \
                           f"{again}"
    else:
        assert said[-1] == f"interrupted: checkpoint of step {saved} saved; {again}"

    resumed = train(resume=cut, **QUIET)
    assert resumed.step == full.step == 9
    assert resumed.val_loss == full.val_loss
    assert _records(cut) == _records(full.run_dir)
    a, b = load_file(cut / "model.safetensors"), load_file(full.run_dir / "model.safetensors")
    assert _same(a, b), [k for k in a if not torch.equal(a[k], b[k])]
    assert _same(torch.load(cut / "optimizer.pt", weights_only=True),
                 torch.load(full.run_dir / "optimizer.pt", weights_only=True))


DIST = {"steps": 8, "eval_every": 4, "save_every": 4, "log_every": 1}


def _one_process_hears_ctrl_c(tmp: str, echo=print) -> dict:
    """Every rank of a 2-process group runs this: a DDP and an FSDP run, where only rank 1 gets SIGINT, in step 6."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    real = loop_mod.lr_at

    def lr_at(step, tc):
        if step == 5 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, tc)

    loop_mod.lr_at = lr_at
    out = {}
    try:
        for kind in ("ddp", "fsdp"):
            try:
                train(preset="debug", overrides={**DIST, "parallel": kind}, out=Path(tmp) / kind, **QUIET)
            except SystemExit as e:
                out[kind] = e.code
    finally:
        loop_mod.lr_at = real
        dist.destroy_process_group()
    return out


def test_ctrl_c_in_one_process_stops_all_after_the_same_step(tmp_path, monkeypatch):
    """The processes agree on the step to stop after (FSDP can gather its checkpoint there too); resumed by one
    process, each run ends as the one-process run does, within the float rounding of a 2-process sum."""
    monkeypatch.setenv(distributed.MAX_NPROC_ENV, "2")  # two processes even on a one-core machine
    exits = distributed.launch(2, _one_process_hears_ctrl_c, {"tmp": str(tmp_path)})
    assert exits == {"ddp": 130, "fsdp": 130}
    single = train(preset="debug", overrides=dict(DIST), out=tmp_path / "single", **QUIET)
    for kind in ("ddp", "fsdp"):
        run = tmp_path / kind
        assert json.loads((run / "trainer_state.json").read_text())["step"] == 6, kind
        assert json.loads((run / "layerlab.json").read_text())["status"] == "interrupted"
        resumed = train(resume=run, **QUIET)
        assert resumed.step == 8 and math.isclose(resumed.val_loss, single.val_loss, rel_tol=1e-5)
        a, b = load_file(run / "model.safetensors"), load_file(single.run_dir / "model.safetensors")
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{kind} {k}: {m}")
