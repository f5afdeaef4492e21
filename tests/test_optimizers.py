"""Layer-wise optimizers on tiny models: each rule's definition, weight-decay groups, state for exact resume."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg

from layerlab.config import TrainConfig
from layerlab.errors import LayerlabError
from layerlab.model import build_model
from layerlab.recipe import resolve
from layerlab.train.optimizers import (
    OPTIMIZERS,
    LAMBOptimizer,
    LARSOptimizer,
    alpha_to_lr_scale,
    block_alphas,
    build_optimizer,
    describe_groups,
    param_groups,
)

# every rule acts within a few steps: LLR recomputes every 2 steps with a 3-step ramp, LISA redraws every 2
FAST = dict(lr=1e-2, steps=8, llr_every=2, llr_ramp=3, llr_until=1.0, lisa_every=2, lisa_layers=1)
RULE_KEY = {"lamb": "trust_ratio_block", "lars": "trust_ratio_block", "llr": "alpha_block",
            "noise": "grad_noise_block", "lisa": "lisa_active"}


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw))


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (4, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _train(opt, model, steps: range, tc: TrainConfig) -> list[float]:
    """The loop's order of calls, on one fixed batch; returns the losses."""
    x, y = _batch()
    losses = []
    for step in steps:
        opt.begin_step(step)
        for group in opt.param_groups:
            group["lr"] = tc.lr * group["lr_scale"]
        logits = model(x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss_and_logs_per_block(name):
    model, tc = _model(), TrainConfig(optimizer=name, **FAST)
    opt = build_optimizer(model, tc)
    losses = _train(opt, model, range(8), tc)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    tel = opt.telemetry()
    assert len(tel["lr_scale_block"]) == 3 and all(s >= 0 for s in tel["lr_scale_block"])
    if name in RULE_KEY:
        values = tel[RULE_KEY[name]]
        assert len(values) == (tc.lisa.layers if name == "lisa" else 3)
        assert all(v is not None and math.isfinite(v) for v in values)
    assert opt.describe()["name"] == name


def test_lamb_trust_ratio_is_weight_norm_over_update_norm():
    g = torch.Generator().manual_seed(1)
    w0, grad = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    w = torch.nn.Parameter(w0.clone())
    opt = LAMBOptimizer([{"params": [w], "weight_decay": 0.1}], lr=0.1, betas=(0.9, 0.999), eps=1e-6)
    w.grad = grad.clone()
    opt.step()
    update = grad / (grad.abs() + 1e-6) + 0.1 * w0  # first step: bias-corrected m = g, v = g^2
    ratio = w0.norm() / update.norm()
    torch.testing.assert_close(opt.state[w]["trust_ratio"], ratio)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * ratio * update)


def test_lars_trust_ratio_is_weight_norm_over_momentum_norm():
    g = torch.Generator().manual_seed(2)
    w0, grad = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    w = torch.nn.Parameter(w0.clone())
    opt = LARSOptimizer([{"params": [w], "weight_decay": 0.01}], lr=0.05, momentum=0.9)
    w.grad = grad.clone()
    opt.step()
    m = 0.1 * (grad + 0.01 * w0)
    ratio = w0.norm() / m.norm()
    torch.testing.assert_close(opt.state[w]["trust_ratio"], ratio)
    torch.testing.assert_close(w.detach(), w0 - 0.05 * ratio * m)


def test_trust_ratio_is_one_for_zero_weights():
    b = torch.nn.Parameter(torch.zeros(4))
    opt = LAMBOptimizer([b], lr=0.1)
    b.grad = torch.ones(4)
    opt.step()
    assert float(opt.state[b]["trust_ratio"]) == 1.0


def test_alpha_map_is_monotone_and_reaches_both_bounds():
    alphas = [3.1, 2.2, 5.0, 4.4, 2.9, 3.8]
    scales = alpha_to_lr_scale(alphas, 0.5, 2.5)
    pairs = sorted(zip(alphas, scales))
    assert all(s1 < s2 for (_, s1), (_, s2) in zip(pairs, pairs[1:])), "larger alpha, larger LR"
    assert scales[alphas.index(2.2)] == 0.5 and scales[alphas.index(5.0)] == 2.5
    assert alpha_to_lr_scale([2.0, 3.0, 4.0], 1.0, 3.0) == [1.0, 2.0, 3.0]  # linear by value
    assert alpha_to_lr_scale([4.0, 4.0], 1.0, 3.0) == [2.0, 2.0]
    assert alpha_to_lr_scale([float("nan"), 2.0, 3.0], 1.0, 3.0) == [1.0, 1.0, 3.0]


def test_llr_sets_block_multipliers_from_alpha_with_a_ramp():
    model = _model()
    tc = TrainConfig(optimizer="llr", llr_every=5, llr_ramp=4, llr_s_min=0.5, llr_s_max=2.0)
    opt = build_optimizer(model, tc)
    target = alpha_to_lr_scale(block_alphas(model), 0.5, 2.0)
    for step in range(4):
        opt.begin_step(step)
        expect = [1 + (t - 1) * (step + 1) / 4 for t in target]
        assert opt.block_lr_scales() == pytest.approx(expect)
    scales = {(g["block"], g["kind"]): g["lr_scale"] for g in opt.param_groups}
    assert scales[(None, "decay")] == 2.0  # embeddings and head at s_max, as in the public code
    assert all(v == 1.0 for (_, kind), v in scales.items() if kind.endswith("norm"))
    assert opt.telemetry()["alpha_block"] == pytest.approx(block_alphas(model))


def test_lisa_freezes_exactly_the_unsampled_blocks():
    model = _model(layers=4)
    tc = TrainConfig(optimizer="lisa", lisa_layers=2, lisa_every=2, seed=3)
    opt = build_optimizer(model, tc)
    x, y = _batch()
    draws = []
    for step in range(4):
        opt.begin_step(step)
        active = opt.active
        assert len(active) == 2 and active == opt.sample(step // 2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        logits = model(x).logits
        F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
        for i, block in enumerate(model.blocks):
            grads = [p.grad for p in block.parameters()]
            assert all(g is not None for g in grads) if i in active else all(g is None for g in grads)
        opt.step()
        for n, p in model.named_parameters():
            block = int(n.split(".")[1]) if n.startswith("blocks.") else None
            changed = not torch.equal(before[n], p.detach())
            assert changed == (block is None or block in active), n
        assert model.embed.weight.requires_grad and model.ln_f.weight.requires_grad
        opt.zero_grad()
        draws.append(tuple(active))
    assert opt.telemetry()["lr_scale_block"] == [1.0 if i in opt.active else 0.0 for i in range(4)]
    again = build_optimizer(_model(layers=4), tc)
    assert [tuple(again.sample(k)) for k in range(2)] == draws[::2], "draws are seeded by the run"


def test_lisa_needs_enough_blocks():
    with pytest.raises(LayerlabError, match="lisa_layers is 5, but the model has 3 blocks"):
        build_optimizer(_model(), TrainConfig(optimizer="lisa", lisa_layers=5))


def test_weight_decay_groups_by_kind_and_block():
    model = _model(placement=["pre", "peri", "sandwich"])
    tc = TrainConfig(weight_decay=0.1, input_norm_decay=0.05, output_norm_decay=0.0)
    groups = param_groups(model, tc)
    seen = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen
            seen[id(p)] = (g["kind"], g["weight_decay"], g["block"])
    where = {n: seen[id(p)] for n, p in model.named_parameters()}
    assert len(where) == len(seen)
    for n, (kind, wd, block) in where.items():
        assert block == (int(n.split(".")[1]) if n.startswith("blocks.") else None), n
        if n.endswith(".bias"):  # biases and norm shifts
            assert (kind, wd) == ("no_decay", 0.0), n
        elif any(f"{k}.weight" in n for k in ("ln1_out", "ln2_out", "ln_f")):
            assert (kind, wd) == ("output_norm", 0.0), n
        elif any(f"{k}.weight" in n for k in ("ln1", "ln2", "inner_norm")):
            assert (kind, wd) == ("input_norm", 0.05), n
        else:
            assert n.endswith(".weight") and model.get_parameter(n).dim() == 2 and (kind, wd) == ("decay", 0.1), n
    kinds = describe_groups(model, groups)
    assert {"blocks.*.ln1_out.weight", "ln_f.weight"} <= set(kinds["output_norm"]["params"])
    assert "blocks.*.attn.inner_norm.weight" in kinds["input_norm"]["params"]


def test_norms_apart_puts_norm_shifts_in_groups_of_their_own():
    """llr and noise leave norms at the base LR: their groups never mix a norm's shift with a linear's bias. The
    default layout keeps one group per (block, kind), the layout optimizer states were saved in before."""
    model = _model(placement=["pre", "peri", "sandwich"])
    tc = TrainConfig(input_norm_decay=0.05)
    is_norm = {id(p): any(f".{k}." in f".{n}" for k in ("ln1", "ln2", "ln1_out", "ln2_out", "inner_norm", "ln_f"))
               for n, p in model.named_parameters()}
    plain, apart = param_groups(model, tc), param_groups(model, tc, norms_apart=True)
    assert len({(g["block"], g["kind"]) for g in plain}) == len(plain)
    assert any(len({is_norm[id(p)] for p in g["params"]}) == 2 for g in plain)  # ln1.bias with attn.qkv.bias
    for g in apart:
        assert {is_norm[id(p)] for p in g["params"]} == {g["norm"]}, (g["block"], g["kind"])
    settings = {id(p): (g["kind"], g["weight_decay"], g["block"]) for g in plain for p in g["params"]}
    assert settings == {id(p): (g["kind"], g["weight_decay"], g["block"]) for g in apart for p in g["params"]}
    assert [build_optimizer(model, TrainConfig(optimizer=o)).norms_apart for o in ("adamw", "llr", "noise")] == [
        False, True, True]


def test_adamw_default_matches_plain_adamw_over_the_old_two_groups():
    """Regrouping per block changes nothing for AdamW: bit for bit the optimizer the loop used before."""
    a, b = _model(), _model()
    tc = TrainConfig(lr=1e-2)
    ours = build_optimizer(a, tc)
    params = list(b.parameters())
    plain = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=tc.lr, betas=(tc.beta1, tc.beta2))
    plain.begin_step = lambda step: None
    plain.zero_grad = lambda zero=plain.zero_grad: zero(set_to_none=True)
    for group in plain.param_groups:
        group["lr_scale"] = 1.0
    _train(ours, a, range(3), tc)
    _train(plain, b, range(3), tc)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_saved_state_resumes_bit_identically(name):
    tc = TrainConfig(optimizer=name, **FAST)
    full = _model()
    _train(build_optimizer(full, tc), full, range(6), tc)

    first = _model()
    opt = build_optimizer(first, tc)
    _train(opt, first, range(3), tc)  # LLR is mid-ramp and LISA mid-period here
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    weights = {k: v.clone() for k, v in first.state_dict().items()}

    resumed = _model(seed=1)  # other initial weights: all must come from the checkpoint
    resumed.load_state_dict(weights)
    opt = build_optimizer(resumed, tc)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    _train(opt, resumed, range(3, 6), tc)
    for (n, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_unknown_optimizer_lists_the_valid_ones():
    expected = r"^unknown optimizer 'adamx'; valid: adamw, lamb, lars, lisa, llr, noise; did you mean 'adamw'\?$"
    with pytest.raises(LayerlabError, match=expected):
        resolve("debug", overrides={"optimizer": "adamx"})
    with pytest.raises(LayerlabError, match="need 0 < llr_s_min <= llr_s_max"):
        TrainConfig(llr_s_min=2.0, llr_s_max=1.0)


def test_cli_takes_optimizer_fields():
    from layerlab.cli import parse_extra
    from layerlab.config import check_fields

    fields = check_fields(parse_extra(["--optimizer", "lamb", "--lisa-layers", "2", "--llr-s-max", "4"]),
                          from_text=True)
    assert fields == {"optimizer": "lamb", "lisa_layers": 2, "llr_s_max": 4.0}
