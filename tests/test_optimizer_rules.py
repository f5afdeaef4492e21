"""Each layer-wise rule against a hand computation: which parameters it scales and by how much.

LAMB and LARS steps against a reference written here; LLR's alpha -> LR map on blocks of known alpha, from weights
with an exact power-law spectrum; the noise rule's estimate on gradients of known signal and noise; LISA's choice
of the parameters it trains and of those it leaves alone.
"""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, tiny_cfg

from layerlab.config import TrainConfig, check_fields
from layerlab.errors import LayerlabError
from layerlab.model import build_model
from layerlab.train import optimizers
from layerlab.train.optimizers import block_alphas, build_optimizer

# the norms of the placements used here, written out by hand: pre (ln1, ln2), peri (+ ln1_out, ln2_out),
# sandwich (+ inner_norm in attention and MLP), and the final ln_f
NORM = re.compile(r"(^|\.)(ln1|ln2|ln1_out|ln2_out|inner_norm|ln_f)\.(weight|bias)$")
INPUT_NORM_GAIN = re.compile(r"\.(ln1|ln2|inner_norm)\.weight$")
PLACEMENTS = ["pre", "peri", "sandwich"]


def _model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw))


def _block(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


def _group_of(opt) -> dict[int, dict]:
    return {id(p): g for g in opt.param_groups for p in g["params"]}


def _set_lrs(opt, lr: float) -> None:
    """What the training loop does before each step."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]


# ---------------------------------------------------------------------------------------------------- LAMB, LARS
def _reference_steps(name: str, model, grads: list[dict[str, torch.Tensor]], lr: float, scope: str, tc):
    """LAMB (You et al. 2020, Algorithm 2) and LARS (Algorithm 1) written out per tensor, from the initial weights.

    Weight decay: matrices ``weight_decay``, input-norm gains ``input_norm_decay``, everything else 0. Trust ratio
    ``||w|| / ||u||`` on every tensor with ``scope`` "all", else on matrices only (dim >= 2).
    """
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(v) for n, v in w.items()}
    v2 = {n: torch.zeros_like(v) for n, v in w.items()}
    b1, b2 = tc.beta1, tc.beta2
    for t, grad in enumerate(grads, start=1):
        for n in w:
            g = grad[n]
            wd = tc.weight_decay if w[n].dim() >= 2 else tc.input_norm_decay if INPUT_NORM_GAIN.search(n) else 0.0
            if name == "lamb":
                m[n] = b1 * m[n] + (1 - b1) * g
                v2[n] = b2 * v2[n] + (1 - b2) * g * g
                u = (m[n] / (1 - b1**t)) / ((v2[n] / (1 - b2**t)).sqrt() + 1e-6) + wd * w[n]
            else:
                m[n] = b1 * m[n] + (1 - b1) * (g + wd * w[n])
                u = m[n]
            ratio = 1.0
            if scope == "all" or w[n].dim() >= 2:
                wn, un = float(w[n].norm()), float(u.norm())
                ratio = wn / un if wn > 0 and un > 0 else 1.0
            w[n] = w[n] - lr * ratio * u
    return w


@pytest.mark.parametrize("scope", ["matrices", "all"])
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_trust_ratio_exempts_biases_and_norms_by_default(name, scope):
    """Biases and norm gains take the plain Adam / momentum step; matrices (and embeddings) the trust ratio.

    Every parameter is moved off its init first, so that no bias is zero (a zero weight has ratio 1 anyway).
    """
    model = perturb(_model(placement=PLACEMENTS), scale=0.3)
    tc = TrainConfig(optimizer=name, lr=1e-2, weight_decay=0.1, input_norm_decay=0.05, beta1=0.9, beta2=0.95,
                     trust_ratio_scope=scope)
    gen = torch.Generator().manual_seed(7)
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()} for _ in range(2)]
    expect = _reference_steps(name, model, grads, tc.lr, scope, tc)
    opt = build_optimizer(model, tc)
    for grad in grads:
        for n, p in model.named_parameters():
            p.grad = grad[n].clone()
        _set_lrs(opt, tc.lr)
        opt.step()
    exempt = 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expect[n], rtol=1e-5, atol=1e-6, msg=n)
        if p.dim() < 2:
            exempt += 1
            assert ("trust_ratio" in opt.optimizer.state[p]) == (scope == "all"), n
    assert exempt > 30  # biases, norm gains and shifts of three placements


def test_trust_ratio_scope_is_a_field_of_files_and_the_command_line():
    from layerlab.cli import parse_extra

    assert TrainConfig().trust_ratio_scope == "matrices"
    assert check_fields(parse_extra(["--trust-ratio-scope", "all"]), from_text=True) == {"trust_ratio_scope": "all"}
    with pytest.raises(LayerlabError, match=re.escape("'trust_ratio_scope' in config expects 'matrices' | 'all'")):
        TrainConfig(trust_ratio_scope="vectors")


def test_a_state_without_the_new_group_keys_still_loads():
    """A state saved before groups carried ``layer_adaptation``/``norm``: the keys come from this run's config."""
    tc = TrainConfig(optimizer="lamb", lr=1e-2)
    model = perturb(_model())
    opt = build_optimizer(model, tc)
    state = opt.state_dict()
    for g in state["optimizer"]["param_groups"]:
        del g["layer_adaptation"], g["norm"]
    again = build_optimizer(model, tc)
    again.load_state_dict(state)
    assert [g["layer_adaptation"] for g in again.param_groups] == [g["kind"] == "decay" for g in again.param_groups]


# ---------------------------------------------------------------------------------------------------- LLR
def _expected_lr_scale(name: str, block_scale: list[float], s_max: float) -> float:
    """LLR by hand: a block's linears (weights and biases) take the block's scale, embeddings and head s_max,
    every norm parameter (gain or shift, in a block or the final norm) the base LR."""
    if NORM.search(name):
        return 1.0
    block = _block(name)
    return s_max if block is None else block_scale[block]


def test_llr_param_group_lrs_follow_known_alphas_and_norms_keep_the_base_lr(monkeypatch):
    alphas = [2.5, 4.0, 3.2]
    monkeypatch.setattr(optimizers, "block_alphas", lambda model: list(alphas))
    model = _model(placement=PLACEMENTS, head_bias=True, tie_embeddings=False)
    tc = TrainConfig(optimizer="llr", lr=1e-3, llr_every=5, llr_ramp=0, llr_s_min=0.5, llr_s_max=2.0)
    opt = build_optimizer(model, tc)
    opt.begin_step(0)
    _set_lrs(opt, tc.lr)
    # linear by value onto [0.5, 2.0]: 0.5 + (alpha - 2.5) / (4.0 - 2.5) * 1.5
    block_scale = [0.5 + (a - 2.5) / 1.5 * 1.5 for a in alphas]
    assert block_scale == pytest.approx([0.5, 2.0, 1.2])
    group = _group_of(opt)
    seen = set()
    for n, p in model.named_parameters():
        expect = tc.lr * _expected_lr_scale(n, block_scale, 2.0)
        assert group[id(p)]["lr"] == pytest.approx(expect, rel=1e-12), n
        seen.add(n.rsplit(".", 1)[-1] + ("/norm" if NORM.search(n) else ""))
    assert seen == {"weight", "bias", "weight/norm", "bias/norm"}
    assert opt.block_lr_scales() == pytest.approx(block_scale)


def _power_law_matrix(shape: tuple[int, int], alpha: float, gen: torch.Generator) -> torch.Tensor:
    """A matrix whose ESD (eigenvalues of W^T W) is the exact quantiles of a Pareto law p(x) ~ x^-alpha, x >= 1:
    ``x_k = (1 - q_k)^(-1 / (alpha - 1))`` at ``q_k = (k + 1/2) / K``, between random orthonormal bases."""
    out, inp = shape
    k = min(shape)
    q = (np.arange(k) + 0.5) / k
    eig = torch.from_numpy((1 - q) ** (-1 / (alpha - 1)))
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=gen, dtype=torch.float64))
    return ((u * eig.sqrt()) @ v.T).float()


def test_alpha_estimator_and_llr_targets_on_weights_of_known_alpha():
    """Every linear of block l gets an exact power-law ESD of exponent alpha_l: the fitted block alphas match them
    (the continuous MLE on quantiles of a Pareto law with xmin 1 is alpha up to ~1%), and LLR's targets are the
    hand-computed linear map of the true alphas (alpha - 1 is off by the same factor in every block, which a
    min-max map does not see)."""
    true = [2.5, 4.0, 3.2]
    model = _model(width=64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block, a in zip(model.blocks, true):
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                lin.weight.copy_(_power_law_matrix(tuple(lin.weight.shape), a, gen))
    eig = torch.linalg.svdvals(model.blocks[0].attn.qkv.weight.detach().double()) ** 2
    assert float(eig.min()) == pytest.approx((1 - 0.5 / 64) ** (-1 / 1.5), rel=1e-5)  # the ESD is as built
    assert block_alphas(model) == pytest.approx(true, rel=0.04)

    tc = TrainConfig(optimizer="llr", llr_every=5, llr_ramp=0, llr_s_min=1.0, llr_s_max=3.0)
    opt = build_optimizer(model, tc)
    opt.begin_step(0)
    expect = [1.0 + (a - 2.5) / 1.5 * 2.0 for a in true]  # [1, 3, 1.933]
    assert opt.block_lr_scales() == pytest.approx(expect, abs=0.01)


# ---------------------------------------------------------------------------------------------------- noise
def test_noise_estimate_matches_the_closed_form_on_gradients_of_known_noise():
    """Gradients ``G_l + xi_t`` with ``|G_l|^2 = 1`` and Gaussian noise of ``E|xi|^2 = sigma_l^2`` on each block's
    linears: the noise share ``sigma^2 / (|G|^2 + sigma^2)`` is known, at every step from the second. Norm
    parameters get large pure noise: the rule leaves them out of the estimate (and at the base LR)."""
    sigma2 = [0.25, 1.0, 4.0]
    expect_noise = [s / (1 + s) for s in sigma2]  # 0.2, 0.5, 0.8
    expect_r = [1 - x for x in expect_noise]
    mean_r = sum(expect_r) / 3
    model = _model(width=64)
    tc = TrainConfig(optimizer="noise", lr=1e-3, beta1=0.9, noise_s_min=0.25, noise_s_max=4.0)
    opt = build_optimizer(model, tc)
    gen = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    tuned = [[n for n in params if _block(n) == b and not NORM.search(n)] for b in range(3)]
    dims = [sum(params[n].numel() for n in names) for names in tuned]
    signal = {}
    for names, d in zip(tuned, dims):
        for n in names:  # one random direction over the block, of norm 1
            signal[n] = torch.randn(params[n].shape, generator=gen, dtype=torch.float64) / math.sqrt(d)
    group = _group_of(opt)
    for t in range(1, 16):
        for n, p in params.items():
            b = _block(n)
            if b is not None and n in signal:
                p.grad = (signal[n] + torch.randn(p.shape, generator=gen, dtype=torch.float64)
                          * math.sqrt(sigma2[b] / dims[b])).float()
            else:  # norms, embeddings: noise far above the blocks' gradients
                p.grad = 10.0 * torch.randn(p.shape, generator=gen)
        _set_lrs(opt, tc.lr)
        opt.step()
        noise = opt.telemetry()["grad_noise_block"]
        if t == 1:
            assert noise == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)  # no estimate from one gradient
            continue
        assert noise == pytest.approx(expect_noise, abs=0.02), t
        for n, p in params.items():
            b = _block(n)
            want = 1.0 if b is None or NORM.search(n) else expect_r[b] / mean_r  # 1.6, 1.0, 0.4
            assert group[id(p)]["lr_scale"] == pytest.approx(want, abs=0.06), (t, n)


# ---------------------------------------------------------------------------------------------------- LISA
def test_lisa_trains_exactly_embeddings_head_and_the_sampled_blocks():
    """Six blocks, two drawn every three steps: at each step exactly the embeddings, final norm, head and the two
    drawn blocks change; a block never drawn has no optimizer state; a drawn-then-frozen block keeps its Adam
    moments untouched; the draw is constant within a period and redrawn at its end."""
    model = _model(layers=6)
    tc = TrainConfig(optimizer="lisa", lr=1e-2, lisa_layers=2, lisa_every=3, seed=5)
    opt = build_optimizer(model, tc)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (4, 16), generator=gen)
    y = torch.roll(x, -1, dims=1)
    ever: set[int] = set()
    draws = []
    for step in range(12):
        opt.begin_step(step)
        active = list(opt.active)
        assert len(active) == 2 == len(set(active)) and all(0 <= i < 6 for i in active)
        if step % 3:
            assert active == draws[-1], "the draw holds for lisa_every steps"
        else:
            draws.append(active)
        ever |= set(active)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        moments = {n: {k: v.clone() for k, v in opt.optimizer.state[p].items()}
                   for n, p in model.named_parameters() if p in opt.optimizer.state}
        logits = model(x).logits
        F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).backward()
        _set_lrs(opt, tc.lr)
        opt.step()
        for n, p in model.named_parameters():
            b = _block(n)
            trains = b is None or b in active
            assert (not torch.equal(before[n], p.detach())) == trains, (step, n)
            assert (p in opt.optimizer.state) == (b is None or b in ever), (step, n)
            if not trains and n in moments:
                for k, v in opt.optimizer.state[p].items():
                    assert torch.equal(v, moments[n][k]), (step, n, k)
        opt.zero_grad()
    assert len({tuple(d) for d in draws}) > 1, "redrawn across periods"
    assert draws == [opt.sample(k) for k in range(4)]


def test_lisa_draws_are_seeded_and_uniform():
    """The draw of period k depends on the run's seed and k only, and every block is drawn with probability
    gamma / N: over 3000 periods each of 6 blocks is drawn ~1000 times of 3000 (binomial sd 25.8)."""
    model = _model(layers=6)
    a = build_optimizer(model, TrainConfig(optimizer="lisa", lisa_layers=2, seed=11))
    b = build_optimizer(model, TrainConfig(optimizer="lisa", lisa_layers=2, seed=11))
    c = build_optimizer(model, TrainConfig(optimizer="lisa", lisa_layers=2, seed=12))
    assert [a.sample(k) for k in range(20)] == [b.sample(k) for k in range(20)]
    assert [a.sample(k) for k in range(20)] != [c.sample(k) for k in range(20)]
    counts = np.zeros(6)
    pairs = set()
    for k in range(3000):
        draw = a.sample(k)
        assert draw == sorted(set(draw)) and len(draw) == 2
        counts[draw] += 1
        pairs.add(tuple(draw))
    assert np.all(np.abs(counts - 1000) < 5 * math.sqrt(3000 * (1 / 3) * (2 / 3))), counts
    assert len(pairs) == 15  # every pair of 6 blocks occurs
