"""One study, start to finish, without networking: read the files, run :mod:`quant`,
build SEG and SR with :mod:`reports`. Used by the node's jobs and by
``musclenode process``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset

from quant.analysis import RoiReference
from quant.enums import RoiSource, SeriesKind, Side
from quant.epg import MeseParameters
from quant.metrics import Measurement
from quant.pipeline import StudyAnalysis, analyse_study
from quant.t2 import AtomsSource
from reports.longitudinal import Comparison, PriorValue, compare
from reports.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

from .errors import InstanceRejected
from .instances import ENHANCED_MR_IMAGE, MR_IMAGE, SEGMENTATION, read_instance, subject_key

if TYPE_CHECKING:
    from quant.t2stage import T2Options
    from reports.summary import Summary

log = logging.getLogger(__name__)

CSV_COLUMNS = ("study_uid", "region", "roi", "source", "side", "metric", "value", "unit", "model", "flags")


@dataclass(frozen=True)
class Rejected:
    """A file that was not read as a DICOM instance, and why."""

    path: Path
    reason: str


@dataclass(frozen=True, eq=False)
class StudyOutputs:
    """One study's analysis with the SEG, SR and parametric maps built from it."""

    analysis: StudyAnalysis
    seg: Dataset
    sr: Dataset
    study_uid: str
    subject_key: str
    study_date: str
    pmaps: list[Dataset] = field(default_factory=list)   # reports.pmap: FF, T2W, B1, FF_T2 (those made)
    summary: Summary | None = None   # reports.summary: the one-page summary (SC and PDF), None if not made
    #: builds the summary page later (``build_outputs(..., summary=False)``): see :func:`with_summary`
    page: Callable[[], Summary | None] | None = field(default=None, repr=False, compare=False)
    #: builds the parametric maps later (``build_outputs(..., summary=False)``): see :func:`with_summary`
    maps: Callable[[], list[Dataset]] | None = field(default=None, repr=False, compare=False)


def with_summary(outputs: StudyOutputs) -> StudyOutputs:
    """``outputs`` with its parametric maps and summary page, built now if :func:`build_outputs`
    deferred them.
    """
    if outputs.page is None and outputs.maps is None:
        return outputs
    return replace(outputs, pmaps=outputs.maps() if outputs.maps is not None else outputs.pmaps,
                   summary=outputs.page() if outputs.page is not None else outputs.summary, page=None, maps=None)


def is_reader_seg(ds: Dataset) -> bool:
    """A DICOM SEG made by someone else than musclenode (a reader's ROIs)."""
    return str(ds.get("SOPClassUID", "")) == SEGMENTATION and str(ds.get("Manufacturer", "")) != "musclenode"


def load_datasets(paths: Iterable[Path]) -> tuple[list[Dataset], list[Rejected]]:
    """Read the MR images and readers' SEGs among ``paths``; unreadable files are returned as rejected."""
    datasets, rejected = [], []
    for p in paths:
        try:
            ds = read_instance(Path(p))
        except InstanceRejected as exc:
            rejected.append(Rejected(Path(p), str(exc)))
            continue
        if str(ds.SOPClassUID) in (MR_IMAGE, ENHANCED_MR_IMAGE) or is_reader_seg(ds):
            datasets.append(ds)
    return datasets, rejected


def parse_date(value: str) -> dt.date | None:
    """The date of a DICOM DA value (``YYYYMMDD``), or None if it is not one."""
    try:
        return dt.datetime.strptime(str(value)[:8], "%Y%m%d").date()
    except ValueError:
        return None


def prior_key(region: str, side: str, metric: str, roi: str = "", source: str = "") -> tuple[str, str, str, str]:
    """What a value is compared across visits by: (region, side, metric, ROI), where the
    ROI part is "" for a whole region and ``"<lineage>:<roi name>"`` for an ROI, so that a
    reader's ROIs (drawn or carried) are never compared with automatic or atlas ones.
    """
    if not roi:
        return (region, side, metric, "")
    return (region, side, metric, f"{RoiSource(source).lineage}:{roi}")


def comparisons_for(analysis: StudyAnalysis, study_date: str,
                    priors: Mapping[tuple[str, str, str, str], Sequence[PriorValue]],
                    ) -> tuple[dict[tuple[str, Side, str, str], Comparison], set[tuple[str, Side, str]]]:
    """Baseline/previous comparison of every measurement that has priors (``priors`` keyed by
    :func:`prior_key`), keyed by (region, side, metric, ROI name or ""); empty if
    ``study_date`` is not a date. Earlier values of another algorithm version are never
    compared: the (region, side, ROI) groups that had some are returned beside.
    """
    current = parse_date(study_date)
    out: dict[tuple[str, Side, str, str], Comparison] = {}
    excluded: set[tuple[str, Side, str]] = set()
    if current is None:
        return out, excluded
    for m in analysis.measurements:
        key = prior_key(m.region, m.side.value, m.metric, m.roi, m.source)
        same = [p for p in priors.get(key, ()) if p.algorithm_version in ("", m.algorithm_version)]
        if len(same) < len(priors.get(key, ())):
            excluded.add((m.region, m.side, m.roi))
        if same:
            out[(m.region, m.side, m.metric, m.roi)] = compare(m.value, current, same)
    return out, excluded


def history_for(analysis: StudyAnalysis, study_date: str,
                priors: Mapping[tuple[str, str, str, str], Sequence[PriorValue]],
                ) -> dict[tuple[str, Side, str, str], list[PriorValue]]:
    """The earlier visits' values of every measurement (``priors`` keyed by :func:`prior_key`),
    keyed like :func:`comparisons_for` (region, side, metric, ROI name or ""): the values the
    summary page plots, those of the same algorithm version only, before ``study_date``.
    """
    current = parse_date(study_date)
    out: dict[tuple[str, Side, str, str], list[PriorValue]] = {}
    for m in analysis.measurements:
        key = prior_key(m.region, m.side.value, m.metric, m.roi, m.source)
        same = [p for p in priors.get(key, ()) if p.algorithm_version in ("", m.algorithm_version)
                and (current is None or p.study_date < current)]
        if same:
            out[(m.region, m.side, m.metric, m.roi)] = same
    return out


def time_point_of(ds: Dataset, study_date: str,
                  priors: Mapping[tuple[str, str, str, str], Sequence[PriorValue]]) -> tuple[str, str]:
    """The visit's (label, Clinical Trial Time Point ID): the ID where the DICOM carries one,
    else ``baseline`` or ``day N`` (days since the subject's earliest visit the node holds).
    """
    protocol_id = str(ds.get("ClinicalTrialTimePointID", "") or "").strip()
    current = parse_date(study_date)
    dates = [p.study_date for values in priors.values() for p in values]
    days = (current - min(dates)).days if current is not None and dates and min(dates) < current else 0
    return (protocol_id or ("baseline" if days == 0 else f"day {days}")), protocol_id


def build_outputs(datasets: Sequence[Dataset],
                  priors: Mapping[tuple[str, str, str, str], Sequence[PriorValue]] | None = None,
                  previous_srs: Sequence[Dataset] = (), *, t2_options: T2Options | None = None,
                  atoms: AtomsSource | None = None, compartments: bool = False,
                  carry_from: Sequence[RoiReference] = (), atlases: Sequence[RoiReference] = (),
                  history_note: str | None = None, summary: bool = True) -> StudyOutputs:
    """Analyse one study's MR datasets and build its SEG, SR, parametric maps and summary page
    (``compartments``: measure the automatic compartments too; a reader's SEG among
    ``datasets`` gives the ROIs, and without one a reader's ROI set of another visit in
    ``carry_from`` is carried here, else other subjects' sets in ``atlases`` are fused here, see
    :func:`quant.pipeline.analyse_study`).

    ``priors`` maps :func:`prior_key` to the values of the subject's earlier visits;
    ``previous_srs`` are SRs of earlier runs on this study that the new SR replaces
    (listed in its Predecessor Documents Sequence); ``history_note`` says in the SR why the
    subject's earlier visits are missing (see :func:`reports.sr.build_sr`). With ``summary``
    false the parametric maps and the page are left for :func:`with_summary` (the node records
    and sends the SEG and SR first).
    """
    from reports.pmap import build_parametric_maps
    from reports.seg import build_seg
    from reports.sr import build_sr
    from reports.summary import build_summary

    images = [d for d in datasets if not is_reader_seg(d)]
    analysis = analyse_study(images, t2_options=t2_options, atoms=atoms, compartments=compartments,
                             reader_segs=[d for d in datasets if is_reader_seg(d)], carry_from=carry_from,
                             atlases=atlases)
    datasets = images
    water = {str(d.SOPInstanceUID): d for d in datasets
             if str(d.SeriesInstanceUID) == analysis.anatomy.series_instance_uid}
    source = [water[uid] for uid in dict.fromkeys(analysis.anatomy.sop_instance_uids)]
    ds0 = source[0]
    key = subject_key(ds0)
    study_date = str(ds0.get("StudyDate", "") or "")
    comparisons, excluded = comparisons_for(analysis, study_date, priors or {})
    time_point = time_point_of(ds0, study_date, priors or {})
    seg = build_seg(analysis, source)
    # one of previous_srs with the new SR's UID (same inputs, same report) is not a predecessor:
    # build_sr leaves it out
    sr = build_sr(analysis, seg, source, comparisons, subject_key=key, previous_versions=previous_srs,
                  time_point=time_point, version_excluded=excluded, history_note=history_note)
    def maps() -> list[Dataset]:
        return build_parametric_maps(analysis, images)

    def page() -> Summary | None:
        try:   # the page never fails the study: its SEG, SR and maps go out without it
            return build_summary(analysis, source, sr, comparisons, history_for(analysis, study_date, priors or {}),
                                 time_point=time_point, version_excluded=excluded)
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            log.error("study %s: summary page not made: %s: %s", ds0.StudyInstanceUID, type(exc).__name__, exc)
            return None
    out = StudyOutputs(analysis, seg, sr, str(ds0.StudyInstanceUID), key, study_date, page=page, maps=maps)
    return with_summary(out) if summary else out


def measurements_csv(rows: Iterable[tuple]) -> str:
    """The CSV text of ``rows`` (as made by :func:`measurement_rows`) under a :data:`CSV_COLUMNS` header."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def measurement_rows(outputs: StudyOutputs) -> list[tuple]:
    """One row per measurement of the study, in :data:`CSV_COLUMNS` order; Dixon values carry the
    Dixon series' flags (fat-water swaps), carried ROIs' values ``roi-registration-review`` when
    their registration needs a look.
    """
    review = "roi-registration-review"   # applies to the carried ROIs' values only
    dixon = ";".join(f for f in outputs.analysis.flags if f != review)   # fat-water swaps: Dixon values

    def flags(m: Measurement) -> str:
        out = [dixon] if dixon and m.model.startswith("dixon") else []
        if m.source == "carried" and review in outputs.analysis.flags:
            out.append(review)
        return ";".join(out)
    return [(outputs.study_uid, m.region, m.roi, m.source, m.side.value, m.metric, f"{m.value:.4f}", m.unit, m.model,
             flags(m)) for m in outputs.analysis.measurements]


def cached_atoms(cache_dir: Path) -> AtomsSource:
    """An ``atoms`` source for :func:`quant.pipeline.analyse_study` that keeps the EPG
    tables (one component over a T2 x B1 grid) in ``cache_dir``, keyed by a hash of the
    sequence, the grids and T1: built once per protocol, reused across exams and worker
    processes. Only the exam's own fat column (one fat T2) is simulated per exam.
    """
    from quant.t2 import epg_atoms, table_key

    from .cache import ArrayCache
    cache = ArrayCache(cache_dir)

    def atoms(params: MeseParameters, t2_grid_ms: np.ndarray, b1_grid: np.ndarray, t1_ms: float) -> np.ndarray:
        key = table_key("epg-atoms-", params, t2_grid_ms, b1_grid, [t1_ms], digits=32)
        return cache.get_or_build(key, lambda: {"atoms": epg_atoms(params, t2_grid_ms, b1_grid, t1_ms)})["atoms"]
    return atoms


def output_datasets(outputs: StudyOutputs) -> list[tuple[str, Dataset]]:
    """(kind, dataset) of every object made for a study, in sending order: ``seg``, ``sr``,
    ``pmap`` (each map), ``summary`` (the page as Secondary Capture) and ``summary-pdf``
    (the page as Encapsulated PDF, sent only where a destination accepts it).
    """
    out = [("seg", outputs.seg), ("sr", outputs.sr), *(("pmap", pm) for pm in outputs.pmaps)]
    if outputs.summary is not None:
        out += [("summary", outputs.summary.sc), ("summary-pdf", outputs.summary.pdf)]
    return out


def encode(ds: Dataset) -> bytes:
    """The bytes of ``ds`` as a DICOM file (preamble and file meta included)."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID   # the node wrote it (PS3.10 7.1)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def series_summary(analysis: StudyAnalysis) -> list[tuple[str, str, str, str]]:
    """(series UID, kind, reason, description) of each series of the study."""
    return [(s.series_instance_uid, s.kind.value, s.reason, s.description) for s in analysis.series]


__all__ = ["build_outputs", "with_summary", "output_datasets", "history_for", "load_datasets", "measurements_csv",
           "measurement_rows",
           "encode", "StudyOutputs", "Rejected", "parse_date", "SeriesKind", "series_summary", "CSV_COLUMNS"]
