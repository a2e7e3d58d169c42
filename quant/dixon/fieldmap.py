"""B0 field-map selection for multi-echo water-fat imaging by quality-guided region growing.

Per voxel, the variable-projection (VARPRO) residual of the water-fat model over a field-map
grid of one period ``1 / delta TE`` has several local minima: the true field map and,
offset by about the fat chemical shift, the fat-water swapped solution (with 3 echoes at
1.5 T in opposed/in-phase spacing the two are nearly equally deep). Which minimum is right
is decided by spatial continuity of the field, in the spirit of the region-growing methods
of Yu et al. (2005) and Berglund et al. (2010):

1. **Quality** of a voxel: its signal weight times how much deeper its best candidate is
   than the second best (a voxel with one clear minimum is reliable, a voxel near the
   noise floor is not).
2. **Islands**: every connected component of the mask (legs separated by air, marrow
   inside cortical bone, a phantom tube) is grown separately from its highest-quality
   voxel, largest island first. A wrongly chosen seed candidate would swap the whole
   island, so the island is grown from each candidate of its seed and one result kept:
   the one consistent across the air gap with the islands already decided where that
   is clear (the decided field, from reliable voxels only, extrapolated linearly with
   its smoothed gradient to the island; a signal- and distance-weighted phasor mean of
   the difference, within ``island_gap_mm``, below ``period / 4`` and ``period / 8``
   clear of the other results), else the one of lowest summed residual over the island
   (the 6-peak fat spectrum, R2* and many voxels make the true solution fit better
   overall even where single voxels are ambiguous); where that is not 1.5 times lower
   than the next (a pure water island and a single-peak model), the decided islands at
   any distance decide if they are clear. Islands of fewer than ``min_island``
   voxels (noise specks) take the candidate nearest the extrapolated decided field.
3. **Growing**: a priority queue (binary heap) in quality order; each newly reached voxel
   takes the candidate closest (wrapped, period ``1 / delta TE``) to the phasor mean of
   its already-decided neighbours, weighted by their signal and inverse squared distance.
   The field may wrap any number of times across the field of view: only wrapped
   differences between neighbours are used.

The grow loop is a numba kernel (:func:`_grow_kernel`) with a plain-Python reference
(:func:`grow_reference`) that the tests compare with it.

References
----------
.. [1] Yu H, Reeder SB, Shimakawa A, Brittain JH, Pelc NJ. Field map estimation with a
   region growing scheme for iterative 3-point water-fat decomposition. Magn Reson Med
   2005;54:1032-1039.
.. [2] Berglund J, Johansson L, Ahlstroem H, Kullberg J. Three-point Dixon method enables
   whole-body water and fat imaging of obese subjects. Magn Reson Med 2010;63:1659-1668.
.. [3] Hernando D, Kellman P, Haldar JP, Liang ZP. Robust water/fat separation in the
   presence of large field inhomogeneities using a graph cut algorithm. Magn Reson Med
   2010;63:79-90.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
from numba import njit
from scipy import ndimage as ndi

__all__ = ["select_fieldmap", "voxel_quality", "neighbourhood", "grow_reference"]


def _wrap(x, period):
    return (x + period / 2) % period - period / 2


def voxel_quality(cand_res: np.ndarray, signal_weight: np.ndarray) -> np.ndarray:
    """Reliability of each voxel's best candidate.

    Parameters
    ----------
    cand_res : ndarray, shape (n, k)
        Residuals of the candidates, ascending; ``inf`` or NaN where a voxel has fewer.
    signal_weight : ndarray, shape (n,)
        Signal energy (any scale; normalised here).

    Returns
    -------
    ndarray, shape (n,)
        ``w (0.05 + (r2 - r1) / r2)`` with ``w`` the normalised signal weight, ``r1`` and
        ``r2`` the two lowest residuals (contrast 1 where there is a single candidate, 0
        quality where there is none).
    """
    res = np.asarray(cand_res, dtype=np.float64)
    w = np.asarray(signal_weight, dtype=np.float64)
    w = w / max(float(np.max(w, initial=0.0)), 1e-300)
    r1 = res[:, 0]
    r2 = res[:, 1] if res.shape[1] > 1 else np.full(len(res), np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        contrast = np.where(np.isfinite(r2) & (r2 > 0), (r2 - r1) / r2, 1.0)
    return np.where(np.isfinite(r1), w * (0.05 + np.clip(contrast, 0.0, 1.0)), 0.0)


def neighbourhood(ndim: int, spacing_mm: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 3^ndim - 1 neighbours of a voxel and their weights.

    Parameters
    ----------
    ndim : int
        Number of spatial dimensions.
    spacing_mm : tuple of float, optional
        Voxel size along each axis (default isotropic).

    Returns
    -------
    offsets : ndarray of int, shape (m, ndim)
        Index offsets of the neighbours.
    weights : ndarray of float, shape (m,)
        ``1 / distance^2`` (distance in units of the smallest voxel size).
    """
    sp = np.ones(ndim) if spacing_mm is None else np.asarray(spacing_mm, dtype=np.float64)
    sp = sp / sp.min()
    grids = np.meshgrid(*([np.arange(-1, 2)] * ndim), indexing="ij")
    offs = np.stack([g.ravel() for g in grids], axis=1)
    offs = offs[np.any(offs != 0, axis=1)]
    d2 = ((offs * sp) ** 2).sum(1)
    return offs.astype(np.int64), 1.0 / d2


# --------------------------------------------------------------------------------------
# The grow loop: numba kernel and its plain-Python reference
# --------------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def _less(ka, va, kb, vb):
    return ka < kb or (ka == kb and va < vb)


@njit(cache=True)
def _heap_push(keys, vals, size, k, v):
    i = size
    keys[i] = k
    vals[i] = v
    while i > 0:
        p = (i - 1) >> 1
        if _less(keys[i], vals[i], keys[p], vals[p]):
            keys[i], keys[p] = keys[p], keys[i]
            vals[i], vals[p] = vals[p], vals[i]
            i = p
        else:
            break
    return size + 1


@njit(cache=True)
def _heap_pop(keys, vals, size):
    k0 = keys[0]
    v0 = vals[0]
    size -= 1
    keys[0] = keys[size]
    vals[0] = vals[size]
    i = 0
    while True:
        a = 2 * i + 1
        b = a + 1
        m = i
        if a < size and _less(keys[a], vals[a], keys[m], vals[m]):
            m = a
        if b < size and _less(keys[b], vals[b], keys[m], vals[m]):
            m = b
        if m == i:
            break
        keys[i], keys[m] = keys[m], keys[i]
        vals[i], vals[m] = vals[m], vals[i]
        i = m
    return k0, v0, size


@njit(cache=True, inline="always")
def _pick(cand, ref, period):
    """The candidate nearest ``ref`` (wrapped); ``ref`` itself if there is none."""
    best = np.inf
    out = ref
    for j in range(cand.size):
        c = cand[j]
        if c == c:      # not NaN
            d = abs(((c - ref) + 0.5 * period) % period - 0.5 * period)
            if d < best:
                best = d
                out = c
    return out


@njit(cache=True)
def _grow_kernel(pos, grid, offsets, off_w, cand_psi, quality, weight, period, seed, seed_psi, out):
    """Quality-guided region growing over the connected voxels reachable from ``seed``.

    ``grid``: flat padded volume holding each voxel's index (-1: not to be grown);
    ``pos``: each voxel's flat position in ``grid``; ``offsets``: flat neighbour offsets
    with weights ``off_w``. ``out`` (NaN = undecided) receives the chosen field of every
    voxel reached.
    """
    n = pos.size
    keys = np.empty(n)
    vals = np.empty(n, np.int64)
    queued = np.zeros(n, np.bool_)
    out[seed] = seed_psi
    queued[seed] = True
    size = 0
    w2p = 2.0 * math.pi / period
    cur = seed
    while True:
        # queue the undecided neighbours of the voxel just decided
        p = pos[cur]
        for o in range(offsets.size):
            j = grid[p + offsets[o]]
            if j >= 0 and not queued[j]:
                queued[j] = True
                size = _heap_push(keys, vals, size, -quality[j], j)
        if size == 0:
            break
        _, cur, size = _heap_pop(keys, vals, size)
        # reference: phasor mean of the decided neighbours
        re = 0.0
        im = 0.0
        p = pos[cur]
        for o in range(offsets.size):
            j = grid[p + offsets[o]]
            if j >= 0:
                v = out[j]
                if v == v:
                    wj = off_w[o] * weight[j]
                    re += wj * math.cos(w2p * v)
                    im += wj * math.sin(w2p * v)
        ref = math.atan2(im, re) / w2p
        out[cur] = _pick(cand_psi[cur], ref, period)


def grow_reference(pos: np.ndarray, grid: np.ndarray, offsets: np.ndarray, off_w: np.ndarray,
                   cand_psi: np.ndarray, quality: np.ndarray, weight: np.ndarray, period: float, seed: int,
                   seed_psi: float, out: np.ndarray) -> None:
    """Plain-Python reference of :func:`_grow_kernel` (``heapq``; same arguments, same
    order of visits, ``out`` filled in place). Used by the tests.

    Returns
    -------
    None
    """
    w2p = 2.0 * math.pi / period
    out[seed] = seed_psi
    queued = {int(seed)}
    heap: list[tuple[float, int]] = []
    cur = int(seed)
    while True:
        for o in offsets:
            j = int(grid[pos[cur] + o])
            if j >= 0 and j not in queued:
                queued.add(j)
                heapq.heappush(heap, (-float(quality[j]), j))
        if not heap:
            break
        _, cur = heapq.heappop(heap)
        re = im = 0.0
        for o, wo in zip(offsets, off_w, strict=True):
            j = int(grid[pos[cur] + o])
            if j >= 0 and not np.isnan(out[j]):
                wj = wo * weight[j]
                re += wj * math.cos(w2p * out[j])
                im += wj * math.sin(w2p * out[j])
        ref = math.atan2(im, re) / w2p
        cand = cand_psi[cur][~np.isnan(cand_psi[cur])]
        if cand.size == 0:
            out[cur] = ref
        else:
            out[cur] = cand[np.argmin(np.abs(_wrap(cand - ref, period)))]


# --------------------------------------------------------------------------------------
# Selection over islands
# --------------------------------------------------------------------------------------

def _field_gradient(decided_full, weight_full, period, sigma_vox):
    """Smooth gradient (Hz per voxel, one array per axis) of the decided field: the
    signal-weighted Gaussian mean of the wrapped differences between neighbours (as
    phasors), so noise and wraps do not matter.
    """
    grads = []
    ph = np.exp(2j * np.pi * np.nan_to_num(decided_full) / period)
    ok = np.isfinite(decided_full)
    for axis in range(decided_full.ndim):
        lo = [slice(None)] * decided_full.ndim
        hi = [slice(None)] * decided_full.ndim
        lo[axis] = slice(None, -1)
        hi[axis] = slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        prod = np.zeros(decided_full.shape, complex)
        both = ok[lo] & ok[hi]
        prod[lo] = np.where(both, ph[hi] * np.conj(ph[lo]) * np.sqrt(weight_full[lo] * weight_full[hi]), 0.0)
        sig = [sigma_vox] * decided_full.ndim
        if decided_full.ndim == 3:
            sig[0] = 1.0
        sm = ndi.gaussian_filter(prod.real, sig, mode="nearest") + 1j * ndi.gaussian_filter(prod.imag, sig,
                                                                                           mode="nearest")
        grads.append(np.angle(sm) * period / (2 * np.pi))
    return grads


def _nearest_decided(decided_full, weight_full, period, spacing):
    """Distance (mm) to the nearest reliably decided voxel (signal energy at least 5 % of
    the median of the decided voxels: not noise in the air) and the decided field
    extrapolated linearly from that voxel (its smoothed gradient times the displacement).
    """
    decided = np.isfinite(decided_full)
    reliable = decided & (weight_full >= 0.05 * np.median(weight_full[decided]))
    dist, near = ndi.distance_transform_edt(~reliable, sampling=spacing, return_indices=True)
    near = tuple(near)
    pred = decided_full[near].copy()
    grid = np.indices(decided_full.shape)
    for axis, g in enumerate(_field_gradient(decided_full, weight_full, period, 3.0)):
        pred += g[near] * (grid[axis] - near[axis])
    return dist, pred


def _consistency(psi_island, dist, near_psi, weight, period, max_mm):
    """Wrapped phasor mean of (island field - nearest decided field) over the island
    voxels within ``max_mm`` of decided voxels (weights: signal, falling with distance);
    NaN if none is that close.
    """
    close = dist <= max_mm
    if not close.any():
        return np.nan
    w = weight[close] * np.exp(-dist[close] / (0.5 * max_mm))
    ph = (w * np.exp(2j * np.pi * (psi_island[close] - near_psi[close]) / period)).sum()
    return abs(float(np.angle(ph))) * period / (2 * np.pi)


def _clear_winner(cons, period):
    """Index of the consistency value that is clearly the smallest (below ``period / 4`` and
    ``period / 8`` below all others), else None.
    """
    cons = np.asarray(cons, dtype=np.float64)
    if not np.isfinite(cons).all():
        return None
    k = int(np.argmin(cons))
    if cons[k] < period / 4 and np.delete(cons, k).min() > cons[k] + period / 8:
        return k
    return None


def select_fieldmap(cand_psi: np.ndarray, cand_res: np.ndarray, mask: np.ndarray, signal_weight: np.ndarray,
                    period_hz: float, *, spacing_mm: Sequence[float] | None = None,
                    island_gap_mm: float = 40.0, min_island: int = 50, use_numba: bool = True) -> np.ndarray:
    """Choose one field-map candidate per voxel by quality-guided region growing.

    Parameters
    ----------
    cand_psi : ndarray, shape (n, k)
        Candidate field-map values (Hz) of the ``n`` voxels of ``mask`` (order of
        ``mask.ravel()``), NaN where a voxel has fewer than ``k``.
    cand_res : ndarray, shape (n, k)
        Their residuals, ascending along axis 1 (``inf`` or NaN where missing).
    mask : ndarray of bool
        Spatial mask (2D or 3D; slices along the first axis).
    signal_weight : ndarray, shape (n,)
        Signal energy of each voxel (weights neighbours and sets the growing order).
    period_hz : float
        Period of the field map, ``1 / delta TE``.
    spacing_mm : tuple of float, optional
        Voxel size per axis (default isotropic); weights neighbours by inverse squared
        distance and measures the gap between islands.
    island_gap_mm : float
        Islands within this distance of already-decided tissue take the seed candidate
        most consistent with it where that is clear; others the candidate of lowest
        summed residual, unless that is less than 1.5 times lower than the next one: then
        the decided tissue at any distance decides, where it is clear.
    min_island : int
        Islands of fewer voxels (noise specks, partial-volume fragments; not the largest)
        are not grown: each voxel takes the candidate nearest the decided field,
        extrapolated from the nearest reliable decided voxel.
    use_numba : bool
        Grow with the numba kernel (default) or the plain-Python reference.

    Returns
    -------
    ndarray, shape (n,)
        The chosen field map (Hz), wrapped into ``[-period/2, period/2)``.
    """
    mask = np.asarray(mask, dtype=bool)
    cand_psi = np.asarray(cand_psi, dtype=np.float64)
    cand_res = np.where(np.isnan(cand_psi), np.inf, np.asarray(cand_res, dtype=np.float64))
    n = int(mask.sum())
    if n == 0:
        return np.empty(0)
    period = float(period_hz)
    spacing = tuple(float(s) for s in (spacing_mm if spacing_mm is not None else (1.0,) * mask.ndim))
    weight = np.asarray(signal_weight, dtype=np.float64)
    weight = weight / max(float(weight.max()), 1e-300)
    quality = voxel_quality(cand_res, weight)
    weight_full = np.zeros(mask.shape)
    weight_full[mask] = weight
    # flat padded grid; voxel indices in the order of mask.ravel()
    padded_shape = tuple(s + 2 for s in mask.shape)
    padded = np.zeros(padded_shape, bool)
    padded[tuple(slice(1, -1) for _ in mask.shape)] = mask
    pos = np.flatnonzero(padded)
    mask_index = np.flatnonzero(mask)
    offs, off_w = neighbourhood(mask.ndim, spacing)
    strides = np.array([int(np.prod(padded_shape[a + 1:])) for a in range(mask.ndim)])
    flat_off = (offs * strides).sum(1)
    labels, n_lab = ndi.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    lab = labels.ravel()[mask_index]
    sizes = np.bincount(lab, minlength=n_lab + 1)
    order = np.argsort(-sizes[1:], kind="stable") + 1
    members_of = np.split(np.argsort(lab, kind="stable"), np.cumsum(sizes)[:-1])
    chosen = np.full(n, np.nan)
    decided_full = np.full(mask.shape, np.nan)
    grid_island = np.full(padded.size, -1, np.int64)
    out = np.full(n, np.nan)
    grow = _grow_kernel if use_numba else grow_reference
    for island in order:
        members = members_of[island]
        if members.size < min_island and np.isfinite(decided_full).any():
            break                       # the largest island is grown whatever its size
        seed = int(members[np.argmax(quality[members])])
        options = cand_psi[seed][np.isfinite(cand_psi[seed])]
        if options.size == 0:
            options = np.array([0.0])
        grid_island[pos[members]] = members
        trials = []
        for psi0 in options:
            out[members] = np.nan
            grow(pos, grid_island, flat_off, off_w, cand_psi, quality, weight, period, seed, float(psi0), out)
            psi_i = out[members].copy()
            picked = np.abs(_wrap(cand_psi[members] - psi_i[:, None], period)) < 1e-9
            res = np.where(picked, cand_res[members], np.inf).min(1)
            trials.append((psi_i, float(np.where(np.isfinite(res), res, 0.0).sum())))
        grid_island[pos[members]] = -1
        residuals = np.array([r for _, r in trials])
        best = int(np.argmin(residuals))
        if len(trials) > 1 and np.isfinite(decided_full).any():
            dist, near_psi = (v.ravel()[mask_index[members]]
                              for v in _nearest_decided(decided_full, weight_full, period, spacing))
            near = _clear_winner([_consistency(p, dist, near_psi, weight[members], period, island_gap_mm)
                                  for p, _ in trials], period)
            if near is not None:
                best = near
            elif np.delete(residuals, best).min() < 1.5 * residuals[best]:
                # the residual cannot tell (e.g. a pure water or fat island, single-peak fat):
                # the decided islands farther away, if they tell clearly
                far = _clear_winner([_consistency(p, dist, near_psi, weight[members], period, np.inf)
                                     for p, _ in trials], period)
                best = best if far is None else far
        chosen[members] = trials[best][0]
        decided_full.ravel()[mask_index[members]] = chosen[members]
    rest = np.flatnonzero(np.isnan(chosen))
    if rest.size:
        if np.isfinite(decided_full).any():
            ref = _nearest_decided(decided_full, weight_full, period, spacing)[1].ravel()[mask_index[rest]]
            d = np.abs(_wrap(cand_psi[rest] - ref[:, None], period))
            d[np.isnan(d)] = np.inf
            pick = cand_psi[rest, np.argmin(d, axis=1)]
            chosen[rest] = np.where(np.isfinite(pick), pick, ref)
        else:
            chosen[rest] = np.nan_to_num(cand_psi[rest, 0])
    return _wrap(chosen, period)


def _circular_smooth(psi: np.ndarray, weight: np.ndarray, period: float, sigma_vox: float) -> np.ndarray:
    """Weighted Gaussian smoothing (in-plane) of a wrapped field map, via phasors."""
    sig = (0.0,) * (psi.ndim - 2) + (sigma_vox, sigma_vox)
    ph = np.exp(2j * np.pi * np.nan_to_num(psi) / period) * weight
    num = ndi.gaussian_filter(ph.real, sig, mode="nearest") + 1j * ndi.gaussian_filter(ph.imag, sig, mode="nearest")
    return np.angle(num) * period / (2 * np.pi)
