"""The water-T2 stage of the study pipeline: a multi-echo spin-echo series, the Dixon
segmentation carried onto its grid, fat T2 calibrated on subcutaneous fat, a
dictionary fit per muscle voxel, and ``t2w_ms``, ``t2w_mean_ms``, ``t2w_iqr_ms``, ``b1``
and ``ff_t2_percent`` per region and side.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from .analysis import RoiSet
from .enums import Metric, Model, RoiSource, Side, SideLabel, Tissue
from .epg import DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO, MeseParameters
from .errors import QuantError, SeriesError
from .metrics import Measurement
from .noise import estimate_noise_sd
from .resample import resample_labels
from .segment import Segmentation
from .t2 import (
    DEFAULT_FAT_T2_MS,
    AtomsSource,
    T2Fit,
    build_dictionary,
    calibrate_fat_t2,
    fit_biexponential_fixed_fat,
    fit_water_t2,
    summarise,
)
from .volume import Volume

T2_METRICS = (Metric.T2W_MS, Metric.T2W_MEAN_MS, Metric.T2W_IQR_MS, Metric.B1, Metric.FF_T2_PERCENT)
MIN_ROI_VOXELS = 20


@dataclass(frozen=True)
class T2Options:
    """How water T2 is measured (``[t2]`` of the node's configuration)."""

    model: str = Model.EPG_BICOMPONENT.value  # or Model.BIEXP_FIXED_FAT
    profile: str = "auto"                    # "auto" (2D: sinc, 3D: none), "sinc", "none"
    time_bandwidth: float = 2.0
    refocusing_to_excitation_slab_ratio: float | None = None   # None: quant.epg's default
    refocusing_angle_deg: float | None = None                  # None: from the header, else 180
    fat_t2_ms: float | None = None           # None: calibrate on subcutaneous fat, default if too few voxels


@dataclass(frozen=True, eq=False)
class T2Result:
    """The water-T2 stage of one study: the MESE volume, its sequence, the fit's maps, the
    labels carried onto its grid, the fat T2 used (and where it came from) and the
    per-region measurements.
    """

    volume: Volume            # the MESE volume (echo, slice, row, column)
    params: MeseParameters
    fit: T2Fit                # maps on the MESE grid (NaN outside muscle)
    labels: np.ndarray        # tissue*4 + side on the MESE grid
    fat_t2_ms: float
    fat_t2_source: str
    measurements: tuple[Measurement, ...]


def mese_parameters(ds: Dataset, volume: Volume, options: T2Options) -> MeseParameters:
    """Sequence parameters from the headers of a MESE series and the options."""
    te = np.asarray(volume.echo_times_ms, dtype=float)
    if te.size < 3:
        raise SeriesError(f"a multi-echo spin echo needs 3 or more echo times, got {te.tolist()}")
    esp = float(np.median(np.diff(te)))
    if not np.allclose(np.diff(te), esp, rtol=0.02) or abs(te[0] - esp) > 0.02 * esp + 0.05:
        raise SeriesError(f"echo times {te.tolist()} ms are not a CPMG train (TE_n = n x echo spacing)")
    acq = str(ds.get("MRAcquisitionType", "2D") or "2D").upper()
    profile = options.profile if options.profile != "auto" else ("none" if acq == "3D" else "sinc")
    refocusing = options.refocusing_angle_deg
    if refocusing is None:
        flip = ds.get("FlipAngle")
        refocusing = float(flip) if flip not in (None, "") and 90 < float(flip) <= 180 else 180.0
    ratio = options.refocusing_to_excitation_slab_ratio
    tr_ms: float | None = None
    tr = ds.get("RepetitionTime")
    if tr in (None, ""):  # Enhanced MR: in the MR Timing and Related Parameters functional group
        shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
        timing = shared.get("MRTimingAndRelatedParametersSequence")
        tr = timing[0].get("RepetitionTime") if timing else None
    if tr not in (None, "") and float(tr) > te[-1]:
        tr_ms = float(tr)
    return MeseParameters(n_echoes=int(te.size), echo_spacing_ms=esp, refocusing_angle_deg=refocusing,
                          profile=profile, time_bandwidth=options.time_bandwidth, repetition_time_ms=tr_ms,
                          refocusing_to_excitation_slab_ratio=(DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO
                                                               if ratio is None else ratio))


MIN_SNR = 5.0   # a voxel is fitted when its largest echo is above this many noise SDs


def _fit(signals: np.ndarray, params: MeseParameters, options: T2Options, fat_t2: float, noise_sd: float | None,
         atoms: AtomsSource | None) -> T2Fit:
    min_signal = MIN_SNR * noise_sd if noise_sd else 0.0
    if options.model == Model.BIEXP_FIXED_FAT:
        return fit_biexponential_fixed_fat(signals, params.echo_times_ms, t2f_ms=fat_t2, min_signal=min_signal)
    if options.model != Model.EPG_BICOMPONENT:
        raise QuantError(f"unknown T2 model {options.model!r} "
                         f"(expected {Model.EPG_BICOMPONENT.value!r} or {Model.BIEXP_FIXED_FAT.value!r})")
    dictionary = build_dictionary(params, t2f_ms=fat_t2, atoms=atoms)
    return fit_water_t2(signals, dictionary, noise_sd=noise_sd, min_signal=min_signal)


def measure_t2(datasets: Sequence[Dataset], mese: Volume, anatomy: Volume, seg: Segmentation,
               options: T2Options = T2Options(), *,
               atoms: Callable[[MeseParameters, np.ndarray, np.ndarray, float], np.ndarray] | None = None,
               algorithm_version: str = "", rois: RoiSet | None = None) -> T2Result:
    """Water T2 per region and side of one MESE series (see the module docstring), and per
    ROI and side when ``rois`` (on the grid of ``anatomy``) are given.

    Returns
    -------
    T2Result
        The fit's maps on the MESE grid, the fat T2 used and the measurements.
    """
    if mese.array.ndim != 4:
        raise SeriesError("the multi-echo series did not assemble into echoes x slices")
    params = mese_parameters(datasets[0], mese, options)
    grid = mese.with_array(mese.array[0])
    combined = (seg.tissue.astype(np.uint8) * 4 + seg.side.astype(np.uint8)).astype(np.uint8)
    labels = resample_labels(combined, anatomy, grid)
    tissue, side = labels // 4, labels % 4
    images = mese.array.astype(np.float32)
    body = (tissue > 0)
    try:
        noise_sd = estimate_noise_sd(images[0], ndi.binary_dilation(body, iterations=1))
    except QuantError:
        noise_sd = None
    signals_of = np.moveaxis(images, 0, -1)
    fat_t2, source = DEFAULT_FAT_T2_MS, "default"
    if options.fat_t2_ms is not None:
        fat_t2, source = float(options.fat_t2_ms), "configured"
    else:
        sat = tissue == Tissue.SUBCUTANEOUS_FAT
        sat = ndi.binary_erosion(sat, structure=np.ones((1, 3, 3), bool))   # away from partial volume
        if sat.sum() >= 30:
            pick = np.flatnonzero(sat.ravel())
            pick = pick[:: max(1, pick.size // 2000)]
            try:
                fat_t2 = calibrate_fat_t2(signals_of.reshape(-1, images.shape[0])[pick], params, noise_sd=noise_sd,
                                          atoms=atoms)
                source = f"calibrated on {pick.size} subcutaneous fat voxels"
            except QuantError:
                source = "default (calibration failed)"
    muscle = tissue == Tissue.MUSCLE
    # away from the muscle's edges (partial volume with fat or fascia), where enough is left
    core = ndi.binary_erosion(muscle, structure=np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]],
                                                          [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                                                          [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], bool))
    if core.sum() >= 0.3 * muscle.sum():
        muscle = core
    fit_all = _fit(signals_of[muscle], params, options, fat_t2, noise_sd, atoms)
    maps = {}
    for name in ("t2w_ms", "b1", "ff", "m_water", "m_fat", "residual"):
        full = np.full(muscle.shape, np.nan, np.float32)
        full[muscle] = getattr(fit_all, name)
        maps[name] = full
    for name in ("success", "fitted"):
        full = np.zeros(muscle.shape, bool)
        full[muscle] = getattr(fit_all, name)
        maps[name] = full
    fit = T2Fit(**maps, model=fit_all.model, t2f_ms=fit_all.t2f_ms, dictionary_key=fit_all.dictionary_key)
    regions: list[tuple[np.ndarray, str]] = [(muscle, "")]
    if rois is not None:
        roi_grid = resample_labels(np.asarray(rois.labels).astype(np.uint8), anatomy, grid)
        regions += [(muscle & (roi_grid == lab), str(name)) for lab, name in sorted(rois.names.items())]
    out = []
    for where, roi_name in regions:
        for s, code in ((Side.RIGHT, SideLabel.RIGHT), (Side.LEFT, SideLabel.LEFT), (Side.NONE, SideLabel.NONE)):
            roi = where & (side == code)
            if roi.sum() < MIN_ROI_VOXELS:
                continue
            summary = summarise(fit, roi)
            for metric in T2_METRICS:
                value = summary[metric.value]
                if value is None or not math.isfinite(value):
                    continue
                n = summary["n_fitted"] if metric is Metric.FF_T2_PERCENT else summary["n_voxels"]
                out.append(Measurement(seg.region.value, s, metric.value, float(value), metric.unit,
                                       algorithm_version, int(n), fit.model, roi=roi_name,
                                       source=rois.source.value if roi_name and rois else RoiSource.AUTOMATIC.value))
    return T2Result(mese, params, fit, labels, fat_t2, source, tuple(out))
