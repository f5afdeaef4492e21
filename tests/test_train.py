"""Training end to end on the debug preset: outputs, exact resume, divergence, bad input."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ctrl_c_at
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerlab
from layerlab.config import MODEL_FIELDS, TrainConfig
from layerlab.errors import LayerlabError
from layerlab.recipe import resolve
from layerlab.train import TrainingDiverged, train
from layerlab.train import checkpoint as ckpt_mod
from layerlab.train import loop as loop_mod

FAST = {"steps": 12, "eval_every": 6, "save_every": 4, "log_every": 1, "telemetry_every": 3}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _metrics(run_dir) if "loss" in r}


def _train_keeping_model(out, **overrides):
    """``train``'s result and the model it trained, as it is in memory at the end of the run."""
    runs = []
    real_setup = loop_mod._setup

    def setup(*args, **kwargs):
        runs.append(real_setup(*args, **kwargs))
        return runs[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod, "_setup", setup)
        res = train(preset="debug", overrides=dict(FAST, **overrides), out=out, progress=False, echo=lambda *a: None)
    return res, runs[-1].model.eval()


@pytest.fixture(scope="module")
def debug_trained(tmp_path_factory):
    return _train_keeping_model(tmp_path_factory.mktemp("runs") / "debug")


@pytest.fixture(scope="module")
def debug_run(debug_trained):
    return debug_trained[0]


@pytest.fixture(scope="module")
def prepbn_trained(tmp_path_factory):
    """The debug run with PRepBN: its schedule spans the run's 12 training forwards, so γ ends at 0."""
    return _train_keeping_model(tmp_path_factory.mktemp("runs") / "prepbn", norm="prepbn")


def test_run_directory_is_a_hugging_face_model(debug_run):
    d = debug_run.run_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.jsonl",
                 "layerlab.json", "optimizer.pt", "trainer_state.json"):
        assert (d / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)
    assert isinstance(tok.decode(out[0]), str)


def test_result_and_manifest(debug_run):
    assert debug_run.step == 12
    assert math.isfinite(debug_run.val_loss) and debug_run.val_bpb > 0
    man = json.loads((debug_run.run_dir / "layerlab.json").read_text())
    assert man["command"] == "train" and man["status"] == "finished"
    assert man["args"]["model"]["layers"] == 2 and "torch" in man["versions"]
    assert man["results"]["val_loss"] == pytest.approx(debug_run.val_loss)
    assert man["optimizer"]["name"] == "adamw"
    assert "ln_f.weight" in man["optimizer"]["param_groups"]["output_norm"]["params"]
    assert man["results"]["val_loss_step0"] > man["results"]["val_loss"], "the model must learn"


def test_metrics_hold_per_block_telemetry(debug_run):
    rows = _metrics(debug_run.run_dir)
    tel = [r for r in rows if "grad_norm_block" in r]
    assert [r["step"] for r in tel] == [3, 6, 9, 12]
    for key in ("grad_norm_block", "update_ratio_block", "resid_rms_block", "max_abs_block"):
        assert len(tel[0][key]) == 2 and all(v > 0 and math.isfinite(v) for v in tel[0][key])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 6, 12]


@pytest.mark.parametrize("trained", ["debug_trained", "prepbn_trained"])
def test_saved_model_is_the_trained_model(request, trained):
    """The run directory holds the model that training left in memory: every weight and buffer (PRepBN's
    counter and running statistics included), and the same logits."""
    res, model = request.getfixturevalue(trained)
    saved = AutoModelForCausalLM.from_pretrained(res.run_dir).eval()
    ours, theirs = model.state_dict(), saved.state_dict()
    assert sorted(theirs) == sorted(ours)
    assert [k for k in ours if not torch.equal(ours[k].cpu(), theirs[k])] == []
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(saved(x).logits, model(x).logits)


def test_prepbn_validation_measures_the_blend(debug_run, prepbn_trained):
    """At step 0 γ = 1, and PRepBN's validation is LayerNorm's: the same loss as the LayerNorm run from the same
    seed (the same initial weights). Evaluating RepBN alone, all zeros at SLAB's init, gave ln V instead."""
    prepbn_run, model = prepbn_trained
    step0 = [json.loads((r.run_dir / "layerlab.json").read_text())["results"]["val_loss_step0"]
             for r in (debug_run, prepbn_run)]
    assert step0[1] == pytest.approx(step0[0], rel=1e-5)
    assert abs(step0[1] - math.log(model.cfg.vocab_size)) > 1e-2


def test_prepbn_run_exports_folded_with_its_logits_and_loss(prepbn_trained, tmp_path):
    """A PRepBN run trained to the end of its schedule exports --to folded: a norm-free model with the trained
    model's logits on the validation text and the run's final validation loss."""
    from layerlab.adapters import load_model
    from layerlab.data import split_ids
    from layerlab.evaluate import lm_loss
    from layerlab.export import export

    res, model = prepbn_trained
    assert all(b.ln1.gamma == 0.0 and b.ln1.repbn.eta.detach().abs().item() > 0 for b in model.blocks)
    out = export(res.run_dir, to="folded", out=tmp_path / "folded")
    folded = load_model(out)
    assert folded.model.cfg.norm == "none"
    ids = torch.as_tensor(split_ids(folded.tokenizer, None)[:128].astype("int64")).view(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded.model(ids).logits, model(ids).logits)
    assert lm_loss(folded.model, folded.tokenizer)["loss"] == pytest.approx(res.val_loss, rel=1e-5)


def test_rerunning_a_finished_run_is_a_no_op(debug_run):
    before = (debug_run.run_dir / "model.safetensors").read_bytes()
    res = train(preset="debug", overrides=dict(FAST), out=debug_run.run_dir, progress=False, echo=lambda *a: None)
    assert res.step == 12 and (debug_run.run_dir / "model.safetensors").read_bytes() == before
    assert json.loads((debug_run.run_dir / "layerlab.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("extra", [
    {"norm": "layernorm"},
    {"norm": "prepbn"},
    {"optimizer": "lamb"},
    {"optimizer": "llr", "llr_every": 3, "llr_ramp": 3, "llr_until": 1.0},  # cut at step 4: mid-ramp
    {"optimizer": "lisa", "lisa_every": 3},  # cut at step 4: mid-period
], ids=lambda extra: "-".join(str(v) for v in extra.values()))
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch, extra):
    """Ctrl-C at step 4 saves a checkpoint; resuming gives the same loss at every later step."""
    over = dict(FAST, dropout=0.1, **extra)
    full = train(preset="debug", overrides=over, out=tmp_path / "full", progress=False, echo=lambda *a: None)

    real_save = ckpt_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_interrupt(run_dir, model, optimizer, step, extra=None):
        real_save(run_dir, model, optimizer, step, extra)
        calls["n"] += 1
        if step == 4 and calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_interrupt)
    with pytest.raises(SystemExit) as e:
        train(preset="debug", overrides=over, out=tmp_path / "cut", progress=False, echo=lambda *a: None)
    assert e.value.code == 130
    assert json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["step"] == 4
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    resumed = train(resume=tmp_path / "cut", progress=False, echo=lambda *a: None)
    a, b = _losses(full.run_dir), _losses(resumed.run_dir)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert resumed.val_loss == full.val_loss
    per_block = [{k: v for k, v in r.items() if k in ("lr_scale_block", "trust_ratio_block", "alpha_block",
                                                      "lisa_active")} for r in _metrics(full.run_dir) if "loss" in r]
    assert per_block == [{k: v for k, v in r.items() if k in per_block[0]} for r in _metrics(resumed.run_dir)
                         if "loss" in r]
    assert all("lr_scale_block" in r for r in per_block)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_ce = loop_mod.F.cross_entropy
    calls = {"n": 0}

    class FakeF:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def cross_entropy(logits, y, **kw):
            calls["n"] += 1
            loss = real_ce(logits, y, **kw)
            return loss * float("nan") if calls["n"] > 6 and not kw else loss

    monkeypatch.setattr(loop_mod, "F", FakeF())
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step \d+; stopped, last good checkpoint "
                                               r"\(step 4\) kept"):
        train(preset="debug", overrides=dict(FAST), out=tmp_path / "nan", progress=False, echo=lambda *a: None)
    assert json.loads((tmp_path / "nan" / "trainer_state.json").read_text())["step"] == 4


def test_non_utf8_text_trains(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00 caf\xe9 " * 400 + "plain text é ✓ ".encode() * 200)
    res = train(preset="debug", overrides={"data": str(f), "steps": 2, "eval_every": 2}, out=tmp_path / "r",
                progress=False, echo=lambda *a: None)
    assert math.isfinite(res.val_loss)


def test_bpe_tokenizer_run_loads_with_auto_tokenizer(tmp_path):
    res = train(preset="debug", overrides={"tokenizer": "bpe:300", "steps": 2, "eval_every": 2},
                out=tmp_path / "bpe", progress=False, echo=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(res.run_dir)
    assert len(tok) == 300
    assert AutoModelForCausalLM.from_pretrained(res.run_dir).config.vocab_size == 320


@pytest.mark.parametrize("overrides,message", [
    ({"norm": "layernrom"}, "unknown norm 'layernrom'; valid: .*rmsnorm"),
    ({"placement": "middle"}, "unknown placement 'middle'; valid: "),
    ({"data": "/no/such/file.txt"}, "data path does not exist"),
])
def test_bad_input_errors(tmp_path, overrides, message):
    with pytest.raises(LayerlabError, match=message):
        train(preset="debug", overrides=overrides, out=tmp_path / "x", progress=False, echo=lambda *a: None)


def test_empty_and_short_data(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(LayerlabError, match="data is empty"):
        train(preset="debug", overrides={"data": str(empty)}, out=tmp_path / "a", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("too short " * 20)
    with pytest.raises(LayerlabError, match="data too short: validation split has \\d+ tokens, need at least 65"):
        train(preset="debug", overrides={"data": str(short)}, out=tmp_path / "b", progress=False)


def test_existing_directories_are_protected(tmp_path, debug_run):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(LayerlabError, match="exists and is not a layerlab run"):
        train(preset="debug", out=other, progress=False)
    with pytest.raises(LayerlabError, match="holds a run of a different config \\(layers: 2 -> 3"):
        train(preset="debug", overrides=dict(FAST, layers=3), out=debug_run.run_dir, progress=False)
    with pytest.raises(LayerlabError, match="cannot resume .*: incompatible config \\(width: saved 64, asked 128\\)"):
        train(resume=debug_run.run_dir, overrides={"width": 128}, progress=False)
    with pytest.raises(LayerlabError, match="not a layerlab run directory"):
        train(resume=other, progress=False)


def test_extending_a_finished_run_keeps_its_lr_schedule(tmp_path):
    """--steps 8 on a finished 4-step run: the cosine keeps its 4 steps, steps 5-8 train at its final LR (no jump
    back up); a note says so and how to get an 8-step schedule; cut by Ctrl-C, the extension resumes exactly."""
    base = {**FAST, "steps": 4, "eval_every": 4, "save_every": 4}
    a, b = tmp_path / "a", tmp_path / "b"
    train(preset="debug", overrides=base, out=a, progress=False, echo=lambda *a: None)
    shutil.copytree(a, b)
    said = []
    res = train(resume=a, overrides={"steps": 8}, progress=False, echo=said.append)
    assert res.step == 8
    tc = TrainConfig(**json.loads((a / "layerlab.json").read_text())["args"]["train"])
    assert tc.steps == 8
    lrs = {r["step"]: r["lr"] for r in _metrics(a) if "lr" in r}
    four = tc.model_copy(update={"steps": 4})
    assert [lrs[s] for s in range(1, 5)] == [loop_mod.lr_at(s, four) for s in range(4)]
    assert [lrs[s] for s in range(5, 9)] == [tc.lr * tc.min_lr_ratio] * 4
    notes = [line for line in said if line.startswith("note: the LR schedule of")]
    assert len(notes) == 1 and "laid out for 4 steps and keeps that length: steps 5-8 train at its final LR" in \
        notes[0] and notes[0].endswith("start a new run: layerlab train --steps 8 --out NEW_DIR")
    man = json.loads((a / "layerlab.json").read_text())
    assert man["status"] == "finished" and man["schedule_steps"] == 4

    with ctrl_c_at(6), pytest.raises(SystemExit):
        train(resume=b, overrides={"steps": 8}, progress=False, echo=lambda *a: None)
    assert json.loads((b / "trainer_state.json").read_text())["step"] == 6
    train(resume=b, progress=False, echo=lambda *a: None)  # the steps saved (8), the schedule saved (4)
    same = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in _metrics(b)]
    assert same == [{k: v for k, v in r.items() if k != "tok_per_s"} for r in _metrics(a)]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_out_that_is_a_file_is_one_line(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("mine")
    with pytest.raises(LayerlabError, match=r"^\S*README\.md is a file, not a run directory; choose another --out$"):
        train(preset="debug", out=readme, progress=False)
    with pytest.raises(LayerlabError, match=r"^cannot create run directory \S*README\.md/run: \S*README\.md is a "
                                            r"file; choose another --out$"):
        train(preset="debug", out=readme / "run", progress=False)
    assert readme.read_text() == "mine"


def test_default_run_dir_names_the_model_fields_that_differ():
    from layerlab.train.plan import default_run_dir

    def name(preset=None, **over):
        return default_run_dir(resolve(preset, overrides=over))

    assert name() == Path("runs/tiny-pre-layernorm-L4-d256")  # the README's
    assert name(mlp="swiglu") == Path("runs/tiny-pre-layernorm-L4-d256-swiglu")
    assert name(positions="rope") == Path("runs/tiny-pre-layernorm-L4-d256-rope")
    assert name(mlp="swiglu", positions="rope") == Path("runs/tiny-pre-layernorm-L4-d256-swiglu-rope")
    assert name("debug") == Path("runs/debug-pre-layernorm-L2-d64")  # a preset's own values are not named
    assert name("debug", heads=4) == Path("runs/debug-pre-layernorm-L2-d64-h4")
    variants = [{}, {"mlp": "swiglu"}, {"positions": "rope"}, {"heads": 8}, {"context": 128}, {"dropout": 0.1},
                {"tie_embeddings": False}, {"bias": False}, {"init": "standard"}, {"rope_theta": 5e5},
                {"placement": ["pre", "pre", "post", "post"]}, {"placement": ["post", "post", "pre", "pre"]},
                {"drop_attn": [1]}, {"drop_mlp": [1]}]
    assert len({name(**v) for v in variants}) == len(variants)
    # every model field is in the name, or named when it differs (vocab_size follows the tokenizer)
    from layerlab.train.plan import _NAME_PARTS

    assert set(MODEL_FIELDS) == {"vocab_size", "placement", "norm", "layers", "width"} | set(_NAME_PARTS)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "layerlab", "train", "--preset", "debug", "--norm", "fancy", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: unknown norm 'fancy'; valid:")
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_cli_train_and_sample(tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(app, ["train", "--preset", "debug", "--steps", "3", "--eval-every", "3", "--lr", "1e-3",
                            "--placement", "pre,post", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"model: {out}" in r.output and "bits/byte" in r.output
    man = json.loads((out / "layerlab.json").read_text())
    assert man["args"]["train"]["lr"] == 1e-3 and man["args"]["model"]["placement"] == ["pre", "post"]
    r = runner.invoke(app, ["sample", str(out), "--prompt", "The ", "--tokens", "10", "--temperature", "0"])
    assert r.exit_code == 0 and r.output.startswith("The ")
    r = runner.invoke(app, ["train", "--help"])
    assert "Examples" in r.output


def test_layerlab_import_registers_auto_classes():
    from transformers import AutoConfig

    assert AutoConfig.for_model("layerlab").__class__ is layerlab.LayerlabConfig


def test_export_run_to_plain_gpt2_directory(debug_run, tmp_path):
    from transformers import GPT2LMHeadModel

    from layerlab.export import export

    before = {p.name: p.read_bytes() for p in debug_run.run_dir.iterdir() if p.is_file()}
    out = export(debug_run.run_dir, to="gpt2", out=tmp_path / "gpt2")
    gpt2 = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(gpt2, GPT2LMHeadModel)
    ours = AutoModelForCausalLM.from_pretrained(debug_run.run_dir).eval()
    x = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(gpt2(x).logits, ours(x).logits)
    assert AutoTokenizer.from_pretrained(out)("ab").input_ids == [97, 98]
    assert {p.name: p.read_bytes() for p in debug_run.run_dir.iterdir() if p.is_file()} == before
    with pytest.raises(LayerlabError, match="refusing to write into the input directory"):
        export(debug_run.run_dir, to="gpt2", out=debug_run.run_dir / "sub")
    with pytest.raises(LayerlabError, match="already exists and is not empty"):
        export(debug_run.run_dir, to="gpt2", out=out)
