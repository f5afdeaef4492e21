"""The block designs of issue 16 that are registry entries of the model: the block form (sequential, parallel,
parallel2), the depth wiring (residual, DenseFormer), FFN sharing (one wide FFN) and Magneto's Sub-LN init.

Every check compares with a computation written here: a hand-written forward, the paper's index formulas, closed
forms for parameter counts and init statistics, or a cache-free greedy loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FakeTok, dir_tensors, measure_fake_ids, perturb, save_model
from transformers import AutoModelForCausalLM

import layerlab
from layerlab.adapters import view
from layerlab.analysis.analyze import analyze_model
from layerlab.cli import parse_extra
from layerlab.config import ModelConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.model import num_params
from layerlab.recipe import resolve
from layerlab.registry import BLOCKS, NORMS, PLACEMENTS, block_form_placements, block_placement_names

V = 64


def cfg(**kw) -> ModelConfig:
    base = dict(layers=3, width=32, heads=2, context=32, vocab_size=V)
    return ModelConfig(**{**base, **kw})


def build(seed: int = 0, scale: float = 0.05, **kw):
    torch.manual_seed(seed)
    return perturb(layerlab.build_model(cfg(**kw)), scale=scale, seed=seed).eval()


def ids(B=2, T=12, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ a hand-written forward


def ref_attn(attn, h):
    """Causal multi-head attention from the weights: softmax(q k^T / sqrt(D) + causal mask) v, then proj."""
    B, T, C = h.shape
    H = attn.heads
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.proj.weight.T + attn.proj.bias


def ref_mlp(mlp, h):
    mlp = getattr(mlp, "ffn", mlp)
    a = h @ mlp.fc.weight.T + mlp.fc.bias
    return F.gelu(a, approximate="tanh") @ mlp.proj.weight.T + mlp.proj.bias


def ref_block(b, x, form):
    """A pre-LN block, sequential or parallel (one norm or two), written out."""
    if form == "sequential":
        x = x + ref_attn(b.attn, b.ln1(x))
        return x + ref_mlp(b.mlp, b.ln2(x))
    n2 = b.ln1 if form == "parallel" else b.ln2
    return x + ref_attn(b.attn, b.ln1(x)) + ref_mlp(b.mlp, n2(x))


def ref_logits(model, x, form="sequential", dwa=None):
    """The model's logits from its weights; ``dwa`` = (dilation, period) wires the blocks as DenseFormer's paper
    says: X_0 the embedding, X_k block k-1's output, after block i (if (i+1) % period == 0) the next input is
    sum_j alpha_j X_j over j in 0..i+1 with j = i+1 (mod dilation)."""
    h = model.embed(x) + model.pos(torch.arange(x.shape[1]))
    outs = [h]
    for i, b in enumerate(model.blocks):
        out = ref_block(b, h, form)
        outs.append(out)
        h = out
        if dwa is not None and (i + 1) % dwa[1] == 0:
            js = [j for j in range(i + 2) if j % dwa[0] == (i + 1) % dwa[0]]
            alpha = b.dwa.alpha
            assert alpha.numel() == len(js) == (i + 1 + dwa[0]) // dwa[0]  # the paper code's count
            h = sum(a * outs[j] for a, j in zip(alpha, js, strict=True))
    return model.lm_head(model.ln_f(h))


@pytest.mark.parametrize("form", ["sequential", "parallel", "parallel2"])
def test_block_forms_equal_a_hand_written_forward(form):
    model, x = build(block=form), ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref_logits(model, x, form), rtol=1e-5, atol=1e-5)
    assert (model.blocks[0].ln2 is None) == (form == "parallel")  # one norm feeds both sublayers


@pytest.mark.parametrize("dilation,period", [(1, 1), (2, 1), (1, 2), (3, 2)])
def test_denseformer_equals_the_papers_weighted_average(dilation, period):
    model, x = build(layers=5, wiring="denseformer", denseformer_dilation=dilation, denseformer_period=period), ids()
    averaging = [i for i in range(5) if (i + 1) % period == 0]
    assert [i for i, b in enumerate(model.blocks) if b.dwa.alpha is not None] == averaging
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref_logits(model, x, dwa=(dilation, period)), rtol=1e-5,
                                   atol=1e-5)


def test_denseformer_starts_as_the_identity():
    """Freshly built, every average is the identity: the same weights give the residual model's logits."""
    torch.manual_seed(0)
    dense = layerlab.build_model(cfg(layers=4, wiring="denseformer", denseformer_dilation=2)).eval()
    plain = layerlab.build_model(cfg(layers=4)).eval()
    plain.load_state_dict({k: v for k, v in dense.state_dict().items() if ".dwa." not in k})
    for b in dense.blocks:
        assert b.dwa.alpha.tolist() == [0.0] * (b.dwa.alpha.numel() - 1) + [1.0]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, plain(x).logits, rtol=0, atol=0)


def test_one_wide_ffn_is_shared_counted_once_and_survives_save_and_load(tmp_path):
    L, C, M = 4, 32, 3.0
    model = build(layers=L, width=C, ffn_sharing="all", ffn_mult=M)
    ffn = model.blocks[0].mlp.ffn
    assert all(b.mlp.ffn is ffn for b in model.blocks) and len({id(b.ln2) for b in model.blocks}) == L
    F_ = round(4 * C * M)
    assert ffn.fc.weight.shape == (F_, C)
    # closed form: embeddings + positions + per block (2 LayerNorms, qkv, proj) + one FFN + final norm
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C)
    expect = V * C + 32 * C + L * per_block + (C * F_ + F_) + (F_ * C + C) + 2 * C
    assert num_params(model) == expect
    assert num_params(model) < num_params(build(layers=L, width=C)) + (C * F_ + F_ + F_ * C + C)
    save_model(model, tmp_path)
    stored = dir_tensors(tmp_path)  # the file holds the FFN once
    assert sorted(k for k in stored if ".fc." in k or ".proj." in k and "attn" not in k) == [
        "shared_ffn.0.fc.bias", "shared_ffn.0.fc.weight", "shared_ffn.0.proj.bias", "shared_ffn.0.proj.weight"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(b.mlp.ffn is back.blocks[0].mlp.ffn for b in back.blocks)  # still one FFN
    assert num_params(back) == expect
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(x).logits, ref_logits(model, x), rtol=1e-5, atol=1e-5)
    # one step of training moves the one FFN that every block runs
    back.train()
    back(x, labels=x).loss.backward()
    assert back.blocks[-1].mlp.fc.weight.grad is not None


def test_magneto_init_gain_on_the_sandwich_placement():
    """Sub-LN with init 'scaled': value/output projections and FFN weights N(0, 0.02 sqrt(log 2L)), q and k rows
    N(0, 0.02) (Wang et al., 2022; torchscale's decoder multiplies fc1, fc2, v_proj, out_proj by that gain)."""
    L, C = 8, 64
    torch.manual_seed(0)
    model = layerlab.build_model(cfg(layers=L, width=C, heads=4, placement="sandwich"))
    gamma = math.sqrt(math.log(2 * L))
    big, small = [], []
    for b in model.blocks:
        big += [b.mlp.fc.weight, b.mlp.proj.weight, b.attn.proj.weight, b.attn.qkv.weight[2 * C:]]
        small += [b.attn.qkv.weight[:2 * C]]
    std = lambda ws: float(torch.cat([w.detach().reshape(-1) for w in ws]).std())  # noqa: E731
    assert std(big) == pytest.approx(0.02 * gamma, rel=0.02)
    assert std(small) == pytest.approx(0.02, rel=0.02)
    # Pre-LN keeps GPT-2's depth-scaled output projections; init 'standard' leaves every weight at 0.02
    torch.manual_seed(0)
    pre = layerlab.build_model(cfg(layers=L, width=C, heads=4))
    assert std([b.mlp.proj.weight for b in pre.blocks]) == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02)
    torch.manual_seed(0)
    flat = layerlab.build_model(cfg(layers=L, width=C, heads=4, placement="sandwich", init="standard"))
    assert std([b.mlp.proj.weight for b in flat.blocks]) == pytest.approx(0.02, rel=0.02)


# ------------------------------------------------------------------ every design: HF format, generate, analyze

DESIGNS = {
    "parallel": dict(block="parallel"),
    "parallel2-peri": dict(block="parallel2", placement="peri"),
    "denseformer": dict(wiring="denseformer"),
    "denseformer-dilated": dict(wiring="denseformer", denseformer_dilation=2, denseformer_period=2, layers=4),
    "one-wide-ffn": dict(ffn_sharing="all", ffn_mult=2.0),
    "magneto": dict(placement="sandwich"),
    "recursive": dict(layers=4, loops=2, loop_lora_rank=2),  # 2 unique blocks looped twice, per-block LoRA
    "recursive-parallel-rope": dict(layers=4, loops=2, loop_lora_rank=1, block="parallel", positions="rope"),
    "recursive-denseformer": dict(layers=6, loops=3, wiring="denseformer"),
    "moe": dict(mlp="moe", experts=4, top_k=2),
    "mod": dict(mod_capacity=0.5, layers=4),  # Mixture-of-Depths: blocks 1 and 3 routed by the predictor
    "mod-parallel-rope": dict(mod_capacity=0.125, block="parallel", positions="rope", layers=4),
    # MSG's masks mid-ramp on a grown model (layerlab.grow): block 2 new, residual coordinates >= 16 and neurons
    # >= 64 new, all at mask 0.4
    "msg": dict(msg_blocks=[2], msg_width=16, msg_hidden=64, msg_mask=0.4),
    "msg-peri-rmsnorm-rope": dict(msg_blocks=[1], msg_width=16, msg_hidden=64, msg_mask=0.7, norm="rmsnorm",
                                  placement="peri", positions="rope"),
}


def greedy_loop(model, x, new):
    """Greedy decoding by full forwards, no cache."""
    with torch.no_grad():
        for _ in range(new):
            nxt = model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
    return x


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_design_round_trips_generates_and_is_analyzed(design, tmp_path, monkeypatch):
    model = build(**DESIGNS[design], scale=0.1)
    save_model(model, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.cfg == model.cfg
    x = ids(B=1, T=6)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
        out = back.generate(x, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(out, greedy_loop(back, x, 8))

    v = view(back)
    assert v.form == BLOCKS[back.cfg.block].form
    with torch.no_grad(), v.trace() as t:
        v.forward(ids())
    for i in range(back.cfg.layers):
        # the stream the adapter sees is the one the next block reads (DenseFormer: the weighted average)
        if i + 1 < back.cfg.layers:
            torch.testing.assert_close(t.resid_out[i], t.resid_in[i + 1], rtol=0, atol=0)
        if v.form == "parallel":  # mid is resid_in + attn, and resid_out = mid + mlp
            torch.testing.assert_close(t.mid[i], t.resid_in[i] + t.attn[i])
            torch.testing.assert_close(t.resid_out[i], t.mid[i] + t.mlp[i], rtol=1e-5, atol=1e-5)
    measure_fake_ids(monkeypatch)
    entry = analyze_model(back, FakeTok(V), name="m", path=None, tokens=50, seq_len=16, batch_size=4,
                          removal_tokens=50, spectra=False, intrinsic=False, progress=False)
    # the layer removal runs each block again on other streams: the model's own forward is unchanged by it
    assert entry["fidelity"]["passed"] is True and entry["fidelity"]["max_rel_hidden_diff"] <= 1e-6
    assert all(math.isfinite(row["removal_loss_delta"]) for row in entry["layers"])


# ------------------------------------------------------------------ every norm x each placement they combine with


def _block_ref(b, x, form):
    """One block of any pre-like placement as its definition reads, from its modules."""
    s = b.scale
    n2 = b.ln1 if b.ln2 is None else b.ln2
    if b.placement == "peri":
        a = b.ln1_out(b.attn(b.ln1(x)))
        return x + a + b.ln2_out(b.mlp(n2(x)))
    return x + b.attn(b.ln1(x) * s) + b.mlp(n2(x) * s)


def _pairs(form):
    return [(n, p) for n in NORMS for p in block_form_placements(form)]


@pytest.mark.parametrize("norm,placement", _pairs("parallel"))
@pytest.mark.parametrize("form", ["parallel", "parallel2"])
def test_parallel_block_with_every_norm_and_placement(form, norm, placement):
    model = build(layers=2, width=16, context=16, norm=norm, placement=placement, block=form, scale=0.02)
    x = model.embed(ids(B=2, T=5)) + model.pos(torch.arange(5))
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1](x), _block_ref(model.blocks[1], x, form), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,placement", [(n, p) for n in NORMS for p in PLACEMENTS])
def test_denseformer_and_shared_ffn_with_every_norm_and_placement(norm, placement):
    """Both combine with every placement: the logits are those of the blocks' own forwards wired by hand (Y_1 =
    X_1 without averaging at period 2, Y_2 = a0 X_0 + a1 X_1 + a2 X_2), and the two blocks run one FFN."""
    model = build(layers=2, width=16, context=16, norm=norm, placement=placement, wiring="denseformer",
                  denseformer_period=2, ffn_sharing="all", scale=0.02)
    x = ids(B=2, T=5)
    assert model.blocks[0].mlp.ffn is model.blocks[1].mlp.ffn and model.blocks[0].dwa.alpha is None
    with torch.no_grad():
        X0 = model.embed(x) + model.pos(torch.arange(5))
        X1 = model.blocks[0]._forward(model.blocks[0], X0, {"rope": None, "cache": None, "mask": None})
        X2 = model.blocks[1]._forward(model.blocks[1], X1, {"rope": None, "cache": None, "mask": None})
        a = model.blocks[1].dwa.alpha
        expect = model.lm_head(model.ln_f(a[0] * X0 + a[1] * X1 + a[2] * X2))
        torch.testing.assert_close(model(x).logits, expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ names and bad input


@pytest.mark.parametrize("norm,placement", [(n, p) for n in NORMS for p in PLACEMENTS if not PLACEMENTS[p].inner_norm])
def test_moe_with_every_norm_and_placement(norm, placement):
    """Two experts that are both copies of a dense model's MLP, top-2 (weights renormalised to sum to 1): the MoE
    model computes the dense model's logits, with every norm and each placement the MoE MLP combines with."""
    dense = build(layers=2, width=16, context=16, norm=norm, placement=placement, scale=0.02)
    moe = build(layers=2, width=16, context=16, norm=norm, placement=placement, mlp="moe", experts=2, top_k=2)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for i, b in enumerate(dense.blocks):
        p = f"blocks.{i}.mlp.experts."
        state.update({p + "fc": torch.stack([b.mlp.fc.weight] * 2), p + "proj": torch.stack([b.mlp.proj.weight] * 2),
                      p + "fc_bias": b.mlp.fc.bias.repeat(2), p + "proj_bias": b.mlp.proj.bias.repeat(2),
                      f"blocks.{i}.mlp.gate.weight": moe.blocks[i].mlp.gate.weight})
    moe.load_state_dict(state, strict=True)
    x = ids(B=2, T=5)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,placement", [(n, p) for n in NORMS for p in PLACEMENTS])
def test_recursive_with_every_norm_and_placement(norm, placement):
    """Four blocks looped as 2 x 2 at LoRA rank 0 equal a plain model whose blocks i and i + 2 were given the same
    linear weights by hand (norms and biases per block), with every norm and placement."""
    rec = build(layers=4, width=16, context=16, norm=norm, placement=placement, loops=2)
    plain = build(layers=4, width=16, context=16, norm=norm, placement=placement)
    have = rec.state_dict()
    state = {}
    for name in plain.state_dict():
        if name in have:
            state[name] = have[name]
        else:  # a shared linear's weight: block i runs unique block i % 2's, stored once in loop_shared
            i, rest = name.split(".", 2)[1:]
            state[name] = have[f"loop_shared.{int(i) % 2}.{rest}"]
    plain.load_state_dict(state, strict=True)
    assert not torch.equal(plain.blocks[0].attn.qkv.weight, plain.blocks[1].attn.qkv.weight)
    x = ids(B=2, T=5)
    with torch.no_grad():
        torch.testing.assert_close(rec(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm,placement", [(n, p) for n in NORMS for p in block_placement_names()
                                            if PLACEMENTS[p].residual_sublayers])
def test_mod_with_every_norm_and_placement(norm, placement):
    """A routed block in training (capacity 0.5) equals the block's own forward run by hand on the top half of each
    row's tokens by router score (in position order), the update scaled by the score, the others passed on; with
    every norm and each placement Mixture-of-Depths routes (its sublayers add to the stream)."""
    model = build(layers=2, width=16, context=16, norm=norm, placement=placement, mod_capacity=0.5).train()
    b = model.blocks[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 16, generator=g)
    buffers = {k: v.clone() for k, v in b.state_dict().items()}  # batch norms move their statistics in training
    with torch.no_grad():
        got = b(x)
        b.load_state_dict(buffers)
        want = x.clone()
        r = [[float((x[row, t] * b.mod_router.router.weight[0]).sum()) for t in range(6)] for row in range(2)]
        tops = [sorted(sorted(range(6), key=lambda t, row=row: -r[row][t])[:3]) for row in range(2)]
        xs = torch.stack([x[row, top] for row, top in enumerate(tops)])  # both rows at once: batch norms' statistics
        out = b._forward(b, xs, {"rope": None, "cache": None, "mask": None})
        for row, top in enumerate(tops):
            for n, t in enumerate(top):
                want[row, t] = xs[row, n] + r[row][t] * (out[row, n] - xs[row, n])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, b._forward(b, x, {"rope": None, "cache": None, "mask": None}), atol=1e-3)


def test_designs_are_fields_on_the_command_line_and_in_yaml(tmp_path):
    extra = parse_extra(["--block", "parallel2", "--wiring=denseformer", "--denseformer-period", "2",
                         "--ffn-sharing", "all", "--ffn-mult", "1.5"])
    over = check_fields(extra, from_text=True, source="command line")
    spec = resolve("tiny", None, over)
    m = spec.model
    assert (m.block, m.wiring, m.denseformer_period, m.ffn_sharing, m.ffn_mult) == ("parallel2", "denseformer", 2,
                                                                                   "all", 1.5)
    path = tmp_path / "c.yaml"
    path.write_text("block: parallel\nplacement: lns\nwiring: denseformer\ndenseformer_dilation: 3\n")
    m = resolve(None, path, {}).model
    assert (m.block, m.placement, m.denseformer_dilation) == ("parallel", "lns", 3)


@pytest.mark.parametrize("kw,message", [
    (dict(block="paralel"), "unknown block form 'paralel'"),
    (dict(wiring="dense"), "unknown wiring 'dense'"),
    (dict(ffn_sharing="every"), "unknown FFN sharing 'every'"),
    (dict(block="parallel", placement="post"), "block 'parallel' does not combine with placement 'post'"),
    (dict(block="parallel2", placement="mix"), "block 'parallel2' does not combine with placement 'mix'"),
    (dict(block="parallel", placement="pre,post,pre"), "block 'parallel' does not combine with placement 'post'"),
    (dict(ffn_mult=0), "ffn_mult must be positive"),
    (dict(ffn_mult=-1.0), "ffn_mult must be positive"),
    (dict(wiring="denseformer", denseformer_period=0), "denseformer_period must be at least 1"),
    (dict(denseformer_dilation=0), "denseformer_dilation must be at least 1"),
])
def test_bad_designs_are_one_line_errors(kw, message):
    with pytest.raises(LayerlabError, match=message) as e:
        cfg(**kw)
    assert "\n" not in str(e.value)


def test_parallel_combines_with_the_residual_placements_only():
    assert block_form_placements("parallel") == [p for p in block_placement_names() if p != "post"]
    assert block_form_placements("sequential") == block_placement_names()


def test_denseformer_layer_removal_streams_follow_the_stated_rule():
    """analyze's layer removal re-runs the later blocks on a skip-stream: each average takes that stream's own block
    output for its own term and the full model's earlier outputs for the others (model.DepthWeightedAverage)."""
    from layerlab.analysis.stats import RemovalSums

    model, x = build(layers=3, wiring="denseformer", scale=0.1), ids()
    v = view(model)
    rs = RemovalSums(3, limit=10**9, causal=True)
    with torch.no_grad():
        with rs.streams(v):
            v.forward(x)
        streams = rs._streams  # s_i: the stream after the last block with block i removed
        X = [model.embed(x) + model.pos(torch.arange(x.shape[1]))]  # the full model: X_k
        Y = [X[0]]  # and the averages Y_k, the stream entering block k
        for b in model.blocks:
            X.append(ref_block(b, Y[-1], "sequential"))
            Y.append(sum(b.dwa.alpha[j] * X[j] for j in range(len(X))))
        for i in range(3):
            s = Y_i = Y[i]  # block i removed: its input passes on
            for k in range(i + 1, 3):
                out, a = ref_block(model.blocks[k], s, "sequential"), model.blocks[k].dwa.alpha
                s = a[-1] * out + sum(a[j] * X[j] for j in range(k + 1))
            torch.testing.assert_close(streams[i], s, rtol=1e-5, atol=1e-5, msg=f"block {i} removed")
            assert not torch.allclose(Y_i, s) or i == 2


@pytest.mark.parametrize("design", [{"block": "parallel"}, {"wiring": "denseformer"}, {"ffn_sharing": "all"},
                                    {"mod_capacity": 0.5}, {"msg_width": 16, "msg_hidden": 64}, {"mlp": "moe"}])
def test_compressors_and_export_refuse_designs_they_do_not_handle(design, tmp_path):
    """prune, quantize, convert and export edit blocks as the plain design lays them out; another design is one line
    before anything is written (a pruned DenseFormer's averages, one shared FFN at per-block widths, ...)."""
    from layerlab.compress.convert import convert
    from layerlab.compress.prune import prune
    from layerlab.compress.quantize import quantize
    from layerlab.export import export

    d = save_model(build(**design), tmp_path / "m")
    name, value = next(iter(design.items()))
    runs = {"prune": lambda out: prune(d, remove=1, out=out), "quantize": lambda out: quantize(d, bits=4, out=out),
            "convert": lambda out: convert(d, to="rmsnorm", out=out), "export": lambda out: export(d, out=out)}
    for command, run in runs.items():
        with pytest.raises(LayerlabError, match=f"{command} handles layerlab models of the plain design.*"
                                                f"{name}={value!r}"):
            run(tmp_path / command)
        assert not (tmp_path / command).exists()


def test_interventions_skip_a_denseformer_and_replay_is_refused():
    from layerlab.analysis.interventions import Interventions

    model = build(wiring="denseformer")
    assert "cannot be reordered" in Interventions().skip_reason(view(model))
    assert Interventions().skip_reason(view(build())) is None
    with pytest.raises(LayerlabError, match="DenseFormer"), view(model).skip(1, replay=object()):
        pass
