"""Plain-numpy references of the T2 fit kernels, used by the tests."""

from __future__ import annotations

import numpy as np

from ..rician import rician_mean_reference
from .dictionary import _NO_WATER, _OK, _T2_AT_EDGE, T2Dictionary
from .fit import T2Fit, _result
from .kernels import _FINE, _MAX_MOVES, _coarse_strides
from .tables import _coarse_basis, _cr_weights_numpy, _pad_linear


def _nnls2_reference(y, w, f, free_fat=False):
    """2-column bounded least squares by scipy (reference); returns (proj, a, b)."""
    from scipy.optimize import lsq_linear, nnls
    A = np.stack([w, f], axis=1)
    if not np.any(f):
        a = max(float(y @ w) / float(w @ w), 0.0)
        return a * float(y @ w), a, 0.0
    if free_fat:
        a, b = lsq_linear(A, y, bounds=([0.0, -np.inf], [np.inf, np.inf]), method="bvls", tol=1e-14).x
    else:
        (a, b), _ = nnls(A, y)
    return float(y @ (a * w + b * f)), float(a), float(b)


def _interp_reference(dictionary, x, yb):
    W = dictionary.water_atoms  # (n_t2, n_b1, E)
    F = dictionary.fat_atoms
    # pad by linear extrapolation, one point each side
    Wp = _pad_linear(W, (0, 1))
    Fp = _pad_linear(F, (0,))
    ix = int(np.clip(np.floor(x), 0, W.shape[0] - 2))
    iy = int(np.clip(np.floor(yb), 0, W.shape[1] - 2))
    wt = _cr_weights_numpy(x - ix)
    wb = _cr_weights_numpy(yb - iy)
    block = Wp[ix:ix + 4, iy:iy + 4]  # padded index ix..ix+3 == grid ix-1..ix+2
    w = np.einsum("p,q,pqe->e", wt, wb, block)
    f = np.einsum("q,qe->e", wb, Fp[iy:iy + 4])
    return w, f


def _newton_reference(r, has_x, has_y):
    g = np.zeros(2)
    h = np.zeros((2, 2))
    if has_x:
        g[0] = (r[2, 1] - r[0, 1]) / 2
        h[0, 0] = r[2, 1] - 2 * r[1, 1] + r[0, 1]
    if has_y:
        g[1] = (r[1, 2] - r[1, 0]) / 2
        h[1, 1] = r[1, 2] - 2 * r[1, 1] + r[1, 0]
    if has_x and has_y and h[0, 0] > 0 and h[1, 1] > 0:
        h[0, 1] = h[1, 0] = (r[2, 2] - r[2, 0] - r[0, 2] + r[0, 0]) / 4
    if h[0, 1] != 0 and np.linalg.det(h) > 0:
        d = -np.linalg.solve(h, g)
    else:
        d = np.array([-g[0] / h[0, 0] if h[0, 0] > 0 else 0.0, -g[1] / h[1, 1] if h[1, 1] > 0 else 0.0])
    return np.clip(d, -1, 1)


def _refine_reference(y, dictionary, i, j, free_fat=False):
    """Hill climbing on the fine grid from fine atom (i, j), then the Newton step (as
    :func:`_refine`); atoms interpolated on the fly. Returns (x, yb, a, b).
    """
    n_i = _FINE * (dictionary.t2w_grid_ms.size - 1) + 1
    n_j = _FINE * (dictionary.b1_grid.size - 1) + 1

    def at(x, yb):
        w, f = _interp_reference(dictionary, x, yb)
        return _nnls2_reference(y, w, f, free_fat)

    def climb(i, j, h, best, a, b):
        for _ in range(_MAX_MOVES + 1):
            r = np.full((3, 3), np.nan)
            r[1, 1] = -best
            move = (best, i, j, a, b)
            for di in range(3):
                for dj in range(3):
                    ii, jj = i + (di - 1) * h, j + (dj - 1) * h
                    if (di, dj) == (1, 1) or not (0 <= ii < n_i and 0 <= jj < n_j):
                        continue
                    p, a1, b1 = at(ii / _FINE, jj / _FINE)
                    r[di, dj] = -p
                    if p > move[0]:
                        move = (p, ii, jj, a1, b1)
            if move[1:3] == (i, j):
                return i, j, best, a, b, r
            best, i, j, a, b = move
        return i, j, best, a, b, None

    best, a, b = at(i / _FINE, j / _FINE)
    i, j, best, a, b, r = climb(i, j, _FINE, best, a, b)
    if r is not None:
        d = _newton_reference(r, np.isfinite(r[0, 1] + r[2, 1]), np.isfinite(r[1, 0] + r[1, 2]))
        ii, jj = i + int(round(d[0] * _FINE)), j + int(round(d[1] * _FINE))
        if (ii, jj) != (i, j):
            p, a1, b1 = at(ii / _FINE, jj / _FINE)
            if p > best:
                i, j, best, a, b = ii, jj, p, a1, b1
    i, j, best, a, b, r = climb(i, j, 1, best, a, b)
    settled = r is not None
    x, yb = i / _FINE, j / _FINE
    if settled:
        d = _newton_reference(r, 0 < i < n_i - 1, 0 < j < n_j - 1)
        for scale in ((1.0, 0.5) if np.any(d) else ()):
            p, a1, b1 = at((i + scale * d[0]) / _FINE, (j + scale * d[1]) / _FINE)
            if p >= best:
                x, yb, a, b = (i + scale * d[0]) / _FINE, (j + scale * d[1]) / _FINE, a1, b1
                break
    return x, yb, a, b


def _best_atom_reference(y, dictionary, free_fat=False):
    """Fine-grid indices of the best atom of the coarse subgrid, by brute force in the
    subspace of the dictionary's first singular vectors.
    """
    st, sb = _coarse_strides(*dictionary.water_atoms.shape[:2])
    basis = _coarse_basis(dictionary)
    W = dictionary.water_atoms[::st, ::sb] @ basis.T
    F = dictionary.fat_atoms[::sb] @ basis.T
    yr = basis @ y
    proj = np.array([[_nnls2_reference(yr, W[i, j], F[j], free_fat)[0] for j in range(W.shape[1])]
                     for i in range(W.shape[0])])
    bi, bj = np.unravel_index(np.argmax(proj), proj.shape)
    return _FINE * st * int(bi), _FINE * sb * int(bj)


def fit_water_t2_reference(signals: np.ndarray, dictionary: T2Dictionary, *, noise_sd: float | None = None,
                           n_floor_iterations: int = 1, free_fat: bool = False) -> T2Fit:
    """Plain-numpy/scipy reference of :func:`fit_water_t2` (slow; for tests on a few voxels).

    Every atom's amplitudes come from :func:`scipy.optimize.nnls` instead of the
    closed form.
    """
    arr = np.asarray(signals, dtype=np.float64)
    shape = arr.shape[:-1]
    y_all = arr.reshape(-1, arr.shape[-1])
    n = y_all.shape[0]
    x = np.full(n, np.nan)
    yb = np.full(n, np.nan)
    a = np.full(n, np.nan)
    b = np.full(n, np.nan)
    res = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int8)
    sd = 0.0 if noise_sd is None else float(noise_sd)
    n_i = _FINE * (dictionary.t2w_grid_ms.size - 1) + 1
    n_j = _FINE * (dictionary.b1_grid.size - 1) + 1

    def model(xv, yv, av, bv):
        w, f = _interp_reference(dictionary, xv, yv)
        return av * w + bv * f

    for v in range(n):
        y = y_all[v]
        if not np.all(np.isfinite(y)) or y.max() <= 0:
            continue
        i, j = _best_atom_reference(y, dictionary, free_fat)
        if sd > 0 and n_floor_iterations > 0:
            w, f = _interp_reference(dictionary, i / _FINE, j / _FINE)
            _, av, bv = _nnls2_reference(y, w, f, free_fat)
            m = av * w + bv * f
            for _ in range(n_floor_iterations):
                xv, yv, av, bv = _refine_reference(y - (rician_mean_reference(m, sd) - m), dictionary, i, j,
                                                   free_fat)
                m = model(xv, yv, av, bv)
                i = int(np.clip(round(xv * _FINE), 0, n_i - 1))
                j = int(np.clip(round(yv * _FINE), 0, n_j - 1))
        else:
            xv, yv, av, bv = _refine_reference(y, dictionary, i, j, free_fat)
            m = model(xv, yv, av, bv)
        pred = rician_mean_reference(m, sd) if sd > 0 else m
        x[v], yb[v], a[v], b[v] = xv, yv, av, bv
        res[v] = np.sqrt(np.mean((y - pred) ** 2))
        n_t2 = dictionary.t2w_grid_ms.size
        status[v] = _NO_WATER if av <= 0 else _T2_AT_EDGE if (xv <= 0 or xv >= n_t2 - 1) else _OK
    return _result(dictionary, shape, x, yb, a, b, res, status)


# --------------------------------------------------------------------------- bi-exponential fallback
