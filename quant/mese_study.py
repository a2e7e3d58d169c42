"""The pipeline of a study that has a multi-echo spin-echo (MESE) series but no Dixon.

Many muscle protocols acquire only a T2 mapping series. The bi-component EPG fit of
:mod:`quant.t2` gives the water and fat amplitudes of every voxel, which is enough to
segment the legs on the MESE series itself:

1. Assemble the MESE volume; estimate the noise SD from the first echo's background.
2. Fit every voxel above the noise (first pass; fat T2 configured, else calibrated on
   the voxels that decay slowly, :func:`first_pass_fat_t2`): water and fat amplitudes
   ``M_w``, ``M_f`` and the proton-density fat fraction ``M_f / (M_w + M_f)``. A fat T2
   far from the exam's would read subcutaneous fat as part water, and it would not be
   told from muscle.
3. :func:`quant.segment.segment_legs` with ``M_w`` as water, ``M_f`` as fat, the PD fat
   fraction as FF and the first echo as the anatomy image (body outline, dark cortex):
   the same rules as the Dixon path (sides from patient coordinates, fatty muscle stays
   muscle, thigh/calf from Body Part Examined, descriptions or anatomy).
4. The regular water-T2 stage (:func:`quant.t2stage.measure_t2`) on that segmentation
   (same grid): fat T2 calibrated on subcutaneous fat, ``t2w_ms``, ``t2w_mean_ms``,
   ``t2w_iqr_ms``, ``b1`` and ``ff_t2_percent`` per leg.
5. ``csa_mm2`` per leg with the partial-volume weighting of :mod:`quant.metrics` (from the
   PD fat fraction and the PD amplitude ``M_w + M_f``), and ``vol_ml`` only when the
   slices are contiguous (gap at most :data:`CONTIGUOUS_TOL` of the slice thickness; a
   MESE with gaps between slices samples the leg, it does not cover it).

Not reported: the Dixon ``ff_percent`` (no Dixon) and ``frma_mm2`` (the functional
remaining muscle area is defined with the Dixon fat fraction; the T2-derived FF is
reported as ``ff_t2_percent``). The analysis' ``anatomy`` is the first-echo volume:
the masks, the SEG and the SR's "source series for segmentation" are on the MESE series.

ROIs (:func:`quant.roi_stage.find_rois`, as on the Dixon path): the caller's, else a
reader's SEG that references the MESE series (its frames reference the first echo's
instances, or lie at their positions: one label map on the first-echo grid), else a
reader's set of another visit carried onto the first-echo volume, else other subjects'
sets fused, else the automatic compartments (on the segmentation of step 3, the septa from
the PD fat fraction of the fit). Every ROI and side gets ``csa_mm2`` (and ``vol_ml``) the
way a leg does (:func:`quant.roi_stage.measure_rois`) and the water-T2 metrics of
:func:`quant.t2stage.measure_t2`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from . import ALGORITHM_VERSION
from .analysis import RoiReference, RoiSet, StudyAnalysis
from .enums import Model, Tissue
from .epg import MeseParameters
from .errors import QuantError, SeriesError
from .metrics import Measurement, muscle_metrics, partial_volume_weights
from .noise import estimate_noise_sd
from .roi_stage import find_rois, measure_rois
from .segment import INPLANE_3D, otsu_threshold, segment_legs
from .series import SeriesInfo
from .t2 import DEFAULT_FAT_T2_MS, build_dictionary, calibrate_fat_t2, fit_water_t2
from .t2stage import MIN_SNR, T2Options, measure_t2, mese_parameters
from .volume import Volume, assemble_volume

#: Slices are contiguous (``vol_ml`` reported) when the slice spacing exceeds the slice
#: thickness by at most this fraction of it (overlapping slices count as contiguous).
CONTIGUOUS_TOL = 0.05
#: Model name of the CSA (and VOL) measured on masks found on the MESE fit.
MESE_SEGMENTATION_MODEL = Model.EPG_BICOMPONENT



def slice_thickness_mm(datasets: Sequence[Dataset]) -> float | None:
    """Slice Thickness (mm) of a series: the classic attribute, else the Pixel Measures
    functional group of an Enhanced MR instance (shared, else the first frame's).

    Returns
    -------
    float or None
        The thickness of the first instance that states one; None when none does.
    """
    for ds in datasets:
        value = ds.get("SliceThickness")
        if value in (None, ""):
            for owner in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
                groups = ds.get(owner) or []
                pm = groups[0].get("PixelMeasuresSequence") if groups else None
                if pm and pm[0].get("SliceThickness") not in (None, ""):
                    value = pm[0].SliceThickness
                    break
        if value not in (None, ""):
            try:
                thickness = float(value)
            except (TypeError, ValueError):
                continue
            if thickness > 0:
                return thickness
    return None


def slices_contiguous(volume: Volume, thickness_mm: float | None) -> tuple[bool, str]:
    """Whether the slices of ``volume`` cover the anatomy between them.

    Returns
    -------
    (bool, str)
        True when there are two or more slices and the spacing is at most
        ``(1 + CONTIGUOUS_TOL)`` times ``thickness_mm``; the reason in words otherwise.
    """
    n = volume.array.shape[-3]
    spacing = float(volume.spacing_mm[0])
    if n < 2:
        return False, "one slice"
    if thickness_mm is None:
        return False, "Slice Thickness is not in the headers"
    if spacing > (1.0 + CONTIGUOUS_TOL) * thickness_mm:
        return False, (f"slices of {thickness_mm:g} mm every {spacing:g} mm "
                       f"(gaps of {spacing - thickness_mm:g} mm)")
    return True, f"slices of {thickness_mm:g} mm every {spacing:g} mm"


def first_pass_fat_t2(images: np.ndarray, params: MeseParameters, noise_sd: float | None,
                      atoms: Callable | None = None, *, max_voxels: int = 2000) -> tuple[float, str]:
    """Fat T2 (ms) of the exam before any segmentation, from its slowly decaying voxels.

    Voxels whose first echo is well above the noise (20 noise SDs, else above the median)
    and whose signal at about 80 ms, relative to the first echo, is above Otsu's
    threshold of that ratio (fat decays with T2 ~ 150 ms, muscle ~ 35 ms), away from
    their edges in-plane, are fitted by :func:`quant.t2.calibrate_fat_t2` (fat T2 and
    B1 free, a water admixture of T2 30 ms).

    Returns
    -------
    (float, str)
        The fat T2 (ms) and how it was found (``"calibrated on N slowly decaying
        voxels"``, or the default :data:`quant.t2.DEFAULT_FAT_T2_MS` with the reason).
    """
    first = images[0]
    late = images[min(images.shape[0] - 1, max(1, round(80.0 / params.echo_spacing_ms) - 1))]
    bright = first > (20.0 * noise_sd if noise_sd else float(np.median(first)))
    if bright.sum() < 100:
        return DEFAULT_FAT_T2_MS, "default (too few voxels above the noise)"
    ratio = np.zeros(first.shape, np.float32)
    ratio[bright] = late[bright] / first[bright]
    slow = bright & (ratio > otsu_threshold(ratio[bright]))
    slow = ndi.binary_erosion(slow, structure=INPLANE_3D)
    pick = np.flatnonzero(slow.ravel())
    if pick.size < 30:
        return DEFAULT_FAT_T2_MS, "default (too few slowly decaying voxels)"
    pick = pick[:: max(1, pick.size // max_voxels)]
    signals = np.moveaxis(images, 0, -1).reshape(-1, images.shape[0])[pick]
    try:
        return calibrate_fat_t2(signals, params, noise_sd=noise_sd, atoms=atoms), \
            f"calibrated on {pick.size} slowly decaying voxels"
    except QuantError:
        return DEFAULT_FAT_T2_MS, "default (calibration failed)"


def analyse_mese_study(by_series: Mapping[str, Sequence[Dataset]], infos: Sequence[SeriesInfo],
                       mese_info: SeriesInfo, notes: list[str], t2_options: T2Options | None = None,
                       atoms: Callable | None = None, *, body_part: str = "", rois: RoiSet | None = None,
                       reader_segs: Sequence[Dataset] = (), carry_from: Sequence[RoiReference] = (),
                       atlases: Sequence[RoiReference] = (), compartments: bool = False) -> StudyAnalysis:
    """Segment, measure CSA (and VOL) and water T2 on a MESE series alone (module notes).

    Parameters
    ----------
    by_series : mapping
        Series Instance UID -> the datasets of that series (the whole study).
    infos : sequence of SeriesInfo
        What every series of the study was recognised as.
    mese_info : SeriesInfo
        The MESE series to use.
    notes : list of str
        Notes so far; the analysis' notes continue it.
    t2_options : T2Options, optional
        How water T2 is measured (default :class:`~quant.t2stage.T2Options`).
    atoms : callable, optional
        Source of the EPG tables (see :func:`quant.t2.build_dictionary`).
    body_part : str
        Body Part Examined and descriptions, to tell thigh from calf.
    rois : RoiSet, optional
        ROIs on the grid of the first echo (the MESE slices), measured as given.
    reader_segs, carry_from, atlases, compartments
        Where else the ROIs come from, in that order (:func:`quant.roi_stage.find_rois`;
        see :func:`quant.pipeline.analyse_study`).

    Returns
    -------
    StudyAnalysis
        ``anatomy`` is the first-echo volume of the MESE series (masks on its grid),
        ``fat_fraction`` the PD fat fraction of the first-pass fit (NaN where not fitted),
        ``measurements`` ``csa_mm2`` (and ``vol_ml`` with contiguous slices) by model
        ``epg-bicomponent`` plus the water-T2 metrics, per leg and, with ROIs, per ROI and
        leg; ``t2`` the T2 result; ``rois``, ``roi_refusals``, ``carried``, ``atlas`` and
        ``flags`` as on the Dixon path.

    Raises
    ------
    SeriesError
        The MESE series cannot be assembled into echoes x slices, or is not a CPMG train.
    SegmentationError
        No legs or no muscle were found.
    """
    options = t2_options or T2Options()
    datasets = by_series[mese_info.series_instance_uid]
    mese = assemble_volume(datasets)
    if mese.array.ndim != 4:
        raise SeriesError("the multi-echo spin-echo series did not assemble into echoes x slices "
                          f"(series {mese_info.series_instance_uid})")
    params = mese_parameters(datasets[0], mese, options)
    images = mese.array.astype(np.float32)
    first = mese.with_array(images[0])
    try:
        noise_sd: float | None = estimate_noise_sd(images[0])
    except QuantError:
        noise_sd = None

    # first pass: every voxel above the noise, fat T2 configured or calibrated on the
    # slowly decaying voxels (fat: subcutaneous, marrow), else the default
    if options.fat_t2_ms is not None:
        fat_t2, fat_source = float(options.fat_t2_ms), "configured"
    else:
        fat_t2, fat_source = first_pass_fat_t2(images, params, noise_sd, atoms)
    min_signal = MIN_SNR * noise_sd if noise_sd else 0.0
    fit_mask = images.max(axis=0) > min_signal
    dictionary = build_dictionary(params, t2f_ms=fat_t2, atoms=atoms)
    fit = fit_water_t2(np.moveaxis(images, 0, -1)[fit_mask], dictionary, noise_sd=noise_sd,
                       min_signal=min_signal)
    m_water = np.zeros(first.array.shape, np.float32)
    m_fat = np.zeros(first.array.shape, np.float32)
    ff = np.full(first.array.shape, np.nan, np.float32)
    fitted = fit.fitted
    m_water[fit_mask] = np.where(fitted, np.nan_to_num(fit.m_water), 0.0)
    m_fat[fit_mask] = np.where(fitted, np.nan_to_num(fit.m_fat), 0.0)
    ff[fit_mask] = np.where(fitted, fit.ff, np.nan)
    notes.append(f"no Dixon series: legs segmented on the water and fat amplitudes of the EPG fit of "
                 f"series {mese_info.description or mese_info.series_instance_uid} "
                 f"({int(fit_mask.sum())} voxels, fat T2 {fat_t2:.0f} ms {fat_source})")

    seg = segment_legs(first.with_array(m_water), m_fat, ff, in_phase=images[0], body_part=body_part)
    labels, groups = seg.muscle_groups()
    sat = ndi.binary_erosion(seg.tissue == Tissue.SUBCUTANEOUS_FAT, structure=INPLANE_3D)
    fat_ff = float(np.nanmedian(ff[sat])) if sat.sum() > 50 else 0.92
    pd_signal = m_water + m_fat
    labels_ext, weights, muscle_ff = partial_volume_weights(labels, ff, pd_signal, fat_ff=fat_ff)
    metrics, per_slice = muscle_metrics(
        labels_ext, muscle_ff, groups, pixel_area_mm2=first.pixel_area_mm2,
        slice_thickness_mm=first.spacing_mm[0], algorithm_version=ALGORITHM_VERSION,
        model=MESE_SEGMENTATION_MODEL.value, weights=weights)
    contiguous, why = slices_contiguous(first, slice_thickness_mm(datasets))
    keep = {"csa_mm2", "vol_ml"} if contiguous else {"csa_mm2"}
    measurements: list[Measurement] = [m for m in metrics if m.metric in keep]
    if not contiguous:
        notes.append(f"volume not reported: the MESE slices are not contiguous ({why})")
    found = find_rois(first, seg, ff, notes, rois=rois, reader_segs=reader_segs, carry_from=carry_from,
                      atlases=atlases, compartments=compartments)
    if found.rois is not None:
        core = ndi.binary_erosion(labels > 0, structure=INPLANE_3D)

        def region_ff(roi: np.ndarray) -> float:   # not reported (no Dixon FF): ff_percent is dropped
            return float(np.nanmean(ff[roi])) if roi.any() else float("nan")
        measurements += [m for m in measure_rois(found.rois, labels_ext, weights, muscle_ff, core, seg, first,
                                                 MESE_SEGMENTATION_MODEL, region_ff) if m.metric in keep]
    notes.append("no Dixon fat fraction or fRMA: the fat fraction is the T2 fit's (ff_t2_percent)")
    notes.extend(seg.notes)

    t2 = None
    try:
        t2 = measure_t2(datasets, mese, first, seg, options, atoms=atoms, algorithm_version=ALGORITHM_VERSION,
                        rois=found.rois)
        measurements.extend(t2.measurements)
        notes.append(f"water T2 ({t2.fit.model}) from series {mese_info.description or mese_info.series_instance_uid}"
                     f", fat T2 {t2.fat_t2_ms:.0f} ms ({t2.fat_t2_source})")
    except QuantError as exc:
        notes.append(f"water T2 not measured: {exc}")
    csa = {groups[g]: v for g, v in per_slice.items()}
    return StudyAnalysis(series=tuple(infos), anatomy=first, fat_fraction=ff, segmentation=seg,
                         measurements=tuple(measurements), csa_per_slice=csa, notes=tuple(notes), t2=t2,
                         flags=found.flags, rois=found.rois, roi_refusals=found.refusals, carried=found.carried,
                         atlas=found.atlas)
