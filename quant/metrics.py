"""Metrics per region and side: CSA (mm²), VOL (ml), FF (%), fRMA (mm²).

- CSA per slice = number of muscle voxels × pixel area; ``csa_mm2`` is its mean over the
  slices that contain muscle of that leg.
- VOL = number of muscle voxels × voxel volume / 1000 (ml).
- FF = mean voxel fat fraction over the muscle (%).
- fRMA per slice = Σ pixel area × (1 − FF) over the muscle (the fat-free, functional
  remaining muscle area); ``frma_mm2`` is its mean over the same slices as CSA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .enums import Side

UNITS = {"csa_mm2": "mm2", "vol_ml": "ml", "ff_percent": "%", "frma_mm2": "mm2"}


@dataclass(frozen=True)
class Measurement:
    """One number of one region and side, with the algorithm that made it."""

    region: str          # "thigh", "calf", ... or "thigh/<muscle>"
    side: Side
    metric: str          # "csa_mm2", "vol_ml", "ff_percent", "frma_mm2"
    value: float
    unit: str
    algorithm_version: str
    n_voxels: int = 0
    model: str = ""      # which model made the value (e.g. "dixon-magnitude")


@njit(cache=True)
def _slice_sums(mask_labels, ff, n_labels, n_slices):
    """Per label and slice: voxel count, count of voxels with finite FF, sum of FF,
    and sum of (1 - FF) (voxels without FF count as fat-free)."""
    count = np.zeros((n_labels, n_slices), np.int64)
    nff = np.zeros((n_labels, n_slices), np.int64)
    sff = np.zeros((n_labels, n_slices), np.float64)
    sfree = np.zeros((n_labels, n_slices), np.float64)
    nz, ny, nx = mask_labels.shape
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                lab = mask_labels[k, j, i]
                if lab <= 0:
                    continue
                count[lab, k] += 1
                v = ff[k, j, i]
                if v == v:  # not NaN
                    v = min(max(v, 0.0), 1.0)
                    nff[lab, k] += 1
                    sff[lab, k] += v
                    sfree[lab, k] += 1.0 - v
                else:
                    sfree[lab, k] += 1.0
    return count, nff, sff, sfree


def slice_sums(labels: np.ndarray, ff: np.ndarray, n_labels: int):
    """Per-label, per-slice sums (see :func:`_slice_sums`); labels are 1..n_labels-1."""
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    ff = np.ascontiguousarray(ff, dtype=np.float32)
    if labels.shape != ff.shape:
        raise ValueError(f"labels {labels.shape} and FF {ff.shape} differ in shape")
    return _slice_sums(labels, ff, n_labels, labels.shape[0])


def slice_sums_reference(labels, ff, n_labels):
    """Plain numpy reference of :func:`slice_sums`."""
    nz = labels.shape[0]
    count = np.zeros((n_labels, nz), np.int64)
    nff = np.zeros((n_labels, nz), np.int64)
    sff = np.zeros((n_labels, nz))
    sfree = np.zeros((n_labels, nz))
    for lab in range(1, n_labels):
        for k in range(nz):
            m = labels[k] == lab
            v = ff[k][m].astype(float)
            fin = np.isfinite(v)
            count[lab, k] = m.sum()
            nff[lab, k] = fin.sum()
            vc = np.clip(v[fin], 0, 1)
            sff[lab, k] = vc.sum()
            sfree[lab, k] = (1 - vc).sum() + (~fin).sum()
    return count, nff, sff, sfree


def muscle_metrics(labels: np.ndarray, ff: np.ndarray, groups: dict[int, tuple[str, Side]], *,
                   pixel_area_mm2: float, slice_thickness_mm: float, algorithm_version: str,
                   model: str = "dixon-magnitude") -> tuple[list[Measurement], dict[int, np.ndarray]]:
    """CSA, VOL, FF and fRMA for each labelled muscle group.

    Parameters
    ----------
    labels : ndarray of int, (slices, rows, columns)
        0 outside muscle, a group number inside.
    ff : ndarray of float, same shape
        Fat fraction 0..1 (NaN where unknown).
    groups : mapping group number -> (region, side)
    pixel_area_mm2, slice_thickness_mm : float
        In-plane pixel area and slice spacing.

    Returns
    -------
    measurements, csa_per_slice
        The measurements, and the CSA (mm²) of every slice per group.
    """
    n_labels = max(groups) + 1 if groups else 1
    count, nff, sff, sfree = slice_sums(labels, ff, n_labels)
    out: list[Measurement] = []
    per_slice: dict[int, np.ndarray] = {}
    for g, (region, side) in sorted(groups.items()):
        n = int(count[g].sum())
        if n == 0:
            continue
        present = count[g] > 0
        csa = count[g] * pixel_area_mm2
        frma = sfree[g] * pixel_area_mm2
        per_slice[g] = csa
        ff_mean = float(sff[g].sum() / max(nff[g].sum(), 1)) * 100.0
        values = {
            "csa_mm2": float(csa[present].mean()),
            "vol_ml": n * pixel_area_mm2 * slice_thickness_mm / 1000.0,
            "ff_percent": ff_mean,
            "frma_mm2": float(frma[present].mean()),
        }
        for metric, value in values.items():
            out.append(Measurement(region, side, metric, value, UNITS[metric], algorithm_version, n, model))
    return out, per_slice
