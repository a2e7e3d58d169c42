"""Fallback water-T2 model: bi-exponential with a fixed fat T2 (the UCL approach), and its numpy reference."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from ..enums import Model
from ..errors import QuantError
from .dictionary import (
    _NO_WATER,
    _NOT_FITTED,
    _OK,
    _T2_AT_EDGE,
    DEFAULT_FAT_T2_MS,
    _grid,
)
from .fit import T2Fit, _check_signals
from .kernels import _load_voxel, _proj2
from .reference import _nnls2_reference


@njit(cache=True)
def _biexp_proj(y, te, t2w, ef, gff, ew):
    """Projection and amplitudes of the bi-exponential with water T2 ``t2w`` (fat vector ``ef``)."""
    yw = 0.0
    yf = 0.0
    ww = 0.0
    wf = 0.0
    for e in range(y.size):
        ew[e] = math.exp(-te[e] / t2w)
        yw += y[e] * ew[e]
        yf += y[e] * ef[e]
        ww += ew[e] * ew[e]
        wf += ew[e] * ef[e]
    return _proj2(yw, yf, ww, wf, gff, False)


@njit(cache=True, parallel=True)
def _fit_biexp_kernel(signals, te, t2f, t2_grid, min_signal, out_t2, out_a, out_b, out_res, out_status):
    """Grid search over ``t2_grid`` then golden-section search between its neighbours."""
    n_vox = signals.shape[0]
    n_e = signals.shape[1]
    n_g = t2_grid.size
    ef = np.empty(n_e)
    gff = 0.0
    for e in range(n_e):
        ef[e] = math.exp(-te[e] / t2f)
        gff += ef[e] * ef[e]
    invphi = (math.sqrt(5.0) - 1.0) / 2.0
    n_chunks = min(n_vox, 1024)
    for c in prange(n_chunks):
        y = np.empty(n_e)
        ew = np.empty(n_e)
        for v in range(c, n_vox, n_chunks):
            if not _load_voxel(signals, v, y, min_signal):
                out_t2[v] = np.nan
                out_a[v] = np.nan
                out_b[v] = np.nan
                out_res[v] = np.nan
                out_status[v] = _NOT_FITTED
                continue
            best = -1.0
            bi = 0
            for g in range(n_g):
                p, _, _ = _biexp_proj(y, te, t2_grid[g], ef, gff, ew)
                if p > best:
                    best = p
                    bi = g
            lo = t2_grid[max(bi - 1, 0)]
            hi = t2_grid[min(bi + 1, n_g - 1)]
            c1 = hi - invphi * (hi - lo)
            c2 = lo + invphi * (hi - lo)
            p1, _, _ = _biexp_proj(y, te, c1, ef, gff, ew)
            p2, _, _ = _biexp_proj(y, te, c2, ef, gff, ew)
            for _ in range(40):
                if p1 > p2:
                    hi = c2
                    c2 = c1
                    p2 = p1
                    c1 = hi - invphi * (hi - lo)
                    p1, _, _ = _biexp_proj(y, te, c1, ef, gff, ew)
                else:
                    lo = c1
                    c1 = c2
                    p1 = p2
                    c2 = lo + invphi * (hi - lo)
                    p2, _, _ = _biexp_proj(y, te, c2, ef, gff, ew)
            t2 = 0.5 * (lo + hi)
            p, a, b = _biexp_proj(y, te, t2, ef, gff, ew)
            if p < best:
                t2 = t2_grid[bi]
                p, a, b = _biexp_proj(y, te, t2, ef, gff, ew)
            ss = 0.0
            for e in range(n_e):
                d = y[e] - a * ew[e] - b * ef[e]
                ss += d * d
            out_t2[v] = t2
            out_a[v] = a
            out_b[v] = b
            out_res[v] = math.sqrt(ss / n_e)
            if a <= 0.0:
                out_status[v] = _NO_WATER
            elif bi == 0 or bi == n_g - 1:
                out_status[v] = _T2_AT_EDGE
            else:
                out_status[v] = _OK


DEFAULT_BIEXP_T2W_GRID_MS = np.geomspace(5.0, 140.0, 160)


def _biexp_inputs(signals, te_ms, t2f_ms, discard_first_echo):
    te = np.asarray(te_ms, dtype=np.float64).ravel()
    if te.size < 3 or not np.all(np.isfinite(te)) or np.any(np.diff(te) <= 0) or te[0] <= 0:
        raise QuantError("te_ms must be at least 3 increasing echo times > 0 (ms)")
    arr = _check_signals(signals, te.size)
    if not (np.isscalar(t2f_ms) and math.isfinite(t2f_ms) and t2f_ms > 0):
        raise QuantError(f"t2f_ms must be a finite number > 0, got {t2f_ms!r}")
    start = 1 if discard_first_echo else 0
    if te.size - start < 3:
        raise QuantError("need at least 3 echoes after discarding the first")
    y = np.ascontiguousarray(arr.reshape(-1, te.size)[:, start:], dtype=np.float64)
    return arr.shape[:-1], y, np.ascontiguousarray(te[start:])


def _biexp_result(shape, t2, a, b, res, status, t2f_ms):
    fitted = status != _NOT_FITTED
    with np.errstate(invalid="ignore", divide="ignore"):
        ff = np.where(fitted & (a + b > 0), b / (a + b), np.nan)
    t2 = np.where(fitted & (status != _NO_WATER), t2, np.nan)
    f32 = lambda v: np.asarray(v, dtype=np.float32).reshape(shape)  # noqa: E731
    return T2Fit(t2w_ms=f32(t2), b1=f32(np.full(t2.shape, np.nan)), ff=f32(ff), m_water=f32(a), m_fat=f32(b),
                 residual=f32(res), success=(status == _OK).reshape(shape), fitted=fitted.reshape(shape),
                 model=Model.BIEXP_FIXED_FAT.value, t2f_ms=float(t2f_ms), dictionary_key="")


def fit_biexponential_fixed_fat(signals: np.ndarray, te_ms: Sequence[float] | np.ndarray,
                                t2f_ms: float = DEFAULT_FAT_T2_MS, *,
                                discard_first_echo: bool = True, min_signal: float = 0.0,
                                t2w_grid_ms: Sequence[float] | np.ndarray = DEFAULT_BIEXP_T2W_GRID_MS) -> T2Fit:
    """Water T2 by the bi-exponential model with fixed fat T2 (numba, parallel).

    ``S(TE) = M_w exp(-TE/T2w) + M_f exp(-TE/T2f)``, both amplitudes non-negative and
    solved in closed form for each T2w; T2w by a grid search then a golden-section
    search between the neighbours of the best grid point. This is the published UCL
    approach (first echo discarded to lessen the stimulated-echo bias). It has no B1:
    with imperfect refocusing (B1 != 1, slice profiles) stimulated echoes slow the
    apparent decay and T2w comes out too long.

    Parameters
    ----------
    signals : ndarray, shape (..., n_echoes)
        Echo magnitudes, echoes last.
    te_ms : array_like
        Echo times (ms), increasing.
    t2f_ms : float
        Fat T2 (ms).
    discard_first_echo : bool
        Leave the first echo out of the fit.
    min_signal : float
        Voxels whose largest echo is at most this are not fitted.
    t2w_grid_ms : array_like
        Search grid of water T2 (ms).

    Returns
    -------
    T2Fit
        ``model="biexp-fixed-fat"``, ``b1`` NaN; ``ff`` is ``M_f / (M_w + M_f)``
        extrapolated to TE = 0.
    """
    shape, y, te = _biexp_inputs(signals, te_ms, t2f_ms, discard_first_echo)
    grid = _grid("t2w_grid_ms", t2w_grid_ms, 0.1, 10000.0)
    n = y.shape[0]
    t2 = np.empty(n)
    a = np.empty(n)
    b = np.empty(n)
    res = np.empty(n)
    status = np.empty(n, dtype=np.int8)
    if n:
        _fit_biexp_kernel(y, te, float(t2f_ms), grid, float(min_signal), t2, a, b, res, status)
    return _biexp_result(shape, t2, a, b, res, status, t2f_ms)


def fit_biexponential_fixed_fat_reference(signals: np.ndarray, te_ms: Sequence[float] | np.ndarray,
                                          t2f_ms: float = DEFAULT_FAT_T2_MS, *,
                                          discard_first_echo: bool = True,
                                          t2w_grid_ms: Sequence[float] | np.ndarray = DEFAULT_BIEXP_T2W_GRID_MS,
                                          ) -> T2Fit:
    """Plain-numpy/scipy reference of :func:`fit_biexponential_fixed_fat` (bounded scalar
    minimisation by :func:`scipy.optimize.minimize_scalar`, amplitudes by ``nnls``).
    """
    from scipy.optimize import minimize_scalar
    shape, y_all, te = _biexp_inputs(signals, te_ms, t2f_ms, discard_first_echo)
    grid = np.asarray(t2w_grid_ms, dtype=np.float64)
    ef = np.exp(-te / t2f_ms)
    n = y_all.shape[0]
    out = np.full((4, n), np.nan)
    status = np.zeros(n, dtype=np.int8)
    for v in range(n):
        y = y_all[v]
        if y.max() <= 0:
            continue
        neg = lambda t2, y=y: -_nnls2_reference(y, np.exp(-te / t2), ef)[0]  # noqa: E731
        i = int(np.argmin([neg(t) for t in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        t2 = minimize_scalar(neg, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}).x
        _, a, b = _nnls2_reference(y, np.exp(-te / t2), ef)
        out[:, v] = t2, a, b, np.sqrt(np.mean((y - a * np.exp(-te / t2) - b * ef) ** 2))
        status[v] = _NO_WATER if a <= 0 else _T2_AT_EDGE if i in (0, grid.size - 1) else _OK
    return _biexp_result(shape, out[0], out[1], out[2], out[3], status, t2f_ms)

