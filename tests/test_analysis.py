"""Analysis: adapters on every architecture, and each measurement against an independent recomputation."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTok, measure_fake_ids, perturb, tiny_cfg
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import layerlab
from layerlab.adapters import view
from layerlab.analysis.analyze import analyze_model
from layerlab.analysis.stats import StreamStats, anisotropy, curvature, effective_rank, prompt_entropy
from layerlab.errors import LayerlabError
from layerlab.evaluate import masked_loss_sum

V = 64


def _causal_models():
    small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64)
    return {
        "layerlab": lambda: layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=V)),
        "layerlab-peri-rope": lambda: layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=V,
                                                                    placement="peri", positions="rope")),
        "layerlab-post": lambda: layerlab.build_model(tiny_cfg(layers=3, context=32, vocab_size=V, placement="post")),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=3, n_head=2,
                                                   bos_token_id=0, eos_token_id=0)),
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**small)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**small)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**small)),
    }


def _bert():
    return BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))


ALL = {**_causal_models(), "bert": _bert}


def _build(name):
    torch.manual_seed(0)
    return perturb(ALL[name](), scale=0.02).eval()


def _batch(seq=12, pad=3):
    ids = torch.randint(1, V, (2, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, seq - pad:] = 0  # right padding on the second row
    return ids, mask


@pytest.mark.parametrize("name", sorted(ALL))
def test_trace_matches_output_hidden_states(name):
    model = _build(name)
    v = view(model)
    ids, mask = _batch()
    with torch.no_grad(), v.trace() as t:
        v.forward(ids, mask)
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i in range(v.num_layers):
        torch.testing.assert_close(t.resid_in[i], hs[i])
        if i + 1 < v.num_layers:
            torch.testing.assert_close(t.resid_out[i], hs[i + 1])
        assert t.attn[i].shape == hs[0].shape and t.mlp[i].shape == hs[0].shape and t.mid[i] is not None
    if v.placements()[0] != "post":  # residual adds: x_l+1 = x_l + attn + mlp, and mid = x_l + attn
        for i in range(v.num_layers):
            torch.testing.assert_close(t.resid_out[i], t.resid_in[i] + t.attn[i] + t.mlp[i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(t.mid[i], t.resid_in[i] + t.attn[i], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_block_has_named_parts_and_linears(name):
    v = view(_build(name))
    for b in v.blocks:
        assert b.ln1 is not None and b.attn is not None and b.ln2 is not None and b.mlp is not None
        mats = v.linears(b.index)
        assert len(mats) >= 4 and all(w.dim() == 2 for w in mats.values())
    assert v.has_lm_head == (name != "bert") and v.causal == (name != "bert")


def test_gpt2_linears_are_out_by_in():
    model = _build("gpt2")
    mats = view(model).linears(0)
    assert mats["mlp.c_fc"].shape == (128, 32)  # GPT-2's Conv1D stores (in, out); the view gives (out, in)


def test_unsupported_architecture_lists_the_supported_ones():
    listed = "unsupported architecture 'toy'; supported: bert, (.*, )?gemma, (.*, )?gpt2, (.*, )?layerlab"
    with pytest.raises(LayerlabError, match=listed):
        view(torch.nn.Linear(2, 2).__class__.__new__(type("M", (torch.nn.Module,), {
            "config": type("C", (), {"model_type": "toy"})()})))


@pytest.mark.parametrize("name", ["layerlab", "gpt2", "llama"])
def test_skip_equals_the_model_with_that_block_deleted(name):
    model = _build(name)
    v = view(model)
    ids, mask = _batch(pad=0)
    with torch.no_grad():
        with v.skip(1):
            skipped = v.forward(ids, mask).logits
        blocks = v.root.get_submodule(v.arch.blocks)
        kept = torch.nn.ModuleList([blocks[0], blocks[2]])
        parent_path, _, attr = v.arch.blocks.rpartition(".")
        parent = v.root.get_submodule(parent_path) if parent_path else v.root
        setattr(parent, attr, kept)
        if hasattr(model.config, "num_hidden_layers"):
            model.config.num_hidden_layers = 2
        try:
            if name == "llama":  # Llama's attention indexes its cache by layer: renumber to match
                kept[1].self_attn.layer_idx = 1
            deleted = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            setattr(parent, attr, blocks)
    torch.testing.assert_close(skipped, deleted)
    # and skipping leaves the model exactly as it was
    with torch.no_grad():
        again = v.forward(ids, mask).logits
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(again, full)


def _manual_states(model, ids, mask):
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return hs


def test_angular_distance_and_block_influence_match_recomputation():
    model = _build("gpt2")
    v = view(model)
    ids, mask = _batch()
    with torch.no_grad(), v.trace() as t:
        v.forward(ids, mask)
    states = [t.resid_in[0], *t.resid_out]
    s = StreamStats(v.num_layers)
    s.update(states, t.attn, t.mlp, t.mid, mask)
    res = s.results()
    hs = _manual_states(model, ids, mask)
    # HF's last hidden state is after ln_f; the stream leaving the last block is before it
    hs = list(hs[:-1]) + [states[-1]]
    m = mask.bool()
    for i in range(v.num_layers):
        for n in range(1, v.num_layers + 1 - i):
            cos = F.cosine_similarity(hs[i][m], hs[i + n][m], dim=-1)
            expect = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()
            assert res["ang"][i][i + n] == pytest.approx(float(expect), abs=1e-5)
        bi = 1 - F.cosine_similarity(hs[i][m], hs[i + 1][m], dim=-1).mean()
        assert res["block_influence"][i] == pytest.approx(float(bi), abs=1e-5)
    last = torch.tensor([11, 8])  # the last real token of each row
    for i in range(v.num_layers):
        cos = F.cosine_similarity(hs[i][torch.arange(2), last], hs[i + 1][torch.arange(2), last], dim=-1)
        assert res["ang_last"][i][i + 1] == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), abs=1e-5)


def test_removal_delta_equals_the_loss_of_the_deleted_model():
    model = _build("layerlab")
    tok = FakeTok(V)
    entry = analyze_model(model, tok, name="m", path=None, tokens=200, seq_len=16, batch_size=4,
                          removal_tokens=10_000, spectra=False, intrinsic=False, progress=False)
    ids = torch.tensor(tok.ids[:200])
    # recompute: the same windows, full model and with block 1 deleted
    wins = ids[: (200 // 16) * 16].view(-1, 16)
    tail = ids[(200 // 16) * 16:]
    mask = torch.ones_like(wins)
    with torch.no_grad():
        full, n = masked_loss_sum(model(wins).logits, wins, mask)
        blocks = model.blocks
        model.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != 1])
        deleted, _ = masked_loss_sum(model(wins).logits, wins, mask)
        t_row = torch.cat([tail, torch.zeros(16 - len(tail), dtype=torch.long)])[None]
        t_mask = torch.cat([torch.ones(len(tail)), torch.zeros(16 - len(tail))])[None].long()
        d_tail, n_tail = masked_loss_sum(model(t_row).logits, t_row, t_mask)
        model.blocks = blocks
        f_tail, _ = masked_loss_sum(model(t_row).logits, t_row, t_mask)
    expect = (deleted + d_tail - full - f_tail) / (n + n_tail)
    assert entry["layers"][1]["removal_loss_delta"] == pytest.approx(expect, rel=1e-4, abs=1e-6)
    assert entry["loss"] == pytest.approx((full + f_tail) / (n + n_tail), rel=1e-5)


@pytest.fixture(autouse=True)
def _fake_text(monkeypatch):
    measure_fake_ids(monkeypatch)


def test_effective_rank_is_exact_on_low_rank_data():
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 7):
        U, _ = torch.linalg.qr(torch.randn(200, k, generator=g, dtype=torch.float64))
        W, _ = torch.linalg.qr(torch.randn(64, k, generator=g, dtype=torch.float64))
        Z = U @ W.T * 5.0  # k equal singular values
        assert effective_rank(Z) == pytest.approx(k, rel=1e-9)
    Z = torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert effective_rank(Z) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)


def test_sample_measures_on_constructed_data():
    Z = torch.eye(8)  # orthogonal tokens: fully spread, zero anisotropy
    assert prompt_entropy(Z) == pytest.approx(1.0)  # a flat spectrum; skewed ones: test_metrics_reference.py
    assert anisotropy(Z) == pytest.approx(0.0)
    assert anisotropy(torch.ones(5, 3)) == pytest.approx(1.0)
    line = torch.arange(10.0)[:, None] * torch.ones(1, 4)  # a straight trajectory has zero curvature
    assert curvature(line) == pytest.approx(0.0, abs=1e-3)
    zig = torch.tensor([[0.0, 0], [1, 0], [1, 1], [2, 1], [2, 2]])  # right angles
    assert curvature(zig) == pytest.approx(math.pi / 2)


def test_memory_does_not_grow_with_tokens():
    model = _build("layerlab")
    tok = FakeTok(V)
    small = analyze_model(model, tok, name="m", path=None, tokens=256, seq_len=16, batch_size=4, removal_tokens=0,
                          spectra=False, intrinsic=False, progress=False)
    large = analyze_model(model, tok, name="m", path=None, tokens=2048, seq_len=16, batch_size=4, removal_tokens=0,
                          spectra=False, intrinsic=False, progress=False)
    assert small["samples"]["tokens"] == 256 and large["samples"]["tokens"] == 2048
    assert large["samples"]["token_sample"] <= 1024  # the sample is capped, the rest are running sums


def test_report_keys_and_best_block(tmp_path):
    model = _build("layerlab")
    entry = analyze_model(model, FakeTok(V), name="m", path=None, tokens=300, seq_len=16, batch_size=4,
                          spectra=False, intrinsic=False, progress=False)
    keys = {"index", "angular_distance", "angular_distance_last_token", "block_influence", "relative_contribution",
            "hidden_rms", "max_abs_activation", "effective_rank", "esd_alpha", "logit_lens_loss",
            "removal_loss_delta"}
    assert keys <= set(entry["layers"][0])
    assert set(entry["layers"][0]["max_abs"]) == {"resid", "attn", "mlp", "gate"}
    M = entry["angular_distance_matrix_last_token"]  # a causal LM: pruning reads the last-token distances
    for n, best in entry["best_block_to_prune"].items():
        n = int(n)
        d = [M[s][s + n] for s in range(3 - n + 1)]
        assert best["distance"] == min(d) and best["start"] == d.index(min(d))
    json.dumps(entry)  # plain JSON types only


@pytest.mark.parametrize("name", ["layerlab", "gpt2", "llama", "bert"])
def test_replace_swaps_a_named_norm(name):
    model = _build(name)
    v = view(model)
    ids, mask = _batch(pad=0)
    with torch.no_grad():
        before = v.forward(ids, mask)
    old = v.replace(1, "ln2", torch.nn.Identity())
    assert v.blocks[1].ln2.__class__.__name__ == "Identity"
    with torch.no_grad():
        changed = v.forward(ids, mask)
    key = "logits" if v.causal else "last_hidden_state"
    assert not torch.allclose(getattr(before, key), getattr(changed, key))
    v.replace(1, "ln2", old)
    with torch.no_grad():
        torch.testing.assert_close(getattr(v.forward(ids, mask), key), getattr(before, key))
    with pytest.raises(LayerlabError, match="unknown part 'ln3'"):
        v.replace(0, "ln3", old)


@pytest.mark.parametrize("name", sorted(ALL))
def test_skip_with_replayed_prefix_equals_plain_skip(name):
    model = _build(name)
    v = view(model)
    ids, mask = _batch()
    key = "logits" if v.causal else "last_hidden_state"
    with torch.no_grad():
        with v.trace() as t:
            v.forward(ids, mask)
        for i in range(v.num_layers):
            with v.skip(i):
                plain = getattr(v.forward(ids, mask), key)
            with v.skip(i, replay=t):
                fast = getattr(v.forward(ids, mask), key)
            torch.testing.assert_close(fast, plain)
    assert all(type(b.module) is not type(None) for b in v.blocks)
    assert v.root.get_submodule(v.arch.blocks)[0] is v.blocks[0].module  # stand-ins are gone
