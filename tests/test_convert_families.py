"""convert --to rmsnorm on the Pre-LN LayerNorm families of Hugging Face (issue 13): OPT, GPT-NeoX (parallel and
sequential), GPT-J, Phi, Falcon (one-norm parallel, new_decoder_architecture, sequential, ALiBi with biases), BLOOM.

Every check compares against a computation that does not go through convert: the input model's own logits in
plain transformers, a hand-written RMSNorm put in place of each LayerNorm, hand-listed linears that read each
norm, and BLOOM's embedding LayerNorm recomputed and centered by hand. Tiny random models (3 layers, hidden 32),
perturbed so that every norm's gain and bias are off their init; nothing is downloaded.
"""

import json
import sys

import pytest
import torch
import transformers
from conftest import digest, perturb, save_model
from torch import nn
from transformers import AutoModelForCausalLM

from layerlab.adapters import load_model
from layerlab.compress import convert
from layerlab.compress.recenter import norm_readers, recenter_family, use_rmsnorm
from layerlab.norms import CRMSNorm, RMSNorm

V = 320  # the byte tokenizer's 257 ids fit
REL = 1e-4  # the bar: logits within 1e-4 of the largest, in float32
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=64)

# name -> (config, block list, {norm in a block: the linears in that block that read it}, final norm, head)
FAMILIES = {
    "opt": (lambda: transformers.OPTConfig(**SMALL, word_embed_proj_dim=32, ffn_dim=64),
            "model.decoder.layers", {"self_attn_layer_norm": ["self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj"], "final_layer_norm": ["fc1"]},
            "model.decoder.final_layer_norm", "lm_head"),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**SMALL, intermediate_size=64, use_parallel_residual=True),
                 "gpt_neox.layers", {"input_layernorm": ["attention.query_key_value"],
                                     "post_attention_layernorm": ["mlp.dense_h_to_4h"]},
                 "gpt_neox.final_layer_norm", "lm_head"),
    "gpt_neox_seq": (lambda: transformers.GPTNeoXConfig(**SMALL, intermediate_size=64, use_parallel_residual=False),
                     "gpt_neox.layers", {"input_layernorm": ["attention.query_key_value"],
                                         "post_attention_layernorm": ["mlp.dense_h_to_4h"]},
                     "gpt_neox.final_layer_norm", "lm_head"),
    "gptj": (lambda: transformers.GPTJConfig(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64,
                                             rotary_dim=8, bos_token_id=1, eos_token_id=2),
             "transformer.h", {"ln_1": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"]},
             "transformer.ln_f", "lm_head"),
    "phi": (lambda: transformers.PhiConfig(**SMALL, intermediate_size=64),
            "model.layers", {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                 "mlp.fc1"]}, "model.final_layernorm", "lm_head"),
    "falcon": (lambda: transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=2, parallel_attn=True, multi_query=True,
                                                 new_decoder_architecture=False),
               "transformer.h", {"input_layernorm": ["self_attention.query_key_value", "mlp.dense_h_to_4h"]},
               "transformer.ln_f", "lm_head"),
    "falcon_new": (lambda: transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                     num_attention_heads=4, num_kv_heads=2,
                                                     new_decoder_architecture=True),
                   "transformer.h", {"ln_attn": ["self_attention.query_key_value"],
                                     "ln_mlp": ["mlp.dense_h_to_4h"]}, "transformer.ln_f", "lm_head"),
    "falcon_seq": (lambda: transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                     num_attention_heads=2, parallel_attn=False,
                                                     new_decoder_architecture=False),
                   "transformer.h", {"input_layernorm": ["self_attention.query_key_value"],
                                     "post_attention_layernorm": ["mlp.dense_h_to_4h"]}, "transformer.ln_f",
                   "lm_head"),
    "falcon_alibi": (lambda: transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                       num_attention_heads=2, parallel_attn=True, alibi=True,
                                                       bias=True, new_decoder_architecture=False),
                     "transformer.h", {"input_layernorm": ["self_attention.query_key_value", "mlp.dense_h_to_4h"]},
                     "transformer.ln_f", "lm_head"),
    "bloom": (lambda: transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=3, n_head=2),
              "transformer.h", {"input_layernorm": ["self_attention.query_key_value"],
                                "post_attention_layernorm": ["mlp.dense_h_to_4h"]}, "transformer.ln_f", "lm_head"),
}


def _build(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family][0]())
    return perturb(model, 0.05).eval()  # every norm's gain and bias off (1, 0)


def _ids(n=2, t=12, seed=0):
    return torch.randint(0, 257, (n, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


class HandRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g + b, in float64: written here, independent of layerlab's norms."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.g, self.b, self.eps = ln.weight.detach().double(), ln.bias.detach().double(), ln.eps

    def forward(self, x):
        x64 = x.double()
        return (x64 / (x64.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.g + self.b).to(x.dtype)


def _stream_norm_paths(family: str, model) -> list[str]:
    _, blocks, readers, final, _ = FAMILIES[family]
    n = len(model.get_submodule(blocks))
    return [f"{blocks}.{i}.{name}" for i in range(n) for name in readers] + [final]


def _with_hand_rmsnorm(family: str, model):
    """``model`` with every norm that reads the residual stream swapped for :class:`HandRMSNorm` (in place)."""
    for path in _stream_norm_paths(family, model):
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, HandRMSNorm(model.get_submodule(path)))
    return model


def _stream(family: str, model, x) -> list[torch.Tensor]:
    """The residual stream entering every block and entering the final norm, recorded by hooks written here."""
    _, blocks, _, final, _ = FAMILIES[family]
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()),
                                         with_kwargs=True) for b in model.get_submodule(blocks)]
    hooks.append(model.get_submodule(final).register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())))
    _logits(model, x)
    for h in hooks:
        h.remove()
    return seen


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_exactly_through_the_cli(family, tmp_path, monkeypatch, capsys):
    """The CLI writes the same family, recentered: plain transformers loads it, and with a hand-written RMSNorm
    in place of every stream LayerNorm (and with convert's own RMSNorm modules) the logits are the input's; the
    stream is zero-mean at every block boundary; the input directory is untouched."""
    from layerlab.cli import main

    model = _build(family)
    src = save_model(model, tmp_path / "in")
    before = digest(src)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["layerlab", "convert", str(src), "--to", "rmsnorm", "--out", str(out),
                                      "--tokens", "256"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    stdout = capsys.readouterr().out
    assert digest(src) == before, "the input directory is never modified"
    assert "max |logit difference| against the original" in stdout and "max |stream mean|" in stdout
    x = _ids()
    reference = _logits(AutoModelForCausalLM.from_pretrained(src).eval(), x)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model.config.model_type and config["layerlab"] == {"norms": "rmsnorm"}
    assert config.get("tie_word_embeddings") is not True, "a tied head is untied (the embedding is recentered)"
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain) is type(model)
    assert _rel(_logits(plain, x), reference) <= REL  # LayerNorm on a zero-mean stream
    hand = _with_hand_rmsnorm(family, AutoModelForCausalLM.from_pretrained(out).eval())
    assert _rel(_logits(hand, x), reference) <= REL
    stream = _stream(family, hand, x)
    assert len(stream) == model.config.num_hidden_layers + 1
    for h in stream:
        assert float(h.mean(-1).abs().max()) <= 1e-6 * float(h.pow(2).mean(-1).sqrt().max()) + 1e-7
    # the check has teeth: the same hand RMSNorm on the input (stream not centered) changes the logits
    assert _rel(_logits(_with_hand_rmsnorm(family, _build(family)), x), reference) > 1e-2
    assert max(float(h.mean(-1).abs().max()) for h in _stream(family, _build(family), x)) > 1e-2
    # what layerlab loads: actual RMSNorm modules, biases kept where the format has no linear bias, or folded
    loaded = load_model(out).model
    assert _rel(_logits(loaded, x), reference) <= REL
    assert all(isinstance(loaded.get_submodule(p), RMSNorm) for p in _stream_norm_paths(family, loaded))
    for fold in (False, True):
        m = use_rmsnorm(AutoModelForCausalLM.from_pretrained(out).eval(), fold=fold)
        norms = [m.get_submodule(p) for p in _stream_norm_paths(family, m)]
        assert all(isinstance(n, RMSNorm) for n in norms)
        if fold:
            assert all(type(n) is RMSNorm and not hasattr(n, "bias") for n in norms)
        else:  # the family's keys: written back after the swap (as prune would), it loads in plain transformers
            assert set(m.state_dict()) == set(plain.state_dict())
            m.save_pretrained(tmp_path / "again")
            again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
            assert _rel(_logits(again, x), reference) <= REL
        left = [name for name, n in m.named_modules() if isinstance(n, nn.LayerNorm)]
        assert left == (["transformer.word_embeddings_layernorm"] if family == "bloom" else [])
        assert _rel(_logits(m, x), reference) <= REL
    rec = json.loads((out / "layerlab.json").read_text())
    scale = float(reference.abs().max())
    for key in ("max_abs_logit_diff", "max_abs_logit_diff_bias_free", "max_abs_logit_diff_layernorm"):
        assert 0 <= rec[key] <= REL * scale, (key, rec[key])
    assert rec["max_abs_stream_mean"] < 1e-6 < 1e-2 < rec["max_abs_stream_mean_before"]
    assert rec["after"]["loss"] == pytest.approx(rec["before"]["loss"], abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_readers_of_each_norm_are_the_linears_that_take_its_output(family):
    """One norm feeding both sublayers (GPT-J, Phi, Falcon-7B), two norms reading the same x (NeoX parallel,
    Falcon's new architecture), OPT's MLP on (B*T, C) rows: the readers found equal the hand-listed ones."""
    model = _build(family)
    _, blocks, readers, final, head = FAMILIES[family]
    paths = _stream_norm_paths(family, model)
    found = norm_readers(model, {p: model.get_submodule(p) for p in paths})
    expected = {f"{blocks}.{i}.{n}": [f"{blocks}.{i}.{r}" for r in rs] for i in range(3) for n, rs in readers.items()}
    expected[final] = [head]
    names = {id(m): name for name, m in model.named_modules()}
    assert {p: sorted(names[id(m)] for m in ms) for p, ms in found.items()} == \
        {p: sorted(rs) for p, rs in expected.items()}


def test_bloom_embedding_norm_outputs_the_centered_stream():
    """BLOOM's stream starts as word_embeddings_layernorm(E[t]) = g*n + b. After conversion that LayerNorm
    outputs exactly the centered original, recomputed here in float64 from the input's weights."""
    model = _build("bloom")
    conv = recenter_family(model)
    ln, e = model.transformer.word_embeddings_layernorm, model.transformer.word_embeddings.weight.detach().double()
    n = (e - e.mean(1, keepdim=True)) / (e.var(1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    x0 = n * ln.weight.detach().double() + ln.bias.detach().double()  # (V, C) the stream entering block 0, per token
    expected = x0 - x0.mean(1, keepdim=True)
    with torch.no_grad():
        got = conv.transformer.word_embeddings_layernorm(conv.transformer.word_embeddings.weight).double()
    assert float((got - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    assert float(got.mean(1).abs().max()) < 1e-7
    assert not conv.config.tie_word_embeddings
    torch.testing.assert_close(conv.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)  # the original matrix


def test_centering_a_tied_embedding_in_place_would_change_the_softmax():
    """Why the head is untied: logit v moves by -mean(E_v) * sum(h), which depends on v, so log-softmax changes
    (checked by hand on the input OPT, which ties its head to the embedding)."""
    model = _build("opt")
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    x = _ids()
    before = torch.log_softmax(_logits(model, x), -1)
    with torch.no_grad():
        w = model.lm_head.weight
        w.sub_(w.mean(1, keepdim=True))  # the tied matrix centered: embedding and head at once
    after = torch.log_softmax(_logits(model, x), -1)
    assert float((after - before).abs().max()) > 1e-3


def test_crmsnorm_target_on_a_family(tmp_path):
    model = _build("opt")
    src = save_model(model, tmp_path / "in")
    rec = convert(src, to="crmsnorm", out=tmp_path / "out", tokens=256)
    x = _ids(seed=3)
    reference = _logits(model, x)
    m = use_rmsnorm(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), "crmsnorm", fold=True)
    assert all(type(m.get_submodule(p)) is CRMSNorm for p in _stream_norm_paths("opt", m))
    assert _rel(_logits(m, x), reference) <= REL
    # as layerlab loads it: the final norm keeps its bias (OPT's head has none), after a CRMSNorm
    m = use_rmsnorm(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), "crmsnorm")
    kept = m.get_submodule("model.decoder.final_layer_norm")
    assert isinstance(kept, CRMSNorm) and kept.bias.abs().max() > 0.01
    assert _rel(_logits(m, x), reference) <= REL
    assert rec["to"] == "crmsnorm" and rec["max_abs_logit_diff_bias_free"] <= REL * float(reference.abs().max())


@pytest.mark.parametrize("case, expected", [
    ("no-norm", "no-norm supports layerlab and GPT-2 models; a 'opt' model converts exactly with --to rmsnorm"),
    ("post-ln", "do_layer_norm_before=False"),
])
def test_refusals_are_one_line_and_write_nothing(case, expected, tmp_path, monkeypatch, capsys):
    from layerlab.cli import main

    model = _build("opt")
    if case == "post-ln":  # OPT-350m's form
        cfg = FAMILIES["opt"][0]()
        cfg.do_layer_norm_before = False
        model = AutoModelForCausalLM.from_config(cfg)
    src = save_model(model, tmp_path / "in")
    before = digest(src)
    out = tmp_path / "out"
    to = "no-norm" if case == "no-norm" else "rmsnorm"
    monkeypatch.setattr(sys, "argv", ["layerlab", "convert", str(src), "--to", to, "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    stdout, stderr = capsys.readouterr()
    assert e.value.code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and expected in stderr, stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert digest(src) == before


def test_a_conversion_that_is_not_exact_is_an_error_and_writes_nothing(tmp_path, monkeypatch):
    """With the recentering disabled, LayerNorm no longer equals RMSNorm on the stream: convert's own check sees
    it and refuses in one line, leaving no output behind."""
    import importlib

    from layerlab.errors import LayerlabError

    module = importlib.import_module("layerlab.compress.recenter")  # where recentring lives

    src = save_model(_build("gpt_neox"), tmp_path / "in")
    monkeypatch.setattr(module, "_center_", lambda t, dim: None)
    with pytest.raises(LayerlabError, match=r"^the conversion of this 'gpt_neox' model is not exact \(") as e:
        convert(src, to="rmsnorm", out=tmp_path / "out", tokens=256)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_family_model_without_tokenizer_converts_checked_on_random_ids(tmp_path):
    model = _build("phi")
    model.save_pretrained(tmp_path / "in")  # no tokenizer files
    rec = convert(tmp_path / "in", to="rmsnorm", out=tmp_path / "out")
    x = _ids(seed=4)
    reference = _logits(model, x)
    assert _rel(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), x), reference) <= REL
    assert rec["checked_on"].endswith("random token ids (seed 0)") and "loss" not in rec["after"]
    assert rec["max_abs_logit_diff"] <= REL * float(reference.abs().max())
