"""Fat T2 of an exam, calibrated on subcutaneous fat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..epg import MeseParameters
from ..errors import QuantError
from .dictionary import (
    DEFAULT_B1_GRID,
    DEFAULT_FAT_T1_MS,
    DEFAULT_WATER_T1_MS,
    AtomsSource,
    build_dictionary,
)
from .fit import _check_signals, fit_water_t2

DEFAULT_FAT_T2_GRID_MS = np.arange(60.0, 300.0 + 1e-9, 2.0)


def calibrate_fat_t2(signals_in_fat_voxels: np.ndarray, params: MeseParameters, *,
                     t2_grid_ms: Sequence[float] | np.ndarray = DEFAULT_FAT_T2_GRID_MS,
                     b1_grid: Sequence[float] | np.ndarray = DEFAULT_B1_GRID,
                     t1f_ms: float = DEFAULT_FAT_T1_MS, water_t2_ms: float | None = 30.0,
                     t1w_ms: float = DEFAULT_WATER_T1_MS, noise_sd: float | None = None,
                     min_voxels: int = 10, atoms: AtomsSource | None = None) -> float:
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
