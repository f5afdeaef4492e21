"""Live training logs and kept steps (issue 14, section 4): ``log: tensorboard`` writes the records of metrics.jsonl as
TensorBoard scalars, read back here with TensorBoard's own event reader; ``keep_every`` keeps the weights of steps as
model directories RUN/steps/stepNNNNNNN/ that load and analyze, without changing the run, and survive a resume."""

import json
import math
import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from layerlab.adapters import load_model
from layerlab.cli import app
from layerlab.config import ModelConfig, TrainConfig
from layerlab.data import TokenData, load_tokenizer
from layerlab.errors import LayerlabError
from layerlab.io import cache_dir
from layerlab.model import build_model
from layerlab.train import loop as loop_mod
from layerlab.train import train

# debug preset: 2 blocks, lr 3e-3, warmup 2, min_lr_ratio 0.1 (the default)
FAST = {"steps": 8, "eval_every": 3, "save_every": 4, "log_every": 1, "telemetry_every": 2, "eval_batches": 2}
QUIET = {"progress": False, "echo": lambda *a, **k: None}
STEPS_KEPT = [0, 3, 6, 8]  # keep_every 3: step 0, every third step, and the last
BLOCK_KEYS = ("grad_norm_block", "update_ratio_block", "resid_rms_block", "max_abs_block", "lr_scale_block")


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in records]


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under RUN/tb/, by tag, as TensorBoard itself reads it: (step, value) in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard must hold, written out by hand from metrics.jsonl: each number under its key, each of the
    2 blocks' telemetry under key/0 and key/1, stored as float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("step", "tokens"):
                continue
            if key.endswith("_block"):
                assert len(value) == 2
                for i, v in enumerate(value):
                    out.setdefault(f"{key}/{i}", []).append((r["step"], float(np.float32(v))))
            elif isinstance(value, (int, float)):
                out.setdefault(key, []).append((r["step"], float(np.float32(value))))
    return out


def _lr(step: int) -> float:
    """The LR of (0-based) step ``step`` of the debug preset over 8 steps, by hand: warmup 2, cosine to 0.1x."""
    lr, floor = 3e-3, 3e-4
    if step < 2:
        return lr * (step + 1) / 2
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * (step - 2) / 6))


def _same_weights(a, b) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The run without live log or kept steps, in a process of its own: it must not import TensorBoard."""
    out = tmp_path_factory.mktemp("plain") / "run"
    code = textwrap.dedent(f"""
        import sys
        from layerlab.train import train
        train(preset="debug", overrides={FAST!r}, out={str(out)!r}, progress=False, echo=lambda *a, **k: None)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "wandb")
                        or m.startswith("torch.utils.tensorboard"))
        print("loaded:", loaded)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded: []" in r.stdout
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The same run from the command line, with --log tensorboard and --keep-every 3."""
    out = tmp_path_factory.mktemp("full") / "run"
    args = ["train", "--preset", "debug", "--out", str(out), "--no-progress", "--log", "tensorboard",
            "--keep-every", "3"]
    for key, value in FAST.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return out


def test_tensorboard_holds_the_runs_own_records(full):
    """Every number of metrics.jsonl, and nothing else, is a TensorBoard scalar at its step; the LR follows the
    warmup + cosine written out by hand, and the per-block telemetry is there for every block."""
    records = _records(full)
    events = _events(full)
    assert events == _expected_scalars(records)
    assert [s for s, _ in events["loss"]] == list(range(1, 9))
    assert [s for s, _ in events["val_loss"]] == [0, 3, 6, 8]
    assert [s for s, _ in events["grad_norm_block/1"]] == [2, 4, 6, 8]
    for key in BLOCK_KEYS:
        assert f"{key}/0" in events and f"{key}/1" in events
    for step, value in events["lr"]:
        assert value == pytest.approx(_lr(step - 1), rel=1e-6)
    assert all(v > 0 for _, v in events["tok_per_s"])


def test_kept_steps_leave_the_run_unchanged(plain, full):
    """Keeping steps and logging to TensorBoard change nothing: same losses and telemetry at every step, the same
    final weights; the last kept step is the final model, step 0 the seed's initialization."""
    assert _without_time(_records(full)) == _without_time(_records(plain))
    assert _same_weights(full, plain)
    assert not (plain / "steps").exists() and not (plain / "tb").exists()
    kept = sorted(p.name for p in (full / "steps").iterdir())
    assert kept == [f"step{s:07d}" for s in STEPS_KEPT]
    assert _same_weights(full / "steps" / "step0000008", full)
    manifest = json.loads((full / "layerlab.json").read_text())
    torch.manual_seed(manifest["args"]["train"]["seed"])
    init = build_model(ModelConfig(**manifest["args"]["model"]))
    saved = load_file(full / "steps" / "step0000000" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in init.state_dict().items() if k in saved)
    step3 = json.loads((full / "steps" / "step0000003" / "layerlab.json").read_text())
    assert step3["command"] == "train-step" and step3["step"] == 3 and step3["tokens"] == 3 * 4 * 64


def test_a_kept_step_is_the_model_of_its_step(full):
    """A kept step loads with load_model, and its validation loss over the curve's windows is the one the run
    logged at that step; it is a complete model directory (tokenizer included) that analyze accepts."""
    import layerlab

    tc = TrainConfig(**{**json.loads((full / "layerlab.json").read_text())["args"]["train"]})
    by_step = {r["step"]: r for r in _records(full) if "val_loss" in r}
    step_dir = full / "steps" / "step0000003"
    lm = load_model(step_dir, device="cpu")
    data = TokenData.prepare(None, load_tokenizer(step_dir), cache_dir())

    loss = loop_mod.curve_loss(lm.model, data, tc, 64, torch.device("cpu"), nullcontext)
    assert loss == pytest.approx(by_step[3]["val_loss"], rel=1e-6)
    assert loss != pytest.approx(by_step[6]["val_loss"], rel=1e-3)  # a different step is a different model
    report = layerlab.analyze(step_dir, tokens=256, removal_tokens=128, spectra=False, progress=False)
    assert len(report.layers) == 2


@pytest.mark.parametrize("keep_after", [3, 4])
def test_resume_redoes_kept_steps_and_purges_events_past_the_checkpoint(full, tmp_path, monkeypatch, keep_after):
    """A run stopped halfway through step 8, its checkpoint at step 4 but its log and kept steps at 7 and 6,
    resumes to the same records, kept steps and TensorBoard scalars as the run that was never stopped. Resumed
    with keep_every 4, it keeps what it kept up to its checkpoint and then steps 8 (not 6: it is not redone)."""
    out = tmp_path / "cut"
    real = loop_mod._forward_backward
    calls = []

    def forward_backward(run, gen, want_tel):
        calls.append(1)
        if len(calls) == 8:  # halfway through step 8: after its forward, before its update
            raise KeyboardInterrupt
        return real(run, gen, want_tel)

    overrides = {**FAST, "log": "tensorboard", "keep_every": 3}
    with monkeypatch.context() as m:
        m.setattr(loop_mod, "_forward_backward", forward_backward)
        with pytest.raises(SystemExit):
            train(preset="debug", overrides=overrides, out=out, **QUIET)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4
    assert (out / "steps" / "step0000006").is_dir()  # past the checkpoint: the resumed run redoes it
    assert max(s for s, _ in _events(out)["loss"]) == 7

    train(resume=out, overrides={"keep_every": keep_after}, **QUIET)
    assert _without_time(_records(out)) == _without_time(_records(full))
    kept = STEPS_KEPT if keep_after == 3 else [0, 3, 8]
    assert sorted(p.name for p in (out / "steps").iterdir()) == [f"step{s:07d}" for s in kept]
    for s in kept:
        assert _same_weights(out / "steps" / f"step{s:07d}", full / "steps" / f"step{s:07d}")
    events = _events(out)
    assert events == _expected_scalars(_records(out))  # one event per step: the lost steps 5-7 were purged
    reference = _events(full)
    assert {t: v for t, v in events.items() if t != "tok_per_s"} == \
        {t: v for t, v in reference.items() if t != "tok_per_s"}


def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(LayerlabError, match="keep_every must be non-negative"):
        TrainConfig(keep_every=-1)
    with pytest.raises(LayerlabError, match="did you mean 'tensorboard'"):
        train(preset="debug", overrides={"log": "tensorbord"}, out=tmp_path / "a", **QUIET)
    import importlib.util

    from layerlab.train import logs

    real = importlib.util.find_spec
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real(name, *a))
    with pytest.raises(LayerlabError, match=r"pip install 'layerlab\[tensorboard\]'"):
        train(preset="debug", overrides={**FAST, "log": "tensorboard"}, out=tmp_path / "b", **QUIET)
    assert not (tmp_path / "b").exists()  # refused before anything is written
