"""Several processes on CPU (gloo): DDP, FSDP, LISA and checkpoints give the one-process run, within float rounding.

One group of 2 processes does every multi-process run (starting processes costs seconds on a small machine); a
torchrun launch checks the command line route. The references train in this process.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from layerlab.errors import LayerlabError
from layerlab.train import distributed, train
from layerlab.train import loop as loop_mod

FAST = {"steps": 8, "eval_every": 4, "save_every": 4, "log_every": 1, "telemetry_every": 2}
LISA = {"optimizer": "lisa", "lisa_every": 3}
TELEMETRY = ("grad_norm_block", "update_ratio_block", "resid_rms_block", "max_abs_block")
QUIET = {"progress": False, "echo": lambda *a, **k: None}


def _records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@contextmanager
def _ctrl_c_at_step(n: int = 5):
    """The loop meets Ctrl-C as it starts step ``n`` (1-based), on every rank at once."""
    real = loop_mod.lr_at

    def lr_at(step, tc):
        if step == n - 1:
            raise KeyboardInterrupt
        return real(step, tc)

    loop_mod.lr_at = lr_at
    try:
        yield
    finally:
        loop_mod.lr_at = real


def _group_work(tmp: str, echo=print) -> dict:
    """Every rank of the 2-process group runs this: LISA, a DDP and an FSDP run cut at step 4 and resumed, and
    an FSDP LISA run cut at step 3 (before one block was ever drawn) and resumed."""
    from pathlib import Path

    tmp = Path(tmp)
    dist.init_process_group("gloo")  # one group for all runs: train() uses it and leaves it open
    out = {}
    try:
        out["lisa"] = train(preset="debug", overrides={**FAST, **LISA}, out=tmp / "lisa-2", **QUIET)
        for name, extra, at in (("ddp", {}, 5), ("fsdp", {"parallel": "fsdp"}, 5),
                                ("fsdp-lisa", {**LISA, "parallel": "fsdp", "save_every": 3}, 4)):
            try:
                with _ctrl_c_at_step(at):
                    train(preset="debug", overrides={**FAST, **extra}, out=tmp / f"{name}-cut", **QUIET)
            except SystemExit as e:
                out[f"{name}-exit"] = e.code
        if dist.get_rank() == 0:
            shutil.copytree(tmp / "ddp-cut", tmp / "ddp-cut-for-1")
            shutil.copytree(tmp / "fsdp-cut", tmp / "fsdp-cut-for-1")
            shutil.copytree(tmp / "fsdp-cut", tmp / "fsdp-cut-for-2")
            shutil.copytree(tmp / "fsdp-lisa-cut", tmp / "fsdp-lisa-step-3")
        dist.barrier()
        out["ddp-resumed-2"] = train(resume=tmp / "ddp-cut", **QUIET)
        out["fsdp-resumed-2"] = train(resume=tmp / "fsdp-cut-for-2", **QUIET)
        out["fsdp-lisa-resumed-2"] = train(resume=tmp / "fsdp-lisa-cut", **QUIET)
    finally:
        dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process runs, then the one-process references and resumptions."""
    tmp = tmp_path_factory.mktemp("dist")
    before = os.environ.get(distributed.MAX_NPROC_ENV)
    os.environ[distributed.MAX_NPROC_ENV] = "2"  # two processes even on a one-core machine (slowly)
    try:
        group = distributed.launch(2, _group_work, {"tmp": str(tmp)})
    finally:
        if before is None:
            del os.environ[distributed.MAX_NPROC_ENV]
        else:
            os.environ[distributed.MAX_NPROC_ENV] = before
    single = train(preset="debug", overrides=dict(FAST), out=tmp / "single", **QUIET)
    single_lisa = train(preset="debug", overrides={**FAST, **LISA}, out=tmp / "lisa-1", **QUIET)
    ddp_resumed_1 = train(resume=tmp / "ddp-cut-for-1", **QUIET)
    fsdp_resumed_1 = train(resume=tmp / "fsdp-cut-for-1", **QUIET)
    return {"tmp": tmp, "group": group, "single": single, "single_lisa": single_lisa,
            "ddp_resumed_1": ddp_resumed_1, "fsdp_resumed_1": fsdp_resumed_1}


def _assert_same_run(run_dir, reference_dir, steps=None):
    """Losses, validation losses and per-block telemetry at every logged step, and the final weights."""
    a, b = _records(run_dir), _records(reference_dir)
    steps = sorted(b) if steps is None else steps
    assert [s for s in sorted(a) if s in steps] == steps
    for s in steps:
        for key in ("loss", "val_loss", "grad_norm", "lr", *TELEMETRY):
            if key in b[s]:
                torch.testing.assert_close(torch.tensor(a[s][key], dtype=torch.float64),
                                           torch.tensor(b[s][key], dtype=torch.float64), rtol=1e-5, atol=1e-6,
                                           msg=lambda m, s=s, key=key: f"step {s} {key}: {m}")
        for key in ("lisa_active", "lr_scale_block"):
            assert a[s].get(key) == b[s].get(key), (s, key)


def _assert_same_weights(run_dir, reference_dir):
    a, b = load_file(run_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_two_processes_lisa_match_one(runs):
    tmp = runs["tmp"]
    assert runs["group"]["lisa"].main and runs["group"]["lisa"].step == 8
    _assert_same_run(tmp / "lisa-2", tmp / "lisa-1")
    _assert_same_weights(tmp / "lisa-2", tmp / "lisa-1")
    assert math.isclose(runs["group"]["lisa"].val_loss, runs["single_lisa"].val_loss, rel_tol=1e-5)
    man = json.loads((tmp / "lisa-2" / "layerlab.json").read_text())
    assert man["status"] == "finished" and man["processes"] == 2
    assert len({tuple(r["lisa_active"]) for r in _records(tmp / "lisa-2").values() if "lisa_active" in r}) > 1


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_cut_run_matches_one_process_until_the_cut(runs, kind):
    """2 processes (DDP, or FSDP) give the one-process losses and telemetry; Ctrl-C exits with 130."""
    tmp = runs["tmp"]
    assert runs["group"][f"{kind}-exit"] == 130
    if kind == "fsdp":  # the DDP run has been resumed since
        assert json.loads((tmp / "fsdp-cut" / "trainer_state.json").read_text())["step"] == 4
    _assert_same_run(tmp / f"{kind}-cut", tmp / "single", steps=[0, 1, 2, 3, 4])


@pytest.mark.parametrize("saved,resumed", [("ddp", 2), ("ddp", 1), ("fsdp", 2), ("fsdp", 1)])
def test_checkpoint_of_two_processes_resumes_under_m(runs, saved, resumed):
    tmp = runs["tmp"]
    run_dir = tmp / {("ddp", 2): "ddp-cut"}.get((saved, resumed), f"{saved}-cut-for-{resumed}")
    result = runs["group"][f"{saved}-resumed-2"] if resumed == 2 else runs[f"{saved}_resumed_1"]
    assert result.step == 8
    _assert_same_run(run_dir, tmp / "single")
    _assert_same_weights(run_dir, tmp / "single")
    assert math.isclose(result.val_loss, runs["single"].val_loss, rel_tol=1e-5)
    assert json.loads((run_dir / "layerlab.json").read_text())["status"] == "finished"


def test_fsdp_lisa_checkpoint_without_a_blocks_state_resumes_exactly(runs):
    """Cut after step 3, when LISA had drawn block 1 only: block 0 has no optimizer state in the checkpoint, and
    the 2 resumed processes must give it none (its first step is its first), as the one-process run does."""
    tmp = runs["tmp"]
    assert runs["group"]["fsdp-lisa-exit"] == 130
    opt = torch.load(tmp / "fsdp-lisa-step-3" / "optimizer.pt", weights_only=True)["optimizer"]
    assert 0 < len(opt["state"]) < sum(len(g["params"]) for g in opt["param_groups"])
    assert runs["group"]["fsdp-lisa-resumed-2"].step == 8
    _assert_same_run(tmp / "fsdp-lisa-cut", tmp / "lisa-1")  # a first step counted as a second shows at step 4
    a, b = (torch.load(tmp / d / "optimizer.pt", weights_only=True)["optimizer"]["state"]
            for d in ("fsdp-lisa-cut", "lisa-1"))
    assert {i: float(s["step"]) for i, s in a.items()} == {i: float(s["step"]) for i, s in b.items()}
    # (the weights are not compared: the key bias has no gradient, so Adam turns rounding noise into lr-sized
    # steps that differ by about 1e-5 between 1 and 2 processes; the validation loss at step 8 covers them)


def test_fsdp_checkpoint_is_the_one_process_format(runs):
    """Gathered from shards, it holds the same tensors (tied head dropped) and optimizer layout as DDP's."""
    tmp = runs["tmp"]
    fsdp, ddp = tmp / "fsdp-cut", tmp / "single"  # the FSDP checkpoint of step 4, and a one-process one
    a, b = load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in a
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    config = json.loads((fsdp / "config.json").read_text())
    assert config["architectures"] == json.loads((ddp / "config.json").read_text())["architectures"]
    opt = torch.load(tmp / "fsdp-cut" / "optimizer.pt", weights_only=True)
    assert set(opt) == {"optimizer", "rule"}
    assert all(not hasattr(v, "placements") for s in opt["optimizer"]["state"].values() for v in s.values())


def test_torchrun_launch_matches_one_process(runs):
    """``torchrun --nproc_per_node 2 -m layerlab train`` with the same flags trains the same run."""
    tmp = runs["tmp"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "layerlab", "train", "--preset", "debug", *flags, "--out", str(tmp / "torchrun"), "--no-progress"]
    env = dict(os.environ, **{distributed.MAX_NPROC_ENV: "2"})
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("model: ") == 1, p.stdout  # rank 0 reports
    assert "2 processes (ddp)" in p.stdout
    _assert_same_run(tmp / "torchrun", tmp / "single")
    _assert_same_weights(tmp / "torchrun", tmp / "single")


# ---------------------------------------------------------------------------------------------------- bad input
def test_nproc_beyond_the_cores_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv(distributed.MAX_NPROC_ENV, raising=False)
    n = distributed.capacity("cpu")[0] + 1
    with pytest.raises(LayerlabError, match=rf"^--nproc {n} is more than the {n - 1} CPU cores of this machine$"):
        train(preset="debug", overrides={"device": "cpu"}, out=tmp_path / "x", nproc=n, **QUIET)
    assert not (tmp_path / "x").exists()


def test_cli_nproc_error_is_one_line(tmp_path, monkeypatch, capsys):
    from layerlab.cli import main

    monkeypatch.setenv(distributed.MAX_NPROC_ENV, "2")
    monkeypatch.setattr(sys, "argv", ["layerlab", "train", "--preset", "debug", "--nproc", "3", "--device", "cpu",
                                      "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --nproc 3 is more than the 2 processes that ${distributed.MAX_NPROC_ENV} allows"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("overrides,nproc,message", [
    ({}, 3, r"^batch_size 4 is not divisible by 3 processes: each trains on an equal share of the global batch; "
            r"choose a multiple of 3$"),
    ({"parallel": "fsdp", "optimizer": "llr"}, 2, r"^optimizer llr does not run under parallel fsdp"),
    ({"device": "cuda:1"}, 2, "device cuda:1 names one GPU|CUDA devices"),
    ({}, 0, r"^--nproc must be at least 1, got 0$"),
])
def test_bad_process_counts(tmp_path, monkeypatch, overrides, nproc, message):
    monkeypatch.setenv(distributed.MAX_NPROC_ENV, "8")
    with pytest.raises(LayerlabError, match=message):
        train(preset="debug", overrides=overrides, out=tmp_path / "x", nproc=nproc, **QUIET)
    assert not (tmp_path / "x").exists()


def test_nproc_inside_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LayerlabError, match="--nproc starts its own processes; under torchrun leave it out"):
        train(preset="debug", out=tmp_path / "x", nproc=2, **QUIET)


def test_rows_split_the_global_batch_evenly():
    x = torch.arange(12).view(6, 2)
    parts = [distributed.Dist(rank=r, world=3).rows(x) for r in range(3)]
    assert torch.equal(torch.cat(parts), x) and all(len(p) == 2 for p in parts)
    assert distributed.Dist().rows(x) is x


@pytest.mark.gpu
def test_two_gpus_match_one(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    over = dict(FAST, device="cuda", precision="fp32", compile=False)
    one = train(preset="debug", overrides=over, out=tmp_path / "one", **QUIET)
    two = train(preset="debug", overrides=over, out=tmp_path / "two", nproc=2, **QUIET)
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    assert math.isclose(one.val_loss, two.val_loss, rel_tol=1e-4)
