"""Proton-density fat fraction, R2* and field map from a multi-echo gradient echo (MEGRE)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import QuantError, SeriesError
from ..noise import _otsu
from .fieldmap import _circular_smooth, _wrap, select_fieldmap
from .reference import select_coarse_to_fine
from .spectrum import HAMILTON_6PEAK, FatSpectrum, fat_signal_model


@dataclass(frozen=True, eq=False)
class PDFFResult:
    """Result of :func:`megre_pdff` (NaN outside ``mask``).

    Attributes
    ----------
    pdff : ndarray of float32
        Proton-density fat fraction ``F / (W + F)``, **not clipped** to 0..1 (with the
        phase-constrained fit, noise makes it go slightly below 0 in lean tissue: clipping
        would bias region means; clip for display).
    r2star_s : ndarray of float32
        R2* (1/s), common to water and fat.
    fieldmap_hz : ndarray of float32
        Smooth B0 field map (Hz), wrapped into one period ``1 / delta TE``.
    water, fat : ndarray of float32
        Amplitudes at t = 0 (image units; signed with the phase-constrained fit).
    mask : ndarray of bool
        Voxels fitted.
    fat_spectrum : str
        Name of the fat model.
    """

    pdff: np.ndarray
    r2star_s: np.ndarray
    fieldmap_hz: np.ndarray
    water: np.ndarray
    fat: np.ndarray
    mask: np.ndarray
    fat_spectrum: str = HAMILTON_6PEAK.name


@njit(cache=True, inline="always")
def _gram(t, c, r2):
    """A^H A of the model columns [1, c_n] exp(-R2* t_n): (G00, G01, G11)."""
    g00 = 0.0
    g01 = 0j
    g11 = 0.0
    for n in range(t.size):
        e = math.exp(-2.0 * r2 * t[n])
        g00 += e
        g01 += e * c[n]
        g11 += e * (c[n].real ** 2 + c[n].imag ** 2)
    return g00, g01, g11


@njit(cache=True)
def _projections(s, t, c, psi, r2):
    """B = A^H s for the two columns at (psi, r2)."""
    b0 = 0j
    b1 = 0j
    for n in range(t.size):
        ang = -2.0 * math.pi * psi * t[n]
        ph = math.exp(-r2 * t[n]) * complex(math.cos(ang), math.sin(ang))
        z = s[n] * ph
        b0 += z
        b1 += z * c[n].conjugate()
    return b0, b1


@njit(cache=True)
def _varpro_res(s, s_energy, t, c, psi, r2):
    """Residual energy of the complex (unconstrained) water/fat fit at (psi, r2)."""
    g00, g01, g11 = _gram(t, c, r2)
    det = g00 * g11 - (g01.real ** 2 + g01.imag ** 2)
    if det <= 1e-300:
        return s_energy
    b0, b1 = _projections(s, t, c, psi, r2)
    q = g11 * (b0.real ** 2 + b0.imag ** 2) + g00 * (b1.real ** 2 + b1.imag ** 2) \
        - 2.0 * (b0.conjugate() * g01 * b1).real
    return s_energy - q / det


@njit(cache=True, parallel=True)
def _candidate_kernel(sig, t, c, psi_grid, r2_grid, n_cand, constrained, cand_psi, cand_res):
    """Voxel-wise VARPRO grid search: the ``n_cand`` deepest local minima (over a periodic
    psi grid) of the residual minimised over R2*; parabolic sub-grid refinement.
    """
    n, ne = sig.shape
    m = psi_grid.size
    nr = r2_grid.size
    step = psi_grid[1] - psi_grid[0]
    # precompute per R2*: Gram entries and weights
    g00 = np.empty(nr)
    g01 = np.empty(nr, np.complex128)
    g11 = np.empty(nr)
    det = np.empty(nr)
    wr = np.empty((nr, ne))
    for r in range(nr):
        a, b, cc = _gram(t, c, r2_grid[r])
        g00[r] = a
        g01[r] = b
        g11[r] = cc
        det[r] = a * cc - (b.real ** 2 + b.imag ** 2)
        for e in range(ne):
            wr[r, e] = math.exp(-r2_grid[r] * t[e])
    rot = np.empty((m, ne), np.complex128)
    for j in range(m):
        for e in range(ne):
            ang = -2.0 * math.pi * psi_grid[j] * t[e]
            rot[j, e] = complex(math.cos(ang), math.sin(ang))
    cconj = np.conj(c)
    for i in prange(n):
        s = sig[i]
        energy = 0.0
        for e in range(ne):
            energy += s[e].real ** 2 + s[e].imag ** 2
        curve = np.empty(m)
        z = np.empty(ne, np.complex128)
        for j in range(m):
            for e in range(ne):
                z[e] = s[e] * rot[j, e]
            best = energy
            for r in range(nr):
                if det[r] <= 1e-300:
                    continue
                if constrained:
                    res, _, _ = _constrained_fit(s, energy, t, c, psi_grid[j], r2_grid[r])
                    if res < best:
                        best = res
                    continue
                b0 = 0j
                b1 = 0j
                for e in range(ne):
                    v = z[e] * wr[r, e]
                    b0 += v
                    b1 += v * cconj[e]
                q = g11[r] * (b0.real ** 2 + b0.imag ** 2) + g00[r] * (b1.real ** 2 + b1.imag ** 2) \
                    - 2.0 * (b0.conjugate() * g01[r] * b1).real
                res = energy - q / det[r]
                if res < best:
                    best = res
            curve[j] = best
        for k in range(n_cand):
            cand_psi[i, k] = np.nan
            cand_res[i, k] = np.inf
        for j in range(m):
            ym = curve[(j - 1) % m]
            yp = curve[(j + 1) % m]
            y0 = curve[j]
            if y0 < ym and y0 <= yp:
                den = ym - 2.0 * y0 + yp
                off = 0.5 * (ym - yp) / den if den > 0 else 0.0
                val = y0 - 0.25 * (ym - yp) * off
                # insert into the sorted candidate list
                k = n_cand - 1
                if val < cand_res[i, k]:
                    while k > 0 and val < cand_res[i, k - 1]:
                        cand_res[i, k] = cand_res[i, k - 1]
                        cand_psi[i, k] = cand_psi[i, k - 1]
                        k -= 1
                    cand_res[i, k] = val
                    cand_psi[i, k] = psi_grid[j] + off * step


@njit(cache=True)
def _golden_r2(s, energy, t, c, psi, r2_max, constrained, n_iter):
    g = 0.6180339887498949
    a = 0.0
    b = r2_max
    x1 = b - g * (b - a)
    x2 = a + g * (b - a)
    f1 = _fit_res(s, energy, t, c, psi, x1, constrained)
    f2 = _fit_res(s, energy, t, c, psi, x2, constrained)
    for _ in range(n_iter):
        if f1 > f2:
            a, x1, f1 = x1, x2, f2
            x2 = a + g * (b - a)
            f2 = _fit_res(s, energy, t, c, psi, x2, constrained)
        else:
            b, x2, f2 = x2, x1, f1
            x1 = b - g * (b - a)
            f1 = _fit_res(s, energy, t, c, psi, x1, constrained)
    x = 0.5 * (a + b)
    fx = _fit_res(s, energy, t, c, psi, x, constrained)
    f0 = _fit_res(s, energy, t, c, psi, 0.0, constrained)
    if f0 < fx:
        return 0.0, f0
    return x, fx


@njit(cache=True)
def _fit_res(s, energy, t, c, psi, r2, constrained):
    if not constrained:
        return _varpro_res(s, energy, t, c, psi, r2)
    res, _, _ = _constrained_fit(s, energy, t, c, psi, r2)
    return res


@njit(cache=True)
def _constrained_fit(s, energy, t, c, psi, r2):
    """Phase-constrained fit: s = exp(i phi) A x with x = (W, F) real. Returns
    (residual, W, F) with W + F >= 0.
    """
    g00, g01, g11 = _gram(t, c, r2)
    h00, h01, h11 = g00, g01.real, g11            # Re(A^H A)
    det = h00 * h11 - h01 * h01
    if det <= 1e-300:
        return energy, 0.0, 0.0
    i00, i01, i11 = h11 / det, -h01 / det, h00 / det
    b0, b1 = _projections(s, t, c, psi, r2)
    a0, a1, c0, c1 = b0.real, b1.real, b0.imag, b1.imag
    alpha = a0 * (i00 * a0 + i01 * a1) + a1 * (i01 * a0 + i11 * a1)
    gamma = c0 * (i00 * c0 + i01 * c1) + c1 * (i01 * c0 + i11 * c1)
    beta = a0 * (i00 * c0 + i01 * c1) + a1 * (i01 * c0 + i11 * c1)
    value = 0.5 * (alpha + gamma) + 0.5 * math.sqrt((alpha - gamma) ** 2 + 4.0 * beta * beta)
    phi = 0.5 * math.atan2(2.0 * beta, alpha - gamma)
    p0 = math.cos(phi) * a0 + math.sin(phi) * c0
    p1 = math.cos(phi) * a1 + math.sin(phi) * c1
    w = i00 * p0 + i01 * p1
    f = i01 * p0 + i11 * p1
    if w + f < 0.0:
        w, f = -w, -f
    return energy - value, w, f


@njit(cache=True, parallel=True)
def _refine_kernel(sig, t, c, psi0, half_width, r2_max, n_iter, constrained, psi_out):
    """Refine each voxel's field map within psi0 +- half_width (golden section over psi,
    R2* minimised inside by golden section), complex fit.
    """
    n = sig.shape[0]
    g = 0.6180339887498949
    for i in prange(n):
        s = sig[i]
        energy = 0.0
        for e in range(s.size):
            energy += s[e].real ** 2 + s[e].imag ** 2
        a = psi0[i] - half_width
        b = psi0[i] + half_width
        x1 = b - g * (b - a)
        x2 = a + g * (b - a)
        _, f1 = _golden_r2(s, energy, t, c, x1, r2_max, constrained, 25)
        _, f2 = _golden_r2(s, energy, t, c, x2, r2_max, constrained, 25)
        for _ in range(n_iter):
            if f1 > f2:
                a, x1, f1 = x1, x2, f2
                x2 = a + g * (b - a)
                _, f2 = _golden_r2(s, energy, t, c, x2, r2_max, constrained, 25)
            else:
                b, x2, f2 = x2, x1, f1
                x1 = b - g * (b - a)
                _, f1 = _golden_r2(s, energy, t, c, x1, r2_max, constrained, 25)
        psi_out[i] = 0.5 * (a + b)


@njit(cache=True, parallel=True)
def _final_fit_kernel(sig, t, c, psi, r2_max, constrained, w_out, f_out, r2_out):
    """Water, fat and R2* of each voxel at a fixed field map (golden section in R2*)."""
    n = sig.shape[0]
    for i in prange(n):
        s = sig[i]
        energy = 0.0
        for e in range(s.size):
            energy += s[e].real ** 2 + s[e].imag ** 2
        r2, _ = _golden_r2(s, energy, t, c, psi[i], r2_max, constrained, 40)
        r2_out[i] = r2
        if constrained:
            _, w, f = _constrained_fit(s, energy, t, c, psi[i], r2)
            w_out[i] = w
            f_out[i] = f
        else:
            g00, g01, g11 = _gram(t, c, r2)
            det = g00 * g11 - (g01.real ** 2 + g01.imag ** 2)
            b0, b1 = _projections(s, t, c, psi[i], r2)
            x0 = (g11 * b0 - g01 * b1) / det
            x1 = (-g01.conjugate() * b0 + g00 * b1) / det
            w_out[i] = abs(x0)
            f_out[i] = abs(x1)


def megre_pdff(magnitude: np.ndarray, phase: np.ndarray, te_ms: Sequence[float], *,
                   field_strength_t: float = 3.0, fat_spectrum: FatSpectrum = HAMILTON_6PEAK,
                   mask: np.ndarray | None = None, r2star_max_s: float = 500.0,
                   fieldmap_smoothing_vox: float = 1.5, phase_constrained: bool = True,
                   conjugate: bool = False, psi_step_hz: float | None = None,
                   n_candidates: int = 4, spacing_mm: Sequence[float] | None = None,
                   fieldmap_method: str = "region-growing") -> PDFFResult:
    """Proton-density fat fraction, R2* and B0 field map from a multi-echo gradient echo.

    Model per voxel: ``s_n = exp(i phi0) (W + F c_n) exp((i 2 pi psi - R2*) t_n)`` with
    ``c_n`` the multi-peak fat spectrum at ``field_strength_t``.

    1. Candidates: the residual of the complex (variable projection) fit, minimised over
       an R2* grid, on a psi grid covering one period ``1 / delta TE``; its deepest
       ``n_candidates`` local minima per voxel (water/fat ambiguity gives several).
       With 3 echoes the complex fit would have no degree of freedom left for R2*: the
       search then uses the phase-constrained fit (or R2* = 0 if ``phase_constrained``
       is False).
    2. Selection by quality-guided region growing (:func:`quant.dixon.fieldmap.select_fieldmap`,
       after Yu et al. 2005 and Berglund et al. 2010): each connected tissue island is
       grown from its most reliable voxel in order of voxel quality, every voxel taking
       the candidate nearest (wrapped) to its decided neighbours; the seed candidate of
       each island is the one consistent with nearby islands across the air gap, else
       the one of lowest summed residual. The field map may wrap across the field of view.
    3. The chosen candidate is refined continuously, then smoothed
       (``fieldmap_smoothing_vox``, in-plane Gaussian SD in voxels; 0: none).
    4. At the smooth field map, R2* (golden section in 0..``r2star_max_s``) and water and
       fat: real amplitudes with one common phase (``phase_constrained``, unbiased
       near FF 0), else complex amplitudes and PDFF from magnitudes.

    Parameters
    ----------
    magnitude, phase : ndarray, shape (n_echo, ...)
        Magnitude (any units) and phase (radians) of each echo; >= 3 echoes.
    te_ms : sequence of float
        Echo times (ms), increasing.
    field_strength_t : float
        Main field (T), e.g. 1.5 or 3.0.
    fat_spectrum : FatSpectrum
        :data:`HAMILTON_6PEAK` (default) or :data:`SINGLE_PEAK` or another.
    mask : ndarray of bool, optional
        Voxels to fit (spatial shape). Default: first-echo magnitude above Otsu's
        threshold / 4.
    r2star_max_s : float
        Upper bound of R2* (1/s).
    conjugate : bool
        The vendor's phase turns the other way (fat then appears above water): conjugate.
    psi_step_hz : float, optional
        Field-map grid step (Hz); default ``period / 200``.
    n_candidates : int
        Local minima kept per voxel.
    spacing_mm : sequence of float, optional
        Voxel size (mm) per spatial axis, for the neighbour weights and island gaps of the
        selection (default isotropic).
    fieldmap_method : str
        ``"region-growing"`` (default) or ``"coarse-to-fine"`` (the former smooth-reference
        selection, :func:`quant.dixon.reference.select_coarse_to_fine`, kept for comparison).

    Returns
    -------
    PDFFResult

    Raises
    ------
    SeriesError
        Fewer than 3 echoes, shapes that disagree, or echo times not increasing.
    """
    mag = np.asarray(magnitude, dtype=np.float64)
    pha = np.asarray(phase, dtype=np.float64)
    te = np.asarray(te_ms, dtype=np.float64).ravel()
    if mag.shape != pha.shape:
        raise SeriesError(f"magnitude {mag.shape} and phase {pha.shape} differ in shape")
    if mag.ndim < 2 or mag.shape[0] < 3:
        raise SeriesError(f"multi-echo Dixon needs >= 3 echoes along axis 0, got shape {mag.shape}")
    if te.size != mag.shape[0]:
        raise SeriesError(f"{te.size} echo times (EchoTime) for {mag.shape[0]} echoes")
    if np.any(np.diff(te) <= 0):
        raise SeriesError(f"echo times must increase, got {te.tolist()} ms")
    if fieldmap_method not in ("region-growing", "coarse-to-fine"):
        raise QuantError(f"unknown fieldmap_method {fieldmap_method!r}")
    spatial = mag.shape[1:]
    sig_full = mag * np.exp((-1j if conjugate else 1j) * pha)
    if mask is None:
        e1 = mag[0]
        mask = e1 > 0.25 * _otsu(e1.ravel())
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != spatial:
        raise SeriesError(f"mask {mask.shape} and images {spatial} differ in shape")
    t = te * 1e-3
    c = fat_signal_model(te, field_strength_t, fat_spectrum)
    period = 1.0 / float(np.median(np.diff(t)))
    step = psi_step_hz or period / 200.0
    psi_grid = -period / 2 + np.arange(int(round(period / step))) * (period / int(round(period / step)))
    # with 3 echoes a complex fit with R2* has no degree of freedom left: search with one
    # common phase (5 unknowns for 6 numbers) when allowed, else at R2* = 0
    search_constrained = bool(te.size < 4 and phase_constrained)
    r2_search_max = float(r2star_max_s) if (te.size >= 4 or search_constrained) else 0.0
    r2_grid = np.array([0.0, 25.0, 50.0, 100.0, 150.0, 250.0, 400.0])
    r2_grid = r2_grid[r2_grid <= r2_search_max]
    sig = np.ascontiguousarray(sig_full.reshape(te.size, -1)[:, mask.ravel()].T)
    n = sig.shape[0]
    nan_map = np.full(spatial, np.nan, np.float32)
    if n == 0:
        return PDFFResult(nan_map, nan_map.copy(), nan_map.copy(), nan_map.copy(), nan_map.copy(), mask,
                          fat_spectrum.name)
    cand_psi = np.empty((n, n_candidates))
    cand_res = np.empty((n, n_candidates))
    _candidate_kernel(sig, t, c, psi_grid, r2_grid, int(n_candidates), search_constrained, cand_psi, cand_res)
    # 2. selection: quality-guided region growing over the candidates (quant.dixon.fieldmap)
    weight = np.zeros(spatial)
    weight[mask] = np.abs(sig[:, 0]) ** 2
    weight /= max(weight.max(), 1e-300)
    choice = np.zeros(spatial)
    if fieldmap_method == "coarse-to-fine":
        choice[mask] = select_coarse_to_fine(cand_psi, mask, weight[mask], period)
    else:
        choice[mask] = select_fieldmap(cand_psi, cand_res, mask, weight[mask], period, spacing_mm=spacing_mm)
    # 3. refine, smooth
    psi_ref = np.empty(n)
    _refine_kernel(sig, t, c, np.ascontiguousarray(choice[mask]), float(period / len(psi_grid)),
                   r2_search_max, 20, search_constrained, psi_ref)
    psi_map = np.zeros(spatial)
    psi_map[mask] = _wrap(psi_ref, period)
    if fieldmap_smoothing_vox > 0:
        w_mask = np.where(mask, weight, 0.0)
        psi_map = _circular_smooth(psi_map, w_mask, period, fieldmap_smoothing_vox)
    psi_vox = np.ascontiguousarray(psi_map[mask])
    # 4. final fit
    w = np.empty(n)
    f = np.empty(n)
    r2 = np.empty(n)
    r2_fit_max = float(r2star_max_s) if (te.size >= 4 or phase_constrained) else 0.0
    _final_fit_kernel(sig, t, c, psi_vox, r2_fit_max, bool(phase_constrained), w, f, r2)
    with np.errstate(invalid="ignore", divide="ignore"):
        pdff = np.where(np.abs(w + f) > 0, f / (w + f), np.nan)

    def full(v):
        out = np.full(spatial, np.nan, np.float32)
        out[mask] = v
        return out

    return PDFFResult(pdff=full(pdff), r2star_s=full(r2), fieldmap_hz=full(psi_vox), water=full(w),
                      fat=full(f), mask=mask, fat_spectrum=fat_spectrum.name)
