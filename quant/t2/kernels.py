"""numba kernels of the EPG dictionary fit: coarse subspace search, fine-grid climb, Newton step."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..rician import _rician_mean_fast
from .dictionary import _NO_WATER, _NOT_FITTED, _OK, _T2_AT_EDGE


@njit(cache=True)
def _proj2(yw, yf, ww, wf, ff, free_fat):
    """Projection ``y . model`` of the 2x2 least squares with water amplitude >= 0 and
    fat amplitude >= 0 (or of any sign when ``free_fat``), and the amplitudes.
    """
    det = ww * ff - wf * wf
    if det > 1e-12 * ww * ff and det > 0.0:
        a = (yw * ff - yf * wf) / det
        b = (yf * ww - yw * wf) / det
        if a >= 0.0 and (b >= 0.0 or free_fat):
            return a * yw + b * yf, a, b
    pw = 0.0
    aw = 0.0
    if yw > 0.0 and ww > 0.0:
        aw = yw / ww
        pw = aw * yw
    pf = 0.0
    bf = 0.0
    if (yf > 0.0 or free_fat) and ff > 0.0:
        bf = yf / ff
        pf = bf * yf
    if pf > pw:
        return pf, 0.0, bf
    return pw, aw, 0.0


@njit(cache=True, fastmath={"nnan", "ninf", "nsz"})
def _coarse_search(yr, t, free_fat, buf):
    """Best atom (i, j) of the coarse subgrid for the voxel ``yr`` projected onto the
    ``_COARSE_RANK`` (= 8) basis vectors: the largest projection (smallest residual).

    The products with the 8 basis coordinates are written out so that they stay in
    registers while the loop over T2 atoms vectorises (twice as fast as a loop over
    them); the atoms' Gram terms ``c_a, c_b, c_c`` are ``ff/det, wf/det, ww/det`` (0 where
    the Gram matrix is singular), ``inv_ww`` and ``inv_ff`` the inverse norms.
    """
    water, fat, c_a, c_b, c_c, inv_ww, inv_ff = t.water_c, t.fat_c, t.c_a, t.c_b, t.c_c, t.inv_ww, t.inv_ff
    y0, y1, y2, y3, y4, y5, y6, y7 = yr[0], yr[1], yr[2], yr[3], yr[4], yr[5], yr[6], yr[7]
    n_t2 = water.shape[2]
    best = -1.0
    bi = 0
    bj = 0
    for j in range(water.shape[0]):
        yf = (y0 * fat[j, 0] + y1 * fat[j, 1] + y2 * fat[j, 2] + y3 * fat[j, 3] + y4 * fat[j, 4] + y5 * fat[j, 5]
              + y6 * fat[j, 6] + y7 * fat[j, 7])
        pf = yf * yf * inv_ff[j] if (yf > 0.0 or free_fat) else 0.0
        for i in range(n_t2):
            buf[i] = (y0 * water[j, 0, i] + y1 * water[j, 1, i] + y2 * water[j, 2, i] + y3 * water[j, 3, i]
                      + y4 * water[j, 4, i] + y5 * water[j, 5, i] + y6 * water[j, 6, i] + y7 * water[j, 7, i])
        for i in range(n_t2):
            yw = buf[i]
            a = yw * c_a[j, i] - yf * c_b[j, i]
            b = yf * c_c[j, i] - yw * c_b[j, i]
            p = a * yw + b * yf
            if a < 0.0 or (b < 0.0 and not free_fat):
                p = 0.0
            ywp = max(yw, 0.0)
            buf[i] = max(p, max(ywp * ywp * inv_ww[j, i], pf))
        row_max = -1.0
        for i in range(n_t2):
            row_max = max(row_max, buf[i])
        if row_max > best:
            best = row_max
            bj = j
            for i in range(n_t2):
                if buf[i] == row_max:
                    bi = i
                    break
    return bi, bj


@njit(cache=True)
def _cr_weights(t, w):
    """Catmull-Rom weights for offsets -1, 0, 1, 2 at fraction t in [0, 1)."""
    t2 = t * t
    t3 = t2 * t
    w[0] = -0.5 * t3 + t2 - 0.5 * t
    w[1] = 1.5 * t3 - 2.5 * t2 + 1.0
    w[2] = -1.5 * t3 + 2.0 * t2 + 0.5 * t
    w[3] = 0.5 * t3 - 0.5 * t2


@njit(cache=True)
def _interp_atoms(water_pad, fat_pad, x, yb, wt, wb, w_out, f_out):
    """Water atom at fractional (T2 index x, B1 index yb) and fat atom at yb, by cubic
    (Catmull-Rom) interpolation of the padded atoms (one linearly extrapolated point
    beyond each grid end: ``water_pad[j + 1, i + 1] = water[j, i]``).
    """
    n_b1 = water_pad.shape[0] - 2
    n_t2 = water_pad.shape[1] - 2
    n_e = w_out.size
    ix = int(math.floor(x)) if math.isfinite(x) else 0
    ix = min(max(ix, 0), n_t2 - 2)
    iy = int(math.floor(yb)) if math.isfinite(yb) else 0
    iy = min(max(iy, 0), n_b1 - 2)
    _cr_weights(x - ix, wt)
    _cr_weights(yb - iy, wb)
    for e in range(n_e):
        w_out[e] = 0.0
        f_out[e] = 0.0
    # padded index ix + p is grid index ix - 1 + p
    for q in range(4):
        for e in range(n_e):
            f_out[e] += wb[q] * fat_pad[iy + q, e]
        for p in range(4):
            c = wt[p] * wb[q]
            for e in range(n_e):
                w_out[e] += c * water_pad[iy + q, ix + p, e]


@njit(cache=True)
def _proj_at(y, water_pad, fat_pad, x, yb, free_fat, wt, wb, w_buf, f_buf):
    _interp_atoms(water_pad, fat_pad, x, yb, wt, wb, w_buf, f_buf)
    yw = 0.0
    yf = 0.0
    ww = 0.0
    wf = 0.0
    ff = 0.0
    for e in range(y.size):
        yw += y[e] * w_buf[e]
        yf += y[e] * f_buf[e]
        ww += w_buf[e] * w_buf[e]
        wf += w_buf[e] * f_buf[e]
        ff += f_buf[e] * f_buf[e]
    return _proj2(yw, yf, ww, wf, ff, free_fat)


@njit(cache=True)
def _newton_step(r, has_x, has_y):
    """Minimiser offset (dx, dy), each clamped to [-1, 1], of the quadratic through the
    3x3 values ``r`` (unit spacing); separable 1-D parabolas where the 2-D Hessian is
    not positive definite, 0 along an axis whose stencil leaves the grid.
    """
    f0 = r[1, 1]
    gx = 0.0
    hxx = 0.0
    gy = 0.0
    hyy = 0.0
    if has_x:
        gx = 0.5 * (r[2, 1] - r[0, 1])
        hxx = r[2, 1] - 2.0 * f0 + r[0, 1]
    if has_y:
        gy = 0.5 * (r[1, 2] - r[1, 0])
        hyy = r[1, 2] - 2.0 * f0 + r[1, 0]
    dx = 0.0
    dy = 0.0
    done = False
    if has_x and has_y and hxx > 0.0 and hyy > 0.0:
        hxy = 0.25 * (r[2, 2] - r[2, 0] - r[0, 2] + r[0, 0])
        det = hxx * hyy - hxy * hxy
        if det > 0.0:
            dx = -(hyy * gx - hxy * gy) / det
            dy = -(hxx * gy - hxy * gx) / det
            done = True
    if not done:
        if has_x and hxx > 0.0:
            dx = -gx / hxx
        if has_y and hyy > 0.0:
            dy = -gy / hyy
    return min(max(dx, -1.0), 1.0), min(max(dy, -1.0), 1.0)


_COARSE_RANK = 8   # singular vectors of the dictionary that the coarse search works in (8: written out in it)
_FINE = 4          # the refinement's fine grid: _FINE points per grid step (interpolated atoms, tabulated)
_MAX_MOVES = 64    # hill-climbing moves per stencil spacing (a bound for flat valleys; 1-2 are typical)
_COARSE_STEP = (2, 2)  # T2 and B1 strides of the coarse first search (grids of 5 strides or more);
# a T2 stride of 3 lost the global minimum for some noise-free voxels at FF < 1 % (kinked surface)


def _coarse_strides(n_t2: int, n_b1: int) -> tuple[int, int]:
    """T2 and B1 strides of the coarse search for a grid of that size."""
    step_t2, step_b1 = _COARSE_STEP
    return (step_t2 if n_t2 >= 5 * step_t2 else 1, step_b1 if n_b1 >= 5 * step_b1 else 1)


@njit(cache=True)
def _proj_fine(y, tabs, i, j, free_fat):
    """Projection and amplitudes of fine-grid atom (T2 index ``i``, B1 index ``j``): the
    2x2 least squares with water amplitude >= 0 and fat amplitude >= 0 (any sign when
    ``free_fat``), else the better one-component fit (as :func:`_proj2`).
    """
    n_e = y.size
    atom = tabs.fine[j, i]    # echoes, then ff/det, wf/det, ww/det, 1/ww
    fat = tabs.fine_fat[j]    # echoes, then 1/ff
    yw = 0.0
    yf = 0.0
    for e in range(n_e):
        yw += y[e] * atom[e]
        yf += y[e] * fat[e]
    if atom[n_e] != 0.0:
        a = yw * atom[n_e] - yf * atom[n_e + 1]
        b = yf * atom[n_e + 2] - yw * atom[n_e + 1]
        if a >= 0.0 and (b >= 0.0 or free_fat):
            return a * yw + b * yf, a, b
    aw = max(yw, 0.0) * atom[n_e + 3]
    bf = yf * fat[n_e] if (yf > 0.0 or free_fat) else 0.0
    if bf * yf > aw * yw:
        return bf * yf, 0.0, bf
    return aw * yw, aw, 0.0


@njit(cache=True)
def _climb(y, tabs, i, j, h, best, a, b, free_fat, res3):
    """Hill climbing on the fine grid with stencil spacing ``h`` (fine steps) from atom
    (i, j) of projection ``best``: move to the best of the 8 neighbours while one is
    better, at most ``_MAX_MOVES`` times. Returns the new atom and whether it settled
    (then ``res3`` holds minus the projections of its 3x3 stencil, NaN off the grid).
    """
    n_i = tabs.fine.shape[1]
    n_j = tabs.fine.shape[0]
    for _ in range(_MAX_MOVES + 1):
        bi, bj, bp, ba, bb = i, j, best, a, b
        for di in range(3):
            for dj in range(3):
                ii = i + (di - 1) * h
                jj = j + (dj - 1) * h
                if di == 1 and dj == 1:
                    res3[1, 1] = -best
                elif 0 <= ii < n_i and 0 <= jj < n_j:
                    p, a1, b1 = _proj_fine(y, tabs, ii, jj, free_fat)
                    res3[di, dj] = -p
                    if p > bp:
                        bi, bj, bp, ba, bb = ii, jj, p, a1, b1
                else:
                    res3[di, dj] = np.nan
        if bi == i and bj == j:
            return i, j, best, a, b, True
        i, j, best, a, b = bi, bj, bp, ba, bb
    return i, j, best, a, b, False


@njit(cache=True)
def _search(y, yr, tabs, free_fat, yw_buf):
    """Best atom of the coarse subgrid (every ``st``-th T2 and ``sb``-th B1 atom, the
    whole grid for small grids), searched in the subspace of the dictionary's first
    ``_COARSE_RANK`` singular vectors: its fine-grid indices.
    """
    t = tabs
    for r in range(yr.size):
        acc = 0.0
        for e in range(y.size):
            acc += t.basis[r, e] * y[e]
        yr[r] = acc
    ci, cj = _coarse_search(yr, t, free_fat, yw_buf)
    return ci * t.st * _FINE, cj * t.sb * _FINE


@njit(cache=True)
def _refine(y, tabs, i, j, free_fat, wt, wb, w_buf, f_buf, res3, m):
    """Refinement from fine-grid atom (i, j): hill climbing with a stencil of one grid
    step, a jump to the fine atom nearest the Newton step on that stencil (if it is
    better), hill climbing on the fine grid (1/4 grid step), then a Newton step on
    that stencil, or half of it, evaluated with interpolated atoms (kept if it raises
    the projection). Returns (x, yb, a, b) with fractional grid indices, and the model in ``m``.
    """
    fine, fine_fat = tabs.fine, tabs.fine_fat
    n_i = fine.shape[1]
    n_j = fine.shape[0]
    best, a, b = _proj_fine(y, tabs, i, j, free_fat)
    i, j, best, a, b, settled = _climb(y, tabs, i, j, _FINE, best, a, b, free_fat, res3)
    if settled:   # jump to the nearest fine atom of the Newton step on the grid-spacing stencil
        dx, dy = _newton_step(res3, math.isfinite(res3[0, 1] + res3[2, 1]), math.isfinite(res3[1, 0] + res3[1, 2]))
        ii = i + int(round(dx * _FINE))
        jj = j + int(round(dy * _FINE))
        if ii != i or jj != j:
            p, a1, b1 = _proj_fine(y, tabs, ii, jj, free_fat)
            if p > best:
                i, j, best, a, b = ii, jj, p, a1, b1
    i, j, best, a, b, settled = _climb(y, tabs, i, j, 1, best, a, b, free_fat, res3)
    if settled:
        dx, dy = _newton_step(res3, 0 < i < n_i - 1, 0 < j < n_j - 1)
        for scale in (1.0, 0.5):   # the half step where the full one overshoots (the kink at fat 0)
            if dx == 0.0 and dy == 0.0:
                break
            x = (i + scale * dx) / _FINE
            yb = (j + scale * dy) / _FINE
            p, a1, b1 = _proj_at(y, tabs.water_pad, tabs.fat_pad, x, yb, free_fat, wt, wb, w_buf, f_buf)
            if p >= best:
                for e in range(m.size):
                    m[e] = a1 * w_buf[e] + b1 * f_buf[e]
                return x, yb, a1, b1
    for e in range(m.size):
        m[e] = a * fine[j, i, e] + b * fine_fat[j, e]
    return i / _FINE, j / _FINE, a, b


@njit(cache=True, inline="always")
def _load_voxel(signals, v, y, min_signal):
    """Copy voxel ``v``'s echoes into ``y``; False where it is not to be fitted (a
    non-finite echo, or no echo above ``min_signal``).
    """
    ok = True
    smax = 0.0
    for e in range(y.size):
        y[e] = signals[v, e]
        if not math.isfinite(y[e]):
            ok = False
        smax = max(smax, y[e])
    return ok and smax > min_signal and smax > 0.0


@njit(cache=True, parallel=True)
def _fit_epg_kernel(signals, tabs, min_signal, noise_sd, n_floor_iter, free_fat, rice,
                    out_x, out_y, out_a, out_b, out_res, out_status):
    """Variable-projection dictionary fit of every voxel (rows of ``signals``).

    ``tabs`` holds the dictionary tables of :func:`_tables`. Outputs fractional grid
    indices, amplitudes, RMS residual and a status code per voxel.
    """
    fine, fine_fat = tabs.fine, tabs.fine_fat
    n_t2 = tabs.water_pad.shape[1] - 2
    n_i = fine.shape[1]
    n_j = fine.shape[0]
    n_vox = signals.shape[0]
    n_e = signals.shape[1]
    n_chunks = min(n_vox, 1024)
    for c in prange(n_chunks):
        y = np.empty(n_e)
        yr = np.empty(tabs.basis.shape[0])
        y_eff = np.empty(n_e)
        m = np.empty(n_e)
        yw_buf = np.empty(tabs.water_c.shape[2])
        wt = np.empty(4)
        wb = np.empty(4)
        w_buf = np.empty(n_e)
        f_buf = np.empty(n_e)
        res3 = np.empty((3, 3))
        for v in range(c, n_vox, n_chunks):
            if not _load_voxel(signals, v, y, min_signal):
                out_x[v] = np.nan
                out_y[v] = np.nan
                out_a[v] = np.nan
                out_b[v] = np.nan
                out_res[v] = np.nan
                out_status[v] = _NOT_FITTED
                continue
            i, j = _search(y, yr, tabs, free_fat, yw_buf)
            if noise_sd > 0.0 and n_floor_iter > 0:
                # noise-floor iterations: refine on the data less the Rician bias of the
                # current model, the first time that of the best coarse atom
                _, a, b = _proj_fine(y, tabs, i, j, free_fat)
                for e in range(n_e):
                    m[e] = a * fine[j, i, e] + b * fine_fat[j, e]
                for _ in range(n_floor_iter):
                    for e in range(n_e):
                        y_eff[e] = y[e] - (_rician_mean_fast(m[e], noise_sd, rice) - m[e])
                    x, yb, a, b = _refine(y_eff, tabs, i, j, free_fat, wt, wb, w_buf, f_buf, res3, m)
                    i = min(max(int(round(x * _FINE)), 0), n_i - 1)
                    j = min(max(int(round(yb * _FINE)), 0), n_j - 1)
            else:
                x, yb, a, b = _refine(y, tabs, i, j, free_fat, wt, wb, w_buf, f_buf, res3, m)
            # RMS residual of the model (its Rician mean with noise_sd) against the data
            ss = 0.0
            for e in range(n_e):
                if noise_sd > 0.0:
                    d = y[e] - _rician_mean_fast(m[e], noise_sd, rice)
                else:
                    d = y[e] - m[e]
                ss += d * d
            out_x[v] = x
            out_y[v] = yb
            out_a[v] = a
            out_b[v] = b
            out_res[v] = math.sqrt(ss / n_e)
            if a <= 0.0:
                out_status[v] = _NO_WATER
            elif x <= 0.0 or x >= n_t2 - 1:
                out_status[v] = _T2_AT_EDGE
            else:
                out_status[v] = _OK
