"""The ROIs of one study, and their measurements: shared by every path of the pipeline.

:mod:`quant.pipeline` (Dixon, MEGRE, hand and head-neck) and :mod:`quant.mese_study` (a
multi-echo spin echo alone) find a study's ROI set the same way (:func:`find_rois`: the
caller's, else the newest usable reader SEG, else a reader's set of another visit carried
by registration, else other subjects' sets fused, else the automatic compartments) and
measure every ROI per side with the partial-volume weighting of the whole region
(:func:`measure_rois`). This module imports neither, so both can call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset

from . import ALGORITHM_VERSION
from .analysis import RoiReference, RoiSet
from .atlas import Atlas, AtlasResult, atlas_compartments
from .compartments import automatic_compartments
from .enums import Metric, Model, Region, RoiSource, Tissue
from .errors import RoiSetError, SeriesError
from .metrics import Measurement, muscle_metrics, roi_groups
from .reader_rois import rois_from_seg
from .registration import CarriedRois, carry_rois
from .segment import Segmentation
from .volume import Volume


@dataclass(frozen=True)
class FoundRois:
    """What :func:`find_rois` found: the ROI set (None: none) and how.

    Attributes
    ----------
    rois : RoiSet or None
        The ROI set to measure.
    refusals : tuple of (str, str)
        (SOP Instance UID, reason) of every reader SEG that could not be used.
    carried : CarriedRois or None
        The registration of a carried set.
    atlas : AtlasResult or None
        The fusion of other subjects' sets.
    flags : tuple of str
        ``roi-registration-review`` when the carried set needs a look.
    """

    rois: RoiSet | None
    refusals: tuple[tuple[str, str], ...] = ()
    carried: CarriedRois | None = None
    atlas: AtlasResult | None = None
    flags: tuple[str, ...] = ()


def find_rois(anatomy: Volume, seg: Segmentation, ff: np.ndarray, notes: list[str], *,
              rois: RoiSet | None = None, reader_segs: Sequence[Dataset] = (),
              carry_from: Sequence[RoiReference] = (), atlases: Sequence[RoiReference] = (),
              compartments: bool = False) -> FoundRois:
    """The ROI set of a thigh or calf study, in order of preference.

    Parameters
    ----------
    anatomy : Volume
        The 3-D volume segmented (the ROIs' grid; registration target).
    seg : Segmentation
        Its segmentation (region, sides, muscle).
    ff : ndarray
        Its fat fraction map (0..1; NaN where unknown), for the atlas and the compartments.
    notes : list of str
        Appended with what was used, or why not.
    rois : RoiSet, optional
        The caller's ROIs: used as given.
    reader_segs, carry_from, atlases, compartments
        As :func:`quant.pipeline.analyse_study`: the newest usable reader SEG
        (:func:`reader_rois`), else the subject's set of this region carried (:func:`carry`),
        else other subjects' sets fused (:func:`atlas_rois`), else the automatic compartments.

    Returns
    -------
    FoundRois
    """
    refusals: list[tuple[str, str]] = []
    carried = fused = None
    if rois is None and reader_segs:
        rois, refusals = reader_rois(reader_segs, anatomy, seg.region, notes)
    if rois is None and carry_from:
        rois, carried = carry(carry_from, anatomy, seg, notes)
    if rois is None and atlases:
        rois, fused = atlas_rois(atlases, anatomy, seg, ff, notes)
    if rois is None and compartments:
        rois = automatic_compartments(seg, ff, anatomy)
        if rois is None:
            notes.append(f"no automatic compartments for region {seg.region.value}")
    flags = ("roi-registration-review",) if carried is not None and carried.needs_review else ()
    return FoundRois(rois, tuple(refusals), carried, fused, flags)


def carry(references: Sequence[RoiReference], anatomy: Volume, seg: Segmentation | None,
          notes: list[str], region: Region | None = None) -> tuple[RoiSet | None, CarriedRois | None]:
    """The ROI set of the reference of this visit's region carried onto ``anatomy``; without
    ``seg`` (a hand or head-neck, whose muscle is the ROIs), on the whole section.
    """
    region = seg.region if seg is not None else region
    assert region is not None
    ref = next((r for r in references if r.region == region.value), None)
    if ref is None:
        regions = ", ".join(sorted({r.region for r in references}))
        notes.append(f"no reader ROI set of the {region.value} to carry (the subject has: {regions})")
        return None, None
    if anatomy.array.ndim != 3 or ref.anatomy.array.ndim != 3:
        notes.append("reader ROI set not carried: 3-D images needed")
        return None, None
    if seg is None:
        carried = carry_rois(ref.anatomy, ref.rois.labels, anatomy)
    else:
        carried = carry_rois(ref.anatomy, ref.rois.labels, anatomy, moving_side=ref.side, fixed_side=seg.side,
                             fixed_muscle=seg.tissue == Tissue.MUSCLE)
    origin = ref.rois.origin
    drawn = f" drawn on the visit of {origin.study_date or origin.study_instance_uid}" if origin else ""
    dice = "n/a" if carried.dice_muscle is None else f"{carried.dice_muscle:.3f}"
    notes.append(f"reader ROI set{drawn} carried by registration in {carried.seconds:.1f} s: Dice with the "
                 f"muscle {dice}, mismatch {carried.mismatch:.3f}"
                 + ("; flagged for review" if carried.needs_review else ""))
    return RoiSet(carried.labels, dict(ref.rois.names), RoiSource.CARRIED, origin,
                  laterality=dict(ref.rois.laterality)), carried


def atlas_rois(references: Sequence[RoiReference], anatomy: Volume, seg: Segmentation, ff: np.ndarray,
               notes: list[str]) -> tuple[RoiSet | None, AtlasResult | None]:
    """Other subjects' reader ROI sets of this region, registered here and fused (two at least)."""
    mine = [r for r in references if r.region == seg.region.value]
    if len(mine) < 2 or anatomy.array.ndim != 3:
        return None, None
    atlases = [Atlas(r.anatomy, r.rois.labels, dict(r.rois.names), side=r.side, region=seg.region,
                     key=r.rois.origin.study_instance_uid if r.rois.origin else "") for r in mine]
    result = atlas_compartments(atlases, anatomy, seg, ff, combine="watershed")
    used = sum(a.used for a in result.atlases)
    if result.rois is None:
        notes.append(f"atlas ROIs not used: none of {len(atlases)} atlases could be carried")
        return None, None
    low = min(result.agreement.values()) if result.agreement else float("nan")
    notes.append(f"ROIs from {used} of {len(atlases)} other subjects' reader sets (atlas, {result.seconds:.1f} s; "
                 f"lowest agreement {low:.2f})")
    return result.rois, result


def reader_rois(segs: Sequence[Dataset], anatomy: Volume, region: Region,
                notes: list[str]) -> tuple[RoiSet | None, list[tuple[str, str]]]:
    """The ROI set of the newest usable reader SEG, and (SOP Instance UID, reason) of each
    one that cannot be used (older usable ones are simply not used).
    """
    def newest_first(ds: Dataset) -> tuple[str, str, int]:
        return (str(ds.get("ContentDate", "")), str(ds.get("ContentTime", "")), int(ds.get("SeriesNumber", 0) or 0))
    refusals: list[tuple[str, str]] = []
    chosen = None
    for ds in sorted(segs, key=newest_first, reverse=True):
        uid = str(ds.get("SOPInstanceUID", ""))
        try:
            rois, _ = rois_from_seg(ds, anatomy, region)
        except RoiSetError as exc:
            refusals.append((uid, f"reader SEG not used: {exc}"))
            continue
        if chosen is None:
            chosen = rois
            notes.append(f"ROIs from the reader's SEG {uid} ({len(rois.names)} segments)")
    return chosen, refusals


def measure_rois(rois: RoiSet, labels_ext: np.ndarray, weights: np.ndarray, muscle_ff: np.ndarray,
                 core: np.ndarray, seg: Segmentation, anatomy: Volume, model: Model,
                 region_ff: Callable[[np.ndarray], float]) -> list[Measurement]:
    """CSA, VOL, FF and fRMA of each ROI and side, the same way as the whole region's
    (``labels_ext``, ``weights`` and ``muscle_ff`` of :func:`quant.metrics.partial_volume_weights`;
    each FF by ``region_ff`` over the ROI's voxels in ``core``, see :func:`core_ffs`).
    """
    if rois.labels.shape != labels_ext.shape:
        raise SeriesError(f"ROI label map {rois.labels.shape} is not on the grid of the series segmented "
                          f"{labels_ext.shape}")
    roi_lab, roi_grp, roi_of = roi_groups(labels_ext, rois.labels, seg.side, rois.names, seg.region.value,
                                          muscle_core=seg.tissue == Tissue.MUSCLE)
    out, _ = muscle_metrics(roi_lab, muscle_ff, roi_grp, pixel_area_mm2=anatomy.pixel_area_mm2,
                            slice_thickness_mm=anatomy.spacing_mm[0], algorithm_version=ALGORITHM_VERSION,
                            model=model.value, weights=weights, roi_of=roi_of, source=rois.source.value)
    group = {(roi_of[g], side): g for g, (_, side) in roi_grp.items()}
    ffs = core_ffs(roi_lab, roi_grp, core, region_ff)
    return with_ff(out, lambda m: ffs[group[(m.roi, m.side)]], model)


def core_ffs(labels: np.ndarray, groups: Iterable[int], core: np.ndarray,
             region_ff: Callable[[np.ndarray], float]) -> dict[int, float]:
    """The FF of each labelled group by ``region_ff`` over its voxels away from the muscle's
    edges (``core``; all its voxels when fewer than 50 are left).
    """
    out = {}
    for g in groups:
        sel = labels == g
        inner = sel & core
        out[g] = region_ff(inner if inner.sum() >= 50 else sel)
    return out


def with_ff(measurements: Iterable[Measurement], ff_of: Callable[[Measurement], float],
            model: Model) -> list[Measurement]:
    """The measurements with each ``ff_percent`` replaced by ``ff_of`` (0..1) where finite."""
    out = []
    for m in measurements:
        ff = ff_of(m) if m.metric == Metric.FF_PERCENT else float("nan")
        out.append(replace(m, value=100.0 * ff, model=model.value) if np.isfinite(ff) else m)
    return out
