"""Per-weight-matrix spectra: the heavy-tail exponent (HT-SR alpha) and stable rank of every linear.

Heavy-Tailed Self-Regularization (HT-SR; Martin & Mahoney, JMLR 2021, "Implicit self-regularization in deep
neural networks") reads how well trained a weight matrix is from the tail of its empirical spectral density (ESD):
the eigenvalues of ``W^T W`` follow ``p(lambda) ~ lambda^-alpha`` above some ``xmin``, and a smaller alpha means
a heavier tail, i.e. more learned correlation. The same alpha drives the layerwise learning rates of He et al.,
"One LR Doesn't Fit All: Heavy-Tail Guided Layerwise Learning Rates for LLMs" (arXiv:2605.22297).

What this module follows, and where from:

- **ESD** (:func:`esd`): the squared singular values of ``W``, i.e. the eigenvalues of ``W^T W``, one per
  ``min(out, in)``, computed in float64. WeightWatcher (CalculatedContent/WeightWatcher, ``weightwatcher.py``,
  ``combined_eigenvalues``: ``evals = sv * sv``) does not divide by ``N`` by default: its ``normalize`` parameter
  (``W * 1/sqrt(N)``, ``N = max(out, in)``, in ``apply_normalize_Wmats``) defaults to ``False`` in
  ``constants.DEFAULT_PARAMS`` and was removed from ``analyze()`` in 0.6.5; He et al.'s code
  (``olmo/LRUnbalance.py``, ``net_esd_estimator``) also uses raw ``svdvals**2``. We do the same and offer the
  RMT convention ``W^T W / N`` as ``esd(w, normalize=True)``. Alpha is scale-invariant, so the choice only moves
  ``xmin``.
- **Power-law fit** (:func:`fit_power_law`): the continuous maximum-likelihood estimator of Clauset, Shalizi &
  Newman (SIAM Review 2009, eq. 3.1), ``alpha = 1 + n / sum(ln(x_i / xmin))`` over the ``n`` eigenvalues
  ``x_i >= xmin``, with ``xmin`` chosen to minimise the Kolmogorov-Smirnov distance between the empirical tail and
  the fitted power law (CSN section 3.3). This is WeightWatcher's default (``WW_powerlaw.WWFit``, with
  ``fix_fingers=None`` and ``xmin`` automatic, on eigenvalues above ``EVALS_THRESH``), which in turn mirrors the
  ``powerlaw`` package. Three deliberate differences: (1) WWFit tries every eigenvalue but the largest as ``xmin``;
  we try at most :data:`MAX_CANDIDATES` quantile-spaced ones, so a 4096-wide matrix costs the same as a 200-wide
  one; (2) we require a tail of at least :data:`MIN_TAIL` eigenvalues (WeightWatcher's ``DEFAULT_MIN_EVALS`` is
  10, though it applies it to the whole layer), because KS minimisation otherwise rewards two- or three-point
  tails whose alpha is noise; (3) the KS distance is the two-sided supremum over the empirical CDF's steps (CSN),
  where WWFit compares against the lower step ``k/n`` only. He et al. instead fix ``xmin`` at the median eigenvalue
  (``pl_fitting='median'``, ``xmin_pos=2``); pass ``xmin=`` to reproduce that.
- **Stable rank** (:func:`stable_rank`): ``||W||_F^2 / ||W||_2^2 = sum(s^2) / max(s^2)``.
- **Speed** (:func:`_eigenvalues`): a matrix wider than :data:`EXACT_DIM` on both sides gets the eigenvalues of
  its Gram matrix ``W^T W`` (over the longer side, formed per matrix in chunks) in float32, recomputed in float64
  when float32 does not resolve the bottom of the spectrum; 4x faster than the float64 SVD at TinyLlama's shapes,
  with alpha within 1e-3 of the SVD's (tests/test_spectra.py). The fit itself is unchanged, over the whole
  spectrum: the KS-chosen xmin sits 5-50% deep in the spectra we measured, too deep for a top-k method to pay
  (see :func:`_eigenvalues`).

:func:`matrix_spectrum` measures one weight, :func:`block_spectra` one block (what an offloaded model calls while
the block is held), :func:`weight_spectra` every block of a :class:`~layerlab.adapters.LayerView`;
:func:`spectra_cached` stores the result per checkpoint; :func:`block_summary` averages it per block.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import LayerlabError
from ..io import atomic_write_json, sha256_file
from .stats import one_thread

if TYPE_CHECKING:  # annotations only: any object with num_layers and linears(i) will do
    from ..adapters import LayerView

MIN_DIM = 16  # matrices with fewer singular values than this are skipped: too few eigenvalues for a tail fit
MIN_TAIL = 10  # smallest tail fit_power_law will choose when it picks xmin itself
MAX_CANDIDATES = 200  # at most this many xmin values are tried
# Eigenvalues below this fraction of the largest are rank deficiency (singular values under ~1e-6 of the top
# one), not spectrum; WeightWatcher drops evals below an absolute 1e-5, which depends on the weights' scale.
ZERO_RTOL = 1e-12
# A tail whose values sit within this relative spread of xmin on average (mean ln(x / xmin) below it) is flat, not
# a power law: float32 rounding alone would give it an alpha in the millions (an orthogonal matrix, say).
FLAT_RTOL = 1e-6
# Bumped whenever the method changes, so that cached results from an older method are not reused.
METHOD_VERSION = 2  # 2: eigenvalues from the Gram matrix above EXACT_DIM (see _eigenvalues)
# Matrices whose smaller side is at most this get the exact float64 SVD; larger ones the Gram matrix's eigenvalues.
EXACT_DIM = 256
# A float32 Gram eigenvalue below this fraction of the largest is not resolved (float32 rounding of the product is
# ~1e-5 of the top eigenvalue at 2048-5632 wide): the spectrum is then recomputed in float64.
RESOLVED_RTOL = 1e-4
GRAM_CHUNK = 1 << 22  # elements of a weight converted to the Gram's dtype at once (16 MB of float32)
_KS_CHUNK = 1 << 22  # candidates x eigenvalues evaluated at once, to bound memory for very wide matrices


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit of an ESD tail: exponent, where the tail starts, KS distance, and tail size."""

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int

    @property
    def stderr(self) -> float:
        """Asymptotic standard error of alpha, ``(alpha - 1) / sqrt(n_tail)`` (CSN 2009, eq. 3.2)."""
        return (self.alpha - 1) / math.sqrt(self.n_tail) if self.n_tail > 0 else math.nan


@dataclass
class MatrixSpectrum:
    """The spectrum summary of one weight matrix of one block."""

    block: int
    name: str
    shape: tuple[int, int]  # (out, in)
    esd_alpha: float  # nan when the matrix has no tail to fit (fewer than MIN_TAIL nonzero eigenvalues, or flat)
    stable_rank: float
    xmin: float
    n_tail: int


# ---------------------------------------------------------------------------------------------------- matrices
def _checked(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` detached, on a device with float64 (CPU or CUDA), after checking it is a finite 2-d matrix."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise LayerlabError(f"expected a 2-d weight matrix, got {shape}")
    if weight.numel() == 0:
        raise LayerlabError(f"weight matrix is empty: shape {tuple(weight.shape)}")
    w = weight.detach()
    if w.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64
        w = w.cpu()
    if not bool(torch.isfinite(w).all()):
        raise LayerlabError(f"weight matrix of shape {tuple(weight.shape)} has non-finite entries")
    return w


def _singular_values(weight: torch.Tensor) -> np.ndarray:
    """Singular values of a 2-d weight in float64, ascending."""
    # float64: half-precision weights would otherwise lose the small end of the spectrum to rounding
    s = torch.linalg.svdvals(_checked(weight).to(torch.float64)).cpu().numpy()
    return np.sort(s)


def _gram(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """The Gram matrix of ``w`` over its longer side (``W^T W`` or ``W W^T``, ``min(out, in)`` square), in
    ``dtype``, and ``||W||_F^2`` in float64.

    ``W`` is converted to ``dtype`` :data:`GRAM_CHUNK` elements at a time (whole rows of the longer side), and the
    Gram matrix is the sum of the chunks' Gram matrices: a bf16 checkpoint never gets a float32 copy of a whole
    matrix, let alone of the model.
    """
    tall = w if w.shape[0] >= w.shape[1] else w.t()  # (long, short): G = tall^T tall
    long, short = tall.shape
    g: torch.Tensor | None = None
    frob2 = 0.0
    step = max(1, GRAM_CHUNK // short)
    for lo in range(0, long, step):
        c = tall[lo:lo + step].to(dtype)
        g = c.t() @ c if g is None else g.addmm_(c.t(), c)
        # a bf16 value's square is exact in float32; the sum runs in float64
        frob2 += float(c.square().sum(dtype=torch.float64))
    assert g is not None  # _checked refuses empty matrices
    return g, frob2


def _gram_eigenvalues(w: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, float]:
    g, frob2 = _gram(w, dtype)
    with one_thread():  # see one_thread: LAPACK spins on 2 threads; the product above may use them all
        eigs = torch.linalg.eigvalsh(g)
    return np.sort(eigs.double().cpu().numpy()), frob2


def _eigenvalues(weight: torch.Tensor) -> tuple[np.ndarray, float, str]:
    """Eigenvalues of ``W^T W`` (ascending, float64), ``||W||_F^2``, and the method that computed them.

    Three methods, cheapest first, each used only where it resolves what the power-law fit reads:

    - ``"svd64"``: float64 singular values of ``W``, squared (the reference), for matrices whose smaller side is at
      most :data:`EXACT_DIM`: they are cheap, and this keeps small models' results exact.
    - ``"gram32"``: float32 ``eigvalsh`` of the float32 Gram matrix (:func:`_gram`). Forming the Gram matrix is
      one BLAS-3 product and its eigenvalues cost a quarter of an SVD: measured here (one thread), a 2048x2048
      bf16 weight takes 0.44 s against 1.82 s for the float64 SVD, a 5632x2048 one 0.72 s against 2.83 s. Its
      eigenvalues carry an absolute error of order ``eps32 * lambda_max`` (measured 7e-6 to 1.2e-5 of the top
      one at those shapes), which moves a tail's alpha by less than 1e-3 (tests/test_spectra.py), but says
      nothing about eigenvalues below it.
    - ``"gram64"``: the same in float64, when some float32 eigenvalue is below :data:`RESOLVED_RTOL` of the
      largest. Then the count of nonzero eigenvalues (which sets the xmin candidates) and the deepest candidate
      tails are not resolved in float32; float64 resolves them down to ~1e-13 of the top, below the
      :data:`ZERO_RTOL` cut, at about half the SVD's cost (0.83 s for 2048x2048). Square and trained attention
      matrices are often this ill-conditioned; tall Gaussian-like MLP matrices are not.

    Why not a top-k (Lanczos or randomized) method: the xmin that the KS criterion picks lies 5-50% of the way into
    the spectrum on the matrices we measured (100-930 of 2048 eigenvalues for TinyLlama-shaped heavy-tailed
    ones, 14-190 of 384 on MiniLM), so k would have to be hundreds; one block iteration with k=256 columns over a
    5632x2048 ``W`` already costs half the Gram product, and after the Gram product the remaining ``eigvalsh``
    is the smaller cost (0.25 s at 2048). The Gram product is the floor for any method that reads ``W``.
    """
    w = _checked(weight)
    if min(w.shape) <= EXACT_DIM:
        with one_thread():
            s = torch.linalg.svdvals(w.to(torch.float64)).cpu().numpy()
        eigs = np.sort(s * s)
        return eigs, float(eigs.sum()), "svd64"
    eigs, frob2 = _gram_eigenvalues(w, torch.float32)
    if eigs[0] < RESOLVED_RTOL * eigs[-1]:
        eigs, frob2 = _gram_eigenvalues(w, torch.float64)
        return eigs, frob2, "gram64"
    return eigs, frob2, "gram32"


def esd(weight: torch.Tensor, normalize: bool = False) -> np.ndarray:
    """Eigenvalues of ``W^T W`` (the squared singular values of ``W``), float64, ascending.

    There are ``min(out, in)`` of them: the nonzero spectra of ``W^T W`` and ``W W^T`` coincide. With
    ``normalize=True`` they are divided by ``N = max(out, in)``, the random-matrix convention ``X = W^T W / N``
    (WeightWatcher's optional ``normalize``); the default follows WeightWatcher's default and leaves them raw.
    """
    s = _singular_values(weight)
    eigs = s * s
    return eigs / max(weight.shape) if normalize else eigs


def stable_rank(weight: torch.Tensor) -> float:
    """Stable rank ``||W||_F^2 / ||W||_2^2``: between 1 and the rank; nan for an all-zero matrix."""
    return _stable_rank_from_eigs(esd(weight))


def _stable_rank_from_eigs(eigs: np.ndarray) -> float:
    top = float(eigs[-1])
    return float(eigs.sum() / top) if top > 0 else math.nan


# ---------------------------------------------------------------------------------------------------- power law
def _tail_alphas(logx: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """CSN MLE of alpha for the tails ``x[starts[j]:]`` of a sorted sample, all at once."""
    n = logx.size
    suffix = np.cumsum(logx[::-1])[::-1]  # suffix[i] = sum(logx[i:])
    m = n - starts
    denom = suffix[starts] - m * logx[starts]  # sum over the tail of ln(x / xmin)
    # a flat tail has no power law to speak of: alpha inf, never chosen
    flat = denom <= m * FLAT_RTOL
    return np.where(flat, np.inf, 1.0 + m / np.where(flat, 1.0, denom))


def _ks_distances(logx: np.ndarray, starts: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Two-sided KS distance between each tail's empirical CDF and its fitted power law's CDF."""
    n = logx.size
    out = np.full(starts.size, np.inf)
    chunk = max(1, _KS_CHUNK // n)
    idx = np.arange(n)
    for lo in range(0, starts.size, chunk):
        st, al = starts[lo:lo + chunk, None], alphas[lo:lo + chunk, None]
        ok = np.isfinite(al[:, 0])
        m = (n - st).astype(np.float64)
        k = idx[None, :] - st  # rank within the tail; negative below xmin
        inside = k >= 0
        # clip below-xmin points to ratio 1 so that nothing overflows; they are masked out anyway
        dlog = np.maximum(logx[None, :] - logx[st], 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            model_cdf = 1.0 - np.exp((1.0 - al) * dlog)
            # the empirical CDF steps from k/m to (k+1)/m at the k-th tail point: compare with both sides
            gap = np.maximum(model_cdf - k / m, (k + 1) / m - model_cdf)
        gap = np.where(inside, gap, -np.inf)
        d = gap.max(axis=1)
        out[lo:lo + chunk] = np.where(ok, d, np.inf)
    return out


def _ks_given_xmin(tail_log: np.ndarray, log_xmin: float, alpha: float) -> float:
    """KS distance of a tail to a power law whose lower bound ``xmin`` need not be a sample value."""
    m = tail_log.size
    k = np.arange(m)
    model_cdf = 1.0 - np.exp((1.0 - alpha) * (tail_log - log_xmin))
    return float(np.max(np.maximum(model_cdf - k / m, (k + 1) / m - model_cdf)))


def fit_power_law(eigs: np.ndarray, xmin: float | None = None) -> PowerLawFit:
    """Fit ``p(x) ~ x^-alpha`` to the tail ``x >= xmin`` of a sample (an ESD) by continuous MLE.

    ``alpha = 1 + n / sum(ln(x_i / xmin))`` (Clauset, Shalizi & Newman 2009). With ``xmin=None``, ``xmin`` is the
    sample value, among at most :data:`MAX_CANDIDATES` quantile-spaced ones leaving at least :data:`MIN_TAIL`
    points in the tail, whose fit has the smallest Kolmogorov-Smirnov distance to the tail; that is
    WeightWatcher's default method (see the module docstring). Non-positive values and numerical zeros (below
    :data:`ZERO_RTOL` times the largest) are dropped first: they are rank deficiency, not spectrum. Tails that are
    flat to within :data:`FLAT_RTOL` (all values equal, up to rounding) are not fitted.
    """
    x = np.asarray(eigs, dtype=np.float64).ravel()
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise LayerlabError("fit_power_law needs a non-empty array of finite values")
    x = np.sort(x)
    x = x[x > x[-1] * ZERO_RTOL] if x[-1] > 0 else x[:0]
    n = x.size
    logx = np.log(x)

    if xmin is not None:
        if not (math.isfinite(xmin) and xmin > 0):
            raise LayerlabError(f"xmin must be a positive number, got {xmin}")
        start = int(np.searchsorted(x, xmin, side="left"))
        if n - start < 2:
            raise LayerlabError(f"xmin={xmin:g} leaves {n - start} value(s) in the tail; need at least 2")
        # the given xmin, not the nearest sample, is the lower bound of the fitted law
        tail_log = logx[start:]
        m = tail_log.size
        denom = float(tail_log.sum() - m * math.log(xmin))
        if denom <= m * FLAT_RTOL:
            raise LayerlabError(f"the values in the tail all equal xmin={xmin:g}; no power law to fit")
        alpha = 1.0 + m / denom
        d = _ks_given_xmin(tail_log, math.log(xmin), alpha)
        return PowerLawFit(alpha=alpha, xmin=float(xmin), ks_distance=d, n_tail=m)

    if n < MIN_TAIL:
        raise LayerlabError(f"need at least {MIN_TAIL} positive eigenvalues to fit a power law, got {n}")
    last = n - MIN_TAIL  # the largest start that keeps MIN_TAIL points
    starts = np.unique(np.linspace(0, last, min(MAX_CANDIDATES, last + 1)).round().astype(np.int64))
    # a tail is "x >= xmin": with ties, start at the first copy of the value so that no copy is left out
    starts = np.unique(np.searchsorted(x, x[starts], side="left"))
    alphas = _tail_alphas(logx, starts)
    ds = _ks_distances(logx, starts, alphas)
    best = int(np.argmin(ds))
    if not np.isfinite(ds[best]):
        raise LayerlabError("no candidate xmin gives a power-law fit: the eigenvalues are (nearly) all equal")
    s = int(starts[best])
    return PowerLawFit(alpha=float(alphas[best]), xmin=float(x[s]), ks_distance=float(ds[best]), n_tail=n - s)


# ---------------------------------------------------------------------------------------------------- a model
def _fit_or_none(eigs: np.ndarray) -> PowerLawFit | None:
    try:
        return fit_power_law(eigs)
    except LayerlabError:  # fewer than MIN_TAIL nonzero eigenvalues, or all equal (an orthogonal matrix): no tail
        return None


def matrix_spectrum(weight: torch.Tensor, block: int = 0, name: str = "") -> MatrixSpectrum:
    """ESD alpha and stable rank of one 2-d weight (any dtype; computed per matrix, see :func:`_eigenvalues`).

    ``||W||_F^2`` is summed in float64 (exactly, for bf16 and fp16 weights) and ``||W||_2^2`` is the largest
    eigenvalue, so the stable rank needs no second decomposition. A matrix with fewer than :data:`MIN_TAIL`
    nonzero eigenvalues, or with all of them equal, gets ``esd_alpha``/``xmin`` nan and ``n_tail`` 0.
    """
    eigs, frob2, _ = _eigenvalues(weight)
    fit = _fit_or_none(eigs)
    top = float(eigs[-1])
    return MatrixSpectrum(
        block=block, name=name, shape=(int(weight.shape[0]), int(weight.shape[1])),
        esd_alpha=fit.alpha if fit else math.nan, stable_rank=frob2 / top if top > 0 else math.nan,
        xmin=fit.xmin if fit else math.nan, n_tail=fit.n_tail if fit else 0,
    )


def block_spectra(view: LayerView, index: int, advance: Callable[[], None] | None = None) -> list[MatrixSpectrum]:
    """:func:`matrix_spectrum` of every 2-d weight of block ``index``, in the order ``view.linears`` gives them.

    Needs only that block's weights: an offloaded model calls it while the block is materialised. Matrices whose
    smaller dimension is below :data:`MIN_DIM` are left out (their handful of eigenvalues cannot show a tail).
    ``advance`` is called once per matrix (a progress bar).
    """
    out: list[MatrixSpectrum] = []
    for name, w in view.linears(index).items():
        if advance is not None:
            advance()
        if min(w.shape) < MIN_DIM:
            continue
        try:
            out.append(matrix_spectrum(w, block=index, name=name))
        except LayerlabError as e:
            raise LayerlabError(f"block {index} {name}: {e}") from None
    return out


def weight_spectra(view: LayerView, progress: bool = False) -> list[MatrixSpectrum]:
    """ESD alpha and stable rank of every 2-d weight of every block of a :class:`~layerlab.adapters.LayerView`.

    Matrices are listed block by block in the order ``view.linears`` gives them (:func:`block_spectra` per
    block). Matrices whose smaller dimension is below :data:`MIN_DIM` are skipped (left out of the list): their
    handful of eigenvalues cannot show a tail. A matrix with fewer than :data:`MIN_TAIL` nonzero eigenvalues, or
    with all of them equal, is kept with ``esd_alpha``/``xmin`` nan and ``n_tail`` 0. One decomposition per
    matrix serves both measures.
    """
    total = sum(len(view.linears(i)) for i in range(view.num_layers)) if progress else 0
    out: list[MatrixSpectrum] = []
    with _progress(progress, total) as advance:
        for i in range(view.num_layers):
            out += block_spectra(view, i, advance)
    return out


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over ``total`` matrices, or nothing; yields the function that advances it."""
    if not enabled:
        yield lambda: None
        return
    with Progress(TextColumn("[bold]spectra"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("spectra", total=total)
        yield lambda: bar.advance(task)


# ---------------------------------------------------------------------------------------------------- caching
def _method_ident() -> bytes:
    # results depend on the method as well as the weights: a new method must not reuse old files
    ident = {"method": METHOD_VERSION, "min_dim": MIN_DIM, "min_tail": MIN_TAIL, "max_candidates": MAX_CANDIDATES,
             "zero_rtol": ZERO_RTOL, "flat_rtol": FLAT_RTOL, "exact_dim": EXACT_DIM, "resolved_rtol": RESOLVED_RTOL}
    return json.dumps(ident, sort_keys=True).encode()


def spectra_key(view: LayerView, model_dir: Path | None = None) -> str:
    """The cache key of a checkpoint: sha256 over the method and the weights.

    The weights are the ``*.safetensors`` files of ``model_dir`` (names and contents, sorted by name) when it has
    any; otherwise (no ``model_dir``, or one holding PyTorch files only) the bytes of every block's 2-d weights as
    ``view.linears`` gives them. File hashes are cheaper for a large model, but do not see edits made to the
    weights in memory after loading: pass ``model_dir=None`` for a model changed since.
    """
    h = hashlib.sha256(_method_ident())
    files: list[Path] = []
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise LayerlabError(f"model directory not found: {model_dir}")
        files = sorted(model_dir.glob("*.safetensors"))
    if files:
        for f in files:
            h.update(f"file:{f.name}:{sha256_file(f)}\n".encode())
        return h.hexdigest()
    for i in range(view.num_layers):
        for name, w in view.linears(i).items():
            t = w.detach().cpu().contiguous()
            h.update(f"tensor:{i}:{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
            # raw bytes through a uint8 view: works for bfloat16, which numpy cannot hold
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _to_json(s: MatrixSpectrum) -> dict:
    d = asdict(s)
    d["shape"] = list(s.shape)
    # nan is not JSON; null keeps the file readable by other tools
    for k in ("esd_alpha", "stable_rank", "xmin"):
        d[k] = None if math.isnan(d[k]) else d[k]
    return d


def _from_json(d: dict) -> MatrixSpectrum:
    def num(v) -> float:
        return math.nan if v is None else float(v)

    return MatrixSpectrum(block=int(d["block"]), name=str(d["name"]), shape=(int(d["shape"][0]), int(d["shape"][1])),
                          esd_alpha=num(d["esd_alpha"]), stable_rank=num(d["stable_rank"]), xmin=num(d["xmin"]),
                          n_tail=int(d["n_tail"]))


def _read_cache(path: Path, key: str) -> list[MatrixSpectrum] | None:
    try:
        obj = json.loads(path.read_text())
        if obj.get("key") != key:
            return None
        return [_from_json(d) for d in obj["spectra"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None  # missing, truncated or foreign: recompute and overwrite


def spectra_cached(view: LayerView, model_dir: Path | None, cache_dir: Path,
                   progress: bool = False) -> list[MatrixSpectrum]:
    """:func:`weight_spectra`, computed once per checkpoint and then read from ``cache_dir``.

    The file is ``cache_dir / f"spectra-{key[:16]}.json"`` with ``key`` from :func:`spectra_key`; it is written
    atomically (temp file, then rename), so a crash or a concurrent run never leaves a half-written cache. An
    unreadable or mismatched file is recomputed and replaced.
    """
    key = spectra_key(view, model_dir)
    path = Path(cache_dir) / f"spectra-{key[:16]}.json"
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    spectra = weight_spectra(view, progress=progress)
    atomic_write_json(path, {"format": "layerlab-spectra", "method": METHOD_VERSION, "key": key,
                             "spectra": [_to_json(s) for s in spectra]})
    return spectra


# ---------------------------------------------------------------------------------------------------- summaries
def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def block_summary(spectra: list[MatrixSpectrum], num_layers: int) -> list[dict]:
    """Per block, the mean ``esd_alpha`` and mean ``stable_rank`` over its matrices, ignoring nan.

    Returns ``num_layers`` dicts ``{"esd_alpha": ..., "stable_rank": ...}``; a block with no finite value (all
    its matrices skipped or degenerate) gets nan.
    """
    alphas: list[list[float]] = [[] for _ in range(num_layers)]
    ranks: list[list[float]] = [[] for _ in range(num_layers)]
    for s in spectra:
        if not 0 <= s.block < num_layers:
            raise LayerlabError(f"spectrum of block {s.block} ({s.name}) is outside 0..{num_layers - 1}")
        alphas[s.block].append(s.esd_alpha)
        ranks[s.block].append(s.stable_rank)
    return [{"esd_alpha": _nanmean(a), "stable_rank": _nanmean(r)} for a, r in zip(alphas, ranks)]
