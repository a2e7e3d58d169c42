"""The current values of a musclenode TID 1500 Measurement Report, read back: the inverse of
:func:`reports.sr.build_sr`, so that a subject's history can be rebuilt from the SRs a node
once sent to PACS (:mod:`node.history`).

Only the volumetric measurement groups (TID 1411) are read; comparison items (private
``99MUSCLENODE`` concepts: values at baseline, changes, intervals) and quality figures are
skipped, as are planar groups (TID 1410). Each NUM item maps back to its metric by concept
name, unit, Derivation and Measurement Method, as :data:`reports.codes.METRIC_CONCEPTS`,
:data:`reports.codes.METRIC_DERIVATIONS` and :data:`reports.codes.MODEL_METHODS` say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from quant import muscles
from quant.enums import METRIC_UNITS, Metric, Roi

from . import codes

#: Manufacturer of the SRs this module reads.
MANUFACTURER = "musclenode"
_ALGORITHM_VERSION = ("111003", "DCM")   # Algorithm Version (TID 4019)
_T2_MODELS = frozenset({"epg-bicomponent", "biexp-fixed-fat"})   # the models of the T2 fit's fat fraction


@dataclass(frozen=True)
class ReportedValue:
    """One current value of a musclenode SR: names as in ``measurements.csv``.

    ``roi`` is "" for the whole region, ``source`` then "" too (as the node's
    ``measurements`` table keeps them); ``unit`` is the metric's unit as the node writes it
    (``mm2``, ``ml``, ``%``, ``ms``, ``1``); ``value`` is as written in the SR (rounded to
    the reported precision, :mod:`reports.precision`).
    """

    region: str
    side: str
    metric: str
    value: float
    unit: str
    algorithm_version: str
    roi: str = ""
    source: str = ""


@dataclass(frozen=True)
class ReportReadback:
    """A musclenode SR's header and current values."""

    sop_instance_uid: str
    study_instance_uid: str
    study_date: str            # DICOM DA, "" when the SR has none
    content_datetime: str      # Content Date + Time, to tell the newest of a study's SRs
    predecessors: tuple[str, ...]   # SOP Instance UIDs of the SRs it replaces
    values: tuple[ReportedValue, ...]


def _key(concept) -> tuple[str, str]:
    return (str(concept.value), str(concept.scheme_designator))


#: (concept, unit, derivation) -> metrics written with them; several where only the
#: Measurement Method tells them apart (the Dixon and the T2 fit's fat fraction).
_METRICS_BY_ITEM: Mapping[tuple, tuple[str, ...]] = MappingProxyType({
    k: tuple(m for m in codes.METRIC_CONCEPTS
             if (_key(codes.METRIC_CONCEPTS[m][0]), _key(codes.METRIC_CONCEPTS[m][1]),
                 _key(codes.METRIC_DERIVATIONS[m]) if m in codes.METRIC_DERIVATIONS else None) == k)
    for k in {(_key(c), _key(u), _key(codes.METRIC_DERIVATIONS[m]) if m in codes.METRIC_DERIVATIONS else None)
              for m, (c, u) in codes.METRIC_CONCEPTS.items()}
})
_MODEL_BY_METHOD = MappingProxyType({_key(c): model for model, c in codes.MODEL_METHODS.items()})
_REGION_BY_SITE = MappingProxyType({_key(codes.region_concept(r)): r
                                    for r in ("thigh", "calf", "leg", "hand", "head_neck")})
_SIDE_BY_LATERALITY = MappingProxyType({_key(codes.RIGHT): "right", _key(codes.LEFT): "left"})
_SOURCE_BY_CODE = MappingProxyType({_key(c): s for s, c in codes.ROI_SOURCES.items()})
_KNOWN_ROI_NAMES = frozenset({r.value for r in Roi} | set(muscles.PROPERTY_TYPES) | set(muscles.UNCODED_NAMES)
                             | set(muscles.KNOWN_CODES.values()))


def is_musclenode_report(ds: Dataset) -> bool:
    """True for a Comprehensive 3D SR made by musclenode whose document is a TID 1500
    Imaging Measurement Report (126000, DCM).
    """
    if str(ds.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
        return False
    if str(ds.get("Manufacturer", "")).strip() != MANUFACTURER:
        return False
    names = ds.get("ConceptNameCodeSequence") or []
    if not names or (str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", ""))) \
            != _key(codes.IMAGING_MEASUREMENT_REPORT):
        return False
    templates = ds.get("ContentTemplateSequence") or []
    return not templates or str(templates[0].get("TemplateIdentifier", "")) == "1500"


def metric_of(name, unit, derivation, method) -> str | None:
    """The metric (:class:`quant.enums.Metric` value) a NUM item of :func:`reports.sr.build_sr`
    stands for, from its concept name, unit, Derivation and Measurement Method (coded
    concepts, the last two may be None); None for any other item (a comparison, a quality
    figure) or one that cannot be told apart.
    """
    candidates = _METRICS_BY_ITEM.get((_key(name), _key(unit), None if derivation is None else _key(derivation)), ())
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    model = _MODEL_BY_METHOD.get(_key(method)) if method is not None else None
    if model is None:
        return None
    t2 = [m for m in candidates if (m == Metric.FF_T2_PERCENT.value) == (model in _T2_MODELS)]
    return t2[0] if len(t2) == 1 else None


def roi_name(words: str) -> str:
    """The ROI name of its words in a tracking identifier (the inverse of
    :func:`reports.codes.roi_words`): a known ROI spelled with spaces gets its underscores
    back (``"anterior compartment"`` -> ``anterior_compartment``); a reader's own name is
    kept as written.
    """
    key = "_".join(words.split())
    return key if key in _KNOWN_ROI_NAMES else words.strip()


def _algorithm_version(item: Dataset) -> str:
    for child in item.get("ContentSequence", []):
        names = child.get("ConceptNameCodeSequence") or []
        if child.get("ValueType") == "TEXT" and names and \
                (str(names[0].CodeValue), str(names[0].CodingSchemeDesignator)) == _ALGORITHM_VERSION:
            return str(child.TextValue)
    return ""


def _site(group) -> tuple[str | None, str | None, tuple[str, str] | None]:
    """(region, side, site code) of a group's first finding site; None where not known."""
    sites = group.finding_sites
    if not sites:
        return None, None, None
    site = sites[0]
    laterality = site.laterality
    side = _SIDE_BY_LATERALITY.get(_key(laterality)) if laterality is not None else None
    return _REGION_BY_SITE.get(_key(site.value)), side, _key(site.value)


def _roi_of(group, side: str, region: str) -> tuple[str, str] | None:
    """(ROI name, source) of an ROI group, from its ROI source evaluation and its tracking
    identifier "<side> <region words> <ROI words> (<source>)"; None if it does not read so.
    """
    source = None
    for ev in group.get_qualitative_evaluations(codes.ROI_SOURCE):
        source = _SOURCE_BY_CODE.get(_key(ev.value))
    identifier = str(group.tracking_identifier or "")
    prefix = f"{side} {codes.REGION_WORDS[region]} "
    if source is None or not identifier.startswith(prefix) or not identifier.endswith(f" ({source})"):
        return None
    words = identifier[len(prefix):-len(f" ({source})")]
    return (roi_name(words), source) if words.strip() else None


def read_report(ds: Dataset) -> ReportReadback:
    """The current values of a musclenode Measurement Report.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        A Comprehensive 3D SR made by :func:`reports.sr.build_sr` (see
        :func:`is_musclenode_report`).

    Returns
    -------
    ReportReadback
        Region from the whole-region groups' Finding Site, side from its laterality,
        metric from each NUM item (:func:`metric_of`), ROI name and source from each ROI
        group's tracking identifier and ROI source evaluation, algorithm version from the
        item's (else the group's) Algorithm Identification.

    Raises
    ------
    ValueError
        ``ds`` is not a musclenode Measurement Report.
    """
    if not isinstance(ds, Dataset) or not is_musclenode_report(ds):
        raise ValueError("not a musclenode TID 1500 Measurement Report (Comprehensive 3D SR, Manufacturer "
                         "musclenode, concept name 126000 DCM)")
    content = cast(hd.sr.MeasurementReport, hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True).content)
    groups = content.get_volumetric_roi_measurement_groups()
    whole = {id(g) for g in groups if not g.get_qualitative_evaluations(codes.ROI_SOURCE)}
    regions = {r for g in groups if id(g) in whole and (r := _site(g)[0]) is not None}
    values: list[ReportedValue] = []
    if len(regions) == 1:
        region = regions.pop()
        for g in groups:
            _, side, _ = _site(g)
            if side is None:
                continue
            roi, source = "", ""
            if id(g) not in whole:
                found = _roi_of(g, side, region)
                if found is None:
                    continue
                roi, source = found
            group_version = _algorithm_version(g[0])
            for m in g.get_measurements():
                metric = metric_of(m.name, m.unit, m.derivation, m.method)
                if metric is None:
                    continue
                values.append(ReportedValue(region, side, metric, float(m.value), METRIC_UNITS[Metric(metric)],
                                            _algorithm_version(m[0]) or group_version, roi, source))
    content_dt = f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
    predecessors = tuple(str(inst.ReferencedSOPInstanceUID)
                         for study in ds.get("PredecessorDocumentsSequence", [])
                         for series in study.get("ReferencedSeriesSequence", [])
                         for inst in series.get("ReferencedSOPSequence", []))
    return ReportReadback(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.get("StudyDate", "") or ""),
                          content_dt, predecessors, tuple(values))


def latest_per_study(reports: Sequence[ReportReadback]) -> list[ReportReadback]:
    """One report per study: those no other report replaces (Predecessor Documents), the
    newest by Content Date and Time among them (then by SOP Instance UID, so that the choice
    does not depend on the order of ``reports``).
    """
    replaced = {uid for r in reports for uid in r.predecessors}
    best: dict[str, ReportReadback] = {}
    for r in reports:
        if r.sop_instance_uid in replaced:
            continue
        held = best.get(r.study_instance_uid)
        if held is None or (r.content_datetime, r.sop_instance_uid) > (held.content_datetime, held.sop_instance_uid):
            best[r.study_instance_uid] = r
    return [best[k] for k in sorted(best)]


__all__ = ["ReportedValue", "ReportReadback", "is_musclenode_report", "metric_of", "roi_name", "read_report",
           "latest_per_study"]
