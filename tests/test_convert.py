"""convert: exact Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm, LayerNorm removal by fine-tuning, safety."""

import json

import pytest
import torch
from conftest import digest, fit_on_bytes, perturb, save_model, tiny_cfg
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import layerlab
from layerlab.compress import TARGETS, convert, convert_lines
from layerlab.compress.convert import _fixable, fold_norms, removal_schedule, to_rmsnorm
from layerlab.errors import LayerlabError
from layerlab.norms import NORMS, NoNorm

V = 320  # > 257 byte-tokenizer ids
QUIET = {"tokens": 256}
TOL = {"atol": 1e-4, "rtol": 0.0}  # the bar: logits within 1e-4 in fp32

DESIGNS = {
    "learned-tied-gelu": {},
    "learned-untied-swiglu": dict(tie_embeddings=False, mlp="swiglu"),
    "rope-tied-gelu": dict(positions="rope"),
    "rope-untied-swiglu-nobias": dict(positions="rope", tie_embeddings=False, mlp="swiglu", bias=False),
    "dropped-sublayers": dict(drop_attn=[1], drop_mlp=[0, 2]),  # as `prune --unit attn|mlp` writes
}


def _ids(n=2, t=16, seed=0):
    return torch.randint(0, 257, (n, t), generator=torch.Generator().manual_seed(seed))


def _norms(model):
    return [m for name, m in model.named_modules() if name.rpartition(".")[2] in ("ln1", "ln2", "ln_f")]


def _gpt2():
    torch.manual_seed(0)
    return perturb(GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                              bos_token_id=256, eos_token_id=256)), 0.1).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Pre-LN model trained for 40 steps on the embedded corpus (bytes), saved with its tokenizer."""
    torch.manual_seed(0)
    model = layerlab.build_model(tiny_cfg(layers=2, width=32, context=32, vocab_size=V))
    return save_model(fit_on_bytes(model, 40, 200_000), tmp_path_factory.mktemp("m") / "trained")


# ---------------------------------------------------------------- exact conversion


@pytest.mark.parametrize("norm", ["rmsnorm", "crmsnorm"])
@pytest.mark.parametrize("design", DESIGNS)
def test_random_pre_ln_model_converts_exactly(design, norm):
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(vocab_size=V, **DESIGNS[design])), 0.1).eval()
    conv = to_rmsnorm(model, norm)
    x = _ids()
    with torch.no_grad():
        out = conv(input_ids=x, output_hidden_states=True)
        torch.testing.assert_close(out.logits, model(input_ids=x).logits, **TOL)
    assert conv.cfg.norm == norm and conv.cfg.placement == "pre" and not conv.cfg.tie_embeddings
    assert all(type(m) is NORMS[norm] for m in _norms(conv))
    # the mechanism: every residual state (all but the last entry, which is after ln_f) is zero-mean
    assert max(float(h.mean(-1).abs().max()) for h in out.hidden_states[:-1]) < 1e-5
    assert conv.cfg.bias, "the LayerNorm biases are folded into q/k/v and MLP-input biases"


@pytest.mark.parametrize("norm", ["rmsnorm", "crmsnorm"])
def test_trained_model_converts_exactly_and_loads(trained, tmp_path, norm):
    before = digest(trained)
    rec = convert(trained, to=norm, out=tmp_path / "c", **QUIET)
    assert digest(trained) == before, "the input directory is never modified"
    original = AutoModelForCausalLM.from_pretrained(trained).eval()
    conv = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert type(conv).__name__ == "LayerlabForCausalLM" and conv.cfg.norm == norm
    x = _ids(3, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(conv(input_ids=x).logits, original(input_ids=x).logits, **TOL)
    assert rec["max_abs_logit_diff"] < 1e-4
    assert rec["after"]["loss"] == pytest.approx(rec["before"]["loss"], abs=1e-5)
    # the tied head is untied and gets a bias (the final norm's); the five norms lose theirs
    assert rec["after"]["params"] == rec["before"]["params"] + V * 32 + V - 5 * 32
    man = json.loads((tmp_path / "c" / "layerlab.json").read_text())
    assert man["command"] == "convert" and man["args"]["to"] == norm and man["source"] == "layerlab"
    assert {"before", "after", "decisions", "versions"} <= set(man)
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("norm", ["rmsnorm", "crmsnorm"])
def test_hugging_face_gpt2_converts_exactly_to_a_layerlab_model(tmp_path, norm):
    gpt2 = _gpt2()
    src = save_model(gpt2, tmp_path / "gpt2")
    before = digest(src)
    rec = convert(src, to=norm, out=tmp_path / "c", tokens=256)
    lines = convert_lines(rec)
    assert digest(src) == before
    conv = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert conv.config.model_type == "layerlab" and conv.cfg.norm == norm and conv.cfg.head_bias
    assert conv.config.eos_token_id == 256 and conv.generation_config.eos_token_id == 256
    x = _ids(2, 32, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(conv(input_ids=x).logits, gpt2(input_ids=x).logits, **TOL)
    assert rec["source"] == "gpt2" and rec["max_abs_logit_diff"] < 1e-4
    assert any("written as a layerlab model" in d for d in rec["decisions"])
    assert any(line.startswith("before") for line in lines) and any(line.startswith("after") for line in lines)


# ---------------------------------------------------------------- refusals and safety


@pytest.mark.parametrize("change, reason", [
    (dict(placement="post"), "needs Pre-LN .* placement is 'post'"),
    (dict(placement="peri"), "placement is 'peri'"),
    (dict(placement="mix", layers=4), "placement is 'mix'"),
    (dict(placement="lns"), "placement is 'lns'"),
    (dict(placement="sandwich"), "placement is 'sandwich'"),
    (dict(placement=["pre", "post", "pre"]), "placement is 'pre,post,pre'"),
    (dict(norm="rmsnorm"), "needs a LayerNorm model; this model's norm is already 'rmsnorm'"),
    (dict(norm="dyt"), "needs a LayerNorm model; this model's norm is 'dyt'"),
])
def test_other_designs_are_refused_with_the_reason(change, reason):
    model = layerlab.build_model(tiny_cfg(vocab_size=V, **change))
    with pytest.raises(LayerlabError, match=reason):
        to_rmsnorm(model, "rmsnorm")


def test_bad_arguments_and_unsupported_models(trained, tmp_path):
    with pytest.raises(LayerlabError,
                       match="unknown conversion target 'layernorm'; valid: crmsnorm, no-norm, recursive, rmsnorm"):
        convert(trained, to="layernorm", out=tmp_path / "a", **QUIET)
    with pytest.raises(LayerlabError, match="--steps must be >= 0, got -1"):
        convert(trained, to="no-norm", steps=-1, out=tmp_path / "a", **QUIET)
    with pytest.raises(LayerlabError, match="refusing to write into the input directory"):
        convert(trained, to="rmsnorm", out=trained / "inside", **QUIET)
    with pytest.raises(LayerlabError, match="refusing to write into the input directory"):
        convert(trained, to="rmsnorm", out=trained, **QUIET)
    llama_cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, intermediate_size=64)
    llama = save_model(LlamaForCausalLM(llama_cfg), tmp_path / "llama")
    with pytest.raises(LayerlabError, match="Llama-style model already uses RMSNorm"):
        convert(llama, to="rmsnorm", out=tmp_path / "a", **QUIET)
    with pytest.raises(LayerlabError, match="no-norm removes LayerNorm .* uses RMSNorm"):
        convert(llama, to="no-norm", out=tmp_path / "a", **QUIET)
    bert = save_model(BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64)), tmp_path / "bert")
    with pytest.raises(LayerlabError, match="needs a causal Pre-LN language model; this is a BERT-style encoder"):
        convert(bert, to="crmsnorm", out=tmp_path / "a", **QUIET)
    post = save_model(layerlab.build_model(tiny_cfg(vocab_size=V, placement="post")), tmp_path / "post")
    with pytest.raises(LayerlabError, match="placement is 'post'"):
        convert(post, to="no-norm", out=tmp_path / "a", **QUIET)
    assert not (tmp_path / "a").exists(), "a refused conversion writes nothing"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------- no-norm


@pytest.mark.parametrize("design", DESIGNS)
def test_folding_fixed_norms_is_exact(design):
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(vocab_size=V, **DESIGNS[design])), 0.1).eval()
    for i, n in enumerate(_fixable(model).values()):
        n.scale.fill_(0.5 + 0.25 * i)
        n.fixed = True
    folded = fold_norms(model)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=x).logits, model(input_ids=x).logits, **TOL)
    assert folded.cfg.norm == "none" and all(type(m) is NoNorm for m in _norms(folded))


def test_removal_schedule_follows_the_paper_order():
    s = removal_schedule(tiny_cfg(layers=2), 100)
    assert list(s) == ["blocks.0.ln2", "blocks.1.ln2", "blocks.0.ln1", "blocks.1.ln1", "ln_f"]
    assert s["blocks.0.ln2"] == 10 and s["ln_f"] == 50 and list(s.values()) == sorted(s.values())
    assert set(removal_schedule(tiny_cfg(layers=2), 0).values()) == {0}
    assert list(removal_schedule(tiny_cfg(layers=2, drop_attn=[0], drop_mlp=[1]), 10)) == [
        "blocks.0.ln2", "blocks.1.ln1", "ln_f"]


def test_no_norm_fine_tunes_folds_and_records_the_loss_delta(trained, tmp_path):
    before = digest(trained)
    rec = convert(trained, to="no-norm", steps=12, control=True, out=tmp_path / "nn", tokens=256)
    lines = convert_lines(rec)
    assert digest(trained) == before
    assert rec["fold_max_abs_logit_diff"] < 1e-4
    assert rec["after"]["loss"] == pytest.approx(rec["fixed"]["loss"], abs=1e-4), "folding changes nothing"
    assert rec["loss_delta"] == pytest.approx(rec["after"]["loss"] - rec["before"]["loss"])
    assert rec["loss_delta_vs_control"] == pytest.approx(rec["after"]["loss"] - rec["control"]["loss"])
    assert list(rec["scales"]) == list(removal_schedule(tiny_cfg(layers=2), 12))
    assert all(c > 0 for c in rec["scales"].values())
    man = json.loads((tmp_path / "nn" / "layerlab.json").read_text())
    assert man["loss_delta"] == rec["loss_delta"] and man["args"]["steps"] == 12 and man["args"]["seed"] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nn").eval()
    assert model.cfg.norm == "none" and all(type(m) is NoNorm for m in _norms(model))
    assert not [m for m in model.modules() if "Norm" in type(m).__name__ and type(m) is not NoNorm]
    assert any("loss delta" in line for line in lines)
    # seeded: the same call gives the same model
    again = convert(trained, to="no-norm", steps=12, out=tmp_path / "nn2", tokens=256)
    assert again["after"]["loss"] == rec["after"]["loss"] and again["scales"] == rec["scales"]


def test_no_norm_from_gpt2(tmp_path):
    src = save_model(_gpt2(), tmp_path / "gpt2")
    rec = convert(src, to="no-norm", steps=4, out=tmp_path / "nn", **QUIET)
    assert rec["source"] == "gpt2" and rec["fold_max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nn")
    assert model.config.model_type == "layerlab" and model.cfg.norm == "none"
    with torch.no_grad():
        ids = model.generate(_ids(1, 4), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 7)


def test_targets_are_the_documented_ones():
    assert TARGETS == ("rmsnorm", "crmsnorm", "no-norm", "recursive")
