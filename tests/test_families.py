"""More Hugging Face families (issue 13): sequential Pre-LN decoders, x + attn(norm1(x)) then + mlp(norm2(.)),
parallel-residual blocks (x + attn(n1 x) + mlp(n2 x): GPT-NeoX, GPT-J, Phi-1/2, Falcon), BLOOM (whose modules add
the residual themselves), sandwich/Peri-LN blocks with soft-capped logits (Gemma 2, Gemma 3), OLMo 2's
output-normalised sublayers, and mixture-of-experts MLPs (Mixtral, Qwen3-MoE, OLMoE), each checked against
computations that do not go through layerlab's view.

The families layerlab read before (gpt2, and llama, mistral, qwen2 through the ``llama`` entry) are held to the same
checks. Per family, a tiny random model built from the installed transformers' config class (nothing is downloaded):
- the trace equals ``output_hidden_states``: HF's entry l (l < L) is the stream entering block l, and its last
  entry is the final norm of the last block's output (every family here applies the final norm before
  recording it), so it is compared with the model's own final norm of ``resid_out[-1]``; the sublayer outputs
  add up to each block's output; the logit lens at the last block is the model's logits;
- ``skip(i)`` equals the model with block i deleted from its ModuleList (built here by hand);
- ``skip_sublayers`` equals the model with that sublayer's output projection (MoE: its experts) zeroed by hand;
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
from conftest import assert_reports_close, perturb, save_model
from transformers import AutoModelForCausalLM

from layerlab.adapters import view

V = 320  # the byte tokenizer's 257 ids fit
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
QUIET = ["--tokens", "512"]
NEOX = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, **TOKENS)
FALCON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, **TOKENS)
MOE = dict(num_experts_per_tok=2, **TOKENS)

# label -> config; the label is the model_type, or model_type + "_" + the form that differs
FAMILIES = {
    # the families layerlab read before issue 13, held to the same tests
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_inner=64, n_positions=64,
                                            **TOKENS),
    "llama": lambda: transformers.LlamaConfig(**SMALL, **TOKENS),
    "mistral": lambda: transformers.MistralConfig(**SMALL, sliding_window=4, **TOKENS),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, **TOKENS),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**SMALL, **TOKENS),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=16),
    "olmo": lambda: transformers.OlmoConfig(**SMALL, **TOKENS),
    "opt": lambda: transformers.OPTConfig(vocab_size=V, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=3,
                                          num_attention_heads=2, ffn_dim=64, max_position_embeddings=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**NEOX, use_parallel_residual=True),
    "gpt_neox_seq": lambda: transformers.GPTNeoXConfig(**NEOX, use_parallel_residual=False),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_inner=64, n_positions=64,
                                            rotary_dim=8, **TOKENS),
    "phi": lambda: transformers.PhiConfig(**SMALL, **TOKENS),
    "falcon": lambda: transformers.FalconConfig(**FALCON, num_attention_heads=2, parallel_attn=True,
                                                new_decoder_architecture=False, multi_query=True),
    "falcon_new": lambda: transformers.FalconConfig(**FALCON, num_attention_heads=4, num_kv_heads=2,
                                                    new_decoder_architecture=True),
    "falcon_seq": lambda: transformers.FalconConfig(**FALCON, num_attention_heads=2, parallel_attn=False,
                                                    multi_query=False),
    "falcon_alibi": lambda: transformers.FalconConfig(**FALCON, num_attention_heads=2, alibi=True, parallel_attn=True),
    "bloom": lambda: transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=3, n_head=2, **TOKENS),
    # a small cap, so that tanh bends the logits; sliding windows shorter than the test sequences
    "gemma2": lambda: transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=4, final_logit_softcapping=0.5,
                                                **TOKENS),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=4,
                                                         final_logit_softcapping=0.5, **TOKENS),
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, **TOKENS),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, **MOE),
    # block 1 dense (mlp_only_layers): a MoE model whose blocks differ
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, head_dim=16, num_experts=4, moe_intermediate_size=16,
                                                     mlp_only_layers=[1], **MOE),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, num_experts=4, **MOE),
}
PARALLEL = {"gpt_neox", "gptj", "phi", "falcon", "falcon_new", "falcon_alibi"}
MOE_FAMILIES = {"mixtral", "qwen3_moe", "olmoe"}
# where each family keeps its blocks, final norm and what each sublayer adds, read from the transformers modeling
# code (not from layerlab's adapter): blocks, final norm, {unit: the output projection inside a block}
_GPTX = ("transformer.h", "transformer.ln_f")
PATHS = {
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm", {"attn": "self_attn.out_proj", "mlp": "fc2"}),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm",
                 {"attn": "attention.dense", "mlp": "mlp.dense_4h_to_h"}),
    "gpt2": (*_GPTX, {"attn": "attn.c_proj", "mlp": "mlp.c_proj"}),
    "gptj": (*_GPTX, {"attn": "attn.out_proj", "mlp": "mlp.fc_out"}),
    "phi": ("model.layers", "model.final_layernorm", {"attn": "self_attn.dense", "mlp": "mlp.fc2"}),
    "falcon": (*_GPTX, {"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"}),
    "bloom": (*_GPTX, {"attn": "self_attention.dense", "mlp": "mlp.dense_4h_to_h"}),
}
LLAMA_PATHS = ("model.layers", "model.norm", {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"})


def _model_type(label: str) -> str:
    return re.sub("_(seq|new|alibi)$", "", label)


def _paths(label: str):
    return PATHS.get(_model_type(label), LLAMA_PATHS)


def _build(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    assert model.config.model_type == _model_type(family)
    return perturb(model, 0.05).eval()  # norms off their (1, 0) or (0) init, so each norm's form matters


def _layers(model) -> torch.nn.ModuleList:
    return model.get_submodule(_paths(model.config.model_type)[0])


def _final_norm(model) -> torch.nn.Module:
    return model.get_submodule(_paths(model.config.model_type)[1])


def _out_proj(model, i: int, unit: str) -> tuple[str, torch.nn.Module]:
    """(path, module) of what block ``i``'s ``unit`` sublayer adds through: its output projection, or (MoE) the
    experts, whose weights all feed what the MoE block returns."""
    layers, _, proj = _paths(model.config.model_type)
    block = _layers(model)[i]
    path = "mlp.experts" if unit == "mlp" and hasattr(getattr(block, "mlp", None), "experts") else proj[unit]
    return f"{layers}.{i}.{path}", block.get_submodule(path)


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


def _zeroed(model, i: int, unit: str):
    """``model`` with the output projection (MoE: the experts) of block ``i``'s ``unit`` zeroed by hand."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in _out_proj(m, i, unit)[1].parameters():
            p.zero_()
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
    sandwich = _model_type(family) in ("gemma2", "gemma3_text", "olmo2")
    assert v.num_layers == L and len(hs) == L + 1 and v.placements() == ["peri" if sandwich else "pre"] * L
    assert v.form == ("parallel" if family in PARALLEL else "output-norm" if family == "olmo2" else "sequential")
    for i in range(L):
        torch.testing.assert_close(t.resid_in[i], hs[i])
        if i + 1 < L:
            torch.testing.assert_close(t.resid_out[i], hs[i + 1])
        # what the sublayers add makes up the block: x + attn, then + mlp (in a parallel block, mid is defined so)
        torch.testing.assert_close(t.mid[i], t.resid_in[i] + t.attn[i])
        torch.testing.assert_close(t.resid_out[i], t.mid[i] + t.mlp[i])
    # HF's last hidden state is after the final norm, in every family here
    with torch.no_grad():
        torch.testing.assert_close(_final_norm(model)(t.resid_out[-1]), hs[L])
        torch.testing.assert_close(t.final, hs[L])
        torch.testing.assert_close(v.logits_from_hidden(t.resid_out[-1]), out.logits)
    torch.testing.assert_close(traced, out.logits)  # tracing leaves the computation as it is
    assert v.final_norm is _final_norm(model)


def _rms(x, norm, plus_one: bool):
    w = norm.weight.float()
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * ((1.0 + w) if plus_one else w)


def test_sublayer_outputs_are_what_each_sublayer_adds(family):
    """``attn[l]`` / ``mlp[l]`` against the output projections' outputs, hooked here: equal to them where a block
    adds them as they are (BLOOM: the dense projection, not its module's output with the residual in it; MoE: the
    experts' output), their RMSNorm recomputed by hand where the block normalises them (Gemma 2/3: (1 + w),
    OLMo 2: w); and, in a parallel block, the MLP's input is the norm of the block's input, not of ``mid``."""
    model = _build(family)
    v = view(model)
    x = torch.randint(3, V, (2, 10))
    seen, handles = {}, []
    for i in range(v.num_layers):
        for unit in ("attn", "mlp"):
            def keep(m, a, o, key=(i, unit)):  # a copy: Falcon adds attention into the MLP's output in place
                seen[key] = (o[0] if isinstance(o, tuple) else o).detach().clone()
            handles.append(_out_proj(model, i, unit)[1].register_forward_hook(keep))
        block = _layers(model)[i]
        if hasattr(block, "mlp"):  # OPT's fc1/fc2 sit in the block itself
            handles.append(block.mlp.register_forward_pre_hook(
                lambda m, a, key=(i, "mlp_in"): seen.__setitem__(key, a[0].detach())))
    with torch.no_grad(), v.trace() as t:
        v.forward(x)
    for h in handles:
        h.remove()
    for i, block in enumerate(_layers(model)):
        for unit, added in (("attn", t.attn[i]), ("mlp", t.mlp[i])):
            proj = seen[i, unit].reshape(added.shape)  # MoE experts and OPT's fc2 return (B*T, C) rows
            if _model_type(family) in ("gemma2", "gemma3_text", "olmo2"):
                post = block.post_attention_layernorm if unit == "attn" else block.post_feedforward_layernorm
                with torch.no_grad():
                    proj = _rms(proj, post, plus_one=family != "olmo2")
            torch.testing.assert_close(added, proj)
        mlp_in = seen[i, "mlp_in"].reshape(t.mid[i].shape) if (i, "mlp_in") in seen else None
        if family in PARALLEL:
            norm = block.ln_mlp if family == "falcon_new" else (
                block.post_attention_layernorm if family == "gpt_neox" else (
                    block.ln_1 if family == "gptj" else block.input_layernorm))
            with torch.no_grad():
                torch.testing.assert_close(mlp_in, norm(t.resid_in[i]))
            assert not torch.allclose(mlp_in, norm(t.mid[i]))
        elif family == "olmo2":  # no input norm: the MLP reads the stream itself
            torch.testing.assert_close(mlp_in, t.mid[i])


def test_bloom_stream_starts_after_the_embedding_layernorm():
    model = _build("bloom")
    v = view(model)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad(), v.trace() as t:
        v.forward(x)
    ln = model.transformer.word_embeddings_layernorm
    e = model.transformer.word_embeddings.weight[x]
    by_hand = (e - e.mean(-1, keepdim=True)) / torch.sqrt(e.var(-1, unbiased=False, keepdim=True) + ln.eps)
    torch.testing.assert_close(t.resid_in[0], by_hand * ln.weight + ln.bias)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma2_lens_soft_caps_the_logits(family):
    """logits = c tanh(lm_head(norm(h)) / c) with Gemma's (1 + w) RMSNorm, from the raw weights, c = 0.5 here."""
    model = _build(family)
    v = view(model)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad(), v.trace() as t:
        logits = v.forward(x).logits
        raw = _rms(t.resid_out[-1], model.model.norm, plus_one=True) @ model.lm_head.weight.T
        lens = v.logits_from_hidden(t.resid_out[-1])
    assert raw.abs().max() > 1.0  # the cap bends these logits
    torch.testing.assert_close(lens, 0.5 * torch.tanh(raw / 0.5))
    torch.testing.assert_close(lens, logits)
    assert logits.abs().max() < 0.5


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


def test_skip_sublayers_equals_zeroing_the_output_projection_by_hand(family):
    """Zeroing what a sublayer adds (its output; in Gemma 2/3 and OLMo 2 its output norm's, RMSNorm(0) = 0) is the
    model with the sublayer's output projection (MoE: every weight of its experts) zeroed; in a parallel block
    x + attn + 0 is exact too."""
    model = _build(family)
    v = view(model)
    x = torch.randint(0, V, (2, 10))
    full = _logits(model, x)
    for unit in ("attn", "mlp"):
        for i in range(v.num_layers):
            expect = _logits(_zeroed(model, i, unit), x)
            assert not torch.allclose(expect, full, atol=1e-5), (unit, i)
            with torch.no_grad(), v.skip_sublayers(unit, i):
                torch.testing.assert_close(v.forward(x).logits, expect)
    torch.testing.assert_close(_logits(model, x), full)


# falcon_alibi has falcon's module paths and form: the in-memory checks above cover it
@pytest.fixture(scope="module", params=sorted(set(FAMILIES) - {"falcon_alibi"}))
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
    assert type(pruned) is type(original) and pruned.config.model_type == _model_type(family)
    assert pruned.config.num_hidden_layers == 2 and len(_layers(pruned)) == 2
    torch.testing.assert_close(_logits(pruned, x), _logits(_deleted(original, removed[0]), x))
    with torch.no_grad():
        ids = pruned.generate(x[:, :4], max_new_tokens=3, do_sample=False)  # the cache works with 2 layers
    assert ids.shape == (2, 7)

    _cli("prune", str(src), "--remove", "1", "--unit", "attn", "--measure-tokens", "512", *QUIET,
         "--out", str(tmp_path / "a"))
    rec = json.loads((tmp_path / "a" / "layerlab.json").read_text())
    (i,) = [r["block"] for r in rec["removed"]]
    proj, module = _out_proj(original, i, "attn")
    names = [f"{proj}.{n}" for n, _ in module.named_parameters()]  # weight, and bias where the linear has one
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
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
    down, module = _out_proj(original, i, "mlp")  # MoE: the experts, every weight of theirs
    assert rec["zeroed"] == [f"{down}.{n}" for n, _ in module.named_parameters()]
    with torch.no_grad(), v.skip_sublayers("mlp", i):
        expect = v.forward(x).logits
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval(), x), expect)


def test_cli_prune_with_lora_healing_keeps_the_removed_sublayer_out(saved, tmp_path):
    """``prune --unit attn --heal-steps 3`` (LoRA, merged back) on every family: the healed directory loads in
    plain transformers, the zeroed attention output weights are still exactly zero, healing changed other
    weights, and the record's healed loss is finite."""
    family, src = saved
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    _cli("prune", str(src), "--remove", "1", "--unit", "attn", "--heal-steps", "3", "--heal", "lora",
         "--measure-tokens", "512", *QUIET, "--out", str(tmp_path / "h"))
    rec = json.loads((tmp_path / "h" / "layerlab.json").read_text())
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "h").eval()
    assert type(healed) is type(original)
    after, before = healed.state_dict(), original.state_dict()
    assert rec["zeroed"] and all(not after[n].any() for n in rec["zeroed"])
    changed = [k for k in after if k not in rec["zeroed"] and not torch.equal(after[k], before[k])]
    assert changed, "healing changed nothing"
    assert math.isfinite(rec["after"]["loss"])


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
    assert model["fidelity"]["passed"] is True  # the hooked forward is the plain one (analyze raises otherwise)
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


# the Pre-LN LayerNorm families that convert --to rmsnorm maps exactly (tested with convert's own tests)
CONVERTIBLE = {"gpt2", "opt", "gpt_neox", "gpt_neox_seq", "gptj", "phi", "falcon", "falcon_new", "falcon_seq",
               "falcon_alibi", "bloom"}


@pytest.mark.parametrize("saved", sorted(set(FAMILIES) - CONVERTIBLE - {"falcon_alibi"}), indirect=True)
def test_convert_refuses_the_families_it_cannot_convert_in_one_line(saved, tmp_path, monkeypatch, capsys):
    """convert --to rmsnorm refuses the families that already use RMSNorm (Llama-style, Gemma 2/3, OLMo 2, the MoE
    families) and OLMo 1's weightless LayerNorm, which it cannot take yet; one line, nothing written."""
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
    expected = "cannot convert yet" if family == "olmo" else "already uses RMSNorm"
    assert stderr.startswith("error: ") and expected in stderr, stderr
    assert not out.exists()


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_router_load_counts_equal_top_k_of_the_router_weights(family):
    """Per MoE block, the counts equal top-k of softmax(x W^T) recomputed here from the router's weight on the MLP's
    input x = RMSNorm(mid) (post_attention_layernorm by hand), over the real tokens only (the second row is
    padded); a dense block (qwen3_moe's block 1) has none. Two forwards accumulate."""
    from layerlab.adapters import router_load

    model = _build(family)
    v = view(model)
    k, E = model.config.num_experts_per_tok, 4
    x = torch.randint(3, V, (2, 10))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    expect = [torch.zeros(E, dtype=torch.long) for _ in range(v.num_layers)]
    with torch.no_grad(), router_load(v) as counts:
        for _ in range(2):
            with v.trace() as t:
                v.forward(x, mask)
            for i, block in enumerate(_layers(model)):
                if not hasattr(block.mlp, "gate"):
                    continue
                h = _rms(t.mid[i], block.post_attention_layernorm, plus_one=False)[mask.bool()]  # (real, C)
                top = torch.softmax(h @ block.mlp.gate.weight.T, dim=-1).topk(k, dim=-1).indices
                expect[i] += torch.bincount(top.reshape(-1), minlength=E)
    dense = [i for i, block in enumerate(_layers(model)) if not hasattr(block.mlp, "gate")]
    assert dense == ([1] if family == "qwen3_moe" else [])
    for i in range(v.num_layers):
        if i in dense:
            assert counts[i] is None
        else:
            assert int(counts[i].sum()) == 2 * k * int(mask.sum())
            assert torch.equal(counts[i], expect[i]), (i, counts[i], expect[i])


def test_router_stats_closed_form():
    """Entropy in nats of the assignment shares and the largest share, against closed forms."""
    from layerlab.adapters import router_stats

    s = router_stats(torch.tensor([3, 1, 0, 0]))
    assert s["router_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert s["router_max_share"] == pytest.approx(0.75)
    s = router_stats(torch.tensor([5, 5, 5, 5]))
    assert s["router_entropy"] == pytest.approx(math.log(4)) and s["router_max_share"] == pytest.approx(0.25)
    assert router_stats(torch.tensor([0, 7, 0]))["router_entropy"] == pytest.approx(0.0)
    assert router_stats(torch.zeros(4, dtype=torch.long)) == {"router_entropy": None, "router_max_share": None}


def test_block_removal_rewrites_which_qwen3_moe_blocks_are_dense():
    """decoder_sparse_step=2 makes block 1 of 3 sparse, 0 and 2 dense; without block 0 the kept blocks are
    (sparse, dense), which no step expresses: the pruned config lists the dense one, and plain transformers builds
    the same kinds of MLP, with logits equal to the hand-deleted model's."""
    from layerlab.compress.removal import without_blocks

    torch.manual_seed(0)
    cfg = FAMILIES["qwen3_moe"]()
    cfg.mlp_only_layers, cfg.decoder_sparse_step = [], 2
    model = perturb(AutoModelForCausalLM.from_config(cfg), 0.05).eval()
    assert [hasattr(b.mlp, "experts") for b in model.model.layers] == [False, True, False]
    pruned = without_blocks(model, [0])
    assert pruned.config.mlp_only_layers == [1] and pruned.config.decoder_sparse_step == 1
    rebuilt = AutoModelForCausalLM.from_config(pruned.config)
    assert [hasattr(b.mlp, "experts") for b in rebuilt.model.layers] == [True, False]
    x = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(_logits(pruned, x), _logits(_deleted(model, 0), x))


def test_a_view_takes_an_explicit_arch():
    """``LayerView(model, name, arch)`` uses the given description, under a name that has no registry entry (what a
    structure discovered from the module tree needs): its trace is that of the registered view."""
    from layerlab.adapters import ARCHS, LayerView

    model = _build("gptj")
    x = torch.randint(0, V, (1, 8))
    mine = LayerView(model, "discovered", ARCHS["gptj"])
    assert mine.arch_name == "discovered" and mine.form == "parallel" and mine.num_layers == 3
    with torch.no_grad(), mine.trace() as t, view(model).trace() as ref:
        model(input_ids=x, use_cache=False)
    for i in range(3):
        for a, b in ((t.resid_out, ref.resid_out), (t.mid, ref.mid), (t.mlp, ref.mlp)):
            torch.testing.assert_close(a[i], b[i])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_analyze_reports_the_router_load_of_its_own_batches(family, monkeypatch):
    """analyze's ``router_entropy`` / ``router_max_share`` per block are the load of the main forwards over
    the analysed windows: equal to ``router_stats`` of counts gathered here by ``router_load`` over plain forwards
    of the same batches (so neither the fidelity check's forward nor the removal streams are counted), within
    ln E and [1/E, 1]; None for qwen3_moe's dense block and in a dense model."""
    from conftest import FakeTok, measure_fake_ids

    from layerlab.adapters import router_load, router_stats
    from layerlab.data import batches

    module = measure_fake_ids(monkeypatch)
    model = _build(family)
    tok = FakeTok(V)
    entry = module.analyze_model(model, tok, name="m", path=None, tokens=96, seq_len=16, batch_size=2,
                                 removal_tokens=48, spectra=False, intrinsic=False, progress=False)
    v = view(model)
    with torch.no_grad(), router_load(v) as counts:
        for ids, mask in batches(tok, tok.ids[:192], 96, 16, 2):
            v.forward(ids, mask)
    E = 4
    for i, layer in enumerate(entry["layers"]):
        if counts[i] is None:  # a dense block
            assert layer["router_entropy"] is None and layer["router_max_share"] is None
            continue
        expect = router_stats(counts[i])
        assert layer["router_entropy"] == pytest.approx(expect["router_entropy"], abs=1e-9)
        assert layer["router_max_share"] == pytest.approx(expect["router_max_share"], abs=1e-9)
        assert 0 < layer["router_entropy"] <= math.log(E) + 1e-9 and 1 / E <= layer["router_max_share"] <= 1
    assert any(c is None for c in counts) == (family == "qwen3_moe")
    assert entry["form"] == "sequential"


def test_offload_gives_the_in_memory_report(saved, tmp_path, monkeypatch):
    """``analyze --offload`` on every family: blocks read from the safetensors one at a time give the in-memory
    report (every numeric field within 1e-4; no spectra, which tests/test_offload.py covers); the MoE families
    too: their experts are stacked from the per-expert tensors (tests/test_offload_moe.py)."""
    from layerlab.analysis.analyze import analyze

    family, src = saved
    monkeypatch.setenv("LAYERLAB_CACHE", str(tmp_path / "cache"))
    kw = dict(tokens=256, removal_tokens=128, spectra=False, progress=False)
    mem = analyze(src, offload=False, **kw).models[0]
    off = analyze(src, offload=True, **kw).models[0]
    assert off["offload"] is True and mem["offload"] is False and off["fidelity"]["passed"]
    assert assert_reports_close(mem, off, 1e-4) > 50
