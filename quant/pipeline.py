"""The quantification pipeline of one study: series → volumes → masks → maps → metrics.

Pure: takes the decoded datasets of a study, returns a :class:`StudyAnalysis`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from . import ALGORITHM_VERSION
from .analysis import NoDixonError, RoiReference, RoiSet, StudyAnalysis
from .dixon import (
    RegionFatFraction,
    correct_swaps,
    detect_swaps,
    fat_fraction_dixon,
    megre_pdff,
)
from .enums import Model, SeriesKind, Tissue
from .errors import QuantError, SeriesError
from .mese_study import analyse_mese_study
from .metrics import Measurement, muscle_metrics, partial_volume_weights
from .registration import CarriedRois
from .roi_only import roi_only_region, roi_segmentation
from .roi_stage import carry, core_ffs, find_rois, measure_rois, reader_rois, with_ff
from .segment import INPLANE_3D, segment_legs
from .series import SeriesInfo, classify_series
from .t2 import AtomsSource
from .t2stage import T2Options, measure_t2
from .volume import Volume, assemble_volume


def _cut(text: str, limit: int = 64) -> str:
    """``text`` (a Series Description: LO, 64 characters, though some are longer) cut to ``limit``."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def group_by_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    """The datasets of a study by Series Instance UID, in the order given."""
    groups: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        groups[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    return dict(groups)


def _pick(infos: Sequence[SeriesInfo], kind: SeriesKind) -> SeriesInfo | None:
    """The series of one kind; with several (a repeat), the highest series number."""
    cands = [s for s in infos if s.kind is kind]
    if not cands:
        return None
    return max(cands, key=lambda s: (s.series_number or 0, s.n_instances))


def analyse_study(datasets: Iterable[Dataset], *, t2_options: T2Options | None = None,
                  atoms: AtomsSource | None = None, rois: RoiSet | None = None,
                  compartments: bool = False, reader_segs: Sequence[Dataset] = (),
                  carry_from: Sequence[RoiReference] = (), atlases: Sequence[RoiReference] = ()) -> StudyAnalysis:
    """Run the whole pipeline on the datasets of one study.

    With a multi-echo spin-echo series in the study, water T2 is measured in the muscle
    found on the Dixon images (``t2_options``; ``atoms(params, t2_grid_ms, b1_grid, t1_ms)``
    may return the EPG tables from a cache, see :func:`quant.t2.build_dictionary`). With
    ``rois`` (on the grid of the Dixon water or MEGRE series), every metric is also measured
    per ROI and side (``Measurement.roi``, ``Measurement.source``); without ``rois`` and with
    ``compartments``, the automatic compartments of a thigh or calf are measured
    (:func:`quant.compartments.automatic_compartments`). ``reader_segs``: a reader's DICOM SEGs
    of the study; the newest that references the series segmented becomes the ROI set
    (:func:`quant.reader_rois.rois_from_seg`), and every SEG that cannot be used is listed
    with the reason in ``StudyAnalysis.roi_refusals``. Without ROIs of its own (``rois`` or a
    usable reader SEG), a reader's ROI set of another visit of the subject in ``carry_from``
    (the one of the region found) is carried to this visit by registration
    (:func:`quant.registration.carry_rois`), measured with source ``carried``, and its
    registration quality kept in ``StudyAnalysis.carried`` (flag ``roi-registration-review``
    when it needs a look). Still without ROIs, at least two reader ROI sets of *other*
    subjects in ``atlases`` (of the region found) are registered to the visit and fused
    (:func:`quant.atlas.atlas_compartments`, vote, atlas-seeded watershed; source ``atlas``,
    the confidence in ``StudyAnalysis.atlas``); then ``compartments``. A T2
    stage that cannot run leaves a note, not an error: the Dixon results stand. A study
    with a MESE series and no Dixon or MEGRE is segmented on the MESE fit itself
    (:func:`quant.mese_study.analyse_mese_study`), with its ROIs found and measured the same
    way on the first echo's grid. A hand or head-neck study (headers) is
    measured in the reader's ROIs only, which are then its muscle (:mod:`quant.roi_only`).

    Returns
    -------
    StudyAnalysis
        Series found, the volume segmented, fat fraction map, masks, measurements per
        region and side, notes and flags.

    Raises
    ------
    NoDixonError
        Neither a water and fat pair, a multi-echo gradient echo nor a multi-echo spin echo
        was found (a MESE series alone is analysed by :func:`quant.mese_study.analyse_mese_study`).
    SeriesError
        A Dixon series is present but cannot be assembled.
    NeedsRoisError
        A hand or head-neck study without ``rois`` and without a usable reader SEG
        (waiting for ROIs; ``refusals`` lists the SEGs that cannot be used).
    """
    by_series = group_by_series(datasets)
    infos = tuple(classify_series(dss) for dss in by_series.values())
    notes: list[str] = []
    water_info, fat_info = _pick(infos, SeriesKind.WATER), _pick(infos, SeriesKind.FAT)
    megre = _megre(by_series, infos, notes)
    if water_info is None or fat_info is None:
        if megre is None:
            mese_info = _pick(infos, SeriesKind.MESE)
            if mese_info is not None:   # T2 mapping alone: segment on the MESE fit itself
                mese_body_part = _body_part(by_series[mese_info.series_instance_uid][0])
                if (roi_region := roi_only_region(mese_body_part)) is not None:
                    raise NoDixonError(f"{roi_region.value} exam with a MESE series only: measured in a reader's "
                                       "ROIs only on a Dixon or MEGRE series (not yet on a MESE series alone)")
                return analyse_mese_study(by_series, infos, mese_info, notes, t2_options, atoms,
                                          body_part=mese_body_part, rois=rois, reader_segs=reader_segs,
                                          carry_from=carry_from, atlases=atlases, compartments=compartments)
            found = ", ".join(f"{_cut(s.description or s.series_instance_uid)}: {s.kind.value}" for s in infos)
            raise NoDixonError("no Dixon water and fat series and no multi-echo spin echo in this study "
                               f"(series found: {found or 'none'})")
        return _analyse_megre(by_series, infos, megre, notes, t2_options, atoms, rois, compartments, reader_segs,
                              carry_from, atlases)
    water = assemble_volume(by_series[water_info.series_instance_uid])
    fat = assemble_volume(by_series[fat_info.series_instance_uid])
    if not water.same_grid(fat):
        raise SeriesError("Dixon water and fat series are not on the same grid "
                          f"({water_info.series_instance_uid}, {fat_info.series_instance_uid})")
    extra = {}
    for kind in (SeriesKind.IN_PHASE, SeriesKind.OPPOSED_PHASE):
        info = _pick(infos, kind)
        if info is None:
            continue
        try:
            v = assemble_volume(by_series[info.series_instance_uid])
        except SeriesError as exc:
            notes.append(f"{kind.value} series not used: {exc}")
            continue
        if v.same_grid(water):
            extra[kind] = v.array
        else:
            notes.append(f"{kind.value} series not used: not on the grid of the water series")
    in_phase, opposed = extra.get(SeriesKind.IN_PHASE), extra.get(SeriesKind.OPPOSED_PHASE)
    w_arr, f_arr = water.array, fat.array
    flags: list[str] = []
    swaps = detect_swaps(w_arr, f_arr, in_phase=in_phase, opposed_phase=opposed, pixel_mm=water.spacing_mm[1:])
    if swaps.ambiguous:
        flags.append("fat-water-swap-ambiguous")
        notes.append(f"fat-water swap check: {swaps.message}")
    elif swaps.any:
        w_arr, f_arr = correct_swaps(w_arr, f_arr, swaps)
        flags.append("fat-water-swap-corrected-whole-series" if swaps.whole_series_swapped
                     else "fat-water-swap-corrected-regional")
        notes.append(f"fat-water swap corrected: {swaps.message}")
        water = water.with_array(w_arr)
    elif not swaps.regional_checked:
        notes.append(f"fat-water swap check: {swaps.message}")
    dixon = fat_fraction_dixon(w_arr, f_arr, in_phase=in_phase, opposed_phase=opposed, body_mask=swaps.body)
    if megre is not None and megre[0].same_grid(water):
        # multi-echo complex data of the same grid: the PDFF (multi-peak fat, R2*, field
        # map) is the better fat fraction; its region mean is unbiased (not clipped)
        pdff = megre[1].pdff
        model = Model.MEGRE_PDFF
        notes.append("fat fraction from the multi-echo gradient echo (proton-density FF, 6-peak fat)")

        def pdff_mean(roi: np.ndarray) -> float:
            return float(np.nanmean(pdff[roi]))
        region_ff: Callable[[np.ndarray], float] = pdff_mean
    else:
        model = Model.DIXON_RICIAN_ML
        region_ff = RegionFatFraction(w_arr, f_arr, dixon.noise_sd, in_phase=in_phase, opposed_phase=opposed)
    signal = in_phase if in_phase is not None else w_arr + f_arr
    return _measure(by_series, infos, water, f_arr, dixon.ff, signal, water_info, model, region_ff, notes,
                    t2_options, atoms, flags, in_phase=in_phase, rois=rois, compartments=compartments,
                    reader_segs=reader_segs, carry_from=carry_from, atlases=atlases)


def _megre(by_series, infos, notes):
    """(magnitude volume, PDFFResult) of a multi-echo gradient echo with magnitude and
    phase series on one grid, or None.
    """
    mag_info, ph_info = _pick(infos, SeriesKind.MEGRE_MAGNITUDE), _pick(infos, SeriesKind.MEGRE_PHASE)
    if mag_info is None:
        return None
    if ph_info is None:
        notes.append("multi-echo gradient echo without its phase series: no MEGRE PDFF")
        return None
    try:
        mag = assemble_volume(by_series[mag_info.series_instance_uid])
        ph = assemble_volume(by_series[ph_info.series_instance_uid])
    except SeriesError as exc:
        notes.append(f"multi-echo gradient echo not used: {exc}")
        return None
    if not (mag.same_grid(ph) and mag.echo_times_ms == ph.echo_times_ms and mag.array.ndim == 4):
        notes.append("multi-echo gradient echo not used: magnitude and phase differ in grid or echo times")
        return None
    ds0 = by_series[mag_info.series_instance_uid][0]
    field = float(ds0.get("MagneticFieldStrength", 3.0) or 3.0)
    result = megre_pdff(mag.array, phase_to_radians(ph.array), list(mag.echo_times_ms),
                        field_strength_t=field, mask=mag.array[0] > 0.1 * np.percentile(mag.array[0], 99),
                        spacing_mm=mag.spacing_mm)
    return mag.with_array(mag.array[0]), result


def phase_to_radians(phase: np.ndarray) -> np.ndarray:
    """Phase images in radians: values already within ±pi are radians; vendors' integer
    phase (Siemens -4096..4095 after rescale, others 0..4095) maps its range onto 2 pi.
    """
    a = np.asarray(phase, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo >= -np.pi * 1.001 and hi <= np.pi * 1.001:
        return a
    if lo >= 0:
        return (a / 4096.0) * 2 * np.pi - np.pi
    return a * (np.pi / 4096.0)


def _analyse_megre(by_series, infos, megre, notes, t2_options, atoms, rois=None, compartments=False,
                   reader_segs=(), carry_from=(), atlases=()) -> StudyAnalysis:
    """The pipeline when the fat fraction comes from a multi-echo gradient echo alone."""
    anatomy, res = megre
    source = _pick(infos, SeriesKind.MEGRE_MAGNITUDE)
    assert source is not None  # _megre found it
    w_arr = np.abs(np.nan_to_num(res.water)).astype(np.float32)
    f_arr = np.abs(np.nan_to_num(res.fat)).astype(np.float32)
    pdff = res.pdff
    ff_seg = np.clip(pdff, 0, 1).astype(np.float32)
    notes.append("fat fraction from the multi-echo gradient echo (proton-density FF, 6-peak fat, R2*, field map)")

    def region_ff(roi: np.ndarray) -> float:
        return float(np.nanmean(pdff[roi]))
    return _measure(by_series, infos, anatomy.with_array(w_arr), f_arr, ff_seg, w_arr + f_arr,
                    source, Model.MEGRE_PDFF, region_ff, notes, t2_options, atoms, [], rois=rois,
                    compartments=compartments, reader_segs=reader_segs, carry_from=carry_from, atlases=atlases)


def _measure(by_series, infos, water: Volume, fat: np.ndarray, ff: np.ndarray, signal: np.ndarray,
             source: SeriesInfo, model: Model, region_ff: Callable[[np.ndarray], float], notes: list[str],
             t2_options, atoms, flags: list[str], *, in_phase: np.ndarray | None = None,
             rois: RoiSet | None = None, compartments: bool = False,
             reader_segs: Sequence[Dataset] = (), carry_from: Sequence[RoiReference] = (),
             atlases: Sequence[RoiReference] = ()) -> StudyAnalysis:
    """Segment, measure each leg's muscle (partial volume at its edges), replace the FF
    of each region by ``region_ff`` of its core, add water T2: one sequence for every
    source of fat fraction.
    """
    header = by_series[source.series_instance_uid][0]
    body_part = _body_part(header)
    refusals: list[tuple[str, str]] = []
    roi_region = roi_only_region(body_part)
    carried: CarriedRois | None = None
    if roi_region is None:
        seg = segment_legs(water, fat, ff, in_phase=in_phase, body_part=body_part)
    else:   # hand, head-neck: the reader's ROIs are the muscle (quant.roi_only)
        if rois is None and reader_segs:
            rois, refusals = reader_rois(reader_segs, water, roi_region, notes)
        if rois is None and carry_from:   # no muscle mask to check against: outline and intensity only
            rois, carried = carry(carry_from, water, None, notes, region=roi_region)
        seg = roi_segmentation(water, rois, roi_region, ff=ff, signal=signal, header=header,
                               body_part=body_part, refusals=tuple(refusals))
    labels, groups = seg.muscle_groups()
    # Partial volume at the muscle's edges: area and fRMA count the muscle content of the
    # edge voxels, estimated from their FF and signal against the neighbouring muscle.
    sat = ndi.binary_erosion(seg.tissue == Tissue.SUBCUTANEOUS_FAT, structure=INPLANE_3D)
    fat_ff = float(np.nanmedian(ff[sat])) if sat.sum() > 50 else 0.92
    labels_ext, weights, muscle_ff = partial_volume_weights(labels, ff, signal, fat_ff=fat_ff)
    measurements, per_slice = muscle_metrics(
        labels_ext, muscle_ff, groups, pixel_area_mm2=water.pixel_area_mm2,
        slice_thickness_mm=water.spacing_mm[0], algorithm_version=ALGORITHM_VERSION, model=model.value,
        weights=weights)
    # The region's FF from its voxels away from its edges (no partial volume): for
    # magnitude Dixon a maximum-likelihood estimate, free of the noise-floor bias that a
    # mean of voxel values keeps at low fat fraction.
    core = ndi.binary_erosion(labels > 0, structure=INPLANE_3D)
    ffs = core_ffs(labels, groups, core, region_ff)
    measurements = with_ff(measurements, lambda m: ffs[_group_of(groups, m)], model)
    csa = {groups[g]: v for g, v in per_slice.items()}
    fused = None
    if roi_region is None:
        found = find_rois(water, seg, ff, notes, rois=rois, reader_segs=reader_segs, carry_from=carry_from,
                          atlases=atlases, compartments=compartments)
        rois, refusals, carried, fused = found.rois, list(found.refusals), found.carried, found.atlas
    if carried is not None and carried.needs_review:
        flags = [*flags, "roi-registration-review"]
    if rois is not None:
        measurements += measure_rois(rois, labels_ext, weights, muscle_ff, core, seg, water, model, region_ff)
    notes.extend(seg.notes)
    t2, measurements = _t2_stage(by_series, infos, water, seg, measurements, notes, t2_options, atoms, rois)
    return StudyAnalysis(series=infos, anatomy=water, fat_fraction=ff, segmentation=seg,
                         measurements=tuple(measurements), csa_per_slice=csa, notes=tuple(notes), t2=t2,
                         flags=tuple(flags), rois=rois, roi_refusals=tuple(refusals), carried=carried, atlas=fused)


def _t2_stage(by_series, infos, water, seg, measurements, notes, t2_options, atoms, rois=None):
    t2 = None
    mese_info = _pick(infos, SeriesKind.MESE)
    if mese_info is not None:
        mese_ds = by_series[mese_info.series_instance_uid]
        try:
            mese = assemble_volume(mese_ds)
            t2 = measure_t2(mese_ds, mese, water, seg, t2_options or T2Options(),
                            atoms=atoms, algorithm_version=ALGORITHM_VERSION, rois=rois)
            measurements = list(measurements) + list(t2.measurements)
            series = mese_info.description or mese_info.series_instance_uid
            notes.append(f"water T2 ({t2.fit.model}) from series {series}, fat T2 {t2.fat_t2_ms:.0f} ms "
                         f"({t2.fat_t2_source})")
        except QuantError as exc:
            notes.append(f"water T2 not measured: {exc}")
    return t2, measurements


def _group_of(groups: dict, m: Measurement) -> int:
    return next(g for g, (region, side) in groups.items() if region == m.region and side == m.side)


def _body_part(ds: Dataset) -> str:
    return " ".join(str(ds.get(k, "")) for k in ("BodyPartExamined", "SeriesDescription",
                                                 "StudyDescription", "ProtocolName"))
