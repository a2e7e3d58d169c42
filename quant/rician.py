"""Rician statistics shared by the Dixon and T2 fits: Bessel functions, log-likelihood terms, the mean magnitude."""

from __future__ import annotations

import functools
import math

import numpy as np
import numpy.typing as npt
from numba import njit, prange

# Bessel I0, I1 after Abramowitz & Stegun 9.8.1-9.8.4: one implementation for every kernel

@njit(cache=True, inline="always")
def _i0_poly(ax):
    """I0(x) for x < 3.75, else sqrt(x) exp(-x) I0(x)."""
    if ax < 3.75:
        y = (ax / 3.75) ** 2
        return 1.0 + y * (3.5156229 + y * (3.0899424 + y * (1.2067492 + y * (
            0.2659732 + y * (0.0360768 + y * 0.0045813)))))
    y = 3.75 / ax
    return 0.39894228 + y * (0.01328592 + y * (0.00225319 + y * (-0.00157565 + y * (
        0.00916281 + y * (-0.02057706 + y * (0.02635537 + y * (-0.01647633 + y * 0.00392377)))))))


@njit(cache=True, inline="always")
def _i1_poly(ax):
    """I1(x) for x < 3.75, else sqrt(x) exp(-x) I1(x)."""
    if ax < 3.75:
        y = (ax / 3.75) ** 2
        return ax * (0.5 + y * (0.87890594 + y * (0.51498869 + y * (0.15084934 + y * (
            0.02658733 + y * (0.00301532 + y * 0.00032411))))))
    y = 3.75 / ax
    p = 0.02282967 + y * (-0.02895312 + y * (0.01787654 - y * 0.00420059))
    return 0.39894228 + y * (-0.03988024 + y * (-0.00362018 + y * (0.00163801 + y * (-0.01031555 + y * p))))


@njit(cache=True, inline="always")
def i0e(x: float) -> float:
    """exp(-|x|) I0(x) (relative error < 2e-7)."""
    ax = abs(x)
    if ax < 3.75:
        return _i0_poly(ax) * math.exp(-ax)
    return _i0_poly(ax) / math.sqrt(ax)


@njit(cache=True, inline="always")
def i1e(x: float) -> float:
    """exp(-|x|) I1(|x|) (relative error < 2e-7)."""
    ax = abs(x)
    if ax < 3.75:
        return _i1_poly(ax) * math.exp(-ax)
    return _i1_poly(ax) / math.sqrt(ax)


@njit(cache=True)
def log_i0(x: float) -> float:
    """Log I0(x) for x >= 0, without overflow at large ``x``."""
    if x < 3.75:
        return math.log(_i0_poly(x))
    return x - 0.5 * math.log(x) + math.log(_i0_poly(x))


@njit(cache=True)
def bessel_ratio(x: float) -> float:
    """I1(x) / I0(x) for x >= 0 (the exponential scaling of both cancels above 3.75)."""
    return _i1_poly(x) / _i0_poly(x)


@njit(cache=True)
def _rician_mean(nu, sigma):
    """E|nu + n| for complex Gaussian noise of SD ``sigma`` per channel (nu >= 0)."""
    if sigma <= 0.0:
        return nu
    x = nu * nu / (2.0 * sigma * sigma)
    if x > 400.0:
        return nu + sigma * sigma / (2.0 * nu)
    return sigma * math.sqrt(math.pi / 2.0) * ((1.0 + x) * i0e(0.5 * x) + x * i1e(0.5 * x))


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


def rician_mean(nu: npt.ArrayLike, sigma: float) -> np.ndarray:
    """Mean magnitude ``E|nu + n|`` (numba), ``n`` complex Gaussian of SD ``sigma`` per channel.

    ``sigma * sqrt(pi/2) * 1F1(-1/2; 1; -nu^2 / (2 sigma^2))``; Bessel functions by
    Abramowitz & Stegun 9.8 (relative error < 1e-6).
    """
    nu = np.abs(np.asarray(nu, dtype=np.float64))
    out = np.empty_like(nu)
    _rician_mean_array(nu.ravel(), float(sigma), out.reshape(-1))
    return out


def rician_mean_reference(nu: npt.ArrayLike, sigma: float) -> np.ndarray:
    """Plain-numpy/scipy reference of :func:`rician_mean`."""
    from scipy import special
    nu = np.abs(np.asarray(nu, dtype=np.float64))
    if sigma <= 0:
        return nu.copy()
    x = nu ** 2 / (2 * sigma ** 2)
    return sigma * np.sqrt(np.pi / 2) * ((1 + x) * special.i0e(x / 2) + x * special.i1e(x / 2))


# --------------------------------------------------------------------------- EPG fit kernels
