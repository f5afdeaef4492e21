"""CUDA paths: bf16 autocast and torch.compile. Skipped without a GPU."""

import math
from contextlib import contextmanager

import pytest
import torch
from conftest import perturb
from test_model import left_padded_pair

import layerlab
from layerlab.model import CACHE_NAME, output_cache
from layerlab.train import train

pytestmark = pytest.mark.gpu


def test_debug_run_on_cuda_with_bf16_and_compile(tmp_path):
    res = train(preset="debug", overrides={"steps": 6, "eval_every": 6, "device": "cuda"}, out=tmp_path / "r",
                progress=False, echo=lambda *a: None)
    assert math.isfinite(res.val_loss)


@contextmanager
def _full_fp32_matmuls():
    """float32 matmuls in IEEE float32 on CUDA, not TF32 (10-bit mantissa), whatever an earlier test set."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _padded_batch_and_step(cfg):
    """A left-padded batch of two with generate()'s per-row positions, and one decoding step after it."""
    _, _, ids, mask = left_padded_pair(cfg, short=20, long=28)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = torch.randint(1, cfg.vocab_size, (2, 1), generator=torch.Generator().manual_seed(1))
    return (ids, mask, pos), (nxt, torch.cat([mask, torch.ones_like(nxt)], dim=1), pos[:, -1:] + 1)


def _logits(model, batch, step, device):
    """Logits of the batch, then of one cached step, on ``device``: (2, T + 1, V) on the CPU."""
    model = model.to(device)
    (ids, mask, pos), (nxt, step_mask, step_pos) = [[t.to(device) for t in ts] for ts in (batch, step)]
    with torch.no_grad(), _full_fp32_matmuls():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        after = model(nxt, attention_mask=step_mask, position_ids=step_pos, **{CACHE_NAME: output_cache(out)})
    return torch.cat([out.logits, after.logits], dim=1).cpu()


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_model_matches_between_cpu_and_cuda(positions):
    """float32 logits agree between CPU and CUDA, for a left-padded batch with per-row positions and for one
    cached decoding step, to 2e-4 of the logits' spread (their standard deviation).

    The tolerance: on this model float32 logits differ from float64 ones by at most ~8e-6 of their spread
    (measured on CPU), so two float32 devices summing in different orders stay >10x inside 2e-4. TF32 matmuls
    (inputs rounded to 10 mantissa bits; emulated on CPU, 4e-3 to 1.3e-2 of the spread) fail it, and so does a
    CUDA kernel that masks or rotates differently from the CPU one (an error about the spread itself).
    """
    torch.manual_seed(0)
    cfg = layerlab.ModelConfig(layers=2, width=64, heads=2, context=32, vocab_size=64, positions=positions)
    model = perturb(layerlab.build_model(cfg), scale=0.3).eval()  # logits with a spread of ~2, not ~0
    batch, step = _padded_batch_and_step(cfg)
    cpu = _logits(model, batch, step, "cpu")
    gpu = _logits(model, batch, step, "cuda")
    spread = cpu.std().item()
    assert spread > 1.0
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=2e-4 * spread)


def test_analysis_runs_on_cuda():
    from conftest import FakeTok, tiny_cfg

    from layerlab.analysis.analyze import analyze_model

    model = layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=64)).cuda().eval()
    entry = analyze_model(model, FakeTok(), name="m", path=None, tokens=256, seq_len=16, spectra=False,
                          intrinsic=False, progress=False)
    assert entry["layers"][0]["angular_distance"] > 0
