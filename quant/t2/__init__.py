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
of voxels within 0.05 ms of the true T2w on a 1 ms grid). The PD fat fraction is ``M_f / (M_w + M_f)``;
it is T1-weighted unless the dictionary's :class:`~quant.epg.MeseParameters` carry the protocol's TR.

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

Modules, one method each: :mod:`~quant.t2.dictionary` (EPG atoms on the T2w x B1 grid),
:mod:`~quant.t2.kernels` (numba search and refinement), :mod:`~quant.t2.tables` (what the
kernels read, once per dictionary), :mod:`~quant.t2.fit` (:func:`fit_water_t2`,
:func:`summarise`), :mod:`~quant.t2.fallback` (bi-exponential model),
:mod:`~quant.t2.calibration` (fat T2) and :mod:`~quant.t2.reference` (numpy references).
Rician statistics are shared with the Dixon fits in :mod:`quant.rician`.
"""

from .calibration import DEFAULT_FAT_T2_GRID_MS, calibrate_fat_t2
from .dictionary import (
                         DEFAULT_B1_GRID,
                         DEFAULT_FAT_T1_MS,
                         DEFAULT_FAT_T2_MS,
                         DEFAULT_T2W_GRID_MS,
                         DEFAULT_WATER_T1_MS,
                         AtomsSource,
                         T2Dictionary,
                         build_dictionary,
                         epg_atoms,
                         table_key,
)
from .fallback import (
                         DEFAULT_BIEXP_T2W_GRID_MS,
                         fit_biexponential_fixed_fat,
                         fit_biexponential_fixed_fat_reference,
)
from .fit import T2Fit, fit_water_t2, summarise
from .reference import fit_water_t2_reference

__all__ = [
    "DEFAULT_B1_GRID", "DEFAULT_BIEXP_T2W_GRID_MS", "DEFAULT_FAT_T1_MS", "DEFAULT_FAT_T2_GRID_MS", "DEFAULT_FAT_T2_MS",
    "DEFAULT_T2W_GRID_MS", "DEFAULT_WATER_T1_MS", "AtomsSource", "T2Dictionary", "T2Fit",
    "build_dictionary", "calibrate_fat_t2", "epg_atoms", "fit_biexponential_fixed_fat",
    "fit_biexponential_fixed_fat_reference", "fit_water_t2", "fit_water_t2_reference", "summarise", "table_key",
]
