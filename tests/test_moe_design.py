"""The mixture-of-experts MLP (``mlp: moe``, layerlab.moe) and the MLP registry.

Every check compares with a computation written here: a token-by-token, expert-by-expert loop over the stored
weights (in float64 Python), the Switch balancing loss and its gradient in closed form, hand counts of the router's
choices, closed-form parameter counts. The round trip, generate and analyze are in tests/test_designs.py (DESIGNS)."""

import json
import math

import pytest
import torch
from conftest import perturb, save_model
from transformers import AutoModelForCausalLM

import layerlab
from layerlab.adapters import router_load, router_stats, view
from layerlab.cli import parse_extra
from layerlab.config import ModelConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.model import design_note, num_params, refuse_design
from layerlab.recipe import resolve
from layerlab.registry import MLPS
from layerlab.train import telemetry

V = 64


def cfg(**kw) -> ModelConfig:
    base = dict(layers=2, width=16, heads=2, context=32, vocab_size=V, mlp="moe", experts=4, top_k=2)
    return ModelConfig(**{**base, **kw})


def build(seed: int = 0, scale: float = 0.1, **kw):
    torch.manual_seed(seed)
    return perturb(layerlab.build_model(cfg(**kw)), scale=scale, seed=seed).eval()


def ids(B=2, T=10, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the reference: one token, one expert at a time


def _route(gate_w, x, k):
    """Softmax over the experts of one token's logits, the k most probable, their weights (renormalised for k > 1,
    the probability itself for k = 1), all in Python floats."""
    z = [sum(float(a) * float(b) for a, b in zip(row, x, strict=True)) for row in gate_w]
    top = max(z)
    ex = [math.exp(v - top) for v in z]
    p = [v / sum(ex) for v in ex]
    chosen = sorted(range(len(p)), key=lambda e: -p[e])[:k]
    w = [p[e] for e in chosen]
    if k > 1:
        w = [v / sum(w) for v in w]
    return p, chosen, w


def ref_moe(mlp, h, k, gated, coef):
    """The MoE output of rows h (N, C) and its balancing loss coef * E * sum_e f_e P_e (Switch, Eq. 4), written
    out token by token and expert by expert from the stored weights."""
    gate_w = mlp.gate.weight.detach().double()
    E = gate_w.shape[0]
    fc, proj = mlp.experts.fc.detach().double(), mlp.experts.proj.detach().double()
    b1 = mlp.experts.fc_bias.detach().double().view(E, -1)
    b2 = mlp.experts.proj_bias.detach().double().view(E, -1)
    H = proj.shape[-1]
    rows = h.detach().double().reshape(-1, h.shape[-1])
    out, counts, psum = [], [0] * E, [0.0] * E
    for x in rows:
        p, chosen, w = _route(gate_w, x, k)
        y = torch.zeros(x.shape[0], dtype=torch.float64)
        for e, we in zip(chosen, w, strict=True):
            a = fc[e] @ x + b1[e]
            if gated:  # SwiGLU: silu(gate) * up, gate rows first
                g, u = a[:H], a[H:]
                a = g / (1 + torch.exp(-g)) * u
            else:  # GELU, tanh approximation
                a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
            y = y + we * (proj[e] @ a + b2[e])
        out.append(y)
        for e in chosen:
            counts[e] += 1
        psum = [s + pe for s, pe in zip(psum, p, strict=True)]
    N = len(rows)
    aux = coef * E * sum(counts[e] / (N * k) * psum[e] / N for e in range(E))
    return torch.stack(out).view(h.shape), aux, counts


@pytest.mark.parametrize("k,expert_mlp", [(1, "gelu"), (2, "gelu"), (2, "swiglu"), (4, "gelu")])
def test_moe_equals_a_token_by_token_loop_over_experts(k, expert_mlp):
    model = build(top_k=k, expert_mlp=expert_mlp, router_aux_coef=0.03)
    mlp = model.blocks[1].mlp
    h = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(5))
    expect, aux, _ = ref_moe(mlp, h, k, expert_mlp == "swiglu", 0.03)
    mlp.train()
    got = mlp(h)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)
    assert mlp.aux_loss.item() == pytest.approx(aux, rel=1e-5)


def test_the_model_sums_each_blocks_balancing_loss_in_training_only():
    model = build(layers=3, top_k=1)
    inputs = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    x = ids()
    model.train()
    out = model(x, labels=x)
    expect = sum(ref_moe(b.mlp, inputs[i], 1, False, 0.01)[1] for i, b in enumerate(model.blocks))
    assert out.aux_loss.item() == pytest.approx(expect, rel=1e-5)
    model.eval()
    assert model(x).aux_loss is None
    for h in hooks:
        h.remove()


def test_balancing_loss_gradient_reaches_the_router_as_its_closed_form():
    """d aux / d W_r = coef E / N sum_t (p_t * (f - p_t . f)) x_t^T: only P carries a gradient, so the experts
    get none from it; and at k = 1 the task loss reaches the router too (the weight is p, not a renormalised 1)."""
    model = build(top_k=1, router_aux_coef=0.5)
    mlp = model.blocks[0].mlp.train()
    h = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    mlp(h)
    mlp.aux_loss.backward()
    rows = h.reshape(-1, 16).double()
    W = mlp.gate.weight.detach().double()
    p = (rows @ W.T).softmax(-1)  # (N, E)
    f = torch.bincount(p.argmax(-1), minlength=4).double() / rows.shape[0]
    dz = 0.5 * 4 / rows.shape[0] * p * (f - (p * f).sum(-1, keepdim=True))
    torch.testing.assert_close(mlp.gate.weight.grad.double(), dz.T @ rows, rtol=1e-5, atol=1e-8)
    assert all(q.grad is None for q in mlp.experts.parameters())
    model.zero_grad()
    x = ids()
    model(x, labels=x).loss.backward()  # renormalising the one weight to 1 would leave ~1e-8 of rounding here
    assert float(model.blocks[0].mlp.gate.weight.grad.abs().sum()) > 1e-3


def test_equal_active_parameters_at_top_1():
    """Each expert is the dense MLP's size: the total is the dense model plus E - 1 MLPs and the routers (E x C each)
    per block; a token runs the dense model's parameters plus the router."""
    L, C, E = 2, 16, 4
    dense = layerlab.build_model(ModelConfig(layers=L, width=C, heads=2, context=32, vocab_size=V))
    mlp_params = (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert num_params(build(experts=E, top_k=1)) == num_params(dense) + L * ((E - 1) * mlp_params + E * C)
    swiglu = ModelConfig(layers=L, width=C, heads=2, context=32, vocab_size=V, mlp="swiglu")
    assert cfg(expert_mlp="swiglu").hidden == swiglu.hidden == 64  # 8/3 C rounded up to 64


# ------------------------------------------------------------------ the adapter's MoE path


def test_router_load_counts_the_routers_choices_and_removal_zeroes_the_experts():
    model, x = build(layers=2, top_k=2), ids()
    v = view(model)
    inputs = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad(), router_load(v) as counts:
        v.forward(x)
    for h in hooks:
        h.remove()
    for i, b in enumerate(model.blocks):
        _, _, hand = ref_moe(b.mlp, inputs[i], 2, False, 0.01)
        assert counts[i].tolist() == hand
        share = [c / sum(hand) for c in hand]
        stats = router_stats(counts[i])
        assert stats["router_entropy"] == pytest.approx(-sum(s * math.log(s) for s in share if s > 0))
        assert stats["router_max_share"] == pytest.approx(max(share))
    # removing block 1's MLP (analyze's --unit mlp) is zeroing its experts: the same logits as a copy without them
    assert v.out_proj_path(1, "mlp") == "mlp.experts" and v.router(1) is model.blocks[1].mlp.gate
    with torch.no_grad(), v.skip_sublayers("mlp", 1):
        skipped = model(x).logits
    zeroed = build(layers=2, top_k=2)
    with torch.no_grad():
        for q in zeroed.blocks[1].mlp.experts.parameters():
            q.zero_()
        torch.testing.assert_close(skipped, zeroed(x).logits, rtol=0, atol=0)


def test_sections_skip_the_ffn_anatomy_in_one_line_and_run_the_others():
    from layerlab.analysis.ffn import FFNAnatomy
    from layerlab.analysis.interventions import Interventions
    from layerlab.analysis.lenses import Lenses

    v = view(build())
    assert all(v.ffn(i) is None for i in range(v.num_layers))
    reason = FFNAnatomy().skip_reason(v)
    assert "dense MLP" in reason and "\n" not in reason
    assert Interventions().skip_reason(v) is None and Lenses().skip_reason(v) is None


# ------------------------------------------------------------------ training telemetry


def test_telemetry_records_each_blocks_router_load():
    model, x = build(layers=2, top_k=1), ids()
    inputs = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad(), telemetry.residual_stats(model) as stats:
        model(x)
    for h in hooks:
        h.remove()
    record = telemetry.router_record(stats["router_counts"], list)
    for i, b in enumerate(model.blocks):
        hand = ref_moe(b.mlp, inputs[i], 1, False, 0.01)[2]
        share = [c / sum(hand) for c in hand]
        assert record["router_entropy_block"][i] == pytest.approx(-sum(s * math.log(s) for s in share if s > 0))
        assert record["router_max_share_block"][i] == pytest.approx(max(share))
    dense = layerlab.build_model(ModelConfig(layers=2, width=16, heads=2, context=32, vocab_size=V))
    with torch.no_grad(), telemetry.residual_stats(dense) as stats:
        dense(x)
    assert "router_counts" not in stats and telemetry.router_record(stats.get("router_counts"), list) == {}


def test_training_logs_router_statistics_per_block(tmp_path):
    from layerlab.train import train

    over = {"steps": 2, "eval_every": 2, "save_every": 2, "log_every": 1, "telemetry_every": 1, "mlp": "moe",
            "experts": 4, "top_k": 1}
    train(preset="debug", overrides=over, out=tmp_path / "r", progress=False, echo=lambda *a, **k: None)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "router_entropy_block" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert len(r["router_entropy_block"]) == 2 and all(0 <= e <= math.log(4) + 1e-9
                                                           for e in r["router_entropy_block"])
        assert all(0.25 - 1e-9 <= s <= 1 for s in r["router_max_share_block"])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert (back.cfg.mlp, back.cfg.experts, back.cfg.top_k) == ("moe", 4, 1)


# ------------------------------------------------------------------ names, checkpoints and bad input


def test_mlp_registry_and_the_fields_on_the_command_line_and_in_yaml(tmp_path):
    assert sorted(MLPS) == ["gelu", "moe", "swiglu"]
    extra = parse_extra(["--mlp", "moe", "--experts", "4", "--top-k", "1", "--expert-mlp", "swiglu",
                         "--router-aux-coef", "0.02"])
    m = resolve("tiny", None, check_fields(extra, from_text=True, source="command line")).model
    assert (m.mlp, m.experts, m.top_k, m.expert_mlp, m.router_aux_coef) == ("moe", 4, 1, "swiglu", 0.02)
    path = tmp_path / "c.yaml"
    path.write_text("mlp: moe\nexperts: 3\n")
    m = resolve(None, path, {}).model
    assert (m.experts, m.top_k, m.expert_mlp, m.router_aux_coef) == (3, 2, "gelu", 0.01)  # Mixtral, Switch
    assert ModelConfig().experts is None and ModelConfig(mlp="swiglu").top_k is None


def test_top_k_survives_the_hugging_face_config(tmp_path):
    """transformers drops a config's ``top_k`` (a generation parameter): it is stored as moe_top_k."""
    model = build(top_k=3)
    save_model(model, tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["moe_top_k"] == 3 and "top_k" not in stored
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.cfg == model.cfg and back.blocks[0].mlp.gate.top_k == 3


@pytest.mark.parametrize("kw,message", [
    (dict(mlp="gelu", experts=4, top_k=None), "experts=4 set for mlp 'gelu'; the expert fields are for mlp 'moe'"),
    (dict(mlp="swiglu", experts=None, top_k=1), "top_k=1 set for mlp 'swiglu'"),
    (dict(experts=1, top_k=1), "mlp 'moe' needs at least 2 experts, got 1"),
    (dict(experts=4, top_k=5), r"top_k must be in 1..4 \(the experts\), got 5"),
    (dict(top_k=0), r"top_k must be in 1..4 \(the experts\), got 0"),
    (dict(router_aux_coef=-0.1), "router_aux_coef must be non-negative"),
    (dict(ffn_sharing="all"), "mlp 'moe' does not combine with ffn_sharing 'all'"),
    (dict(placement="sandwich"), "mlp 'moe' does not combine with placement 'sandwich'"),
    (dict(mlp="mow"), "unknown mlp 'mow'; valid: gelu, moe, swiglu; did you mean 'moe'"),
])
def test_bad_moe_settings_are_one_line_errors(kw, message):
    with pytest.raises(LayerlabError, match=message) as e:
        cfg(**kw)
    assert "\n" not in str(e.value)


def test_dense_mlps_are_plain_and_moe_is_refused_in_one_line():
    for mlp in ("gelu", "swiglu"):
        model = layerlab.build_model(ModelConfig(layers=2, width=16, heads=2, context=32, vocab_size=V, mlp=mlp))
        refuse_design(model, "prune")  # no error
        assert design_note(model.cfg) == ""
    model = build()
    assert design_note(model.cfg) == ", mlp moe"
    with pytest.raises(LayerlabError, match=r"^quantize handles layerlab models of the plain design .*; this one "
                                            r"has mlp='moe'$"):
        refuse_design(model, "quantize")
