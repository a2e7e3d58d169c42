"""Dixon fat fraction done carefully: noise-floor-free magnitude FF, fat-water swaps, and
proton-density fat fraction (PDFF) from multi-echo gradient echo (MEGRE).

Three parts, each pure (arrays in, arrays and frozen dataclasses out):

1. **Magnitude Dixon** (water, fat and optionally in-phase/opposed-phase images as scanners
   send them). Magnitude images carry Rician noise: where a component is small (fat in
   normal muscle, water in fatty marrow, the opposed-phase near FF 50 %) its magnitude is
   biased upwards by the noise floor, so the naive ``F / (W + F)`` overestimates low FF
   (+4 pp at SNR 20, FF 2 %). Here every available channel is modelled as Rician with
   amplitude ``W``, ``F``, ``W + F`` (in-phase) and ``|W - F|`` (opposed-phase), and
   water and fat are estimated by maximum likelihood (ML):

   - :func:`fat_fraction_dixon`: per voxel. With in-phase and opposed-phase images the
     fat of a water-dominant voxel comes mainly from ``IP - OP`` (two large, unbiased
     signals) and the water of a fat-dominant voxel likewise, so the floor matters little;
     the ML weighs each channel by how much it can tell (a channel at the noise floor
     tells little) and picks the branch (water- or fat-dominant) that explains
     ``|OP| = |W - F|`` best.
   - :func:`roi_fat_fraction`: the mean FF of a region (what the node reports). Voxels
     are grouped into strata of similar FF (from a smoothed per-voxel pilot) and each
     stratum's FF is the joint ML over its voxels with one FF and a per-voxel total
     signal. This removes the floor bias even without IP/OP (the ROI pools the evidence
     that no single voxel has) and stays right for heterogeneous regions.
   - :func:`estimate_noise_sd`: noise SD of a magnitude image from its background
     (Rayleigh median), falling back to a high-pass estimate inside the body.

2. **Fat-water swaps** (:func:`detect_swaps`, :func:`correct_swaps`). Magnitude IP/OP are
   symmetric under ``W <-> F`` (``W + F`` and ``|W - F|``), so they cannot reveal a swap;
   anatomy can: subcutaneous fat (SAT) under the skin is fat. A whole-series swap shows
   as a water-like skin shell; a regional swap (a phase error of the scanner's Dixon
   reconstruction) as a water-like segment of the SAT layer, with the fat-like region
   that it borders inside the body (swapped muscle).

3. **Multi-echo gradient echo (MEGRE)** (:func:`megre_pdff`): magnitude and phase of >= 3
   echoes; signal model ``s_n = (W + F c_n) exp((i 2 pi psi - R2*) t_n)`` with the
   6-peak fat spectrum ``c_n`` (Hamilton / ISMRM fat-water toolbox), one field map ``psi``
   and one R2* per voxel. Field map: voxel-wise candidates from a variable-projection
   (VARPRO) grid search, selected by quality-guided region growing (:mod:`quant.dixon.fieldmap`),
   refined, then smoothed; water and fat with R2* fitted at the smooth field map, phase-
   constrained (water and fat share one phase) so PDFF has no noise floor near 0.

Kernels that touch every voxel are numba (``cache=True``); each has a plain numpy/scipy
reference (``*_reference``, in :mod:`~quant.dixon.reference`) used by the tests.

Modules, one method each: :mod:`~quant.dixon.magnitude` (per-voxel magnitude ML),
:mod:`~quant.dixon.roi` (region ML), :mod:`~quant.dixon.swaps`, :mod:`~quant.dixon.spectrum`
(fat spectrum and MEGRE signal model), :mod:`~quant.dixon.megre` (PDFF, R2*, field map),
:mod:`~quant.dixon.reference`. Noise estimation is shared in :mod:`quant.noise`, Rician
statistics in :mod:`quant.rician`.
"""

from ..noise import body_mask_from, estimate_noise_sd
from .magnitude import CHANNELS, DixonFF, DixonFlag, fat_fraction_dixon
from .megre import PDFFResult, megre_pdff
from .reference import (
                        pdff_fit_reference,
                        rician_loglik,
                        rician_ml_reference,
                        roi_ml_reference,
                        varpro_residual_reference,
)
from .roi import RegionFatFraction, roi_fat_fraction
from .spectrum import (
                        GYROMAGNETIC_MHZ_PER_T,
                        HAMILTON_6PEAK,
                        SINGLE_PEAK,
                        FatSpectrum,
                        fat_signal_model,
                        megre_signal,
)
from .swaps import SwapReport, correct_swaps, detect_swaps

__all__ = [
    "CHANNELS", "GYROMAGNETIC_MHZ_PER_T", "HAMILTON_6PEAK", "SINGLE_PEAK", "DixonFF", "DixonFlag", "FatSpectrum",
    "PDFFResult", "SwapReport", "body_mask_from", "correct_swaps", "detect_swaps", "estimate_noise_sd",
    "fat_fraction_dixon", "fat_signal_model", "megre_signal", "pdff_fit_reference", "megre_pdff",
    "RegionFatFraction", "rician_loglik", "rician_ml_reference", "roi_fat_fraction", "roi_ml_reference",
    "varpro_residual_reference",
]
