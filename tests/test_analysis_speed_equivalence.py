"""The streaming analysis' per-batch reductions, batched for speed, against straightforward references written
here: per token, in float64, with Python loops (issue 13 §4, the cost of ``analyze`` against a plain forward)."""

import math

import numpy as np
import pytest
import skdim
import torch
from conftest import FakeTok, measure_fake_ids, tiny_cfg

import layerlab
from layerlab.analysis import stats
from layerlab.analysis.analyze import _rel_diff, analyze_model
from layerlab.analysis.stats import StreamStats, anisotropy, distinct_rows, intrinsic_dimension, two_nearest


def _batch(dtype, L=4, B=3, T=7, C=16, seed=0):
    """A random traced batch: padding on the right (row 1) and on the left (row 2); block 1 has no attention, block
    3 no MLP gate, block 2's MLP input is the block's output (a block without an MLP's second norm)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    states = [r(B, T, C) * (i + 1) + 0.3 for i in range(L + 1)]
    attn = [None if i == 1 else r(B, T, C) for i in range(L)]
    mlp = [r(B, T, C) * 0.5 for i in range(L)]
    mids = [states[i + 1] if i == 2 else r(B, T, C) for i in range(L)]
    gates = [None if i == 3 else r(B, T).abs() for i in range(L)]
    final = r(B, T, C)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    for x in [*states, *[a for a in attn if a is not None], *mlp, *mids, final]:
        x[~mask.bool()] = 1e4  # padding holds the largest values: none may count
    for x in gates:
        if x is not None:
            x[~mask.bool()] = 1e4
    return states, attn, mlp, mids, gates, final, mask


def _reference(batches) -> dict:
    """Every streaming measure over ``batches``, token by token in float64."""
    states, attn = batches[0][0], batches[0][1]
    L, S, C = len(attn), len(states), states[0].shape[-1]
    d = lambda x: x.double()  # noqa: E731
    ang, ang_last = np.zeros((S, S)), np.zeros((S, S))
    cos_next, rel = np.zeros(L), np.zeros(L)
    a_rel, a_cos, m_rel, m_cos = np.zeros(L), np.zeros(L), np.zeros(L), np.zeros(L)
    sx, sx2 = np.zeros(S), np.zeros(S)
    mx = {"max_resid": [0.0] * S, "max_attn": [None] * L, "max_mlp": [None] * L, "max_gate": [None] * L,
          "max_final": None}
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    angle = lambda a, b: math.acos(max(-1.0, min(1.0, cos(a, b)))) / math.pi  # noqa: E731
    top = lambda cur, x: float(x.abs().max()) if cur is None else max(cur, float(x.abs().max()))  # noqa: E731
    n = seqs = 0
    for states, attn, mlp, mids, gates, final, mask in batches:
        for b in range(mask.shape[0]):
            seqs += 1
            real = [t for t in range(mask.shape[1]) if mask[b, t]]
            for t in real:
                n += 1
                x = [d(s[b, t]) for s in states]
                for i in range(S):
                    for j in range(S):
                        ang[i, j] += angle(x[i], x[j])
                    sx[i] += float(x[i].sum())
                    sx2[i] += float((x[i] ** 2).sum())
                    mx["max_resid"][i] = max(mx["max_resid"][i], float(x[i].abs().max()))
                for i in range(L):
                    cos_next[i] += cos(x[i], x[i + 1])
                    rel[i] += float((x[i + 1] - x[i]).norm() / x[i].norm())
                    if attn[i] is not None:
                        p = d(attn[i][b, t])
                        a_rel[i] += float(p.norm() / x[i].norm())
                        a_cos[i] += cos(p, x[i])
                        mx["max_attn"][i] = top(mx["max_attn"][i], p)
                    p, q = d(mlp[i][b, t]), d(mids[i][b, t])
                    m_rel[i] += float(p.norm() / q.norm())
                    m_cos[i] += cos(p, q)
                    mx["max_mlp"][i] = top(mx["max_mlp"][i], p)
                    if gates[i] is not None:
                        mx["max_gate"][i] = top(mx["max_gate"][i], d(gates[i][b, t]))
                mx["max_final"] = top(mx["max_final"], d(final[b, t]))
            x = [d(s[b, real[-1]]) for s in states]
            for i in range(S):
                for j in range(S):
                    ang_last[i, j] += angle(x[i], x[j])
    mean_x, mean_x2 = sx / (n * C), sx2 / (n * C)
    return {"ang": ang / n, "ang_last": ang_last / seqs, "block_influence": 1 - cos_next / n,
            "relative_contribution": rel / n, "attn_relative_contribution": a_rel / n, "attn_cosine": a_cos / n,
            "mlp_relative_contribution": m_rel / n, "mlp_cosine": m_cos / n,
            "rms": np.sqrt(mean_x2), "var": mean_x2 - mean_x**2, **mx, "tokens": n, "sequences": seqs}


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "chunks-of-3-tokens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_update_matches_a_per_token_reference(dtype, chunk, monkeypatch):
    """Two batches folded in give every streaming measure as the per-token float64 reference; padding (which
    holds the largest values) counts nowhere, a missing part stays None, and a block's input that is a state
    (block 2's MLP reads its own output) is read as that state. With ``chunk``, the states are reduced 3 tokens
    at a time (as a large model's are, CHUNK_VALUES at a time), which must change nothing."""
    if chunk is not None:
        monkeypatch.setattr(stats, "CHUNK_VALUES", chunk * 5 * 16)  # S = 5 states of width 16
    batches = [_batch(dtype), _batch(dtype, seed=1)]
    s = StreamStats(4)
    for states, attn, mlp, mids, gates, final, mask in batches:
        s.update(states, attn, mlp, mids, mask, gates=gates, final=final)
    got, want = s.results(), _reference(batches)
    assert (got["tokens"], got["sequences"]) == (want["tokens"], want["sequences"]) == (2 * (21 - 3 - 2), 6)
    for key in ("block_influence", "relative_contribution", "attn_relative_contribution",
                "mlp_relative_contribution", "rms", "var"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, err_msg=key)
    for key in ("attn_cosine", "mlp_cosine"):  # signed means: rounding is that of the terms (|cos| <= 1)
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6, err_msg=key)
    upper = np.triu(np.ones((5, 5), dtype=bool), 1)
    for key in ("ang", "ang_last"):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in got[key]])
        assert np.isnan(matrix[np.tril(np.ones((5, 5), dtype=bool), -1)]).all()
        np.testing.assert_allclose(matrix[upper], want[key][upper], rtol=2e-6, err_msg=key)
        # float32 arccos of cos(x, x) = 1 - 6e-8 is ~1e-4 rad: the diagonal is rounding noise near 0
        assert (np.abs(np.diagonal(matrix)) < 1e-3).all(), key
    for key in ("max_resid", "max_attn", "max_mlp", "max_gate"):  # maxima are exact
        assert got[key] == want[key], key
    assert got["max_final"] == want["max_final"]
    assert got["max_attn"][1] is None and got["max_gate"][3] is None


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunks-of-4-rows"])
def test_logit_lens_matches_a_per_token_reference(chunk, monkeypatch):
    """CE of each block's output read through the head, KL to the model's own prediction, and the loss, against a
    float64 loop over the predicting positions; ``read`` sees those positions' states only (no logits of padding
    or of each row's last position are made, a (B, T, vocab) tensor less per block on a large vocabulary), with
    ``chunk`` a few rows at a time, as a large vocabulary's are."""
    if chunk is not None:
        monkeypatch.setattr(stats, "CHUNK_VALUES", chunk * 11)  # V = 11
    g = torch.Generator().manual_seed(3)
    L, B, T, C, V = 3, 3, 6, 8, 11
    head = torch.nn.Sequential(torch.nn.LayerNorm(C), torch.nn.Linear(C, V))
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    states = [torch.randn(B, T, C, generator=g) for _ in range(L + 1)]
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    with torch.no_grad():
        logits = head(states[-1])
    seen = []

    def read(h):
        seen.append(tuple(h.shape))
        return head(h)

    s = StreamStats(L)
    s.update_lens(states, read, logits, labels, mask)
    got = s.results()
    ref = head.double()
    ce, kl, n = np.zeros(L), np.zeros(L), 0
    loss = 0.0
    with torch.no_grad():
        for b in range(B):
            for t in range(T - 1):
                if not (mask[b, t] and mask[b, t + 1]):
                    continue
                n += 1
                y = int(labels[b, t + 1])
                final = torch.log_softmax(logits[b, t].double(), -1)
                loss -= float(final[y])
                for i in range(L):
                    logp = final if i == L - 1 else torch.log_softmax(ref(states[i + 1][b, t].double()), -1)
                    ce[i] -= float(logp[y])
                    kl[i] += float((final.exp() * (final - logp)).sum())
    assert n == 3 * 5 - 2 - 2 == 11
    np.testing.assert_allclose(got["lens_ce"], ce / n, rtol=1e-5)
    np.testing.assert_allclose(got["lens_kl"], kl / n, rtol=1e-5, atol=1e-7)
    assert got["lens_kl"][-1] == 0 and got["loss"] == pytest.approx(loss / n, rel=1e-6)
    # the last block's logits are the model's own
    sizes = [n] if chunk is None else [chunk] * (n // chunk) + [n % chunk] * bool(n % chunk)
    assert seen == [(k, C) for k in sizes for _ in range(L - 1)]


def test_anisotropy_is_the_mean_cosine_over_distinct_pairs():
    """Against the pairwise double loop, on data with a common direction (anisotropic) and a zero row."""
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(40, 6, generator=g) + torch.tensor([2.0, 0, 0, 0, 0, 0])
    Z[7] = 0
    U = [z.double() / max(float(z.double().norm()), 1e-12) for z in Z]
    want = sum(float(U[i] @ U[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
    assert anisotropy(Z) == pytest.approx(want, rel=1e-12)


def test_distinct_rows_keeps_the_rows_np_unique_keeps_in_their_first_order():
    """Against np.unique(axis=0) as sets of rows, with repeats in and out of order, a row that differs only in the
    sign of a zero (equal as numbers), and a row that differs in the last bit; the kept order is first occurrence."""
    g = np.random.default_rng(6)
    X = g.standard_normal((50, 7))
    X[[3, 9, 30]] = X[20]
    X[12, 0], X[13] = 0.0, X[12]
    X[13, 0] = -0.0
    X[40] = np.nextafter(X[41], np.inf)
    got = distinct_rows(X)
    want = np.unique(X, axis=0)
    assert got.shape == want.shape == (46, 7)
    assert {r.tobytes() for r in got + 0.0} == {r.tobytes() for r in want + 0.0}
    first = [i for i in range(50) if not any((X[j] == X[i]).all() for j in range(i))]
    assert np.array_equal(got, X[first] + 0.0)


@pytest.mark.parametrize("shape", [(300, 40), (200, 12)])
def test_twonn_matches_scikit_dimension_on_its_own_distances(shape):
    """The nearest-neighbour distances computed here and passed to skdim give skdim's own estimate (which sorts
    the full distance matrix for wide data and searches neighbours for narrow), duplicates dropped first."""
    g = torch.Generator().manual_seed(5)
    n, c = shape
    Z = torch.randn(n, 5, generator=g) @ torch.randn(5, c, generator=g)  # 5-dimensional data in c dimensions
    Z[10] = Z[11]  # a duplicate
    X = np.unique(Z.double().numpy(), axis=0)
    want = float(skdim.id.TwoNN().fit(X).dimension_)
    assert intrinsic_dimension(Z) == pytest.approx(want, rel=1e-9)
    assert 3.5 < want < 6.5


@pytest.mark.parametrize("chunk", [1, 40, 1 << 22])
def test_fidelity_difference_matches_a_per_token_reference(chunk):
    """``_rel_diff`` over row blocks of any size (one row, a few, the whole batch) gives the per-token reference:
    max |Δ| and max |plain| over real tokens, equal infinities and NaN on both sides agreeing, padding ignored."""
    g = torch.Generator().manual_seed(6)
    B, T, C = 4, 5, 3
    plain = torch.randn(B, T, C, generator=g)
    hooked = plain + 1e-3 * torch.randn(B, T, C, generator=g)
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, 3:] = False
    real[3, :] = False  # a row of padding only
    hooked[0, 4] += 50.0  # padding: a large difference that must not count
    plain[2, 1, 0] = hooked[2, 1, 0] = math.inf  # equal infinities agree
    plain[1, 2, 2] = hooked[1, 2, 2] = math.nan  # NaN on both sides agrees
    diff = scale = 0.0
    for b in range(B):
        for t in range(T):
            if not real[b, t]:
                continue
            for c in range(C):
                x, y = float(hooked[b, t, c]), float(plain[b, t, c])
                if not (x == y or (math.isnan(x) and math.isnan(y))):
                    diff = max(diff, abs(x - y))
                if math.isfinite(y):
                    scale = max(scale, abs(y))
    assert _rel_diff(hooked, plain, real, chunk=chunk) == (pytest.approx(diff), pytest.approx(diff / scale))
    hooked[1, 0, 1] = math.nan  # NaN on one side only: diverged
    assert _rel_diff(hooked, plain, real, chunk=chunk)[0] == math.inf


def test_layers_measured_side_by_side_equal_one_at_a_time(monkeypatch):
    """The token-sample measures run for several layers at once, one layer per worker thread; every layer's
    entry, in order, equals the one measured with a single worker (one layer at a time, as before)."""
    from concurrent.futures import ThreadPoolExecutor

    module = measure_fake_ids(monkeypatch)
    torch.manual_seed(0)
    model = layerlab.build_model(tiny_cfg(layers=4, context=32, vocab_size=64)).eval()
    tok = FakeTok(64)
    entries, workers = [], []
    for n in (1, 4):
        def pool(_, n=n, **kw):
            workers.append(n)
            return ThreadPoolExecutor(n, **kw)

        monkeypatch.setattr(module, "ThreadPoolExecutor", pool)
        entries.append(analyze_model(model, tok, name="m", path=None, tokens=512, seq_len=32, batch_size=4,
                                     removal_tokens=0, spectra=False, progress=False)["layers"])
    assert workers == [1, 4]
    one, four = entries
    assert [e["index"] for e in four] == [0, 1, 2, 3]
    same = lambda a, b: a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
    for a, b in zip(one, four, strict=True):
        assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), a["index"]
    assert sum(isinstance(v, float) and math.isfinite(v) for v in one[2].values()) > 5


@pytest.mark.parametrize("n,block", [(1024, 256), (300, 64), (257, 256), (37, 8), (12, 256)])
def test_two_nearest_equals_the_whole_distance_matrix(n, block):
    """The block-by-block search gives each point's two smallest squared distances of the whole n x n matrix,
    for sizes that fill the blocks, leave a partial last block (of one point too), and fit one block; duplicate
    points give a distance of 0 (up to the rounding of |x|^2 + |y|^2 - 2 x.y), and no point is its own neighbour."""
    g = torch.Generator().manual_seed(8)
    Y = (torch.randn(n, 5, generator=g) @ torch.randn(5, 24, generator=g) + 3).double()
    Y[n // 2] = Y[0]
    sq = (Y * Y).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (Y @ Y.T)).clamp_min(0)
    d2.fill_diagonal_(math.inf)
    want = d2.topk(2, dim=1, largest=False).values
    got = two_nearest(Y, block)
    assert got.shape == (n, 2)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9 * float(sq.max()))
    assert got[0, 0] <= 1e-9 * float(sq.max()) and got[n // 2, 0] <= 1e-9 * float(sq.max())  # 0 up to rounding
    assert bool((got[:, 0] <= got[:, 1]).all())
