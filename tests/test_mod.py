"""Mixture-of-Depths (Raposo et al., 2024; layerlab.mod) against references written here, one sequence at a time:
the top-k tokens by router score (a sort in Python), the block run on that subsequence (attention among those tokens
only, each at its own position), its update scaled by the router weight and put back; in evaluation, the causal
predictor's decisions in place of the top-k."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTok, measure_fake_ids, perturb

import layerlab
from layerlab.adapters import view
from layerlab.analysis.analyze import analyze_model
from layerlab.cli import parse_extra
from layerlab.config import ModelConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.generate import self_speculative_greedy
from layerlab.model import output_cache
from layerlab.recipe import resolve

V = 64


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(layers=4, width=32, heads=2, context=32, vocab_size=V), **kw})


def build(seed: int = 0, scale: float = 0.1, **kw):
    """A perturbed model whose predictors send half the tokens of a calibration batch through (a random one's output
    bias would decide alone): each routed block's output bias is moved, in order, to put the decision boundary
    between the two middle logits."""
    torch.manual_seed(seed)
    model = perturb(layerlab.build_model(cfg(**kw)), scale=scale, seed=seed)
    x, seen = ids(B=2, T=14, seed=9), {}
    for b in model.blocks:
        if b.mod_router is None:
            continue
        hook = b.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        with torch.no_grad():
            model.eval()(x)
            hook.remove()
            logits = b.mod_router.predict(seen["x"]).reshape(-1).sort().values
            n = len(logits) // 2
            b.mod_router.predictor[2].bias -= (logits[n - 1] + logits[n]) / 2
    return model


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the reference, one sequence at a time


def ref_ln(ln, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_rope(t, pos, theta):
    """(H, T, D) rotated as complex pairs (x_i + j x_{i+D/2}) * exp(j p theta^(-2i/D)) (Su et al., 2021)."""
    D = t.shape[-1]
    freq = theta ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)
    z = torch.complex(t[..., : D // 2].double(), t[..., D // 2:].double())
    z = z * torch.polar(torch.ones(len(pos), D // 2, dtype=torch.float64), pos[:, None].double() * freq)
    return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)


def ref_attn(attn, h, pos, theta):
    """Causal attention over the rows of h (T, C) in their order; RoPE at positions ``pos`` where theta is given."""
    T, C = h.shape
    H = attn.heads
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (x.view(T, H, C // H).transpose(0, 1) for x in (q, k, v))
    if theta is not None:
        q, k = ref_rope(q, pos, theta), ref_rope(k, pos, theta)
    s = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(T, C) @ attn.proj.weight.T + attn.proj.bias


def ref_block(b, h, pos, theta):
    """A Pre-LN GELU block on the tokens h (T, C) at positions pos."""
    h = h + ref_attn(b.attn, ref_ln(b.ln1, h), pos, theta)
    a = ref_ln(b.ln2, h) @ b.mlp.fc.weight.T + b.mlp.fc.bias
    return h + F.gelu(a, approximate="tanh") @ b.mlp.proj.weight.T + b.mlp.proj.bias


def top_k(b, x, r, capacity):
    """The positions of the floor(C T) largest router scores, in position order."""
    k = max(1, math.floor(capacity * len(r)))
    return sorted(sorted(range(len(r)), key=lambda t: -float(r[t].detach()))[:k])


def predicted(b, x, r, capacity):
    """The positions where the predictor MLP's logit is positive: SiLU(x W1 + b1) W2 + b2 > 0."""
    p = b.mod_router.predictor
    z = x @ p[0].weight.T + p[0].bias
    logit = (z * torch.sigmoid(z)) @ p[2].weight.T + p[2].bias
    return [t for t in range(len(r)) if float(logit[t, 0]) > 0]


def ref_logits(model, x, choose=top_k, seen=None):
    """The logits of each row by the paper's Eq. 1 on every routed block; ``seen`` collects (block, row, input,
    chosen positions)."""
    cfg, rows = model.cfg, []
    theta = cfg.rope_theta if cfg.positions == "rope" else None
    for n, row in enumerate(x):
        T = len(row)
        pos = torch.arange(T)
        h = model.embed.weight[row] + (model.pos.weight[:T] if model.pos is not None else 0)
        for i, b in enumerate(model.blocks):
            if b.mod_router is None:
                h = ref_block(b, h, pos, theta)
                continue
            r = h @ b.mod_router.router.weight[0]
            sel = choose(b, h, r, cfg.mod_capacity)
            if seen is not None:
                seen.append((i, n, h, sel))
            if sel:
                idx = torch.tensor(sel)
                xs = h[idx]
                upd = xs + r[idx, None] * (ref_block(b, xs, pos[idx], theta) - xs)
                h = torch.cat([h[t:t + 1] if t not in sel else upd[sel.index(t)][None] for t in range(T)])
        rows.append(ref_ln(model.ln_f, h) @ model.lm_head.weight.T)
    return torch.stack(rows)


# ------------------------------------------------------------------ training: top-k, gathered


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("capacity", [0.5, 0.125])
def test_training_forward_equals_the_per_token_reference_and_routes_every_other_block(positions, capacity):
    model, x = build(mod_capacity=capacity, positions=positions).train(), ids(T=16)
    assert [b.mod_router is not None for b in model.blocks] == [False, True, False, True]
    with torch.no_grad():
        got = model(x).logits
        ref = ref_logits(model, x)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # not vacuous: every token through every block gives other logits
        assert not torch.allclose(ref, ref_logits(model, x, choose=lambda b, h, r, c: list(range(len(r)))), atol=1e-3)


def test_a_routed_block_runs_on_k_tokens_only_in_training():
    """The cost falls with C: the routed block's attention and MLP see (B, floor(C T), C), the others (B, T, C)."""
    model, x = build(mod_capacity=0.25).train(), ids(B=3, T=16)
    shapes = {}
    for i in (0, 1):
        for name in ("attn", "mlp"):
            getattr(model.blocks[i], name).register_forward_pre_hook(
                lambda m, a, key=(i, name): shapes.__setitem__(key, tuple(a[0].shape)))
    model(x)
    assert shapes == {(0, "attn"): (3, 16, 32), (0, "mlp"): (3, 16, 32), (1, "attn"): (3, 4, 32),
                      (1, "mlp"): (3, 4, 32)}


def test_the_router_gets_the_gradient_of_the_reference():
    """The router is trained by the language-model loss through r (Eq. 1): its gradient is the reference's."""
    model, x = build(mod_capacity=0.5).train(), ids(T=12)
    loss = lambda logits: F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))  # noqa: E731
    loss(model(x).logits).backward()
    got = [b.mod_router.router.weight.grad.clone() for b in model.blocks[1::2]]
    model.zero_grad()
    loss(ref_logits(model, x)).backward()
    for g, b in zip(got, model.blocks[1::2], strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, b.mod_router.router.weight.grad, rtol=1e-4, atol=1e-6)


def test_the_predictor_loss_is_bce_against_top_k_membership_behind_a_stop_gradient():
    model, x = build(mod_capacity=0.5).train(), ids(T=12)
    out = model(x)
    seen = []
    with torch.no_grad():
        ref_logits(model, x, seen=seen)
    expect = 0.0
    for i in (1, 3):  # the routed blocks, each adding its mean BCE weighted 0.01
        bce = []
        for _, n, h, sel in [s for s in seen if s[0] == i]:
            y = torch.tensor([float(t in sel) for t in range(len(h))])
            p = torch.sigmoid(predicted_logits(model.blocks[i], h)).detach()
            bce.append(-(y * p.log() + (1 - y) * (1 - p).log()))
        expect += 0.01 * float(torch.cat(bce).mean())
    assert float(out.aux_loss.detach()) == pytest.approx(expect, rel=1e-5)
    model.zero_grad()
    out.aux_loss.backward()
    for name, p in model.named_parameters():
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == (".predictor." in name), name  # only the predictor learns from it


def predicted_logits(b, h):
    p = b.mod_router.predictor
    z = h @ p[0].weight.T + p[0].bias
    return ((z * torch.sigmoid(z)) @ p[2].weight.T + p[2].bias)[:, 0]


def test_the_gathered_and_masked_paths_agree_in_training():
    """Training with a cache takes the masked path (every token through the block, attention restricted to the chosen
    keys): the same function as the gathered one."""
    model, x = build(mod_capacity=0.5, positions="rope").train(), ids(T=12)
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=True).logits, model(x).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ evaluation: the causal predictor


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_evaluation_routes_by_the_predictor_as_the_reference(positions):
    model, x = build(mod_capacity=0.5, positions=positions).eval(), ids(B=2, T=14)
    seen = []
    with torch.no_grad():
        got = model(x).logits
        torch.testing.assert_close(got, ref_logits(model, x, choose=predicted, seen=seen), rtol=1e-5, atol=1e-5)
    by_block = {i: [sel for j, _, _, sel in seen if j == i] for i in (1, 3)}
    assert by_block[1][0] != by_block[1][1]  # the rows route differently
    assert 0 < sum(map(len, by_block[1])) < 2 * 14  # some tokens go through, some do not
    for i, sels in by_block.items():
        assert float(model.blocks[i].mod_router.last_through) == pytest.approx(sum(map(len, sels)) / 28)


def greedy_loop(model, x, new, **kw):
    with torch.no_grad():
        for _ in range(new):
            x = torch.cat([x, model(x, use_cache=False, **kw).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_decoding_equals_full_forwards_and_a_left_padded_batch_each_row_alone(positions):
    """Each decoded token is routed by the predictor on its own: a routed block's cache layer keeps every token's
    keys with the record of which went through, so a cached step reads the keys a full forward reads."""
    model = build(mod_capacity=0.5, positions=positions, scale=0.3).eval()
    a = torch.randint(1, V, (1, 5), generator=torch.Generator().manual_seed(4))
    b = torch.randint(1, V, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for prompt in (a, b):
            out = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert torch.equal(out, greedy_loop(model, prompt, 10))
        batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], dim=1), b])
        mask = torch.ones_like(batch)
        mask[0, :3] = 0
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate((a, b)):
        assert torch.equal(out[row, -6:], greedy_loop(model, prompt, 6)[0, -6:]), f"row {row}"


def test_a_skipped_token_has_no_keys_in_the_routed_layer_even_after_the_cache_is_reordered():
    """A routed block's cache layer holds zeros for the keys of the tokens the predictor skipped (its mark), so a cache
    that generation reorders (beam search) still routes right: a step after swapping the rows of the cache gives the
    full forward's logits of the swapped sequences."""
    model, x = build(mod_capacity=0.5).eval(), ids(B=2, T=14, seed=9)
    nxt = torch.tensor([[7], [11]])
    seen = []
    with torch.no_grad():
        out = model(x, use_cache=True)
        ref_logits(model, x, choose=predicted, seen=seen)
        cache = output_cache(out)
        for i, n, _, sel in seen:
            keys = cache.layers[model.blocks[i].attn.layer_idx].keys[n]  # (H, T, D)
            assert [p for p in range(14) if keys[:, p].any()] == sel
        cache.reorder_cache(torch.tensor([1, 0]))
        step = model(nxt, cache=cache, use_cache=True).logits[:, -1]
        full = model(torch.cat([x.flip(0), nxt], dim=1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_self_speculative_decoding_of_a_routed_model_equals_greedy():
    """The draft's cache is cut back after a rejection: the routing record is cut with it."""
    model = build(mod_capacity=0.5, scale=0.3).eval()
    x = ids(B=1, T=5)
    plain = greedy_loop(model, x, 16)
    for exit_block in (0, 1, 2):
        got = self_speculative_greedy(model, x, 16, exit_block, 3)
        assert torch.equal(got.ids, plain), exit_block


def test_the_trace_describes_the_routed_stream_and_analyze_passes_fidelity(monkeypatch):
    """A routed block's resid_out is the routed result; what each sublayer adds is its output times r where the token
    went through and nothing where it did not, so that resid_out = mid + mlp as in any block."""
    model, x = build(mod_capacity=0.5).eval(), ids(B=2, T=14)
    v = view(model)
    seen = []
    with torch.no_grad(), v.trace() as t:
        v.forward(x)
        ref_logits(model, x, choose=predicted, seen=seen)
    for i in range(4):
        if i < 3:
            torch.testing.assert_close(t.resid_out[i], t.resid_in[i + 1], rtol=0, atol=0)
        torch.testing.assert_close(t.resid_out[i], t.mid[i] + t.mlp[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t.mid[i], t.resid_in[i] + t.attn[i], rtol=1e-5, atol=1e-5)
    for i, n, h, sel in seen:
        skipped = [p for p in range(14) if p not in sel]
        torch.testing.assert_close(t.resid_in[i][n], h, rtol=1e-5, atol=1e-5)
        assert skipped and sel
        assert torch.equal(t.resid_out[i][n, skipped], t.resid_in[i][n, skipped])
        assert not t.attn[i][n, skipped].any() and not t.mlp[i][n, skipped].any()
        assert t.mlp[i][n, sel].abs().amin(-1).gt(0).all()
    measure_fake_ids(monkeypatch)
    entry = analyze_model(model, FakeTok(V), name="m", path=None, tokens=50, seq_len=16, batch_size=4,
                          removal_tokens=50, spectra=False, intrinsic=False, progress=False)
    assert entry["fidelity"]["passed"] is True
    assert all(math.isfinite(row["removal_loss_delta"]) for row in entry["layers"])


# ------------------------------------------------------------------ off by default; names; bad input


def test_capacity_one_is_the_plain_model():
    assert ModelConfig().mod_capacity == 1.0 and cfg(mod_capacity=1.0) == cfg()
    torch.manual_seed(0)
    plain = layerlab.build_model(cfg())
    torch.manual_seed(0)
    full = layerlab.build_model(cfg(mod_capacity=1.0))
    assert all(b.mod_router is None for b in full.blocks)
    state = full.state_dict()
    assert list(state) == list(plain.state_dict()) and all(torch.equal(v, plain.state_dict()[k])
                                                          for k, v in state.items())
    x = ids()
    for mode in (full.train, full.eval):
        mode()
        with torch.no_grad():
            torch.testing.assert_close(full(x).logits, ref_logits(full, x, choose=None), rtol=1e-5, atol=1e-5)
    assert full(x).aux_loss is None


def test_mod_capacity_is_a_field_on_the_command_line_and_in_yaml(tmp_path):
    over = check_fields(parse_extra(["--mod-capacity", "0.125"]), from_text=True, source="command line")
    assert resolve("tiny", None, over).model.mod_capacity == 0.125
    path = tmp_path / "c.yaml"
    path.write_text("mod_capacity: 0.5\nlayers: 6\n")
    m = resolve(None, path, {}).model
    assert m.mod_capacity == 0.5 and m.mod_blocks() == [1, 3, 5]


@pytest.mark.parametrize("kw,message", [
    (dict(mod_capacity=0), r"mod_capacity must be in \(0, 1\], got 0"),
    (dict(mod_capacity=1.5), r"mod_capacity must be in \(0, 1\], got 1.5"),
    (dict(mod_capacity=-0.25), r"mod_capacity must be in \(0, 1\]"),
    (dict(mod_capacity=0.5, layers=1), "routes every other block"),
    (dict(mod_capacity=0.5, wiring="denseformer"), "mod_capacity 0.5 does not combine with wiring 'denseformer'"),
    (dict(mod_capacity=0.5, loops=2), "does not combine with loops 2"),
    (dict(mod_capacity=0.5, drop_attn=[1]), "does not combine with drop_attn naming routed block 1"),
    (dict(mod_capacity=0.5, drop_mlp=[3]), "does not combine with drop_mlp naming routed block 3"),
    (dict(mod_capacity=0.5, placement="post"), "does not combine with placement 'post' on routed block 1"),
])
def test_bad_mod_settings_are_one_line_errors(kw, message):
    with pytest.raises(LayerlabError, match=message) as e:
        cfg(**kw)
    assert "\n" not in str(e.value)
    # what a routed block does not need is allowed elsewhere: a dropped sublayer on block 0, Post-LN with MoD off
    cfg(mod_capacity=0.5, drop_attn=[2], drop_mlp=[0])
    cfg(placement="post")
