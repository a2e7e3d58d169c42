"""Fat fraction from magnitude Dixon water and fat images.

``FF = F / (W + F)`` voxel-wise, where both are magnitudes as scanners send them. Voxels
whose total signal ``W + F`` is below ``min_signal`` are set to NaN (air, cortical bone).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _fat_fraction_kernel(water, fat, min_signal, out):
    n = water.size
    w = water.ravel()
    f = fat.ravel()
    o = out.ravel()
    for i in prange(n):
        wi = max(w[i], 0.0)
        fi = max(f[i], 0.0)
        s = wi + fi
        if s < min_signal or s <= 0.0:
            o[i] = np.nan
        else:
            o[i] = fi / s


def fat_fraction(water: np.ndarray, fat: np.ndarray, *, min_signal: float = 0.0) -> np.ndarray:
    """Fat fraction (0..1, float32) of magnitude water and fat images of one grid.

    Parameters
    ----------
    water, fat : ndarray
        Magnitude images, same shape. Negative values (rescaled data) count as 0.
    min_signal : float
        Voxels with ``water + fat < min_signal`` are NaN.
    """
    water = np.ascontiguousarray(water, dtype=np.float32)
    fat = np.ascontiguousarray(fat, dtype=np.float32)
    if water.shape != fat.shape:
        raise ValueError(f"water {water.shape} and fat {fat.shape} differ in shape")
    out = np.empty_like(water)
    _fat_fraction_kernel(water, fat, np.float32(min_signal), out)
    return out


def fat_fraction_reference(water: np.ndarray, fat: np.ndarray, *, min_signal: float = 0.0) -> np.ndarray:
    """Plain numpy reference of :func:`fat_fraction` (used by tests).

    The threshold is applied, as in the kernel, to the float32 sum against a float32
    ``min_signal`` (a float64 comparison disagrees where ``W + F`` equals it in float32).
    """
    w = np.clip(np.asarray(water, dtype=np.float32), 0, None)
    f = np.clip(np.asarray(fat, dtype=np.float32), 0, None)
    s = w + f
    with np.errstate(invalid="ignore", divide="ignore"):
        ff = f.astype(np.float64) / s.astype(np.float64)
    ff[(s < np.float32(min_signal)) | (s <= 0)] = np.nan
    return ff.astype(np.float32)
