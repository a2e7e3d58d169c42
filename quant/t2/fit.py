"""The water-T2 fit of multi-echo spin-echo signals against an EPG dictionary, and its summary per region."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..enums import Model
from ..errors import QuantError
from ..rician import _rice
from .dictionary import _NO_WATER, _NOT_FITTED, _OK, T2Dictionary
from .kernels import _fit_epg_kernel
from .tables import _tables


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
                 success=(status == _OK).reshape(shape), fitted=fitted.reshape(shape),
                 model=Model.EPG_BICOMPONENT.value, t2f_ms=dictionary.t2f_ms, dictionary_key=dictionary.key)


# --------------------------------------------------------------------------- numpy reference of the EPG fit


def summarise(t2fit: T2Fit, mask: np.ndarray | None = None) -> dict[str, Any]:
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
        ``t2w_ms`` (median water T2 over voxels whose T2 fit succeeded), ``t2w_mean_ms``,
        ``t2w_sd_ms``, ``t2w_iqr_ms`` (75th minus 25th percentile), ``b1`` (median),
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
    out: dict[str, Any]
    if t2.size:
        q25, q50, q75 = np.percentile(t2, [25, 50, 75])
        b1_med = float(np.median(b1)) if np.all(np.isfinite(b1)) and b1.size else nan
        out = dict(t2w_ms=float(q50), t2w_mean_ms=float(t2.mean()), t2w_sd_ms=float(t2.std(ddof=1)) if t2.size > 1
                   else nan, t2w_iqr_ms=float(q75 - q25), b1=b1_med)
    else:
        out = dict(t2w_ms=nan, t2w_mean_ms=nan, t2w_sd_ms=nan, t2w_iqr_ms=nan, b1=nan)
    out.update(ff_t2_percent=float(100.0 * ff.mean()) if ff.size else nan, n_voxels=int(t2.size),
               n_fitted=int(ff.size), n_roi=int(m.sum()), model=t2fit.model, t2f_ms=float(t2fit.t2f_ms))
    return out
