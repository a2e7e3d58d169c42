"""The quantification pipeline of one study: series → volumes → masks → maps → metrics.

Pure: takes the decoded datasets of a study, returns a :class:`StudyAnalysis`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from . import ALGORITHM_VERSION
from .enums import SeriesKind, Side, SideLabel, Tissue
from .dixon import correct_swaps, detect_swaps, fat_fraction_dixon, pdff_multiecho, roi_fat_fraction
from .errors import QuantError, SeriesError
from .metrics import Measurement, muscle_metrics, partial_volume_weights
from .segment import Segmentation, segment_legs
from .series import SeriesInfo, classify_series
from .volume import Volume, assemble_volume

if False:  # typing only
    from .t2stage import T2Options, T2Result

_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndi.generate_binary_structure(2, 1)
DIXON_MODEL = "dixon-rician-ml"
PDFF_MODEL = "megre-pdff-6peak"   # multi-echo complex Dixon: 6-peak fat, R2*, smooth field map   # per-voxel and region fat fraction by Rician maximum likelihood
DIXON_KINDS = (SeriesKind.WATER, SeriesKind.FAT, SeriesKind.IN_PHASE, SeriesKind.OPPOSED_PHASE)


class NoDixonError(QuantError):
    """The study has no usable Dixon water and fat series."""


@dataclass(frozen=True, eq=False)
class StudyAnalysis:
    """Everything the pipeline found in one study."""

    series: tuple[SeriesInfo, ...]
    reference: Volume                 # the Dixon water volume: masks and maps are on its grid
    fat_fraction: np.ndarray          # 0..1, NaN where no signal
    segmentation: Segmentation
    measurements: tuple[Measurement, ...]
    csa_per_slice: dict               # (region, side) -> CSA (mm²) of each slice
    algorithm_version: str = ALGORITHM_VERSION
    notes: tuple[str, ...] = ()
    t2: "T2Result | None" = None      # water T2 of the multi-echo spin-echo series, if any
    flags: tuple[str, ...] = ()       # e.g. "fat-water-swap-corrected-whole-series"

    @property
    def dixon_series(self) -> dict[SeriesKind, SeriesInfo]:
        return {s.kind: s for s in self.series if s.kind in DIXON_KINDS}


def group_by_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
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


def analyse_study(datasets: Iterable[Dataset], *, t2_options: "T2Options | None" = None,
                  atoms=None) -> StudyAnalysis:
    """Run the whole pipeline on the datasets of one study.

    With a multi-echo spin-echo series in the study, water T2 is measured in the muscle
    found on the Dixon images (``t2_options``; ``atoms(params, t2_grid_ms, b1_grid, t1_ms)``
    may return the EPG tables from a cache, see :func:`quant.t2.build_dictionary`). A T2 stage that cannot run leaves a note, not
    an error: the Dixon results stand.

    Raises
    ------
    NoDixonError
        Neither a water and fat pair nor anything else quantifiable was found.
    SeriesError
        A Dixon series is present but cannot be assembled.
    """
    by_series = group_by_series(datasets)
    infos = tuple(classify_series(dss) for dss in by_series.values())
    notes: list[str] = []
    water_info, fat_info = _pick(infos, SeriesKind.WATER), _pick(infos, SeriesKind.FAT)
    megre = _complex_dixon(by_series, infos, notes)
    if water_info is None or fat_info is None:
        if megre is None:
            found = ", ".join(f"{s.description or s.series_instance_uid}: {s.kind.value}" for s in infos)
            raise NoDixonError(f"no Dixon water and fat series in this study (series found: {found or 'none'})")
        return _analyse_complex_dixon(by_series, infos, megre, notes, t2_options, atoms)
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
    swaps = detect_swaps(w_arr, f_arr, in_phase=in_phase, opposed_phase=opposed)
    if swaps.ambiguous:
        flags.append("fat-water-swap-ambiguous")
        notes.append(f"fat-water swap check: {swaps.message}")
    elif swaps.any:
        w_arr, f_arr = correct_swaps(w_arr, f_arr, swaps)
        flags.append("fat-water-swap-corrected-whole-series" if swaps.whole_series_swapped
                     else "fat-water-swap-corrected-regional")
        notes.append(f"fat-water swap corrected: {swaps.message}")
        water = water.with_array(w_arr)
    dixon = fat_fraction_dixon(w_arr, f_arr, in_phase=in_phase, opposed_phase=opposed)
    ff = dixon.ff
    seg = segment_legs(water, f_arr, ff, in_phase=in_phase,
                       body_part=_body_part(by_series[water_info.series_instance_uid][0]))
    labels, groups = seg.muscle_groups()
    # Partial volume at the muscle's edges: area and fRMA count the muscle content of the
    # edge voxels, estimated from their FF and signal against the neighbouring muscle.
    sat = ndi.binary_erosion(seg.tissue == Tissue.SUBCUTANEOUS_FAT, structure=_INPLANE)
    fat_ff = float(np.nanmedian(ff[sat])) if sat.sum() > 50 else 0.92
    signal = in_phase if in_phase is not None else w_arr + f_arr
    labels_ext, weights, muscle_ff = partial_volume_weights(labels, ff, signal, fat_ff=fat_ff)
    measurements, per_slice = muscle_metrics(
        labels_ext, muscle_ff, groups, pixel_area_mm2=water.pixel_area_mm2,
        slice_thickness_mm=water.spacing_mm[0], algorithm_version=ALGORITHM_VERSION, model=DIXON_MODEL,
        weights=weights)
    # The region's FF: a maximum-likelihood estimate over the region's voxels away from
    # its edges (no partial volume), free of the noise-floor bias that a mean of voxel
    # values keeps at low fat fraction.
    core = ndi.binary_erosion(labels > 0, structure=_INPLANE)

    def roi(g):
        return core & (labels == g) if (core & (labels == g)).sum() >= 50 else labels == g
    if megre is not None and megre[0].same_grid(water):
        # multi-echo complex data of the same grid: the PDFF (multi-peak fat, R2*, field
        # map) is the better fat fraction; its region mean is unbiased (not clipped)
        pdff = megre[1].pdff
        roi_ff = {g: float(np.nanmean(pdff[roi(g)])) for g in groups}
        model = PDFF_MODEL
        notes.append("fat fraction from the multi-echo gradient echo (proton-density FF, 6-peak fat)")
    else:
        roi_ff = {g: roi_fat_fraction(w_arr, f_arr, roi(g), dixon.noise_sd, in_phase=in_phase,
                                      opposed_phase=opposed) for g in groups}
        model = DIXON_MODEL
    measurements = [replace(m, value=100.0 * roi_ff[_group_of(groups, m)], model=model)
                    if m.metric == "ff_percent" and np.isfinite(roi_ff[_group_of(groups, m)]) else m
                    for m in measurements]
    csa = {groups[g]: v for g, v in per_slice.items()}
    notes.extend(seg.notes)
    t2, measurements = _t2_stage(by_series, infos, water, seg, measurements, notes, t2_options, atoms)
    return StudyAnalysis(series=infos, reference=water, fat_fraction=ff, segmentation=seg,
                         measurements=tuple(measurements), csa_per_slice=csa, notes=tuple(notes), t2=t2,
                         flags=tuple(flags))


def _complex_dixon(by_series, infos, notes):
    """(magnitude volume, PDFFResult) of a multi-echo gradient echo with magnitude and
    phase series on one grid, or None."""
    mag_info, ph_info = _pick(infos, SeriesKind.MEGRE_MAGNITUDE), _pick(infos, SeriesKind.MEGRE_PHASE)
    if mag_info is None:
        return None
    if ph_info is None:
        notes.append("multi-echo gradient echo without its phase series: no complex-Dixon PDFF")
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
    result = pdff_multiecho(mag.array, phase_to_radians(ph.array), list(mag.echo_times_ms),
                            field_strength_t=field, mask=mag.array[0] > 0.1 * np.percentile(mag.array[0], 99),
                            spacing_mm=mag.spacing_mm)
    return mag.with_array(mag.array[0]), result


def phase_to_radians(phase: np.ndarray) -> np.ndarray:
    """Phase images in radians: values already within ±pi are radians; vendors' integer
    phase (Siemens -4096..4095 after rescale, others 0..4095) maps its range onto 2 pi."""
    a = np.asarray(phase, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo >= -np.pi * 1.001 and hi <= np.pi * 1.001:
        return a
    if lo >= 0:
        return (a / 4096.0) * 2 * np.pi - np.pi
    return a * (np.pi / 4096.0)


def _analyse_complex_dixon(by_series, infos, megre, notes, t2_options, atoms) -> "StudyAnalysis":
    """The pipeline when the fat fraction comes from a multi-echo gradient echo alone."""
    reference, res = megre
    w_arr = np.abs(np.nan_to_num(res.water)).astype(np.float32)
    f_arr = np.abs(np.nan_to_num(res.fat)).astype(np.float32)
    water = reference.with_array(w_arr)
    pdff = res.pdff
    ff_seg = np.clip(np.nan_to_num(pdff, nan=np.nan), 0, 1).astype(np.float32)
    mag_info = _pick(infos, SeriesKind.MEGRE_MAGNITUDE)
    seg = segment_legs(water, f_arr, ff_seg, body_part=_body_part(by_series[mag_info.series_instance_uid][0]))
    labels, groups = seg.muscle_groups()
    sat = ndi.binary_erosion(seg.tissue == Tissue.SUBCUTANEOUS_FAT, structure=_INPLANE)
    fat_ff = float(np.nanmedian(ff_seg[sat])) if sat.sum() > 50 else 0.92
    labels_ext, weights, muscle_ff = partial_volume_weights(labels, ff_seg, w_arr + f_arr, fat_ff=fat_ff)
    measurements, per_slice = muscle_metrics(
        labels_ext, muscle_ff, groups, pixel_area_mm2=water.pixel_area_mm2,
        slice_thickness_mm=water.spacing_mm[0], algorithm_version=ALGORITHM_VERSION, model=PDFF_MODEL,
        weights=weights)
    core = ndi.binary_erosion(labels > 0, structure=_INPLANE)
    roi_ff = {g: float(np.nanmean(pdff[core & (labels == g)] if (core & (labels == g)).sum() >= 50
                                  else pdff[labels == g])) for g in groups}
    measurements = [replace(m, value=100.0 * roi_ff[_group_of(groups, m)])
                    if m.metric == "ff_percent" and np.isfinite(roi_ff[_group_of(groups, m)]) else m
                    for m in measurements]
    notes.append("fat fraction from the multi-echo gradient echo (proton-density FF, 6-peak fat, R2*, field map)")
    notes.extend(seg.notes)
    t2, measurements = _t2_stage(by_series, infos, water, seg, measurements, notes, t2_options, atoms)
    csa = {groups[g]: v for g, v in per_slice.items()}
    return StudyAnalysis(series=infos, reference=water, fat_fraction=ff_seg, segmentation=seg,
                         measurements=tuple(measurements), csa_per_slice=csa, notes=tuple(notes), t2=t2)


def _t2_stage(by_series, infos, water, seg, measurements, notes, t2_options, atoms):
    t2 = None
    mese_info = _pick(infos, SeriesKind.MESE)
    if mese_info is not None:
        from .t2stage import T2Options, measure_t2
        mese_ds = by_series[mese_info.series_instance_uid]
        try:
            mese = assemble_volume(mese_ds)
            t2 = measure_t2(mese_ds, mese, water, seg, t2_options or T2Options(),
                            atoms=atoms, algorithm_version=ALGORITHM_VERSION)
            measurements = list(measurements) + list(t2.measurements)
            notes.append(f"water T2 ({t2.fit.model}) from series {mese_info.description or mese_info.series_instance_uid}"
                         f", fat T2 {t2.fat_t2_ms:.0f} ms ({t2.fat_t2_source})")
        except QuantError as exc:
            notes.append(f"water T2 not measured: {exc}")
    return t2, measurements


def _group_of(groups: dict, m: Measurement) -> int:
    return next(g for g, (region, side) in groups.items() if region == m.region and side == m.side)


def _body_part(ds: Dataset) -> str:
    return " ".join(str(ds.get(k, "")) for k in ("BodyPartExamined", "SeriesDescription",
                                                 "StudyDescription", "ProtocolName"))
