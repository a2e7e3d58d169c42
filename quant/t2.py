"""Muscle water T2 (T2m) from multi-echo spin echo (MESE) images.

Main model: ``"epg-bicomponent"`` (Marty et al., NMR Biomed 2016;29:431), per voxel

    S(echo n) = M_w * EPG_n(T2w, T1w, B1) + M_f * EPG_n(T2f, T1f, B1)

with the slice-profile EPG of :mod:`quant.epg`, T1w = 1400 ms, T1f = 365 ms and a fat T2
that is fixed per exam (default :data:`DEFAULT_FAT_T2_MS`, or calibrated on
subcutaneous fat with :func:`calibrate_fat_t2`). T2w and B1 come from a dictionary of
EPG atoms on a (T2w x B1) grid: for every atom the two non-negative amplitudes are
solved in closed form (variable projection: the 2x2 non-negative least squares), the
atom with the smallest residual wins. The search is coarse to fine. First every 2nd T2
and B1 atom, in the subspace of the dictionary's first 8 singular vectors. Then hill
climbing from the best of them on a grid four times finer than the dictionary's (its
atoms cubic, Catmull-Rom, interpolated and tabulated once per dictionary): with a
stencil of one grid step, a jump to the Newton step of that stencil, with a stencil of
a quarter step, and a last Newton step (or half of it, where the full step overshoots)
on the quadratic through the 3x3 residuals around the best fine atom (noise free: 99 %
of voxels within 0.05 ms of the true T2w on a 1 ms grid). The PD fat fraction is ``M_f / (M_w + M_f)``; it is T1-weighted unless
the dictionary's :class:`~quant.epg.MeseParameters` carry the protocol's TR.

Noise floor. Magnitude images are Rician: echoes near the noise level are biased
upwards (by up to 1.25 sigma), which the slowly decaying fat component absorbs (for
FF < 5 %: FF +0.5 pp at SNR 100, +1.3 pp at SNR 50). With ``noise_sd`` given, the fit is
repeated with the data corrected by the Rician bias of the current model,
``y - (E[|m + noise|] - m)`` (fixed-point iterations: the model's Rician expectation
then matches the data in the least-squares sense); the result then behaves like a fit
of Gaussian-noise data.

Near FF = 0 the non-negative fat amplitude biases FF upwards (voxels that would
fit a negative fat amplitude are clipped to 0) and, with it, T2w downwards: +0.4 pp and
-0.3 ms at SNR 100, +1.0 pp and -0.8 ms at SNR 50 for FF < 2 %. ``free_fat=True`` lets
the fat amplitude take either sign, which removes that bias of ROI means at the cost
of per-voxel precision near FF = 0 (and per-voxel FF may then be slightly negative).

Fallback model: ``"biexp-fixed-fat"`` (:func:`fit_biexponential_fixed_fat`), the UCL
approach: water and fat exponentials with fixed fat T2, first echo discarded. It
ignores stimulated echoes: where refocusing is imperfect (B1 != 1, slice profiles) their
slowly decaying signal is taken up by the long-T2 fat component, so FF comes out too
high and T2w too short.

Every kernel here is numba (``cache=True``; ``parallel=True`` over voxels) with a
plain-numpy reference of the same name plus ``_reference`` used by the tests.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .epg import MeseParameters, epg_signals
from .errors import QuantError

DEFAULT_WATER_T1_MS = 1400.0
DEFAULT_FAT_T1_MS = 365.0
DEFAULT_FAT_T2_MS = 151.0
"""Fat T2 (ms) when it is not calibrated per exam (Marty et al. 2016, 3 T)."""

MODEL_EPG = "epg-bicomponent"
MODEL_BIEXP = "biexp-fixed-fat"

DEFAULT_T2W_GRID_MS = np.arange(15.0, 80.0 + 1e-9, 1.0)
DEFAULT_B1_GRID = np.round(np.arange(0.5, 1.2 + 1e-9, 0.02), 6)

# status codes of the fit kernels
_NOT_FITTED = 0   # below min_signal or not finite
_OK = 1
_T2_AT_EDGE = 2   # best T2w on the first or last grid point: outside the dictionary
_NO_WATER = 3     # water amplitude 0: T2w undefined


# --------------------------------------------------------------------------- dictionary


@dataclass(frozen=True, eq=False)
class T2Dictionary:
    """EPG atoms of the bi-component model for one sequence.

    Attributes
    ----------
    params : MeseParameters
        Sequence the atoms were computed for.
    t2w_grid_ms, b1_grid : ndarray
        Increasing grids of water T2 (ms) and relative B1.
    water_atoms : ndarray, shape (n_t2, n_b1, n_echoes)
        Water echo magnitudes per unit proton density.
    fat_atoms : ndarray, shape (n_b1, n_echoes)
        Fat echo magnitudes per unit proton density (zero when the dictionary has no
        second component).
    t1w_ms, t1f_ms, t2f_ms : float
        Relaxation times of the atoms (ms).
    key : str
        Stable hash of the sequence key, grids and relaxation times.
    """

    params: MeseParameters
    t2w_grid_ms: np.ndarray
    b1_grid: np.ndarray
    water_atoms: np.ndarray
    fat_atoms: np.ndarray
    t1w_ms: float
    t1f_ms: float
    t2f_ms: float
    key: str

    @property
    def n_atoms(self) -> int:
        """Number of (T2w, B1) atoms."""
        return self.t2w_grid_ms.size * self.b1_grid.size


def _grid(name, values, low, high):
    g = np.asarray(values, dtype=np.float64).ravel()
    if g.size < 3:
        raise QuantError(f"{name} needs at least 3 values, got {g.size}")
    if not np.all(np.isfinite(g)) or np.any(np.diff(g) <= 0):
        raise QuantError(f"{name} must be finite and strictly increasing")
    if g[0] < low or g[-1] > high:
        raise QuantError(f"{name} must lie in [{low}, {high}], got [{g[0]}, {g[-1]}]")
    return g


def table_key(prefix: str, params: MeseParameters, *arrays, digits: int = 24) -> str:
    """``prefix`` + a hash of the sequence and of ``arrays`` (as little-endian float64):
    the name of an EPG table or dictionary, for caches and provenance."""
    h = hashlib.sha256(params.key().encode())
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
    return prefix + h.hexdigest()[:digits]


def _dictionary_key(params, t2_grid, b1_grid, t1w, t1f, t2f):
    return table_key("t2dict-", params, t2_grid, b1_grid, [t1w, t1f, t2f])


def epg_atoms(params: MeseParameters, t2_grid_ms: np.ndarray, b1_grid: np.ndarray, t1_ms: float) -> np.ndarray:
    """EPG echo trains of one component over a (T2, B1) grid, shape (n_T2, n_B1, n_echoes).

    This table depends only on the sequence, the grids and T1, not on the exam: it is
    what a cache keeps (see ``atoms`` of :func:`build_dictionary`)."""
    t2 = np.asarray(t2_grid_ms, dtype=np.float64)
    b1 = np.asarray(b1_grid, dtype=np.float64)
    return epg_signals(t2[:, None], float(t1_ms), b1[None, :], params)


def build_dictionary(params: MeseParameters, t2w_grid_ms=DEFAULT_T2W_GRID_MS, b1_grid=DEFAULT_B1_GRID, *,
                     t1w_ms: float = DEFAULT_WATER_T1_MS, t1f_ms: float = DEFAULT_FAT_T1_MS,
                     t2f_ms: float | None = DEFAULT_FAT_T2_MS, atoms=None) -> T2Dictionary:
    """EPG dictionary of the bi-component water/fat model (numba, parallel over atoms).

    Parameters
    ----------
    params : MeseParameters
        Sequence.
    t2w_grid_ms : array_like
        Water T2 grid (ms), strictly increasing, at least 3 values. Uniform steps of
        0.5-1 ms suit muscle (refinement interpolates between grid points).
    b1_grid : array_like
        B1 grid (relative), strictly increasing, at least 3 values (0.02 steps suit).
    t1w_ms, t1f_ms : float
        Water and fat T1 (ms).
    t2f_ms : float or None
        Fat T2 (ms); ``None`` builds a one-component dictionary (fat atoms zero).
    atoms : callable, optional
        ``atoms(params, t2_grid_ms, b1_grid, t1_ms)`` returning the water table as
        :func:`epg_atoms` does (the default), e.g. from a cache shared across exams and
        workers. The fat column (one fat T2, all B1: a few dozen EPG trains) is always
        simulated here, since fat T2 is calibrated per exam.

    Returns
    -------
    T2Dictionary
    """
    if not isinstance(params, MeseParameters):
        raise QuantError(f"params must be MeseParameters, got {type(params).__name__}")
    t2g = _grid("t2w_grid_ms", t2w_grid_ms, 0.1, 10000.0)
    b1g = _grid("b1_grid", b1_grid, 0.05, 3.0)
    for name, v in (("t1w_ms", t1w_ms), ("t1f_ms", t1f_ms)) + ((("t2f_ms", t2f_ms),) if t2f_ms is not None else ()):
        if not (np.isscalar(v) and math.isfinite(v) and v > 0):
            raise QuantError(f"{name} must be a finite number > 0, got {v!r}")
    water = np.asarray((atoms or epg_atoms)(params, t2g, b1g, float(t1w_ms)), dtype=np.float64)
    if water.shape != (t2g.size, b1g.size, params.n_echoes):
        raise QuantError(f"atoms gave a table of shape {water.shape}, expected "
                         f"{(t2g.size, b1g.size, params.n_echoes)}")
    if t2f_ms is None:
        fat = np.zeros((b1g.size, params.n_echoes))
        t2f = 0.0
    else:
        fat = epg_signals(float(t2f_ms), float(t1f_ms), b1g, params)
        t2f = float(t2f_ms)
    return T2Dictionary(params=params, t2w_grid_ms=t2g, b1_grid=b1g, water_atoms=water, fat_atoms=fat,
                        t1w_ms=float(t1w_ms), t1f_ms=float(t1f_ms), t2f_ms=t2f,
                        key=_dictionary_key(params, t2g, b1g, float(t1w_ms), float(t1f_ms), t2f))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class T2Fit:
    """Per-voxel result of a water T2 fit (arrays of the input's voxel shape).

    Attributes
    ----------
    t2w_ms : ndarray, float32
        Water T2 (ms); NaN where not fitted.
    b1 : ndarray, float32
        Relative B1 (NaN for the bi-exponential model, which has none).
    ff : ndarray, float32
        Proton-density fat fraction ``M_f / (M_w + M_f)`` (0..1) of the same fit.
    m_water, m_fat : ndarray, float32
        Amplitudes (signal units per unit EPG atom: proton densities).
    residual : ndarray, float32
        Root-mean-square residual per echo (signal units).
    success : ndarray, bool
        T2w is usable: fitted, T2w inside the grid (not on its first or last value),
        water amplitude > 0.
    fitted : ndarray, bool
        The voxel had enough signal to be fitted (``ff`` is meaningful where true).
    model : str
        ``"epg-bicomponent"`` or ``"biexp-fixed-fat"``.
    t2f_ms : float
        Fat T2 (ms) used.
    dictionary_key : str
        Key of the EPG dictionary (empty for the bi-exponential model).
    """

    t2w_ms: np.ndarray
    b1: np.ndarray
    ff: np.ndarray
    m_water: np.ndarray
    m_fat: np.ndarray
    residual: np.ndarray
    success: np.ndarray
    fitted: np.ndarray
    model: str
    t2f_ms: float
    dictionary_key: str = ""


# --------------------------------------------------------------------------- Rician mean


@njit(cache=True)
def _i0e(x):
    """exp(-|x|) I0(x): Abramowitz & Stegun 9.8.1/9.8.2 (|error| < 2e-7 relative)."""
    ax = abs(x)
    if ax < 3.75:
        t = (x / 3.75) ** 2
        v = 1.0 + t * (3.5156229 + t * (3.0899424 + t * (1.2067492 + t * (0.2659732 + t * (0.0360768
                                                                                            + t * 0.0045813)))))
        return v * math.exp(-ax)
    t = 3.75 / ax
    v = 0.39894228 + t * (0.01328592 + t * (0.00225319 + t * (-0.00157565 + t * (0.00916281 + t * (
        -0.02057706 + t * (0.02635537 + t * (-0.01647633 + t * 0.00392377)))))))
    return v / math.sqrt(ax)


@njit(cache=True)
def _i1e(x):
    """exp(-|x|) I1(x) for x >= 0: Abramowitz & Stegun 9.8.3/9.8.4."""
    ax = abs(x)
    if ax < 3.75:
        t = (x / 3.75) ** 2
        v = ax * (0.5 + t * (0.87890594 + t * (0.51498869 + t * (0.15084934 + t * (0.02658733 + t * (
            0.00301532 + t * 0.00032411))))))
        return v * math.exp(-ax)
    t = 3.75 / ax
    v = 0.39894228 + t * (-0.03988024 + t * (-0.00362018 + t * (0.00163801 + t * (-0.01031555 + t * (
        0.02282967 + t * (-0.02895312 + t * (0.01787654 - t * 0.00420059)))))))
    return v / math.sqrt(ax)


@njit(cache=True)
def _rician_mean(nu, sigma):
    """E|nu + n| for complex Gaussian noise of SD ``sigma`` per channel (nu >= 0)."""
    if sigma <= 0.0:
        return nu
    x = nu * nu / (2.0 * sigma * sigma)
    if x > 400.0:
        return nu + sigma * sigma / (2.0 * nu)
    return sigma * math.sqrt(math.pi / 2.0) * ((1.0 + x) * _i0e(0.5 * x) + x * _i1e(0.5 * x))


@njit(cache=True, parallel=True)
def _rician_mean_array(nu, sigma, out):
    for i in prange(nu.size):
        out[i] = _rician_mean(nu[i], sigma)


# E|nu + n| / sigma tabulated against nu / sigma (step 1/256 up to 28; beyond, the
# asymptote nu + sigma^2 / (2 nu)), for the fit kernel: linear interpolation is within
# 1.2e-6 sigma of the exact value and much cheaper than two Bessel functions.
_RICE_STEP = 1.0 / 256.0
_RICE_MAX = 28.0


@njit(cache=True)
def _rice_table():
    n = int(_RICE_MAX / _RICE_STEP) + 2
    out = np.empty(n)
    for k in range(n):
        out[k] = _rician_mean(k * _RICE_STEP, 1.0)
    return out


@njit(cache=True, inline="always")
def _rician_mean_fast(nu, sigma, table):
    """:func:`_rician_mean` from ``table`` (see :func:`_rice_table`)."""
    if sigma <= 0.0:
        return nu
    r = nu / sigma
    if r >= _RICE_MAX:
        return nu + sigma * sigma / (2.0 * nu)
    u = r / _RICE_STEP
    k = int(u)
    t = u - k
    return sigma * (table[k] + t * (table[k + 1] - table[k]))


@functools.lru_cache(maxsize=1)
def _rice() -> np.ndarray:
    return _rice_table()


def rician_mean(nu, sigma: float) -> np.ndarray:
    """Mean magnitude ``E|nu + n|`` (numba), ``n`` complex Gaussian of SD ``sigma`` per channel.

    ``sigma * sqrt(pi/2) * 1F1(-1/2; 1; -nu^2 / (2 sigma^2))``; Bessel functions by
    Abramowitz & Stegun 9.8 (relative error < 1e-6).
    """
    nu = np.abs(np.asarray(nu, dtype=np.float64))
    out = np.empty_like(nu)
    _rician_mean_array(nu.ravel(), float(sigma), out.reshape(-1))
    return out


def rician_mean_reference(nu, sigma: float) -> np.ndarray:
    """Plain-numpy/scipy reference of :func:`rician_mean`."""
    from scipy.special import i0e, i1e
    nu = np.abs(np.asarray(nu, dtype=np.float64))
    if sigma <= 0:
        return nu.copy()
    x = nu ** 2 / (2 * sigma ** 2)
    return sigma * np.sqrt(np.pi / 2) * ((1 + x) * i0e(x / 2) + x * i1e(x / 2))


# --------------------------------------------------------------------------- EPG fit kernels


@njit(cache=True)
def _proj2(yw, yf, ww, wf, ff, free_fat):
    """Projection ``y . model`` of the 2x2 least squares with water amplitude >= 0 and
    fat amplitude >= 0 (or of any sign when ``free_fat``), and the amplitudes."""
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
    the Gram matrix is singular), ``inv_ww`` and ``inv_ff`` the inverse norms."""
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
    beyond each grid end: ``water_pad[j + 1, i + 1] = water[j, i]``)."""
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
    not positive definite, 0 along an axis whose stencil leaves the grid."""
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
    return tuple(step if n >= 5 * step else 1 for step, n in zip(_COARSE_STEP, (n_t2, n_b1)))


@njit(cache=True)
def _proj_fine(y, tabs, i, j, free_fat):
    """Projection and amplitudes of fine-grid atom (T2 index ``i``, B1 index ``j``): the
    2x2 least squares with water amplitude >= 0 and fat amplitude >= 0 (any sign when
    ``free_fat``), else the better one-component fit (as :func:`_proj2`)."""
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
    (then ``res3`` holds minus the projections of its 3x3 stencil, NaN off the grid)."""
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
    ``_COARSE_RANK`` singular vectors: its fine-grid indices."""
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
    the projection). Returns (x, yb, a, b) with fractional grid indices, and the model in ``m``."""
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
    non-finite echo, or no echo above ``min_signal``)."""
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
    indices, amplitudes, RMS residual and a status code per voxel."""
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
                for it in range(n_floor_iter):
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


def _pad_linear(arr: np.ndarray, axes) -> np.ndarray:
    """``arr`` with one point added at each end of each of ``axes``, linearly extrapolated
    (the padding :func:`_interp_atoms` expects)."""
    for ax in axes:
        lo = 2 * np.take(arr, [0], axis=ax) - np.take(arr, [1], axis=ax)
        hi = 2 * np.take(arr, [-1], axis=ax) - np.take(arr, [-2], axis=ax)
        arr = np.concatenate([lo, arr, hi], axis=ax)
    return arr


def _cr_matrix(n: int, factor: int) -> np.ndarray:
    """Catmull-Rom interpolation matrix from ``n + 2`` padded grid values to the
    ``factor * (n - 1) + 1`` points of a grid ``factor`` times finer (as
    :func:`_interp_atoms` interpolates)."""
    x = np.arange(factor * (n - 1) + 1) / factor
    ix = np.clip(np.floor(x).astype(int), 0, n - 2)
    w = _cr_weights_numpy(x - ix).T   # (points, 4)
    m = np.zeros((x.size, n + 2))
    for q in range(4):
        m[np.arange(x.size), ix + q] = w[:, q]
    return m


_Tables = collections.namedtuple("_Tables", "water_c fat_c c_a c_b c_c inv_ww inv_ff st sb basis fine fine_fat "
                                             "water_pad fat_pad")
"""What the fit kernel reads. Coarse search (in the rank-``_COARSE_RANK`` subspace):
``water_c`` (n_b1c, rank, n_t2c), ``fat_c`` (n_b1c, rank), the Gram terms of
:func:`_gram_terms` and the strides ``st``, ``sb``, ``basis`` (rank, n_echoes). Fine grid
(``_FINE`` points per grid step), one record per atom for locality: ``fine`` (n_j, n_i,
n_echoes + 4, padded to a multiple of 8 values: the echoes, ``ff/det``, ``wf/det``,
``ww/det``, ``1/ww``), ``fine_fat`` (n_j, n_echoes + 1: the echoes, ``1/ff``). Padded
atoms for interpolation anywhere: ``water_pad`` (n_b1 + 2, n_t2 + 2, n_echoes),
``fat_pad``."""


@functools.lru_cache(maxsize=2)
def _tables(dictionary: T2Dictionary) -> _Tables:
    """The kernel's tables of a dictionary (7.5 MB for 2,376 atoms, 20 ms; cached for the
    last two dictionary objects, as an exam fits several times with one)."""
    water = np.transpose(dictionary.water_atoms, (1, 0, 2))  # (n_b1, n_t2, E)
    fat = np.ascontiguousarray(dictionary.fat_atoms, dtype=np.float64)
    n_b1, n_t2, n_e = water.shape
    water_pad = _pad_linear(water, (0, 1))
    fat_pad = _pad_linear(fat, (0,))
    # fine grid: atoms interpolated _FINE times finer than the dictionary grid
    mb = _cr_matrix(n_b1, _FINE)
    fine = np.einsum("ia,jab->jib", _cr_matrix(n_t2, _FINE), np.einsum("ja,aie->jie", mb, water_pad), optimize=True)
    fine_fat = mb @ fat_pad
    c_a, c_b, c_c, inv_ww, inv_ff = _gram_terms(fine, fine_fat)
    record = np.zeros(fine.shape[:2] + (-(-(n_e + 4) // 8) * 8,))
    record[..., :n_e] = fine
    for k, term in enumerate((c_a, c_b, c_c, inv_ww)):
        record[..., n_e + k] = term
    fat_record = np.concatenate([fine_fat, inv_ff[:, None]], axis=1)
    # coarse subgrid of the first search stage: every st-th T2 and sb-th B1 atom,
    # projected onto the dictionary's first singular vectors
    st, sb = _coarse_strides(n_t2, n_b1)
    basis = _coarse_basis(dictionary)
    wc = water[::sb, ::st] @ basis.T
    fc = fat[::sb] @ basis.T
    c = np.ascontiguousarray
    return _Tables(c(np.transpose(wc, (0, 2, 1))), c(fc), *_gram_terms(wc, fc), st, sb, c(basis), record,
                   c(fat_record), c(water_pad), c(fat_pad))


def _gram_terms(water, fat):
    """Per atom of ``water`` (n_b1, n_t2, E) with ``fat`` (n_b1, E): ``ff/det, wf/det,
    ww/det`` of the 2x2 Gram matrix (0 where it is singular) and the inverse norms
    ``1/ww``, ``1/ff`` (0 for a zero fat atom)."""
    gww = np.einsum("jie,jie->ji", water, water)
    gwf = np.einsum("jie,je->ji", water, fat)
    gff = np.einsum("je,je->j", fat, fat)
    det = gww * gff[:, None] - gwf ** 2
    ok = det > 1e-12 * gww * gff[:, None]
    safe = np.where(ok, det, 1.0)
    c = np.ascontiguousarray
    return (c(np.where(ok, gff[:, None] / safe, 0.0)), c(np.where(ok, gwf / safe, 0.0)),
            c(np.where(ok, gww / safe, 0.0)), c(1.0 / gww), c(np.where(gff > 0, 1.0 / np.where(gff > 0, gff, 1.0), 0.0)))


def _coarse_basis(dictionary: T2Dictionary) -> np.ndarray:
    """(``_COARSE_RANK``, n_echoes): the first right singular vectors of the dictionary's
    unit-norm water and fat atoms."""
    atoms = np.concatenate([dictionary.water_atoms.reshape(-1, dictionary.params.n_echoes), dictionary.fat_atoms])
    norms = np.linalg.norm(atoms, axis=1, keepdims=True)
    atoms = atoms[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    basis = np.zeros((_COARSE_RANK, atoms.shape[1]))   # zero rows where there are fewer echoes
    v = np.linalg.svd(atoms, full_matrices=False)[2][:_COARSE_RANK]
    basis[:v.shape[0]] = v
    return basis


def _check_signals(signals, n_echoes):
    arr = np.asarray(signals)
    if arr.ndim < 1 or arr.shape[-1] != n_echoes:
        raise QuantError(f"signals must have shape (..., {n_echoes}) (echoes last), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise QuantError(f"signals must be real magnitudes, got dtype {arr.dtype}")
    return arr


def _check_noise(noise_sd):
    if noise_sd is None:
        return 0.0
    if not (np.isscalar(noise_sd) and math.isfinite(noise_sd) and noise_sd >= 0):
        raise QuantError(f"noise_sd must be a finite number >= 0 or None, got {noise_sd!r}")
    return float(noise_sd)


def _index_to_value(grid, x):
    out = np.full(x.shape, np.nan)
    ok = np.isfinite(x)
    out[ok] = np.interp(x[ok], np.arange(grid.size), grid)
    return out


def fit_water_t2(signals: np.ndarray, dictionary: T2Dictionary, *, min_signal: float = 0.0,
                 noise_sd: float | None = None, n_floor_iterations: int = 1, free_fat: bool = False) -> T2Fit:
    """Water T2, B1 and PD fat fraction per voxel by the bi-component EPG model (numba, parallel).

    Parameters
    ----------
    signals : ndarray, shape (..., n_echoes)
        Echo magnitudes, echoes last (``np.moveaxis(images, 0, -1)[mask]`` for a
        ``(n_echoes, ...)`` series). float32 or float64.
    dictionary : T2Dictionary
        From :func:`build_dictionary` for this sequence (and exam's fat T2).
    min_signal : float
        Voxels whose largest echo is at most this are not fitted (NaN, ``fitted`` false).
    noise_sd : float or None
        Noise SD per channel of the magnitude images (Rician); when given, the fit
        corrects the noise-floor bias (see the module notes). ``None``: no correction.
    n_floor_iterations : int
        Fixed-point iterations of the noise-floor correction (each refines again from
        the previous fit by hill climbing; one is enough in practice).
    free_fat : bool
        Let the fat amplitude take either sign (unbiased ROI means near FF = 0, see the
        module notes); default: non-negative.

    Returns
    -------
    T2Fit
        ``model="epg-bicomponent"``; ``ff`` is the PD fat fraction (0..1).
    """
    if not isinstance(dictionary, T2Dictionary):
        raise QuantError(f"dictionary must be a T2Dictionary, got {type(dictionary).__name__}")
    arr = _check_signals(signals, dictionary.params.n_echoes)
    sd = _check_noise(noise_sd)
    if not (isinstance(n_floor_iterations, (int, np.integer)) and n_floor_iterations >= 0):
        raise QuantError(f"n_floor_iterations must be an integer >= 0, got {n_floor_iterations!r}")
    shape = arr.shape[:-1]
    y = np.ascontiguousarray(arr.reshape(-1, arr.shape[-1]), dtype=np.float64)
    n = y.shape[0]
    tabs = _tables(dictionary)
    x = np.empty(n)
    yb = np.empty(n)
    a = np.empty(n)
    b = np.empty(n)
    res = np.empty(n)
    status = np.empty(n, dtype=np.int8)
    if n:
        _fit_epg_kernel(y, tabs, float(min_signal), sd, int(n_floor_iterations), bool(free_fat), _rice(),
                        x, yb, a, b, res, status)
    return _result(dictionary, shape, x, yb, a, b, res, status)


def _result(dictionary, shape, x, yb, a, b, res, status):
    fitted = status != _NOT_FITTED
    with np.errstate(invalid="ignore", divide="ignore"):
        ff = np.where(fitted & (a + b > 0), b / (a + b), np.nan)
    t2 = _index_to_value(dictionary.t2w_grid_ms, x)
    b1v = _index_to_value(dictionary.b1_grid, yb)
    t2[~fitted | (status == _NO_WATER)] = np.nan
    f32 = lambda v: v.astype(np.float32).reshape(shape)  # noqa: E731
    return T2Fit(t2w_ms=f32(t2), b1=f32(b1v), ff=f32(ff), m_water=f32(a), m_fat=f32(b), residual=f32(res),
                 success=(status == _OK).reshape(shape), fitted=fitted.reshape(shape), model=MODEL_EPG,
                 t2f_ms=dictionary.t2f_ms, dictionary_key=dictionary.key)


# --------------------------------------------------------------------------- numpy reference of the EPG fit


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


def _cr_weights_numpy(t):
    """Catmull-Rom weights of :func:`_cr_weights` for scalar or array ``t``, shape (4, ...)."""
    return np.array([-0.5 * t ** 3 + t ** 2 - 0.5 * t, 1.5 * t ** 3 - 2.5 * t ** 2 + 1,
                     -1.5 * t ** 3 + 2 * t ** 2 + 0.5 * t, 0.5 * t ** 3 - 0.5 * t ** 2])


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
    :func:`_refine`); atoms interpolated on the fly. Returns (x, yb, a, b)."""
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
    subspace of the dictionary's first singular vectors."""
    st, sb = _coarse_strides(*dictionary.water_atoms.shape[:2])
    basis = _coarse_basis(dictionary)
    W = dictionary.water_atoms[::st, ::sb] @ basis.T
    F = dictionary.fat_atoms[::sb] @ basis.T
    yr = basis @ y
    proj = np.array([[_nnls2_reference(yr, W[i, j], F[j], free_fat)[0] for j in range(W.shape[1])]
                     for i in range(W.shape[0])])
    bi, bj = np.unravel_index(np.argmax(proj), proj.shape)
    return _FINE * st * int(bi), _FINE * sb * int(bj)


def fit_water_t2_reference(signals, dictionary: T2Dictionary, *, noise_sd=None,
                           n_floor_iterations: int = 1, free_fat: bool = False) -> T2Fit:
    """Plain-numpy/scipy reference of :func:`fit_water_t2` (slow; for tests on a few voxels).

    Every atom's amplitudes come from :func:`scipy.optimize.nnls` instead of the
    closed form."""
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
                 model=MODEL_BIEXP, t2f_ms=float(t2f_ms), dictionary_key="")


def fit_biexponential_fixed_fat(signals: np.ndarray, te_ms, t2f_ms: float = DEFAULT_FAT_T2_MS, *,
                                discard_first_echo: bool = True, min_signal: float = 0.0,
                                t2w_grid_ms=DEFAULT_BIEXP_T2W_GRID_MS) -> T2Fit:
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


def fit_biexponential_fixed_fat_reference(signals, te_ms, t2f_ms: float = DEFAULT_FAT_T2_MS, *,
                                          discard_first_echo: bool = True,
                                          t2w_grid_ms=DEFAULT_BIEXP_T2W_GRID_MS) -> T2Fit:
    """Plain-numpy/scipy reference of :func:`fit_biexponential_fixed_fat` (bounded scalar
    minimisation by :func:`scipy.optimize.minimize_scalar`, amplitudes by ``nnls``)."""
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
        neg = lambda t2: -_nnls2_reference(y, np.exp(-te / t2), ef)[0]  # noqa: E731
        i = int(np.argmin([neg(t) for t in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
        t2 = minimize_scalar(neg, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6}).x
        _, a, b = _nnls2_reference(y, np.exp(-te / t2), ef)
        out[:, v] = t2, a, b, np.sqrt(np.mean((y - a * np.exp(-te / t2) - b * ef) ** 2))
        status[v] = _NO_WATER if a <= 0 else _T2_AT_EDGE if i in (0, grid.size - 1) else _OK
    return _biexp_result(shape, out[0], out[1], out[2], out[3], status, t2f_ms)


# --------------------------------------------------------------------------- fat T2 calibration


DEFAULT_FAT_T2_GRID_MS = np.arange(60.0, 300.0 + 1e-9, 2.0)


def calibrate_fat_t2(signals_in_fat_voxels: np.ndarray, params: MeseParameters, *,
                     t2_grid_ms=DEFAULT_FAT_T2_GRID_MS, b1_grid=DEFAULT_B1_GRID,
                     t1f_ms: float = DEFAULT_FAT_T1_MS, water_t2_ms: float | None = 30.0,
                     t1w_ms: float = DEFAULT_WATER_T1_MS, noise_sd: float | None = None,
                     min_voxels: int = 10, atoms=None) -> float:
    """Fat T2 (ms) of this exam from voxels of (nearly) pure fat, e.g. subcutaneous fat.

    Each voxel is fitted with the EPG dictionary machinery, fat T2 and B1 free (fat T1
    ``t1f_ms``); a small water admixture (subcutaneous fat holds a few per cent of
    water) is absorbed by a second component of fixed ``water_t2_ms`` (``None``: pure
    fat, one component). The median over the voxels whose fit succeeded is returned.
    The single-T2 fat model ignores the multi-exponential decay of the fat peaks
    (J-coupling), so the value is an effective T2 for this echo spacing: use it only
    with the same protocol.

    Parameters
    ----------
    signals_in_fat_voxels : ndarray, shape (N, n_echoes)
        Echo magnitudes of fat voxels, echoes last.
    params : MeseParameters
        Sequence.
    t2_grid_ms, b1_grid : array_like
        Search grids for fat T2 (ms) and B1.
    t1f_ms, t1w_ms : float
        Fat and water T1 (ms).
    water_t2_ms : float or None
        T2 (ms) of the water admixture component; ``None`` for none.
    noise_sd : float or None
        Noise SD for the noise-floor correction (see :func:`fit_water_t2`).
    min_voxels : int
        Fewer successful voxels than this raise :class:`~quant.errors.QuantError`.
    atoms : callable, optional
        Source of the EPG tables, as for :func:`build_dictionary`.

    Returns
    -------
    float
        Median fat T2 (ms).
    """
    arr = _check_signals(signals_in_fat_voxels, params.n_echoes).reshape(-1, params.n_echoes)
    # the "water" dimension of this dictionary is fat; the second component is the water admixture
    d = build_dictionary(params, t2_grid_ms, b1_grid, t1w_ms=t1f_ms, t1f_ms=t1w_ms, t2f_ms=water_t2_ms, atoms=atoms)
    fit = fit_water_t2(arr, d, noise_sd=noise_sd)
    ok = fit.success
    if int(ok.sum()) < min_voxels:
        raise QuantError(f"calibrate_fat_t2: only {int(ok.sum())} of {arr.shape[0]} fat voxels gave a fat T2 "
                         f"inside [{d.t2w_grid_ms[0]}, {d.t2w_grid_ms[-1]}] ms (need {min_voxels})")
    return float(np.median(fit.t2w_ms[ok]))


# --------------------------------------------------------------------------- ROI summary


def summarise(t2fit: T2Fit, mask: np.ndarray | None = None) -> dict:
    """ROI summary of a T2 fit for the ``t2w_ms``, ``b1`` and ``ff_t2_percent`` metrics.

    Parameters
    ----------
    t2fit : T2Fit
        Per-voxel fit.
    mask : ndarray of bool or None
        ROI, shaped like the fit's maps; ``None``: every voxel.

    Returns
    -------
    dict
        ``t2w_ms`` (median water T2 over voxels whose T2 fit succeeded), ``t2w_ms_mean``,
        ``t2w_ms_sd``, ``t2w_ms_iqr`` (75th minus 25th percentile), ``b1`` (median),
        ``ff_t2_percent`` (mean PD fat fraction in %, over every fitted voxel),
        ``n_voxels`` (voxels behind the T2 values), ``n_fitted`` (behind FF),
        ``n_roi``, ``model``, ``t2f_ms``. Values are NaN when no voxel qualifies.
    """
    shape = t2fit.t2w_ms.shape
    if mask is None:
        m = np.ones(shape, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != shape:
            raise QuantError(f"mask shape {m.shape} differs from the fit's {shape}")
        m = m.astype(bool)
    ok = m & t2fit.success
    fitted = m & t2fit.fitted & np.isfinite(t2fit.ff)
    t2 = t2fit.t2w_ms[ok].astype(np.float64)
    b1 = t2fit.b1[ok].astype(np.float64)
    ff = t2fit.ff[fitted].astype(np.float64)
    nan = float("nan")
    if t2.size:
        q25, q50, q75 = np.percentile(t2, [25, 50, 75])
        b1_med = float(np.median(b1)) if np.all(np.isfinite(b1)) and b1.size else nan
        out = dict(t2w_ms=float(q50), t2w_ms_mean=float(t2.mean()), t2w_ms_sd=float(t2.std(ddof=1)) if t2.size > 1
                   else nan, t2w_ms_iqr=float(q75 - q25), b1=b1_med)
    else:
        out = dict(t2w_ms=nan, t2w_ms_mean=nan, t2w_ms_sd=nan, t2w_ms_iqr=nan, b1=nan)
    out.update(ff_t2_percent=float(100.0 * ff.mean()) if ff.size else nan, n_voxels=int(t2.size),
               n_fitted=int(ff.size), n_roi=int(m.sum()), model=t2fit.model, t2f_ms=float(t2fit.t2f_ms))
    return out
