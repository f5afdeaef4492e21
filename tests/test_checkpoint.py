"""Checkpoints: a finished run is left alone, and an optimizer state that does not fit (one from before the
optimizer registry included) is a one-line error before anything is written."""

import json
import shutil

import pytest
import torch
from conftest import ctrl_c_at

from layerlab.errors import LayerlabError
from layerlab.io import sha256_file
from layerlab.train import train

FAST = {"steps": 8, "eval_every": 4, "save_every": 4, "log_every": 1, "telemetry_every": 4}
QUIET = {"progress": False, "echo": lambda *a, **k: None}


def _rewrite_optimizer(run_dir, state) -> None:
    """Replace optimizer.pt and its hash, as if the run had saved ``state``."""
    torch.save(state, run_dir / "optimizer.pt")
    trainer = json.loads((run_dir / "trainer_state.json").read_text())
    trainer["hashes"]["optimizer.pt"] = sha256_file(run_dir / "optimizer.pt")
    (run_dir / "trainer_state.json").write_text(json.dumps(trainer))


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    """A run stopped by Ctrl-C after its checkpoint of step 4."""
    out = tmp_path_factory.mktemp("ckpt") / "cut"
    with ctrl_c_at(4), pytest.raises(SystemExit):
        train(preset="debug", overrides=dict(FAST), out=out, **QUIET)
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 4
    return out


def test_finished_run_with_an_old_optimizer_file_is_left_alone(tmp_path):
    """Re-invoking a finished run reports it, before (and without) reading its optimizer state."""
    out = tmp_path / "done"
    train(preset="debug", overrides={**FAST, "steps": 2, "eval_every": 2}, out=out, **QUIET)
    (out / "optimizer.pt").write_bytes(b"not even a torch file")  # it must not be read at all
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    said = []
    res = train(preset="debug", overrides={**FAST, "steps": 2, "eval_every": 2}, out=out, progress=False,
                echo=said.append)
    assert res.step == 2 and said == [f"{out} is already trained to step 2 of 2"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert json.loads((out / "layerlab.json").read_text())["status"] == "finished"


def test_optimizer_file_from_before_the_registry_is_a_one_line_error(cut, tmp_path):
    """Such files (a plain AdamW state) are no longer upgraded: resuming one says so, and writes nothing."""
    old = tmp_path / "old"
    shutil.copytree(cut, old)
    _rewrite_optimizer(old, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).state_dict())
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    with pytest.raises(LayerlabError, match="saved by a layerlab from before the optimizer registry"):
        train(resume=old, **QUIET)
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before


def _drop_a_group(state):
    state["optimizer"]["param_groups"].pop()
    return state


def _reshape_first(state):
    first = state["optimizer"]["state"][0]
    first["exp_avg"] = first["exp_avg"].reshape(-1)[:3].clone()
    return state


@pytest.mark.parametrize("change,message", [
    (lambda s: b"garbage", r"cannot read .*optimizer\.pt: "),
    (lambda s: {"weights": 1}, r"optimizer\.pt does not fit the adamw optimizer of this run \(unknown format "
                                r"\(keys weights\)\)$"),
    (_drop_a_group, r"optimizer\.pt does not fit the adamw optimizer of this run \(loaded state dict has a "
                    r"different number of parameter groups\)$"),
    (_reshape_first, r"optimizer\.pt does not fit the adamw optimizer of this run \(its exp_avg for "
                     r"blocks\.0\.attn\.qkv\.weight has shape \(3,\), the parameter \(192, 64\)\)$"),
], ids=["not-torch", "unknown-format", "groups", "shape"])
def test_optimizer_state_that_does_not_fit_is_one_line(cut, tmp_path, change, message):
    run = tmp_path / "run"
    shutil.copytree(cut, run)
    state = change(torch.load(run / "optimizer.pt", weights_only=True))
    if isinstance(state, bytes):
        (run / "optimizer.pt").write_bytes(state)
        trainer = json.loads((run / "trainer_state.json").read_text())
        trainer["hashes"]["optimizer.pt"] = sha256_file(run / "optimizer.pt")
        (run / "trainer_state.json").write_text(json.dumps(trainer))
    else:
        _rewrite_optimizer(run, state)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(LayerlabError, match=message) as e:
        train(resume=run, **QUIET)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "nothing is written"
