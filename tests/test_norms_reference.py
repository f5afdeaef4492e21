"""Batch-level norms against hand-written references of their papers' algorithms, step by step.

Each reference is numpy float64 on the (N, C) token rows, with the backward written out by hand (no autograd):
PowerNorm as Shen et al., 2020, Algorithm 1 runs in sIncerass/powernorm ``mask_powernorm.py``, and Unified
Normalization as Yang et al., 2022 run it in hikvision-research/Unified-Normalization (``UN1d``). layerlab's
modules run in float64 too, so every step's output, gradients (x, weight, bias) and running statistics agree
to rounding, across the warmup boundary, the window smoothing, the gradient compensation and an outlier batch.
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import perturb, tiny_cfg

import layerlab
from layerlab.export import fold_norms
from layerlab.norms import UnifiedNorm, build_norm

C = 6
EPS = 1e-5
TIGHT = dict(rtol=1e-9, atol=1e-11)


def _batches(steps: int, seed: int, outlier: dict[int, float] | None = None):
    """Seeded (x, dL/dy) pairs of shape (4, 8, C): channels of different scales, a nonzero mean, a drifting
    per-step scale; ``outlier`` maps a 1-indexed step to the factor channel 2 is multiplied by."""
    g = np.random.default_rng(seed)
    chan = np.linspace(0.5, 2.0, C)
    out = []
    for t in range(1, steps + 1):
        x = (g.standard_normal((4, 8, C)) + 0.3) * chan * (1 + 0.1 * np.sin(t))
        if outlier and t in outlier:
            x[..., 2] *= outlier[t]
        out.append((x, g.standard_normal((4, 8, C))))
    return out


def _affine(norm, seed=3):
    g = np.random.default_rng(seed)
    w, b = 1 + 0.5 * g.standard_normal(C), 0.2 * g.standard_normal(C)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        norm.bias.copy_(torch.from_numpy(b))
    return w, b


def _step(norm, x, dy):
    """One layerlab training forward and backward: y, dL/dx, dL/dweight, dL/dbias as numpy (N, C) / (C,)."""
    norm.zero_grad()
    xt = torch.from_numpy(x).requires_grad_()
    y = norm(xt)
    y.backward(torch.from_numpy(dy))
    flat = lambda t: t.detach().reshape(-1, C).numpy()  # noqa: E731
    return flat(y), flat(xt.grad), norm.weight.grad.numpy(), norm.bias.grad.numpy()


def _close(ours, ref, what):
    np.testing.assert_allclose(ours, ref, **TIGHT, err_msg=what)


# ------------------------------------------------------------------ PowerNorm


class PowerNormRef:
    """PowerNorm for one group (``GroupScaling1D`` with group_num=1), alpha_fwd = alpha_bkw = alpha.

    Forward: s = x / sqrt(mean_c x^2 + eps) per token; psi2 = mean over tokens of s^2; z = s / sqrt(psi2 + eps)
    for the first ``warmup`` steps, s / sqrt(phi + eps) after; phi is a cumulative average of psi2 while
    t < warmup, and phi <- alpha phi + (1 - alpha) psi2 every step. Backward: g = dy * w, the intermediate
    gradient xt = g - nu z, ds = xt / sqrt(psi2 + eps) (the batch statistic, as the code does after warmup
    too), nu <- nu + (1 - alpha) mean(xt z); dx through the per-token scaling by the chain rule.
    mask_powernorm.py stores ema_gz = nu / (1 - alpha): its ``g - (1 - abkw) ema_gz z`` and
    ``ema_gz += mean(approx z)`` are the two nu lines above.
    """

    def __init__(self, warmup: int, alpha: float = 0.9):
        self.warmup, self.alpha = warmup, alpha
        self.phi, self.nu, self.t = np.ones(C), np.zeros(C), 0

    def step(self, x, w, b, dy):
        x, dy = x.reshape(-1, C), dy.reshape(-1, C)
        self.t += 1
        t, a = self.t, self.alpha
        rho = np.sqrt((x * x).mean(1, keepdims=True) + EPS)  # (N, 1)
        s = x / rho
        psi2 = (s * s).mean(0)
        z = s / np.sqrt((psi2 if t <= self.warmup else self.phi) + EPS)
        y = z * w + b
        if t < self.warmup:
            self.phi = self.phi * (t - 1) / t + psi2 / t
        self.phi = a * self.phi + (1 - a) * psi2
        xt = dy * w - self.nu * z
        self.nu = self.nu + (1 - a) * (xt * z).mean(0)
        ds = xt / np.sqrt(psi2 + EPS)
        dx = ds / rho - x * (ds * x).sum(1, keepdims=True) / (C * rho**3)  # d(x/rho)/dx applied to ds
        return y, dx, (dy * z).sum(0), dy.sum(0)


def test_powernorm_matches_algorithm_1_forward_backward_and_statistics_across_warmup():
    p = build_norm("powernorm", C, eps=EPS).double().train()
    p.warmup_iters = 3  # steps 1-2: cumulative average; 3: last batch-statistic step; 4-7: running statistic
    w, b = _affine(p)
    ref = PowerNormRef(warmup=3, alpha=p.alpha_fwd)
    assert p.alpha_fwd == p.alpha_bkw == 0.9
    for t, (x, dy) in enumerate(_batches(7, seed=0), start=1):
        y, dx, dw, db = _step(p, x, dy)
        ry, rdx, rdw, rdb = ref.step(x, w, b, dy)
        for ours, theirs, what in [(y, ry, "y"), (dx, rdx, "dL/dx"), (dw, rdw, "dL/dweight"), (db, rdb, "dL/dbias")]:
            _close(ours, theirs, f"step {t}: {what}")
        _close(p.running_phi.numpy().ravel(), ref.phi, f"step {t}: running quadratic mean")
        _close((1 - p.alpha_bkw) * p.ema_gz.numpy().ravel(), ref.nu, f"step {t}: ema of g*z")
    assert np.abs(ref.nu).min() > 0
    p.eval()
    x = _batches(1, seed=9)[0][0].reshape(-1, C)
    s = x / np.sqrt((x * x).mean(1, keepdims=True) + EPS)
    _close(p(torch.from_numpy(x)).detach().numpy(), s / np.sqrt(ref.phi + EPS) * w + b, "eval output")


# ------------------------------------------------------------------ Unified Normalization


class UnifiedRef:
    """Unified Normalization on (N, C) rows, as UN1d / UN2dFunction compute it.

    Forward at step t (slot k = t mod W of a W-long window): x2 = mean over tokens of x^2; spread = sample
    variance of sqrt of every entry of the window before x2 is written; the window takes x2. Outlier
    filtration (t >= warmup): if any channel's arithmetic mean of the window exceeds its geometric mean by
    more than W * spread, slot k takes running_var instead and the step is a skip. The statistic is the
    window's geometric mean when t > W, t >= warmup and not a skip, else x2; z = x / sqrt(var + eps).
    Gradient compensation r = sqrt(var + eps) / sqrt(running_var + eps) clipped to [1/r_max, r_max] when
    t > max(comp_from, warmup) and not a skip, else 1; then running_var <- m running_var + (1 - m) var.
    Backward: g = dy * w * r, gz = mean(g z); the g*z window takes gz (ema_gz on a skip); mean_gz is the
    window's mean when smoothing, else gz; ema_gz <- m ema_gz + (1 - m) mean_gz; dx = (g - c z) / sqrt(var
    + eps) with c = mean_gz on a skip, else ema_gz; dweight = sum(dy r z), dbias = sum(dy).
    """

    def __init__(self, warmup, comp_from, filtration, window=4, m=0.9, r_max=5.0):
        self.warmup, self.comp_from, self.filtration = warmup, comp_from, filtration
        self.window, self.m, self.r_max = window, m, r_max
        self.running_var, self.ema_gz = np.ones(C), np.zeros(C)
        self.win_x2 = [np.zeros(C) for _ in range(window)]
        self.win_gz = [np.zeros(C) for _ in range(window)]
        self.t, self.skipped, self.clipped = 0, [], []

    def _gm(self):
        return np.prod(np.stack(self.win_x2), axis=0) ** (1 / self.window)

    def step(self, x, w, b, dy):
        x, dy = x.reshape(-1, C), dy.reshape(-1, C)
        self.t += 1
        t, k, n, m = self.t, self.t % self.window, self.window, self.m
        x2 = (x * x).mean(0)
        spread = np.sqrt(np.stack(self.win_x2)).var(ddof=1)
        self.win_x2[k] = x2
        skip = False
        if self.filtration and t >= self.warmup:
            if np.any(np.stack(self.win_x2).mean(0) - self._gm() > n * spread):
                self.win_x2[k] = self.running_var.copy()
                skip = True
                self.skipped.append(t)
        smooth = t > n and t >= self.warmup and not skip
        var = self._gm() if smooth else x2
        r = np.ones(C)
        if not skip and t > max(self.comp_from, self.warmup):
            raw = np.sqrt(var + EPS) / np.sqrt(self.running_var + EPS)
            r = np.clip(raw, 1 / self.r_max, self.r_max)
            if np.any(raw != r):
                self.clipped.append(t)
        z = x / np.sqrt(var + EPS)
        y = z * w + b
        self.running_var = m * self.running_var + (1 - m) * var
        g = dy * w * r
        gz = (g * z).mean(0)
        self.win_gz[k] = self.ema_gz.copy() if skip else gz
        mean_gz = np.stack(self.win_gz).mean(0) if smooth else gz
        self.ema_gz = m * self.ema_gz + (1 - m) * mean_gz
        dx = (g - (mean_gz if skip else self.ema_gz) * z) / np.sqrt(var + EPS)
        return y, dx, (dy * r * z).sum(0), dy.sum(0)


@pytest.mark.parametrize("filtration", [True, False], ids=["filtration", "no-filtration"])
def test_unified_matches_the_reference_through_warmup_smoothing_compensation_and_an_outlier(filtration):
    u = build_norm("unified", C, eps=EPS).double().train()
    u.warmup_iters, u.compensation_from, u.outlier_filtration = 6, 8, filtration  # the phases within 16 steps
    w, b = _affine(u)
    ref = UnifiedRef(warmup=6, comp_from=8, filtration=filtration)
    assert (u.window, u.momentum, u.r_max) == (ref.window, ref.m, ref.r_max) == (4, 0.9, 5.0)
    for t, (x, dy) in enumerate(_batches(16, seed=1, outlier={12: 1000.0}), start=1):
        y, dx, dw, db = _step(u, x, dy)
        ry, rdx, rdw, rdb = ref.step(x, w, b, dy)
        for ours, theirs, what in [(y, ry, "y"), (dx, rdx, "dL/dx"), (dw, rdw, "dL/dweight"), (db, rdb, "dL/dbias")]:
            _close(ours, theirs, f"step {t}: {what}")
        _close(u.running_var.numpy(), ref.running_var, f"step {t}: running_var")
        _close(u.ema_gz.numpy(), ref.ema_gz, f"step {t}: ema_gz")
        _close(u.buffer_x2.numpy(), np.stack(ref.win_x2), f"step {t}: window of x2")
    # the run covers what it claims: the outlier step is filtered (and only it; r = 1 there, but running_var
    # takes its x2, so r clips at 1/5 after), or unfiltered its window mean drives r to the clip at once
    assert ref.skipped == ([12] if filtration else []) and int(u.skips) == len(ref.skipped)
    assert ref.clipped == ([13, 14, 15, 16] if filtration else [12])
    u.eval()  # offline statistics only: a fixed per-channel affine, the same for one token or many
    x = _batches(1, seed=9)[0][0].reshape(-1, C)
    y = u(torch.from_numpy(x)).detach().numpy()
    _close(y, x / np.sqrt(ref.running_var + EPS) * w + b, "eval output")
    _close(u(torch.from_numpy(x[:1])).detach().numpy(), y[:1], "eval of one token")


def test_unified_filters_an_injected_outlier_batch_with_its_registered_constants():
    """Defaults (warmup 100, window 4): steady batches never trip the filter; one batch with a channel 100x
    larger does, is normalised by its own statistic, and its window slot holds running_var instead."""
    u = build_norm("unified", C).train()
    steps = u.warmup_iters + 5
    for x, dy in _batches(steps, seed=2):
        u(torch.from_numpy(x).float()).backward(torch.from_numpy(dy).float())
    assert int(u.skips) == 0, "steady batches are not outliers"
    before = u.running_var.clone()
    x = torch.from_numpy(_batches(1, seed=5, outlier={1: 100.0})[0][0]).float()
    y = u(x)
    assert int(u.skips) == 1, "the outlier batch is filtered"
    x2 = x.reshape(-1, C).pow(2).mean(0)
    slot = int(u.iters) % u.window
    torch.testing.assert_close(u.buffer_x2[slot], before)  # the window keeps running_var, not the outlier
    with torch.no_grad():
        want = x / (x2 + u.eps).sqrt() * u.weight + u.bias  # a filtered batch uses its own quadratic mean
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(u.running_var, 0.9 * before + 0.1 * x2)
    x = torch.from_numpy(_batches(1, seed=6)[0][0]).float()
    u(x)
    assert int(u.skips) == 1, "the next steady batch is not filtered: the outlier never entered the window"


def test_unified_outlier_threshold_is_the_window_times_the_spread_of_the_window():
    """Bisect, on the reference, the factor on one channel at which a batch just trips the filter (the gap
    between the window's arithmetic and geometric means reaches window x the variance of its square roots);
    layerlab keeps a batch 1% below that factor and filters one 1% above it."""
    u = build_norm("unified", C, eps=EPS).double().train()
    u.warmup_iters = 6
    w, b = _affine(u)
    ref = UnifiedRef(warmup=6, comp_from=u.compensation_from, filtration=True)
    for x, dy in _batches(9, seed=4):
        _step(u, x, dy)
        ref.step(x, w, b, dy)
    x, dy = _batches(1, seed=7)[0]

    def scaled(f):
        out = x.copy()
        out[..., 2] *= f
        return out

    def trips(f):
        r = copy.deepcopy(ref)
        r.step(scaled(f), w, b, dy)
        return bool(r.skipped)

    lo, hi = 1.0, 1000.0
    assert not ref.skipped and not trips(lo) and trips(hi)
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if trips(mid) else (mid, hi)
    for f, skips in [(0.99 * lo, 0), (1.01 * hi, 1)]:
        v = copy.deepcopy(u)
        _step(v, scaled(f), dy)
        assert int(v.skips) == skips, f"factor {f:.4g} (threshold at {hi:.4g}): {int(v.skips)} skips"


def test_unified_eval_is_a_fixed_affine_that_folds_into_the_linear_layers():
    """After training steps, eval is x / sqrt(running_var + eps) * g + b per channel (by hand), eval_affine is
    that affine, and export's fold gives a norm-free model with the same logits (UN's inference fusion)."""
    torch.manual_seed(0)
    model = perturb(layerlab.build_model(tiny_cfg(norm="unified", layers=2))).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, UnifiedNorm)]
    assert len(norms) == 5 and all(int(m.iters) == 6 and (m.running_var - 1).abs().min() > 1e-4 for m in norms)
    x = torch.randn(5, 32, generator=g) * 2 + 0.5
    for m in norms:
        by_hand = x / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias
        scale, shift = m.eval_affine()
        with torch.no_grad():
            torch.testing.assert_close(m(x), by_hand)
            torch.testing.assert_close(x * scale + shift, by_hand)
    folded, record = fold_norms(model)
    assert folded.cfg.norm == "none" and len(record["folded"]) == 5
    ids = torch.randint(0, 64, (3, 16), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, model(ids).logits)
