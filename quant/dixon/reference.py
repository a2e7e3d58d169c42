"""Plain-numpy references of the Dixon kernels, used by the tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .fieldmap import _circular_smooth, _wrap


def rician_ml_reference(magnitudes: np.ndarray, kinds: Sequence[int], noise_sd: Sequence[float],
                        *, n_grid: int = 401) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference of the per-voxel ML (used by tests): the exact Rician
    log-likelihood (scipy Bessel) maximised on a (w, f) grid, refined once on a finer grid.

    ``magnitudes``: (n, C). Returns (w, f), each (n,).
    """
    from scipy.special import i0e

    mags = np.asarray(magnitudes, dtype=np.float64)
    s2 = np.asarray(noise_sd, dtype=np.float64) ** 2

    def ll(mi, w, f):
        tot = 0.0
        for c, k in enumerate(kinds):
            a = (w, f, w + f, np.abs(w - f))[k]
            z = mi[c] * a / s2[c]
            tot = tot - a * a / (2 * s2[c]) + np.log(i0e(z)) + z
        return tot

    w_out = np.empty(len(mags))
    f_out = np.empty(len(mags))
    for i, mi in enumerate(mags):
        top = 1.5 * mi.max() + 3 * np.sqrt(s2.max())
        lo_w, hi_w, lo_f, hi_f = 0.0, top, 0.0, top
        for _ in range(3):
            gw = np.linspace(lo_w, hi_w, n_grid)
            gf = np.linspace(lo_f, hi_f, n_grid)
            W, F = np.meshgrid(gw, gf, indexing="ij")
            L = ll(mi, W, F)
            a, b = np.unravel_index(np.argmax(L), L.shape)
            dw, df = 2 * (gw[1] - gw[0]), 2 * (gf[1] - gf[0])
            lo_w, hi_w = max(gw[a] - dw, 0.0), gw[a] + dw
            lo_f, hi_f = max(gf[b] - df, 0.0), gf[b] + df
        w_out[i], f_out[i] = gw[a], gf[b]
    return w_out, f_out


def rician_loglik(magnitudes: np.ndarray, kinds: Sequence[int], noise_sd: Sequence[float],
                  w: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Rician log-likelihood (terms that depend on w, f) of each voxel (scipy Bessel)."""
    from scipy.special import i0e

    mags = np.asarray(magnitudes, dtype=np.float64)
    s2 = np.asarray(noise_sd, dtype=np.float64) ** 2
    tot = np.zeros(len(mags))
    for c, k in enumerate(kinds):
        a = (w, f, w + f, np.abs(w - f))[k]
        z = mags[:, c] * a / s2[c]
        tot += -a * a / (2 * s2[c]) + np.log(i0e(z)) + z
    return tot


# --------------------------------------------------------------------------------------
# Noise estimation and body masks
# --------------------------------------------------------------------------------------


def roi_ml_reference(magnitudes: np.ndarray, kinds: Sequence[int], noise_sd: Sequence[float]) -> float:
    """Plain numpy/scipy reference of the stratum ML (used by tests): profile likelihood
    of phi on a grid, the per-voxel totals by many EM steps at each grid point.
    """
    from scipy.special import i0e, i1e

    mags = np.asarray(magnitudes, dtype=np.float64)
    s2 = np.asarray(noise_sd, dtype=np.float64) ** 2

    def kf(k, phi):
        return (1 - phi, phi, 1.0, abs(1 - 2 * phi))[k]

    def profile(phi):
        kv = np.array([kf(k, phi) for k in kinds])
        s = mags.max(axis=1)
        for _ in range(100):
            z = mags * s[:, None] * kv / s2
            y = mags * i1e(z) / i0e(z)
            s = (y * kv / s2).sum(1) / (kv ** 2 / s2).sum()
        a = s[:, None] * kv
        z = mags * a / s2
        return float((-a * a / (2 * s2) + np.log(i0e(z)) + z).sum())

    grid = np.linspace(0, 1, 101)
    vals = np.array([profile(p) for p in grid])
    j = int(np.argmax(vals))
    fine = np.linspace(grid[max(j - 1, 0)], grid[min(j + 1, 100)], 81)
    vals = np.array([profile(p) for p in fine])
    return float(fine[int(np.argmax(vals))])


def varpro_residual_reference(sig: np.ndarray, te_ms: Sequence[float], c: np.ndarray, psi: float,
                              r2: float) -> np.ndarray:
    """Plain numpy reference of the complex VARPRO residual (used by tests): least squares
    of each voxel's echoes ``sig`` (n, E) on the two model columns.
    """
    t = np.asarray(te_ms, dtype=np.float64) * 1e-3
    a = np.exp((2j * np.pi * psi - r2) * t)
    A = np.stack([a, a * c], axis=1)
    x, *_ = np.linalg.lstsq(A, sig.T, rcond=None)
    return (np.abs(sig.T - A @ x) ** 2).sum(0)


def pdff_fit_reference(sig: np.ndarray, te_ms: Sequence[float], c: np.ndarray, psi: np.ndarray,
                       r2_max: float = 500.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain numpy/scipy reference of the phase-constrained fit at a fixed field map (used
    by tests): R2* and the common phase by grid search then bounded scalar minimisation,
    water and fat by real least squares. Returns (water, fat, r2star).
    """
    from scipy.optimize import minimize_scalar

    t = np.asarray(te_ms, dtype=np.float64) * 1e-3
    phis = np.linspace(0, np.pi, 181)
    out = np.zeros((3, len(sig)))
    for i, s in enumerate(np.asarray(sig)):
        def solve(r2: float, i: int = i, s: np.ndarray = s) -> tuple[float, float, float]:
            a = np.exp((2j * np.pi * psi[i] - r2) * t)
            A = np.stack([a, a * c], axis=1)
            Ar = np.concatenate([A.real, A.imag])
            pinv = np.linalg.pinv(Ar)

            def at(ph):
                y = s * np.exp(-1j * ph)
                yr = np.concatenate([y.real, y.imag])
                x = pinv @ yr
                return float(((yr - Ar @ x) ** 2).sum()), x[0], x[1]

            k = int(np.argmin([at(ph)[0] for ph in phis]))
            r = minimize_scalar(lambda ph: at(ph)[0], bounds=(phis[k] - 0.02, phis[k] + 0.02),
                                method="bounded", options=dict(xatol=1e-9))
            return at(r.x)

        coarse = np.linspace(0, r2_max, 11)
        j = int(np.argmin([solve(r)[0] for r in coarse]))
        r = minimize_scalar(lambda v: solve(v)[0], bounds=(coarse[max(j - 1, 0)], coarse[min(j + 1, 10)]),
                            method="bounded", options=dict(xatol=1e-3))
        _, w, f = solve(r.x)
        if w + f < 0:
            w, f = -w, -f
        out[:, i] = (w, f, r.x)
    return out[0], out[1], out[2]


def select_coarse_to_fine(cand_psi: np.ndarray, mask: np.ndarray, signal_weight: np.ndarray,
                          period_hz: float) -> np.ndarray:
    """The former selection of :func:`quant.dixon.megre_pdff`, kept for comparison: the
    candidate nearest a smooth reference field (signal-weighted Gaussian average of the
    current choice, on phasors), from a quarter of the field of view down to 2 voxels.
    It fails where the reference is wrong over a region (fat-water swaps in blocks).

    Parameters
    ----------
    cand_psi : ndarray, shape (n, k)
        Candidates (Hz) of the voxels of ``mask``, best first; NaN where missing.
    mask : ndarray of bool
        Spatial mask.
    signal_weight : ndarray, shape (n,)
        Signal energy of each voxel.
    period_hz : float
        ``1 / delta TE``.

    Returns
    -------
    ndarray, shape (n,)
        The chosen field map (Hz).
    """
    spatial = mask.shape
    n = cand_psi.shape[0]
    period = float(period_hz)
    weight = np.zeros(spatial)
    weight[mask] = signal_weight
    weight /= max(weight.max(), 1e-300)
    choice = np.zeros(spatial)
    choice[mask] = cand_psi[:, 0]
    size = max(spatial[-2:])
    scales = []
    s_vox = size / 4.0
    while s_vox >= 2.0:
        scales.append(s_vox)
        s_vox /= 2.0
    scales.append(2.0)
    valid = np.isfinite(cand_psi)
    for s_vox in scales:
        for _ in range(2):
            ref = _circular_smooth(np.where(mask, choice, 0.0), weight, period, s_vox)[mask]
            d = np.abs(_wrap(cand_psi - ref[:, None], period))
            d[~valid] = np.inf
            picked = cand_psi[np.arange(n), np.argmin(d, axis=1)]
            new = np.zeros(spatial)
            new[mask] = picked
            if np.allclose(new[mask], choice[mask]):
                choice = new
                break
            choice = new
    return choice[mask]
