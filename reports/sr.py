"""TID 1500 Measurement Report (Comprehensive 3D SR) of a :class:`quant.pipeline.StudyAnalysis`.

Content tree::

    Imaging Measurement Report (126000, DCM)                    [TID 1500]
      Language, Observation Context (device observer "musclenode")
      Procedure reported: MRI of the body region (e.g. SCT 241640003 "Magnetic
          resonance imaging of thigh"; LOINC 25056-3 where SNOMED CT has none)
      Imaging Measurements
        Measurement Group (one per leg, one per ROI and side)  [TID 1411]
          Tracking Identifier "right thigh muscle" + Tracking UID (stable per subject)
          Referenced Segment -> the SEG's muscle segment of that side (whole segment)
          Finding Type: Skeletal muscle; Finding Site: Thigh, laterality Right
          Algorithm: musclenode <version>; Time Point ("baseline", "day 182" or the
              Clinical Trial Time Point ID)
          NUM "Interval since baseline" (d), "Interval since previous visit" (d):
              once, where every compared metric of the group shares it
          NUM Area (mm2, derivation Mean)        = mean muscle CSA
          [its comparison, private 99MUSCLENODE concepts: "Area at baseline",
              "Change in area since baseline", "Relative change in area since
              baseline" (%), "Annualised change in area since baseline" (mm2/a),
              the same for the previous visit]
          NUM Volume (mL)                         = muscle volume
          NUM Fat fraction (%, derivation Mean, Measurement Method: the model)
          NUM Functional remaining muscle area (mm2, derivation Mean, method)
        Measurement Group (the same legs and ROIs on the key slice)  [TID 1410]
          Tracking Identifier "right thigh muscle, key slice"
          SCOORD POLYLINE: the segment's outline on the key slice's source image
          NUM Area (mm2) and Fat fraction (%) of that slice

Every value is written at the precision of its method (:mod:`reports.precision`: area
1 mm², FF 0.1 pp, T2 0.1 ms), and every container is SEPARATE, so that a PACS that
shows an SR as an indented text list shows each value under its name.

Each comparison item also carries the generic kind (e.g. "Change since baseline") as its
Derivation, so a reader can select by kind as well as by metric.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage
from pydicom.valuerep import DSfloat

from quant.enums import Region, Side, Tissue
from quant.pipeline import StudyAnalysis

from . import codes, precision
from .longitudinal import Comparison
from .outline import outline, study_key_slice
from .seg import (
    DEFAULT_SOFTWARE_VERSION,
    Masks,
    roi_label,
    roi_segment_numbers,
    roi_tracking_uid,
    segment_label,
    segment_numbers,
    sorted_source_images,
)
from .uids import derive_uid
from .uids import subject_key as default_subject_key

#: Metric order in each measurement group.
METRIC_ORDER: tuple[str, ...] = tuple(codes.METRIC_CONCEPTS)
#: ``Measurement.unit`` strings accepted for each metric.
_UNIT_ALIASES = {"csa_mm2": {"mm2"}, "vol_ml": {"ml", "mL"}, "ff_percent": {"%"}, "frma_mm2": {"mm2"},
                 "t2w_ms": {"ms"}, "t2w_mean_ms": {"ms"}, "t2w_iqr_ms": {"ms"}, "b1": {"1"},
                 "ff_t2_percent": {"%"}}
#: Comparison values written, in order (names of :class:`Comparison` properties, with the
#: prior values themselves first).
_COMPARISON_ORDER = (
    "baseline_value", "change_since_baseline", "relative_change_since_baseline", "days_since_baseline",
    "annualised_change_since_baseline",
    "previous_value", "change_since_previous", "relative_change_since_previous", "days_since_previous",
)


def tracking_uid(subject_key: str, region: Region | str, side: Side | str) -> str:
    """Tracking Unique Identifier of a leg's muscle: the same for every visit of a subject.

    Parameters
    ----------
    subject_key : str
        A stable key of the subject (e.g. issuer + patient ID, or a pseudonym).
    region : quant.enums.Region or str
    side : quant.enums.Side or str
    """
    if not isinstance(subject_key, str) or not subject_key:
        raise ValueError(f"subject_key must be a non-empty str, got {subject_key!r}")
    return derive_uid("musclenode-tracking", subject_key, Region(region).value, Side(side).value, "muscle")


def _normalise_comparisons(comparisons) -> dict[tuple[str, Side, str, str], Comparison]:
    """Comparisons keyed (region, side, metric, ROI name), "" for the whole region."""
    if comparisons is None:
        return {}
    if not isinstance(comparisons, Mapping):
        raise ValueError(f"comparisons must be a mapping (region, side, metric[, roi]) -> Comparison, "
                         f"got {type(comparisons).__name__}")
    out = {}
    for key, comp in comparisons.items():
        if not (isinstance(key, tuple) and len(key) in (3, 4)):
            raise ValueError(f"comparisons key must be (region, side, metric) or (region, side, metric, roi), "
                             f"got {key!r}")
        region, side, metric = key[:3]
        roi = str(key[3] or "") if len(key) == 4 else ""
        try:
            norm = (Region(region).value, Side(side), str(metric), roi)
        except ValueError:
            raise ValueError(f"comparisons key {key!r}: unknown region or side") from None
        if metric not in codes.METRIC_CONCEPTS:
            raise ValueError(f"comparisons key {key!r}: unknown metric {metric!r} "
                             f"(known: {', '.join(codes.METRIC_CONCEPTS)})")
        if not isinstance(comp, Comparison):
            raise ValueError(f"comparisons[{key!r}] must be a Comparison, got {type(comp).__name__}")
        if norm in out:
            raise ValueError(f"comparisons has two entries for {norm}")
        out[norm] = comp
    return out


def _digest(comparisons: dict) -> str:
    """Text that changes whenever the comparisons written into the SR change."""
    def prior(p):
        return None if p is None else (p.study_instance_uid, p.study_date.isoformat(), repr(p.value))
    items = sorted((k[0], k[1].value, k[2], k[3], prior(c.baseline), prior(c.previous), c.current_date.isoformat())
                   for k, c in comparisons.items())
    return repr(items)


def _check_seg(seg_dataset: Dataset, analysis: StudyAnalysis, sources: list[Dataset],
               masks: Masks) -> dict[tuple[Tissue, Side], int]:
    if not isinstance(seg_dataset, Dataset):
        raise ValueError(f"seg_dataset must be a pydicom Dataset (or highdicom Segmentation), "
                         f"got {type(seg_dataset).__name__}")
    if str(seg_dataset.get("SOPClassUID", "")) != SegmentationStorage:
        raise ValueError(f"seg_dataset is not a Segmentation Storage instance "
                         f"(SOP Class UID {seg_dataset.get('SOPClassUID', 'missing')})")
    study = str(sources[0].StudyInstanceUID)
    if str(seg_dataset.get("StudyInstanceUID", "")) != study:
        raise ValueError(f"seg_dataset is in study {seg_dataset.get('StudyInstanceUID')}, "
                         f"the source images in {study}")
    ref_series = {str(item.get("SeriesInstanceUID", "")) for item in seg_dataset.get("ReferencedSeriesSequence", [])}
    if analysis.anatomy.series_instance_uid not in ref_series:
        raise ValueError(f"seg_dataset does not reference the analysis' reference series "
                         f"{analysis.anatomy.series_instance_uid} (it references {sorted(ref_series)})")
    numbers = segment_numbers(analysis, masks)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg_dataset.get("SegmentSequence", [])}
    for (tissue, side), n in numbers.items():
        if tissue is Tissue.MUSCLE and labels.get(n) != segment_label(analysis, tissue, side):
            raise ValueError(f"seg_dataset segment {n} is {labels.get(n)!r}, expected "
                             f"{segment_label(analysis, tissue, side)!r}: was it built from this analysis?")
    return numbers


#: Metrics whose value does not depend on the fat-fraction or T2 model (the segmentation's
#: areas and volumes): no Measurement Method under them, so the method names only what it made.
_MODEL_FREE = frozenset({"csa_mm2", "vol_ml"})


def _method(metric: str, model: str) -> hd.sr.CodedConcept | None:
    """The Measurement Method of a value: the model that made it, none for an area or volume."""
    return None if metric in _MODEL_FREE else codes.MODEL_METHODS.get(model)


def _num(name, value, unit, *, derivation=None, algorithm_id=None, method=None) -> hd.sr.Measurement:
    """A NUM item; a whole-number ``int`` value is written as such (``8709``, not ``8709.0``,
    which claims a decimal the method does not resolve).
    """
    out = hd.sr.Measurement(name=name, value=value, unit=unit, derivation=derivation, algorithm_id=algorithm_id,
                            method=method)
    if isinstance(value, int):
        out[0].MeasuredValueSequence[0].NumericValue = DSfloat(str(value))
    return out


#: Comparison kinds that are intervals: written once per group when every metric of the
#: group has the same (:func:`_group_items`).
_INTERVAL_KINDS = {"days_since_baseline": codes.INTERVAL_SINCE_BASELINE,
                   "days_since_previous": codes.INTERVAL_SINCE_PREVIOUS}


def _comparison_items(metric: str, comp: Comparison, skip: Collection[str] = ()) -> list[hd.sr.Measurement]:
    """The comparison NUM items of one metric, each at its precision, less the kinds in ``skip``."""
    values = {
        "baseline_value": None if comp.baseline is None else comp.baseline.value,
        "previous_value": None if comp.previous is None else comp.previous.value,
    }
    out = []
    for kind in _COMPARISON_ORDER:
        value = values[kind] if kind in values else getattr(comp, kind)
        if value is None or kind in skip:
            continue
        name, unit = codes.comparison_concept(metric, kind)
        generic = codes.COMPARISON_KINDS[kind][0]
        out.append(_num(name, precision.rounded(float(value), metric, kind), unit, derivation=generic))
    return out


def _group_items(values: Sequence[tuple[str, float, hd.sr.AlgorithmIdentification | None, str]],
                 comps: Mapping[str, Comparison]) -> list[hd.sr.Measurement]:
    """The NUM items of one measurement group: each metric's value at its precision (with
    its derivation, algorithm where it is not the group's, and, for model-made values, method),
    then its comparison with
    earlier visits. An interval since baseline or previous visit that every compared metric
    shares is stated once, first; only a metric whose interval differs states its own.

    ``values``: (metric, value, algorithm, model) in :data:`METRIC_ORDER`; ``comps``:
    metric -> comparison (current value filled in).
    """
    shared: dict[str, int] = {}
    for kind in _INTERVAL_KINDS:
        days = {getattr(c, kind) for c in comps.values()}
        if len(days) == 1 and None not in days:
            shared[kind] = int(days.pop())
    items = [_num(concept, int(days), codes.UNIT_DAY) for kind, days in shared.items()
             for concept in (_INTERVAL_KINDS[kind],)]
    for metric, value, algorithm, model in values:
        concept, unit = codes.METRIC_CONCEPTS[metric]
        items.append(_num(concept, precision.rounded(value, metric), unit,
                          derivation=codes.METRIC_DERIVATIONS.get(metric), algorithm_id=algorithm,
                          method=_method(metric, model)))
        if metric in comps:
            items.extend(_comparison_items(metric, comps[metric], skip=shared))
    return items


def _quality(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
    """A quality figure (Dice, mismatch, agreement; unit 1) at :data:`precision.QUALITY_DECIMALS`."""
    return _num(name, round(float(value), precision.QUALITY_DECIMALS) + 0.0, codes.UNIT_ONE)


def _time_point_context(time_point: tuple[str, str] | None) -> hd.sr.TimePointContext | None:
    """TID 1502 of the visit: its label and the Clinical Trial Time Point ID where there is one."""
    if time_point is None:
        return None
    label, protocol_id = time_point
    return hd.sr.TimePointContext(time_point=label, protocol_time_point_identifier=protocol_id or None)


def _group(uid: str, words: str, seg_dataset: Dataset, number: int, analysis: StudyAnalysis,
           site: hd.sr.CodedConcept, side: Side, algorithm: hd.sr.AlgorithmIdentification,
           items: list[hd.sr.Measurement], evaluations: list[hd.sr.QualitativeEvaluation] | None,
           time_point: tuple[str, str] | None = None
           ) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """One volumetric measurement group (TID 1411) on a whole SEG segment."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        time_point_context=_time_point_context(time_point),
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=words),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg_dataset.SOPClassUID), sop_instance_uid=str(seg_dataset.SOPInstanceUID),
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(analysis.anatomy.series_instance_uid)),
        finding_type=codes.SKELETAL_MUSCLE,
        finding_sites=[hd.sr.FindingSite(site, laterality=codes.laterality(side))],
        algorithm_id=algorithm,
        measurements=items,
        qualitative_evaluations=evaluations,
    )


def _roi_groups(analysis: StudyAnalysis, seg_dataset: Dataset, subject_key: str,
                algorithm: hd.sr.AlgorithmIdentification, site: hd.sr.CodedConcept,
                comps: Mapping[tuple[str, Side, str, str], Comparison],
                time_point: tuple[str, str] | None = None, version_excluded: Collection[tuple] = (),
                masks: Masks | None = None) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One measurement group per ROI and side of ``analysis.rois``, referencing its SEG
    segment, with the comparison of each metric with the subject's earlier visits where
    ``comps`` has one (the caller compares only values of the same ROI lineage); the ROI's
    source is a qualitative evaluation, and carried ROIs carry their registration quality
    (Dice with the visit's muscle, residual mismatch, whether it needs review). Finding
    site: the ROI's own SNOMED CT code where one was verified (:func:`reports.codes.roi_concept`,
    e.g. Vastus lateralis muscle), else ``site`` (the region).
    """
    if analysis.rois is None:
        return []
    region = analysis.segmentation.region
    numbers = roi_segment_numbers(analysis, masks)
    source = analysis.rois.source
    by_key = {(m.roi, Side(m.side), m.metric): m for m in analysis.measurements
              if m.roi and m.region == region.value and m.metric in codes.METRIC_CONCEPTS}
    carried = analysis.carried if source.value == "carried" else None
    out = []
    for (label, side), number in numbers.items():
        name = analysis.rois.names[label]
        values, group_comps = [], {}
        for metric in METRIC_ORDER:
            m = by_key.get((name, side, metric))
            if m is None or not math.isfinite(float(m.value)):
                continue
            values.append((metric, float(m.value), None, m.model))
            comp = comps.get((region.value, side, metric, name))
            if comp is not None:
                group_comps[metric] = comp.with_current(float(m.value))
        if not values:
            continue
        items = _group_items(values, group_comps)
        evaluations = [hd.sr.QualitativeEvaluation(codes.ROI_SOURCE, codes.ROI_SOURCES[source.value])]
        if carried is not None:
            dice = carried.dice_by_side.get(side, carried.dice_muscle)
            if dice is not None:
                items.append(_quality(codes.REGISTRATION_DICE, dice))
            items.append(_quality(codes.REGISTRATION_MISMATCH, carried.mismatch))
            evaluations.append(hd.sr.QualitativeEvaluation(codes.REGISTRATION_REVIEW,
                                                           codes.REGISTRATION_REVIEWS[carried.needs_review]))
        if source.value == "atlas" and analysis.atlas is not None and name in analysis.atlas.agreement:
            items.append(_quality(codes.ATLAS_AGREEMENT, analysis.atlas.agreement[name]))
        if (region.value, side, name) in version_excluded:
            evaluations.append(hd.sr.QualitativeEvaluation(codes.VERSION_CHANGE, codes.VERSION_CHANGES[True]))
        words = roi_label(analysis, label, side)
        out.append(_group(roi_tracking_uid(subject_key, region.value, side, name, source.lineage), words,
                          seg_dataset, number, analysis, codes.roi_concept(name) or site, side, algorithm, items,
                          evaluations, time_point))
    return out


def _separate(item: Dataset) -> None:
    """Mark ``item`` and every container below it SEPARATE: a measurement group is a list of
    items, not one sentence (a CONTINUOUS container is shown as running text: text renderers
    such as DCMTK's dsr2html then drop each value's name and print "181 d 8709 mm2 ...").
    """
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


def _planar_groups(analysis: StudyAnalysis, sources: list[Dataset], subject_key: str,
                   algorithm: hd.sr.AlgorithmIdentification, site: hd.sr.CodedConcept,
                   time_point: tuple[str, str] | None = None, made: Masks | None = None
                   ) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One planar measurement group (TID 1410) per leg, and per ROI and side, on the key
    slice (:func:`reports.outline.key_slice`): the outline of its SEG segment on that
    slice as a closed POLYLINE on the source image, with that slice's area (segment
    pixels x pixel area) and mean fat fraction. Viewers that draw no volumetric group
    (OHIF, 3D Slicer) draw these with their values.
    """
    region = analysis.segmentation.region
    made = made or Masks(analysis)   # the masks of the SEG made so far
    ff_model = {(m.side, m.roi): m.model for m in analysis.measurements if m.metric == "ff_t2_percent"}
    ff_model.update({(m.side, m.roi): m.model for m in analysis.measurements if m.metric == "ff_percent"})
    masks: list[tuple[str, str, Side, str, hd.sr.CodedConcept]] = []   # (tracking UID, words, side, ROI, site)
    for side in (Side.RIGHT, Side.LEFT):
        mask = made.tissue(Tissue.MUSCLE, side)
        if mask.any():
            masks.append((tracking_uid(subject_key, region, side),
                          f"{side.value} {codes.REGION_WORDS[region.value]} muscle", side, "", site))
    if analysis.rois is not None:
        for (label, side) in roi_segment_numbers(analysis, made):
            name = analysis.rois.names[label]
            masks.append((roi_tracking_uid(subject_key, region.value, side, name, analysis.rois.source.lineage),
                          roi_label(analysis, label, side), side, name, codes.roi_concept(name) or site))
    if not masks:
        return []

    def mask_of(side: Side, name: str) -> np.ndarray:
        if not name:
            return made.tissue(Tissue.MUSCLE, side)
        assert analysis.rois is not None
        label = next(k for k, v in analysis.rois.names.items() if v == name)
        return made.roi(label, side)

    volumes = {(side, name): mask_of(side, name) for _, _, side, name, _ in masks}
    k = study_key_slice(analysis, made)
    ref = analysis.anatomy
    uid = ref.sop_instance_uids[k]
    frame = ref.frame_numbers[k] if ref.frame_numbers and ref.frame_numbers[k] else None
    source = next(d for d in sources if str(d.SOPInstanceUID) == uid)
    image = hd.sr.SourceImageForRegion(str(source.SOPClassUID), uid, [frame] if frame else None)
    ff_slice = analysis.fat_fraction[k]
    out = []
    for group_uid, words, side, name, finding in masks:
        mask = volumes[(side, name)][k]
        points = outline(mask)
        if points is None:
            continue
        ff = ff_slice[mask]
        ff = ff[np.isfinite(ff)]
        items = [_num(codes.AREA, precision.rounded(float(mask.sum()) * ref.pixel_area_mm2, "csa_mm2"), codes.UNIT_MM2)]
        if ff.size:
            items.append(_num(codes.FAT_FRACTION, precision.rounded(float(ff.mean()) * 100.0, "ff_percent"),
                              codes.UNIT_PERCENT, derivation=codes.MEAN,
                              method=_method("ff_percent", ff_model.get((side, name), ""))))   # the map's model
        out.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            time_point_context=_time_point_context(time_point),
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derive_uid(group_uid, "key-slice"),
                                                         identifier=f"{words}, key slice"),
            referenced_region=hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, points, image),
            finding_type=codes.SKELETAL_MUSCLE,
            finding_sites=[hd.sr.FindingSite(finding, laterality=codes.laterality(side))],
            algorithm_id=algorithm, measurements=items))
    return out


def build_sr(analysis: StudyAnalysis, seg_dataset: Dataset, source_images: Sequence[Dataset],
             comparisons: Mapping[tuple, Comparison] | None = None, *,
             subject_key: str | None = None, series_instance_uid: str | None = None,
             sop_instance_uid: str | None = None, series_number: int = 902, instance_number: int = 1,
             manufacturer: str = "musclenode", software_version: str = DEFAULT_SOFTWARE_VERSION,
             manufacturer_model_name: str = "musclenode", institution_name: str | None = None,
             series_description: str = "Muscle measurements (musclenode)",
             previous_versions: Sequence[Dataset] | None = None, time_point: tuple[str, str] | None = None,
             version_excluded: Collection[tuple] = (), history_note: str | None = None
             ) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of an analysis.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
    seg_dataset : pydicom.Dataset
        The SEG built by :func:`reports.seg.build_seg` from the same analysis (a
        ``highdicom.seg.Segmentation`` or the dataset read back from file).
    source_images : sequence of pydicom.Dataset
        The reference (Dixon water) series' datasets, in any order.
    comparisons : mapping, optional
        ``(region, side, metric) -> Comparison`` (see :mod:`reports.longitudinal`) for
        metrics to compare with earlier visits; ``(region, side, metric, roi)`` for a
        metric of an ROI of ``analysis.rois``. ``current_value`` of a comparison may be
        None (it is taken from the analysis); if given it must equal the analysis' value.
    subject_key : str, optional
        Stable key of the subject; the tracking UIDs are derived from it, region and
        side, so they are equal across visits. Default: ``"<IssuerOfPatientID>/<PatientID>"``
        of the source images.
    series_instance_uid, sop_instance_uid : str, optional
        Default: derived from the study, ``"sr"``, the algorithm version, the subject key,
        the SEG, the source images and the comparisons (same inputs, same UIDs).
    series_number, instance_number : int
    manufacturer, software_version, manufacturer_model_name, institution_name : str
        General Equipment of the SR.
    series_description : str
    previous_versions : sequence of pydicom.Dataset, optional
        Earlier SRs of this study that this one replaces (Predecessor Documents); one with
        this SR's own SOP Instance UID (same inputs, same report) is not listed.
    time_point : (str, str), optional
        The visit's label (``"baseline"``, ``"day 182"`` or its time point ID) and Clinical
        Trial Time Point ID (or ""): a Time Point Context (TID 1502) in every group.
    version_excluded : collection of (region, side, roi)
        Groups whose earlier values were measured by another algorithm version and are not
        compared (``roi`` "" for the whole region): flagged with a qualitative evaluation.
    history_note : str, optional
        Why the subject's earlier visits are missing, a key of
        :data:`reports.codes.PRIOR_HISTORY_NOTES` (``"pacs-no-answer"``): an "Earlier visits"
        evaluation in each whole-region group.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        One volumetric measurement group per leg (muscle) of the analysis' region.

    Raises
    ------
    ValueError
        Inconsistent inputs: source images not of the reference series, a SEG from
        another study or analysis, a comparison for a metric the analysis does not have
        or whose current value differs, a non-finite value, a unit that does not fit.
    """
    for name, v in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    sources = sorted_source_images(analysis, source_images)
    masks = Masks(analysis)   # the SEG's masks, each made once
    numbers = _check_seg(seg_dataset, analysis, sources, masks)
    comps = _normalise_comparisons(comparisons)
    if subject_key is None:
        subject_key = default_subject_key(sources[0])
        if subject_key == "patient::":
            raise ValueError("subject_key not given and the source images have no PatientID to derive it from")
    elif not isinstance(subject_key, str) or not subject_key:
        raise ValueError(f"subject_key must be a non-empty str, got {subject_key!r}")

    region = analysis.segmentation.region
    by_key = {}
    for m in analysis.measurements:
        if m.region == region.value and not m.roi and m.metric in codes.METRIC_CONCEPTS:  # whole-region groups
            by_key[(m.region, Side(m.side), m.metric)] = m
    rois = {(m.region, Side(m.side), m.metric, m.roi) for m in analysis.measurements if m.roi}
    for key in comps:
        if key[:3] not in by_key if not key[3] else key not in rois:
            what = " ".join([key[0], key[1].value, key[2]] + ([key[3]] if key[3] else []))
            raise ValueError(f"comparison for {what} has no measurement in the analysis")

    version = str(analysis.algorithm_version)
    algorithm = hd.sr.AlgorithmIdentification(name="musclenode", version=version)
    site = codes.region_concept(region)
    swap_flags = [f for f in analysis.flags if f in codes.SWAP_FINDINGS]
    swap_finding = codes.SWAP_FINDINGS[swap_flags[0] if swap_flags else ""]
    groups = []
    for side in (Side.RIGHT, Side.LEFT):
        metrics = [k for k in METRIC_ORDER if (region.value, side, k) in by_key]
        if not metrics:
            continue
        number = numbers.get((Tissue.MUSCLE, side))
        if number is None:
            raise ValueError(f"the analysis has {side.value} measurements but no {side.value} muscle segment")
        values, group_comps = [], {}
        for metric in metrics:
            m = by_key[(region.value, side, metric)]
            if m.unit not in _UNIT_ALIASES[metric]:
                raise ValueError(f"{region.value} {side.value} {metric}: unit {m.unit!r}, expected "
                                 f"{sorted(_UNIT_ALIASES[metric])}")
            value = float(m.value)
            if not math.isfinite(value):
                raise ValueError(f"{region.value} {side.value} {metric} is not finite ({m.value})")
            # the group names the algorithm: a value states its own only where it differs
            algo = None if m.algorithm_version == version else \
                hd.sr.AlgorithmIdentification(name="musclenode", version=str(m.algorithm_version))
            values.append((metric, value, algo, m.model))
            comp = comps.get((region.value, side, metric, ""))
            if comp is not None:
                if comp.current_value is None:
                    comp = comp.with_current(value)
                elif not math.isclose(comp.current_value, value, rel_tol=1e-9, abs_tol=1e-9):
                    raise ValueError(f"comparison for {region.value} {side.value} {metric} has current value "
                                     f"{comp.current_value}, the analysis {value}")
                group_comps[metric] = comp
        items = _group_items(values, group_comps)
        words = f"{side.value} {codes.REGION_WORDS[region.value]} muscle"
        # the swap check needs Dixon images: a MEGRE- or MESE-only study makes no claim
        evaluations = [hd.sr.QualitativeEvaluation(codes.FAT_WATER_SWAP, swap_finding)] if analysis.dixon_series \
            else []
        if (region.value, side, "") in version_excluded:
            evaluations.append(hd.sr.QualitativeEvaluation(codes.VERSION_CHANGE, codes.VERSION_CHANGES[True]))
        if history_note is not None:   # earlier visits not retrieved (node.history)
            if history_note not in codes.PRIOR_HISTORY_NOTES:
                raise ValueError(f"history_note must be one of {sorted(codes.PRIOR_HISTORY_NOTES)}, "
                                 f"got {history_note!r}")
            evaluations.append(hd.sr.QualitativeEvaluation(codes.PRIOR_HISTORY,
                                                           codes.PRIOR_HISTORY_NOTES[history_note]))
        groups.append(_group(tracking_uid(subject_key, region, side), words, seg_dataset, number, analysis, site,
                             side, algorithm, items, evaluations or None, time_point))
    if not groups:
        raise ValueError(f"the analysis has no {region.value} muscle measurement of either leg")
    groups += _roi_groups(analysis, seg_dataset, subject_key, algorithm, site, comps, time_point, version_excluded,
                          masks)
    planar = _planar_groups(analysis, sources, subject_key, algorithm, site, time_point, masks)

    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("musclenode-device", manufacturer, manufacturer_model_name),
            name="musclenode", manufacturer_name=manufacturer, model_name=manufacturer_model_name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.procedure_concept(region),
        # planar groups first: OHIF's SR viewport shows the image of the first group, and a
        # volumetric group (on SEG segments) has none
        imaging_measurements=[*planar, *groups],
        title=codes.IMAGING_MEASUREMENT_REPORT,
    )

    _separate(report[0])
    study_uid = str(sources[0].StudyInstanceUID)
    parts = (study_uid, "sr", version, subject_key, str(seg_dataset.SOPInstanceUID),
             *sorted(analysis.anatomy.sop_instance_uids), _digest(comps),
             *((repr(time_point),) if time_point else ()), *((repr(sorted(map(repr, version_excluded))),)
                                                            if version_excluded else ()),
             *((f"history:{history_note}",) if history_note else ()))
    sop_instance_uid = sop_instance_uid or derive_uid(*parts, "instance")
    series_instance_uid = series_instance_uid or derive_uid(*parts, "series")
    replaced = [p for p in previous_versions or () if str(p.SOPInstanceUID) != sop_instance_uid]
    return _document(
        report,
        evidence=[*sources, seg_dataset],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        institution_name=institution_name,
        coding_schemes=[codes.PRIVATE_SCHEME_IDENTIFICATION],
        series_description=series_description,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_version,
        previous_versions=replaced or None,
    )


def _document(report: hd.sr.MeasurementReport, **kwargs) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR of ``report`` (keyword arguments: those of
    ``highdicom.sr.Comprehensive3DSR`` but ``content``).

    highdicom's constructor deep-copies the content tree, converts the copy item by item and
    walks the tree twice to check that every referenced instance is in the evidence: four
    fifths of the time the SR took. Here it gets an empty root container of the same
    concept, whose evidence lists are the same (every instance of ``evidence``, referenced or
    not), and the report's root is then put in its place. The check is not needed: the groups
    reference only the source images and the SEG, which are the evidence.
    """
    root = report[0]
    stub = hd.sr.ContainerContentItem(name=root.name, is_content_continuous=False, template_id="1500")
    stub.ContentSequence = hd.sr.ContentSequence()
    sr = hd.sr.Comprehensive3DSR(content=stub, **kwargs)
    for tag in set(stub.keys()) - set(root.keys()):
        del sr[tag]
    for tag, element in root.items():
        sr[tag] = element
    if "_content" in vars(sr):   # what the constructor keeps for ``sr.content``: the report itself
        sr._content = report
    else:   # another highdicom: let it read the content back from the data set
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=False)
    return sr
