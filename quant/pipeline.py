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
from .dixon import correct_swaps, detect_swaps, fat_fraction_dixon, roi_fat_fraction
from .errors import QuantError, SeriesError
from .metrics import Measurement, muscle_metrics, partial_volume_weights
from .segment import Segmentation, segment_legs
from .series import SeriesInfo, classify_series
from .volume import Volume, assemble_volume

if False:  # typing only
    from .t2stage import T2Options, T2Result

_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndi.generate_binary_structure(2, 1)
DIXON_MODEL = "dixon-rician-ml"   # per-voxel and region fat fraction by Rician maximum likelihood
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
                  dictionary_provider=None) -> StudyAnalysis:
    """Run the whole pipeline on the datasets of one study.

    With a multi-echo spin-echo series in the study, water T2 is measured in the muscle
    found on the Dixon images (``t2_options``; ``dictionary_provider(params, fat_t2_ms)``
    may return a cached EPG dictionary). A T2 stage that cannot run leaves a note, not
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
    if water_info is None or fat_info is None:
        found = ", ".join(f"{s.description or s.series_instance_uid}: {s.kind.value}" for s in infos)
        raise NoDixonError(f"no Dixon water and fat series in this study (series found: {found or 'none'})")
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
    roi_ff = {g: roi_fat_fraction(w_arr, f_arr, core & (labels == g) if (core & (labels == g)).sum() >= 50
                                  else labels == g, dixon.noise_sd, in_phase=in_phase, opposed_phase=opposed)
              for g in groups}
    measurements = [replace(m, value=100.0 * roi_ff[_group_of(groups, m)])
                    if m.metric == "ff_percent" and np.isfinite(roi_ff[_group_of(groups, m)]) else m
                    for m in measurements]
    csa = {groups[g]: v for g, v in per_slice.items()}
    notes.extend(seg.notes)
    t2 = None
    mese_info = _pick(infos, SeriesKind.MESE)
    if mese_info is not None:
        from .t2stage import T2Options, measure_t2
        mese_ds = by_series[mese_info.series_instance_uid]
        try:
            mese = assemble_volume(mese_ds)
            t2 = measure_t2(mese_ds, mese, water, seg, t2_options or T2Options(),
                            dictionary_provider=dictionary_provider, algorithm_version=ALGORITHM_VERSION)
            measurements = list(measurements) + list(t2.measurements)
            notes.append(f"water T2 ({t2.fit.model}) from series {mese_info.description or mese_info.series_instance_uid}"
                         f", fat T2 {t2.fat_t2_ms:.0f} ms ({t2.fat_t2_source})")
        except QuantError as exc:
            notes.append(f"water T2 not measured: {exc}")
    return StudyAnalysis(series=infos, reference=water, fat_fraction=ff, segmentation=seg,
                         measurements=tuple(measurements), csa_per_slice=csa, notes=tuple(notes), t2=t2,
                         flags=tuple(flags))


def _group_of(groups: dict, m: Measurement) -> int:
    return next(g for g, (region, side) in groups.items() if region == m.region and side == m.side)


def _body_part(ds: Dataset) -> str:
    return " ".join(str(ds.get(k, "")) for k in ("BodyPartExamined", "SeriesDescription",
                                                 "StudyDescription", "ProtocolName"))
