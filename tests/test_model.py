"""The GPT: every norm x placement builds and trains; each placement's defining property holds."""

import math

import pytest
import torch
from conftest import cli_help_after, perturb, tiny_cfg
from transformers import AutoModelForCausalLM

import layerlab
from layerlab.config import ModelConfig
from layerlab.errors import LayerlabError
from layerlab.model import CACHE_NAME, apply_rope, num_params, output_cache, rope_cos_sin
from layerlab.norms import NORMS, set_norm_schedule
from layerlab.registry import PLACEMENTS


def _ids(cfg, batch=2, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.context), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_and_placement_trains_one_step(norm, placement):
    torch.manual_seed(0)
    cfg = tiny_cfg(norm=norm, placement=placement, layers=4)
    model = layerlab.build_model(cfg).train()
    set_norm_schedule(model, 10)
    x = _ids(cfg)
    out = model(x, labels=x)
    assert out.logits.shape == (2, cfg.context, cfg.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.embed.weight.grad.abs().sum() > 0
    model.eval()
    assert torch.isfinite(model(x).logits).all()


@pytest.mark.parametrize("variant", [
    dict(positions="rope"), dict(mlp="swiglu"), dict(tie_embeddings=False), dict(dropout=0.1),
    dict(init="standard"), dict(bias=False), dict(placement=["post", "pre", "peri"]),
])
def test_config_variants_build_and_run(variant):
    cfg = tiny_cfg(**variant)
    model = layerlab.build_model(cfg)
    x = _ids(cfg)
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_a_placement_registered_at_runtime_builds_trains_and_is_offered(monkeypatch):
    """One registry entry, in this file only: the config accepts it, alone and in schedules, the model runs it,
    the adapters trace it, and the CLI lists it."""
    from layerlab.adapters import view
    from layerlab.model import FORWARDS
    from layerlab.registry import Placement

    def half_pre(block, x, attn_kw):  # Pre-LN whose sublayers add half their output
        return x + 0.5 * (FORWARDS["pre"](block, x, attn_kw) - x)

    monkeypatch.setitem(PLACEMENTS._entries, "halfpre", Placement("Pre-LN at half strength", forward=half_pre))
    for placement in ("halfpre", ["halfpre", "pre", "halfpre"]):
        model = perturb(layerlab.build_model(tiny_cfg(placement=placement)))
        x = _ids(model.cfg)
        model(x, labels=x).loss.backward()
        assert view(model).placements()[0] == "halfpre"
    with view(model).trace() as t:
        model(x)
    assert all(s is not None for s in t.resid_out)
    assert tiny_cfg(placement="halfpre", drop_mlp=[1]).drop_mlp == [1]  # residual: a block may lack a sublayer
    setup = "from layerlab.registry import PLACEMENTS, Placement\nPLACEMENTS.register('halfpre', Placement('toy'))"
    assert "lns | sandwich | halfpre" in cli_help_after(setup, "train", "placement")


def test_unknown_names_and_bad_schedules_are_clear_errors():
    with pytest.raises(LayerlabError, match="unknown placement 'middle'; valid: .*peri"):
        tiny_cfg(placement="middle")
    with pytest.raises(LayerlabError, match="3 entries but the model has 4 layers"):
        tiny_cfg(layers=4, placement=["pre", "pre", "post"])
    with pytest.raises(LayerlabError, match="per-block schedule"):
        tiny_cfg(placement=["pre", "mix", "pre"])
    with pytest.raises(LayerlabError, match="not divisible"):
        tiny_cfg(width=30, heads=4)


def _capture(module, store, key):
    return module.register_forward_hook(lambda m, a, o: store.__setitem__(key, (a[0].detach(), o.detach())))


def test_lns_scales_norm_outputs_by_inverse_sqrt_depth():
    cfg = tiny_cfg(placement="lns", layers=4)
    model = perturb(layerlab.build_model(cfg)).eval()
    seen = {}
    hooks = []
    for i, b in enumerate(model.blocks):
        hooks += [_capture(b.ln1, seen, ("ln1", i)), _capture(b.attn, seen, ("attn", i)),
                  _capture(b.ln2, seen, ("ln2", i)), _capture(b.mlp, seen, ("mlp", i))]
    model(_ids(cfg))
    for i in range(cfg.layers):
        s = 1 / math.sqrt(i + 1)
        torch.testing.assert_close(seen[("attn", i)][0], seen[("ln1", i)][1] * s)
        torch.testing.assert_close(seen[("mlp", i)][0], seen[("ln2", i)][1] * s)
    assert model.blocks[0].scale == 1.0 and model.blocks[3].scale == 0.5


def test_lns_turns_off_depth_scaled_init():
    torch.manual_seed(0)
    pre = layerlab.build_model(tiny_cfg(placement="pre", layers=8, width=128, heads=2))
    torch.manual_seed(0)
    lns = layerlab.build_model(tiny_cfg(placement="lns", layers=8, width=128, heads=2))
    std_pre, std_lns = pre.blocks[0].mlp.proj.weight.std(), lns.blocks[0].mlp.proj.weight.std()
    assert abs(float(std_lns.detach()) - 0.02) < 0.002
    assert abs(float(std_pre.detach()) - 0.02 / math.sqrt(16)) < 0.001
    assert abs(float(pre.blocks[0].mlp.fc.weight.detach().std()) - 0.02) < 0.002


def test_peri_normalizes_each_sublayer_output():
    cfg = tiny_cfg(placement="peri")
    model = perturb(layerlab.build_model(cfg)).eval()
    b = model.blocks[1]
    x = torch.randn(2, cfg.context, cfg.width)
    h = x + b.ln1_out(b.attn(b.ln1(x)))
    torch.testing.assert_close(b(x), h + b.ln2_out(b.mlp(b.ln2(h))))
    # the residual update of each sublayer is itself normalised: unit RMS times the out-norm's gain
    update = b.ln1_out(b.attn(b.ln1(x)))
    ref = torch.nn.functional.layer_norm(b.attn(b.ln1(x)), (cfg.width,), b.ln1_out.weight, b.ln1_out.bias)
    torch.testing.assert_close(update, ref)


def test_post_normalizes_after_the_residual_add_and_has_no_final_norm():
    cfg = tiny_cfg(placement="post")
    model = perturb(layerlab.build_model(cfg)).eval()
    b = model.blocks[0]
    x = torch.randn(2, cfg.context, cfg.width) * 3
    h = b.ln1(x + b.attn(x))
    torch.testing.assert_close(b(x), b.ln2(h + b.mlp(h)))
    assert type(model.ln_f).__name__ == "NoNorm"
    assert type(layerlab.build_model(tiny_cfg(placement="pre")).ln_f).__name__ == "LayerNorm"


@pytest.mark.parametrize("layers,alpha,n_post", [(4, 0.25, 1), (8, 0.25, 2), (7, 0.5, 3), (6, 0.0, 0), (5, 1.0, 5)])
def test_mix_switches_from_post_to_pre_at_floor_alpha_l(layers, alpha, n_post):
    cfg = tiny_cfg(placement="mix", layers=layers, mix_alpha=alpha)
    model = layerlab.build_model(cfg)
    assert [b.placement for b in model.blocks] == ["post"] * n_post + ["pre"] * (layers - n_post)
    assert n_post == math.floor(alpha * layers)


def test_sandwich_adds_a_norm_before_each_output_projection():
    cfg = tiny_cfg(placement="sandwich", mlp="swiglu")
    model = perturb(layerlab.build_model(cfg)).eval()
    b = model.blocks[0]
    assert b.attn.inner_norm is not None and b.mlp.inner_norm is not None
    seen = {}
    h1 = _capture(b.mlp.inner_norm, seen, "inner")
    h2 = _capture(b.mlp.proj, seen, "proj")
    model(_ids(cfg))
    h1.remove(), h2.remove()
    assert torch.equal(seen["proj"][0], seen["inner"][1])
    assert seen["inner"][0].shape[-1] == cfg.hidden


def test_rope_has_no_position_table_and_learned_has_one():
    assert layerlab.build_model(tiny_cfg(positions="rope")).pos is None
    assert layerlab.build_model(tiny_cfg()).pos.weight.shape == (16, 32)


def test_tied_and_untied_embeddings():
    tied = layerlab.build_model(tiny_cfg())
    untied = layerlab.build_model(tiny_cfg(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert num_params(untied) - num_params(tied) == 64 * 32


def test_swiglu_hidden_width():
    assert ModelConfig(width=256, heads=4, mlp="swiglu").hidden == 704  # 8/3*256 = 682.7 rounded up to 64
    assert ModelConfig(width=256, heads=4).hidden == 1024


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_save_load_gives_identical_logits_and_cached_generation_matches(tmp_path, positions):
    cfg = tiny_cfg(positions=positions, norm="rmsnorm", placement="peri", context=32)
    model = perturb(layerlab.build_model(cfg)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    x = _ids(cfg)[:, :12]
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    with_cache = loaded.generate(x, max_new_tokens=8, do_sample=False)
    without = loaded.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    # and the cached logits equal a full recomputation
    full = loaded(with_cache).logits[:, -1]
    step = loaded(with_cache[:, :-1], use_cache=True)
    inc = loaded(with_cache[:, -1:], **{CACHE_NAME: output_cache(step)}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


def left_padded_pair(cfg, short: int = 5, long: int = 8, seed: int = 4):
    """Two prompts batched as generate() batches them: row 0 holds ``short`` real tokens behind
    ``long - short`` pads, row 1 ``long`` real tokens and no padding. Returns (short row, long row, ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(1, cfg.vocab_size, (1, short), generator=g)
    b = torch.randint(1, cfg.vocab_size, (1, long), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, long - short, dtype=torch.long), a], dim=1), b])
    mask = torch.ones_like(ids)
    mask[0, : long - short] = 0
    return a, b, ids, mask


def test_rope_rotates_each_row_by_its_own_positions():
    """Per-row positions against the closed form of RoPE (Su et al., 2021) as a complex rotation: in the
    rotate-half layout the pair (x_i, x_{i+D/2}) is z = x_i + j x_{i+D/2}, and position p maps it to
    z * exp(j p theta^(-2i/D)). Computed here in float64, independently of rope_cos_sin."""
    D, theta = 8, 10000.0
    x = torch.randn(2, 3, 5, D, generator=torch.Generator().manual_seed(0))  # (B, H, T, D), T != D/2
    pos = torch.tensor([[0, 0, 0, 1, 2], [7, 8, 9, 10, 11]])  # row 0 left-padded, row 1 offset by 7
    out = apply_rope(x, *rope_cos_sin(pos, D, theta))
    freq = theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    angle = pos[:, None, :, None].double() * freq  # (B, 1, T, D/2)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1).float(), rtol=1e-5, atol=1e-5)
    # one shared row of positions, (T,), gives (T, D) tables that rotate every sequence alike
    shared = apply_rope(x, *rope_cos_sin(pos[1], D, theta))
    torch.testing.assert_close(shared[1], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_each_row_of_a_left_padded_batch_equals_the_row_run_alone(positions):
    """Batched behind or beside left padding, with generate()'s per-row position ids (mask cumsum - 1), each
    row's logits equal those of the row run alone (no mask, default positions), for the prompt and for three
    cached decoding steps. RoPE once took every row's phases from row 0's positions: row 1 was off by ~2 here."""
    torch.manual_seed(0)
    cfg = tiny_cfg(positions=positions, context=32)
    model = perturb(layerlab.build_model(cfg), scale=0.3).eval()  # logits spread ~2, and depend on position
    a, b, ids, mask = left_padded_pair(cfg)
    pad = ids.size(1) - a.size(1)
    nxt = torch.randint(1, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = [model(torch.cat([row, nxt[i:i + 1]], dim=1)).logits[0] for i, row in enumerate((a, b))]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        batch = [out.logits[0, pad:], out.logits[1]]
        cache = output_cache(out)
        for t in range(nxt.size(1)):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(nxt[:, t:t + 1], attention_mask=mask, position_ids=pos, **{CACHE_NAME: cache})
            batch = [torch.cat([batch[i], out.logits[i]]) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(batch[i], alone[i], rtol=1e-5, atol=1e-4, msg=lambda m, i=i: f"row {i}: {m}")


def test_hidden_states_follow_hugging_face_convention():
    cfg = tiny_cfg()
    model = perturb(layerlab.build_model(cfg)).eval()
    out = model(_ids(cfg), output_hidden_states=True)
    assert len(out.hidden_states) == cfg.layers + 1
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
