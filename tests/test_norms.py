"""Each registered norm: shape, finiteness, and its defining formula."""

import pytest
import torch
import torch.nn.functional as F

from layerlab.errors import LayerlabError
from layerlab.norms import NORMS, PRepBN, build_norm, is_batch_norm, set_norm_schedule

D = 16


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_keeps_shape_and_is_finite(name):
    torch.manual_seed(0)
    norm = build_norm(name, D, eps=1e-5).train()
    set_norm_schedule(norm, 10)  # as the trainer does; PRepBN starts from LayerNorm
    x = torch.randn(3, 5, D, requires_grad=True)
    y = norm(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0, "gradient must reach the input"
    norm.eval()
    assert torch.isfinite(norm(x)).all()


@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_has_the_same_constructor(name):
    norm = NORMS[name](D, eps=1e-6)
    assert norm(torch.randn(2, D)).shape == (2, D)


def test_unknown_norm_lists_valid_ones():
    with pytest.raises(LayerlabError, match="unknown norm 'layernrom'; valid: .*rmsnorm"):
        build_norm("layernrom", D)


def _random_params(norm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return norm


def test_layernorm_and_rmsnorm_formulas():
    x = torch.randn(4, D) * 3 + 1
    ln = _random_params(build_norm("layernorm", D))
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln(x), ref * ln.weight + ln.bias)
    rms = _random_params(build_norm("rmsnorm", D))
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * rms.weight)


def test_crmsnorm_equals_rmsnorm_on_zero_mean_input_and_ignores_the_last_coordinate():
    x = torch.randn(4, D)
    x = x - x.mean(-1, keepdim=True)
    c = _random_params(build_norm("crmsnorm", D))
    r = build_norm("rmsnorm", D)
    r.weight.data.copy_(c.weight.data)
    torch.testing.assert_close(c(x), r(x))
    y = x.clone()
    y[..., -1] = 123.0  # the stored form has d-1 coordinates; the last is recovered, not read
    torch.testing.assert_close(c(y), c(x))


def test_dyt_formula_and_init():
    d = build_norm("dyt", D)
    assert d.alpha.numel() == 1 and float(d.alpha.detach()) == 0.5
    _random_params(d)
    x = torch.randn(4, D) * 5
    torch.testing.assert_close(d(x), torch.tanh(d.alpha * x) * d.weight + d.bias)


def test_seednorm_starts_as_rmsnorm_and_follows_its_formula():
    x = torch.randn(4, D) * 2
    s = build_norm("seednorm", D)
    torch.testing.assert_close(s(x), F.rms_norm(x, (D,), eps=1e-5))
    _random_params(s)
    rmsx = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    scale = torch.tanh(x @ s.beta)[:, None] * s.alpha + s.gamma  # one dot product per token
    torch.testing.assert_close(s(x), scale * rmsx)


def test_powernorm_uses_quadratic_mean_not_mean_and_running_stats_in_eval():
    torch.manual_seed(0)
    p = build_norm("powernorm", D).train()
    x = torch.randn(64, D) + 5.0  # a large mean: LayerNorm would remove it, PowerNorm must not
    y = p(x)
    assert y.mean() > 0.5, "PowerNorm subtracts no mean"
    g = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # per-token scaling first
    torch.testing.assert_close(y, g / torch.sqrt(g.pow(2).mean(0) + 1e-5))  # batch quadratic mean in warmup
    p.eval()
    torch.testing.assert_close(p(x), g / torch.sqrt(p.running_phi + 1e-5))
    assert p(x[:1]).shape == (1, D), "eval is per-sample: one token works"


# PowerNorm's approximate backward and running statistics against a hand-written reference of the
# paper's algorithm: tests/test_norms_reference.py


def test_prepbn_decays_from_layernorm_to_repbn():
    torch.manual_seed(0)
    n = build_norm("prepbn", D)
    steps = 4
    set_norm_schedule(n, steps)
    assert isinstance(n, PRepBN) and n.gamma == 1.0
    x = torch.randn(8, D)
    n.train()
    torch.testing.assert_close(n(x), n.ln(x))  # gamma = 1: pure LayerNorm
    gammas = [n.gamma]
    for _ in range(steps):
        n(x)
        gammas.append(n.gamma)
    assert gammas == [0.75, 0.5, 0.25, 0.0, 0.0]
    # eval against a hand computation, with trained parameters: test_prepbn_eval_is_the_training_blend


def _trained(norm, steps: int, seed: int = 0):
    """``norm`` after ``steps`` Adam steps on a regression, on inputs with a non-zero mean and a non-unit
    spread: every parameter leaves its init (RepBN's zeros included) and BN's running statistics move."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(D, generator=g)
    opt = torch.optim.Adam(norm.parameters(), lr=0.05)
    norm.train()
    for _ in range(steps):
        x = torch.randn(6, 4, D, generator=g) * 2.5 + 1.5
        ((norm(x) - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return norm.eval()


def _bn_by_hand(x, bn):
    """BatchNorm in eval, from its definition: running statistics, then the affine."""
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _ln_by_hand(x, ln):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


@torch.no_grad()
def _assert_trained(n):
    rep = n.repbn
    for name, t in [("eta", rep.eta), ("bn.weight", rep.bn.weight), ("bn.bias", rep.bn.bias),
                    ("running_mean", rep.bn.running_mean), ("running_var - 1", rep.bn.running_var - 1),
                    ("ln.weight - 1", n.ln.weight - 1), ("ln.bias", n.ln.bias)]:
        assert t.abs().min() > 1e-4, f"{name} is still at its init"


def test_prepbn_eval_is_the_training_blend_with_running_statistics():
    """Validation measures the network being trained: γ·LN(x) + (1-γ)·(BN_running(x) + η·x), the counter
    untouched; once γ = 0, RepBN alone. Before the fix eval returned RepBN alone whatever γ was."""
    torch.manual_seed(0)
    n = build_norm("prepbn", D)
    set_norm_schedule(n, 8)
    _trained(n, 3)
    _assert_trained(n)
    assert int(n.remaining) == 5
    x = torch.randn(5, 3, D) * 2 + 0.5
    with torch.no_grad():
        blend = 5 / 8 * _ln_by_hand(x, n.ln) + 3 / 8 * (_bn_by_hand(x, n.repbn.bn) + n.repbn.eta * x)
        torch.testing.assert_close(n(x), blend)
        torch.testing.assert_close(n(x[:1, :1]), blend[:1, :1])  # eval is per token: one works
    assert int(n.remaining) == 5, "eval forwards must not move the schedule"
    _trained(n, 5, seed=1)
    assert int(n.remaining) == 0
    with torch.no_grad():
        torch.testing.assert_close(n(x), _bn_by_hand(x, n.repbn.bn) + n.repbn.eta * x)


@pytest.mark.parametrize("name", ["batchnorm", "prepbn"])
def test_eval_affine_is_the_eval_output(name):
    """The per-channel (scale, shift) that export --to folded folds: x * scale + shift equals eval's output,
    computed by hand from the running statistics (SLAB's merge_bn for RepBN: + η on the scale)."""
    torch.manual_seed(0)
    n = build_norm(name, D)
    set_norm_schedule(n, 4)
    _trained(n, 6)
    bn = n.bn if name == "batchnorm" else n.repbn.bn
    eta = 0.0 if name == "batchnorm" else n.repbn.eta
    if name == "prepbn":
        _assert_trained(n)
    assert bn.running_mean.abs().min() > 1e-3 and bn.weight.sub(1).abs().min() > 1e-4
    x = torch.randn(7, D) * 3 - 1
    scale, shift = n.eval_affine()
    assert scale.shape == shift.shape == (D,)
    with torch.no_grad():
        by_hand = _bn_by_hand(x, bn) + eta * x
        torch.testing.assert_close(x * scale + shift, by_hand)
        torch.testing.assert_close(n(x), by_hand)


def test_prepbn_with_layernorm_still_blended_cannot_fold():
    n = build_norm("prepbn", D)
    set_norm_schedule(n, 4)
    _trained(n, 2)
    with pytest.raises(LayerlabError, match=r"cannot fold prepbn while γ = 0\.5 > 0 \(2 of 4 training forwards"):
        n.eval_affine()


def test_none_is_identity():
    x = torch.randn(3, D)
    assert torch.equal(build_norm("none", D)(x), x)


def test_batch_norms_are_flagged():
    assert {n for n in NORMS if is_batch_norm(n)} == {"powernorm", "batchnorm", "prepbn", "unified"}
