"""CUDA paths: bf16 autocast and torch.compile. Skipped without a GPU."""

import math

import pytest
import torch

import layerlab
from layerlab.train import train

pytestmark = pytest.mark.gpu


def test_debug_run_on_cuda_with_bf16_and_compile(tmp_path):
    res = train(preset="debug", overrides={"steps": 6, "eval_every": 6, "device": "cuda"}, out=tmp_path / "r",
                progress=False, echo=lambda *a: None)
    assert math.isfinite(res.val_loss)


def test_model_matches_between_cpu_and_cuda():
    cfg = layerlab.ModelConfig(layers=2, width=64, heads=2, context=32, vocab_size=64)
    model = layerlab.build_model(cfg).eval()
    x = torch.randint(0, 64, (2, 32))
    cpu = model(x).logits
    gpu = model.cuda()(x.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_analysis_runs_on_cuda():
    from conftest import tiny_cfg
    from test_analysis import _FakeTok

    from layerlab.analysis.analyze import analyze_model

    model = layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=64)).cuda().eval()
    entry = analyze_model(model, _FakeTok(), name="m", path=None, tokens=256, seq_len=16, spectra=False,
                          intrinsic=False, progress=False)
    assert entry["layers"][0]["angular_distance"] > 0
