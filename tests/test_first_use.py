"""What a new user meets first: one named validation slice, quick and quiet startup, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import perturb, save_model, tiny_cfg
from typer.testing import CliRunner

import layerlab
from layerlab.cli import app
from layerlab.data import ByteTokenizer, split_ids
from layerlab.errors import LayerlabError
from layerlab.evaluate import evaluate, lm_loss

COMMANDS = ("train", "sample", "export", "analyze", "prune", "quantize", "convert", "sweep", "eval")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return save_model(perturb(layerlab.build_model(tiny_cfg(vocab_size=257, context=64))), path)


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": ""}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


# ---------------------------------------------------------------- one validation slice, named
def test_eval_reads_the_whole_embedded_validation_split_and_names_it(model_dir):
    r = evaluate(model_dir)
    n = len(split_ids(ByteTokenizer(), None, "validation"))
    assert r["tokens"] == n and r["predictions"] == n - 1
    assert r["slice"] == f"embedded validation split, all {n:,} tokens"
    first = evaluate(model_dir, tokens=1000)
    assert first["predictions"] == 999 and first["slice"].endswith(f"first 1,000 of {n:,} tokens")
    assert first["loss"] != r["loss"]


def test_lm_loss_windows_cover_every_prediction_once(model_dir):
    """The same slice scored in windows of 64 or of 7 tokens gives the same number of predictions, and a
    window of the full length reproduces a plain forward's mean cross-entropy."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    a = lm_loss(model, tok, tokens=65, seq_len=64)
    b = lm_loss(model, tok, tokens=65, seq_len=7)
    assert a["predictions"] == b["predictions"] == 64
    ids = torch.tensor(split_ids(tok, None, "validation")[:65].astype("int64"))[None]
    with torch.no_grad():
        expect = F.cross_entropy(model(ids[:, :-1]).logits[0], ids[0, 1:]).item()
    assert a["loss"] == pytest.approx(expect, rel=1e-5)


def test_a_layerlab_run_is_scored_on_the_token_stream_it_trained_on(model_dir):
    """The tokenizer saved in a run directory gives back layerlab's own ids, so eval's split is train's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (split_ids(tok, None, "validation") == split_ids(ByteTokenizer(), None, "validation")).all()


def test_eval_split_defaults_to_all_of_a_users_file(model_dir, tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("a" * 900 + "b" * 100)
    whole = evaluate(model_dir, data=str(data))
    held = evaluate(model_dir, data=str(data), split="validation")
    assert whole["tokens"] == 1001 and whole["predictions"] == 1000  # 1000 bytes and the closing eos
    assert held["tokens"] == int(1001 * 0.1)
    assert whole["slice"].startswith(f"{data} (all)") and held["slice"].startswith(f"{data} validation split")
    r = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(data)])
    assert r.exit_code == 0 and f"on the {data} (all), all 1,001 tokens" in r.output


@pytest.mark.parametrize("args, message", [
    (["--tokens", "0"], "--tokens must be at least 2 (one to read, one to predict), got 0"),
    (["--split", "train"], "unknown --split 'train'; valid: all, validation"),
])
def test_eval_refuses_what_it_cannot_score(model_dir, args, message):
    p = _run("-m", "layerlab", "eval", str(model_dir), *args)
    assert p.returncode == 2 and p.stderr.strip() == f"error: {message}"


# ---------------------------------------------------------------- startup
@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS), ["eval", "no/such/model"],
                                  ["train", "--nrom", "rmsnorm"], ["train", "--lr", "fast"],
                                  ["train", "--norm", "rmsnrom"], ["train", "--optimizer", "adamx"],
                                  ["prune", ".", "--remove", "1", "--metric", "angulr", "--out", "x"],
                                  ["convert", ".", "--to", "rms", "--out", "x"],
                                  ["prune", "no/such/model", "--remove", "1", "--out", "x"]])
def test_help_and_argument_errors_do_not_load_torch(args):
    """What makes `layerlab --help` take seconds is importing torch (benchmarks/startup.py times it)."""
    code = ("import sys; from layerlab.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    p = _run("-c", code, *args)
    assert p.stdout.strip().splitlines()[-1] == "NO TORCH", p.stdout + p.stderr


# ---------------------------------------------------------------- quiet
def test_commands_and_imports_print_no_library_noise(model_dir):
    noise = ("Failed to load", "register_constant", "deprecated", "Warning", "W1")
    p = _run("-m", "layerlab", "eval", str(model_dir), "--tokens", "512")
    assert p.returncode == 0, p.stderr
    assert not [n for n in noise if n in p.stderr + p.stdout], p.stderr
    code = ("import layerlab, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
            "out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)\n"
            "print(out.shape[1])")
    p = _run("-c", code)
    assert p.returncode == 0 and p.stdout.strip() == "6", p.stderr
    assert not [n for n in noise if n in p.stderr], p.stderr


# ---------------------------------------------------------------- one-line errors and refusals
def test_analyze_refuses_an_existing_report_unless_told_to_overwrite(model_dir, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("{}")
    runner = CliRunner()
    base = ["analyze", str(model_dir), "--tokens", "256", "--no-spectra", "--no-progress", "--out", str(out)]
    with pytest.raises(LayerlabError, match="already exists and is not empty.*--overwrite"):
        runner.invoke(app, base, catch_exceptions=False)
    assert (out / "report.json").read_text() == "{}"
    r = runner.invoke(app, [*base, "--overwrite"], catch_exceptions=False)
    assert r.exit_code == 0 and "embedded validation split, first 256 of" in r.output
    assert json.loads((out / "report.json").read_text())["models"][0]["num_layers"] == 3


def test_export_of_a_quantized_model_is_one_line(model_dir, tmp_path, capsys):
    from layerlab.compress import quantize, quantize_lines

    record = quantize(model_dir, bits=4, widths=(4,), out=tmp_path / "q", tokens=128, calibration_tokens=128,
                      baselines=False)
    assert capsys.readouterr().out == ""  # library code returns its record; the CLI prints quantize_lines
    assert quantize_lines(record)[0] == "widths per block by lim: [4, 4, 4]"
    p = _run("-m", "layerlab", "export", str(tmp_path / "q"), "--to", "gpt2", "--out", str(tmp_path / "g"))
    assert p.returncode == 2
    assert p.stderr.strip() == (f"error: {tmp_path / 'q'} is already quantized; export the full-precision "
                                "model, then quantize")


def test_sample_with_an_empty_prompt_is_one_line(model_dir):
    p = _run("-m", "layerlab", "sample", str(model_dir), "--prompt", "")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: the prompt is empty: give --prompt some text (the default is a newline)"


def test_sample_says_when_the_context_cuts_the_continuation(model_dir):
    p = _run("-m", "layerlab", "sample", str(model_dir), "--prompt", "def", "--tokens", "1000",
             "--temperature", "0")
    assert p.returncode == 0, p.stderr
    assert "generating 61 tokens, not 1000: the model's context of 64 tokens" in p.stderr
    assert p.stdout.startswith("def")


def test_train_reports_the_figure_eval_reports(tmp_path):
    """The loss train prints at the end is eval's default figure, on the same named slice, to the last bit."""
    from layerlab.train import train

    res = train(preset="debug", out=tmp_path / "run", progress=False, echo=lambda *a, **k: None)
    r = evaluate(tmp_path / "run")
    assert res.val_loss == r["loss"] and res.val_bpb == r["bits_per_byte"] and res.slice == r["slice"]
    assert res.slice.startswith("embedded validation split, all ")
    manifest = json.loads((tmp_path / "run" / "layerlab.json").read_text())
    assert manifest["results"]["val_loss"] == r["loss"] and manifest["results"]["val_slice"] == r["slice"]
    again = train(preset="debug", out=tmp_path / "run", progress=False, echo=lambda *a, **k: None)
    assert (again.val_loss, again.slice) == (res.val_loss, res.slice)  # a finished run reports the same
