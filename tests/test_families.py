"""More Hugging Face families (issue 13, first slice): sequential Pre-LN decoders, x + attn(norm1(x)) then
+ mlp(norm2(.)), each checked against computations that do not go through layerlab's view.

Per family, a tiny random model built from the installed transformers' config class (nothing is downloaded):
- the trace equals ``output_hidden_states``: HF's entry l (l < L) is the stream entering block l, and its last
  entry is the final norm of the last block's output (every family here applies the final norm before
  recording it), so it is compared with the model's own final norm of ``resid_out[-1]``; the sublayer outputs
  add up to each block's output; the logit lens at the last block is the model's logits;
- ``skip(i)`` equals the model with block i deleted from its ModuleList (built here by hand);
- ``layerlab prune`` (blocks, ``--unit attn`` and ``--unit mlp``) writes a directory that plain transformers
  loads as the same class, with one layer fewer (or one zeroed output projection and, for attention, every
  other weight as before), whose logits equal the hand-deleted model's (or the in-memory sublayer skip);
- OPT, whose blocks run the MLP on (B*T, C) rows: the trace and analyze's MLP gates still see (B, T, ...),
  checked against a recomputation; its Post-LN form (OPT-350m) is refused in one line;
- ``analyze``, ``quantize --bits 4`` and ``eval`` run on it through the CLI and report finite figures.
"""

import copy
import json
import math
import re

import pytest
import torch
import transformers
from conftest import perturb, save_model
from transformers import AutoModelForCausalLM

from layerlab.adapters import view

V = 320  # the byte tokenizer's 257 ids fit
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
QUIET = ["--tokens", "512"]

FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=16),
    "olmo": lambda: transformers.OlmoConfig(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: transformers.OPTConfig(vocab_size=V, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=3,
                                          num_attention_heads=2, ffn_dim=64, max_position_embeddings=64),
}


def _build(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    assert model.config.model_type == family
    return perturb(model, 0.05).eval()  # norms off their (1, 0) or (0) init, so each norm's form matters


def _layers(model) -> torch.nn.ModuleList:
    return model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers


def _final_norm(model) -> torch.nn.Module:
    return model.model.decoder.final_layer_norm if model.config.model_type == "opt" else model.model.norm


def _deleted(model, i: int):
    """``model`` with block ``i`` deleted by hand: the ModuleList shortened, the config and layer indices fixed."""
    m = copy.deepcopy(model)
    layers = _layers(m)
    del layers[i]
    m.config.num_hidden_layers = len(layers)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [t for j, t in enumerate(m.config.layer_types) if j != i]
    for j, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j
    return m.eval()


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_trace_equals_output_hidden_states(family):
    model = _build(family)
    v = view(model)
    x = torch.randint(3, V, (2, 10))
    mask = torch.ones_like(x)
    mask[1, 7:] = 0  # right padding on the second row (OPT's learned positions follow the mask)
    with torch.no_grad():
        out = model(input_ids=x, attention_mask=mask, use_cache=False, output_hidden_states=True)
        with v.trace() as t:
            traced = v.forward(x, mask).logits
    hs = out.hidden_states
    L = model.config.num_hidden_layers
    assert v.num_layers == L and len(hs) == L + 1 and v.placements() == ["pre"] * L
    for i in range(L):
        torch.testing.assert_close(t.resid_in[i], hs[i])
        if i + 1 < L:
            torch.testing.assert_close(t.resid_out[i], hs[i + 1])
        # what the sublayers add makes up the block: x + attn, then + mlp
        torch.testing.assert_close(t.mid[i], t.resid_in[i] + t.attn[i])
        torch.testing.assert_close(t.resid_out[i], t.mid[i] + t.mlp[i])
    # HF's last hidden state is after the final norm, in every family here
    with torch.no_grad():
        torch.testing.assert_close(_final_norm(model)(t.resid_out[-1]), hs[L])
        torch.testing.assert_close(t.final, hs[L])
        torch.testing.assert_close(v.logits_from_hidden(t.resid_out[-1]), out.logits)
    torch.testing.assert_close(traced, out.logits)  # tracing leaves the computation as it is
    assert v.final_norm is _final_norm(model)


def test_gemma_stream_starts_scaled_and_lens_uses_its_norm():
    """Gemma's embedding is scaled by sqrt(hidden) before block 0, and its RMSNorm scales by (1 + w): both
    recomputed here from the raw weights."""
    model = _build("gemma")
    v = view(model)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad(), v.trace() as t:
        logits = v.forward(x).logits
    emb = model.model.embed_tokens.weight[x] * torch.tensor(math.sqrt(32.0))
    torch.testing.assert_close(t.resid_in[0], emb)
    h = t.resid_out[-1].float()
    norm = model.model.norm
    w = norm.weight.float()
    assert w.abs().max() > 0  # perturbed off zero, so (1 + w) differs from w and from 1
    by_hand = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + w)
    torch.testing.assert_close(t.final, by_hand)
    torch.testing.assert_close(v.logits_from_hidden(t.resid_out[-1]), by_hand @ model.lm_head.weight.T)
    torch.testing.assert_close(logits, by_hand @ model.lm_head.weight.T)


def test_skip_equals_the_model_with_the_block_deleted(family):
    model = _build(family)
    v = view(model)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad(), v.trace(sublayers=False) as t:
        full = v.forward(x).logits
    for i in range(v.num_layers):
        expect = _logits(_deleted(model, i), x)
        assert not torch.allclose(expect, full, atol=1e-4), "deleting a block must change the logits"
        with torch.no_grad(), v.skip(i):
            torch.testing.assert_close(v.forward(x).logits, expect)
        with torch.no_grad(), v.skip(i, replay=t):
            torch.testing.assert_close(v.forward(x).logits, expect)
    torch.testing.assert_close(_logits(model, x), full)  # the model is left as it was


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    """(family, model directory with the byte tokenizer)."""
    return request.param, save_model(_build(request.param), tmp_path_factory.mktemp(request.param) / "m")


def _cli(*args: str):
    from typer.testing import CliRunner

    from layerlab.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_cli_prune_blocks_and_attention_load_in_plain_transformers(saved, tmp_path):
    family, src = saved
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.randint(0, V, (2, 12))

    _cli("prune", str(src), "--remove", "1", "--measure-tokens", "512", *QUIET, "--out", str(tmp_path / "b"))
    removed = json.loads((tmp_path / "b" / "layerlab.json").read_text())["removed_blocks"]
    assert len(removed) == 1
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert type(pruned) is type(original) and pruned.config.model_type == family
    assert pruned.config.num_hidden_layers == 2 and len(_layers(pruned)) == 2
    torch.testing.assert_close(_logits(pruned, x), _logits(_deleted(original, removed[0]), x))
    with torch.no_grad():
        ids = pruned.generate(x[:, :4], max_new_tokens=3, do_sample=False)  # the cache works with 2 layers
    assert ids.shape == (2, 7)

    _cli("prune", str(src), "--remove", "1", "--unit", "attn", "--measure-tokens", "512", *QUIET,
         "--out", str(tmp_path / "a"))
    rec = json.loads((tmp_path / "a" / "layerlab.json").read_text())
    (i,) = [r["block"] for r in rec["removed"]]
    proj = (f"model.decoder.layers.{i}.self_attn.out_proj" if family == "opt"
            else f"model.layers.{i}.self_attn.o_proj")
    names = [f"{proj}.weight", f"{proj}.bias"] if family == "opt" else [f"{proj}.weight"]  # OPT's linears have biases
    assert rec["surgery"] == "zeroed" and rec["zeroed"] == names
    zeroed = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert type(zeroed) is type(original) and zeroed.config.num_hidden_layers == 3
    before, after = original.state_dict(), zeroed.state_dict()
    assert set(before) == set(after)
    for key, value in after.items():
        if key in names:
            assert before[key].any() and not value.any()
        else:
            assert torch.equal(value, before[key]), key
    v = view(original)
    with torch.no_grad(), v.skip_sublayers("attn", i):
        expect = v.forward(x).logits
    torch.testing.assert_close(_logits(zeroed, x), expect)
    assert not torch.allclose(expect, _logits(original, x), atol=1e-4)

    # --unit mlp reads the stream between the sublayers (for OPT, traced from its (B*T, C) rows)
    _cli("prune", str(src), "--remove", "1", "--unit", "mlp", "--metric", "bi", "--measure-tokens", "512", *QUIET,
         "--out", str(tmp_path / "m"))
    rec = json.loads((tmp_path / "m" / "layerlab.json").read_text())
    (i,) = [r["block"] for r in rec["removed"]]
    assert all(0 <= s < 1 for s in rec["scores"]["influence"])
    down = f"model.decoder.layers.{i}.fc2" if family == "opt" else f"model.layers.{i}.mlp.down_proj"
    assert rec["zeroed"] == ([f"{down}.weight", f"{down}.bias"] if family == "opt" else [f"{down}.weight"])
    with torch.no_grad(), v.skip_sublayers("mlp", i):
        expect = v.forward(x).logits
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval(), x), expect)


def _finite(text: str, label: str) -> float:
    value = float(re.search(rf"{label} ([-0-9.naifNI]+)", text).group(1))
    assert math.isfinite(value), text
    return value


def test_cli_analyze_quantize_eval_report_finite_figures(saved, tmp_path):
    family, src = saved
    _cli("analyze", str(src), "--tokens", "512", "--removal-tokens", "512", "--no-spectra", "--no-progress",
         "--out", str(tmp_path / "r"))
    model = json.loads((tmp_path / "r" / "report.json").read_text())["models"][0]
    assert model["num_layers"] == 3 and math.isfinite(model["loss"])
    assert all(math.isfinite(layer["logit_lens_loss"]) for layer in model["layers"])
    # the lens at the last block is the model itself: its own final norm and head
    assert model["layers"][-1]["logit_lens_kl"] == pytest.approx(0.0, abs=1e-5)

    _cli("quantize", str(src), "--bits", "4", "--importance", "lim", "--calibration-tokens", "512",
         "--no-baselines", *QUIET, "--out", str(tmp_path / "q"))
    rec = json.loads((tmp_path / "q" / "layerlab.json").read_text())
    assert rec["after"]["avg_bits"] == pytest.approx(4.0) and math.isfinite(rec["after"]["loss"])
    assert rec["after"]["bytes"] < rec["before"]["bytes"]

    for d in (src, tmp_path / "q"):
        r = _cli("eval", str(d), *QUIET)
        assert _finite(r.output, "perplexity") > 1


def test_opt_mlp_rows_are_traced_by_token_and_its_gates_by_hand():
    """OPT's block runs its MLP on (B*T, C) rows: the trace still records (B, T, ...) per token, and analyze's
    MLP gates (the input of fc2) equal act(fc1(final_layer_norm(mid))) recomputed here."""
    from layerlab.analysis.analyze import trace_gates

    model = _build("opt")
    v = view(model)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        plain = _logits(model, x)
        with v.trace() as t, trace_gates(v) as gates:
            logits = v.forward(x).logits
    torch.testing.assert_close(logits, plain)
    for i, layer in enumerate(_layers(model)):
        assert t.mid[i].shape == t.mlp[i].shape == (2, 10, 32) and gates[i].shape == (2, 10)
        with torch.no_grad():
            hidden = layer.activation_fn(layer.fc1(layer.final_layer_norm(t.resid_in[i] + t.attn[i])))
        torch.testing.assert_close(gates[i], hidden.abs().amax(-1))
        torch.testing.assert_close(t.mlp[i], layer.fc2(hidden))


def test_post_ln_opt_is_refused_in_one_line(tmp_path):
    from layerlab.adapters import load_model
    from layerlab.errors import LayerlabError

    cfg = FAMILIES["opt"]()
    cfg.do_layer_norm_before = False
    src = save_model(AutoModelForCausalLM.from_config(cfg), tmp_path / "post")
    with pytest.raises(LayerlabError, match="do_layer_norm_before=False") as e:
        load_model(src)
    assert "\n" not in str(e.value)


def test_convert_refuses_the_families_it_cannot_convert_in_one_line(saved, tmp_path, monkeypatch, capsys):
    """convert maps layerlab and GPT-2 Pre-LN models only: the RMSNorm families say they already use it, the
    others (OLMo's weightless LayerNorm, OPT) that convert cannot take them yet; one line, nothing written."""
    import sys

    from layerlab.cli import main

    family, src = saved
    out = tmp_path / "converted"
    monkeypatch.setattr(sys, "argv", ["layerlab", "convert", str(src), "--to", "rmsnorm", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    stdout, stderr = capsys.readouterr()
    assert e.value.code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    expected = "cannot convert yet" if family in ("olmo", "opt") else "already uses RMSNorm"
    assert stderr.startswith("error: ") and expected in stderr, stderr
    assert not out.exists()
