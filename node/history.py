"""A subject's history rebuilt from PACS: the SRs a node once sent hold every earlier value,
so a node that has lost (or never had) its database asks the destinations marked
``query = true`` for them.

For one subject: C-FIND at STUDY level by Patient ID (and Issuer of Patient ID), then at
SERIES level for SR series made by musclenode in each study but the current one; C-GET of
those series (the node plays the storage SCP on the same association, PS3.4 C.4.3); each SR
that is a musclenode TID 1500 report is read back (:mod:`reports.sr_readback`) and its current
values recorded in ``pacs_history``, which :func:`node.worker._priors` reads beside the node's
own ``measurements``. A destination that does not answer within ``[send]
query_timeout_seconds`` is skipped: the job goes on without its priors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy import and_, delete, insert, select
from sqlalchemy.engine import Connection, Engine

from reports.sr_readback import MANUFACTURER, ReportReadback, is_musclenode_report, latest_per_study, read_report

from . import db
from .config import ConfigError, Destination, TLSSettings
from .tls import scu_ae, tls_args

log = logging.getLogger(__name__)

_PENDING = {0xFF00, 0xFF01}
#: SR storage classes a C-GET may deliver (the node's own SRs are Comprehensive 3D SR).
_SR_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)
_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: Query/retrieve information models the node proposes as SCU, preferred first
#: (deploy/CONFORMANCE.md lists them; tests/test_conformance.py checks it).
FIND_MODELS = (StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind)
GET_MODELS = (StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet)
#: SR storage classes the node accepts as the SCP role of a C-GET, and their transfer syntaxes.
GET_SR_CLASSES = _SR_CLASSES
GET_TRANSFER_SYNTAXES = tuple(_TRANSFER_SYNTAXES)


class PacsNoAnswer(Exception):
    """A destination refused the association, timed out, or failed a query or retrieve."""


@dataclass
class DestinationAnswer:
    """What one destination gave for one subject."""

    destination: str
    answered: bool = False
    error: str = ""
    studies: int = 0                  # earlier studies of the subject (the current one left out)
    srs: int = 0                      # musclenode SRs retrieved
    reports: list[ReportReadback] = field(default_factory=list)


@dataclass
class HistoryResult:
    """The outcome of :func:`rebuild_history`: each destination's answer and what was recorded."""

    answers: list[DestinationAnswer]
    recorded_studies: int = 0
    recorded_values: int = 0
    recorded_by_destination: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (SRs, values)

    @property
    def unanswered(self) -> list[DestinationAnswer]:
        """The destinations that did not answer."""
        return [a for a in self.answers if not a.answered]


def _associate(ae: AE, dest: Destination, tls: TLSSettings | None, **kw) -> Association:
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args(dest, tls), **kw)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association (PACS down or not answering)"
        raise PacsNoAnswer(f"{why}: {dest.ae_title}@{dest.host}:{dest.port}")
    return assoc


def _accepted(assoc: Association, *models) -> str | None:
    """The first of ``models`` (SOP class UIDs) the peer accepted, else None."""
    have = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    return next((str(m) for m in models if str(m) in have), None)


def _find(assoc: Association, model: str, query: Dataset) -> Iterator[Dataset]:
    for status, identifier in assoc.send_c_find(query, model):
        code = getattr(status, "Status", None)
        if code is None:
            raise PacsNoAnswer("C-FIND: no response (association lost or timed out)")
        if code in _PENDING:
            if identifier is not None:
                yield identifier
        elif code != 0x0000:
            raise PacsNoAnswer(f"C-FIND status 0x{code:04X}")


def find_sr_series(dest: Destination, patient_id: str, issuer: str, *, exclude_study: str, calling_ae: str,
                   timeout: float, tls: TLSSettings | None = None) -> tuple[int, list[tuple[str, str]]]:
    """The earlier studies of a patient and the musclenode SR series in them (over DICOM TLS
    with ``tls``, the node's ``[node.tls]``, when ``dest.tls``).

    Returns
    -------
    (int, list of (study UID, series UID))
        The number of the patient's studies other than ``exclude_study``, and their SR
        series whose Manufacturer is musclenode (or not returned by the PACS: the SRs are
        checked once retrieved).

    Raises
    ------
    PacsNoAnswer
        The destination did not answer.
    """
    ae = scu_ae(calling_ae, timeout)
    for model in FIND_MODELS:
        ae.add_requested_context(model)
    assoc = _associate(ae, dest, tls)
    try:
        model = _accepted(assoc, *FIND_MODELS)
        if model is None:
            raise PacsNoAnswer(f"{dest.ae_title} accepts neither Study nor Patient Root C-FIND")
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = patient_id
        if issuer:
            q.IssuerOfPatientID = issuer
        q.StudyInstanceUID = ""
        q.StudyDate = ""
        studies = sorted({str(r.StudyInstanceUID) for r in _find(assoc, model, q)
                          if r.get("StudyInstanceUID") and str(r.get("PatientID", patient_id)) == patient_id}
                         - {exclude_study})
        out = []
        for study_uid in studies:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.PatientID = patient_id   # Patient Root needs the unique key of each level above
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = ""
            q.Modality = "SR"
            q.Manufacturer = MANUFACTURER
            for r in _find(assoc, model, q):
                if str(r.get("Modality", "SR")) != "SR":
                    continue
                if str(r.get("Manufacturer", "") or MANUFACTURER).strip() != MANUFACTURER:
                    continue
                out.append((study_uid, str(r.SeriesInstanceUID)))
        return len(studies), out
    finally:
        if assoc.is_established:
            assoc.release()


def get_series(dest: Destination, patient_id: str, series: Sequence[tuple[str, str]], *, calling_ae: str,
               timeout: float, tls: TLSSettings | None = None) -> list[Dataset]:
    """C-GET each (study UID, series UID) of ``series`` over one association (over DICOM TLS
    when ``dest.tls``); the SR instances received (the node is the storage SCP of the sub-operations).

    Raises
    ------
    PacsNoAnswer
        The destination did not answer, or accepted no C-GET.
    """
    received: list[Dataset] = []

    def on_store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = scu_ae(calling_ae, timeout)
    for model in GET_MODELS:
        ae.add_requested_context(model)
    for cls in _SR_CLASSES:
        ae.add_requested_context(cls, _TRANSFER_SYNTAXES)
    roles = [build_role(cls, scp_role=True) for cls in _SR_CLASSES]
    assoc = _associate(ae, dest, tls, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        model = _accepted(assoc, *GET_MODELS)
        if model is None:
            raise PacsNoAnswer(f"{dest.ae_title} accepts no C-GET")
        for study_uid, series_uid in series:
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.PatientID = patient_id
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            for status, _ in assoc.send_c_get(q, model):
                code = getattr(status, "Status", None)
                if code is None:
                    raise PacsNoAnswer("C-GET: no response (association lost or timed out)")
                if code not in _PENDING and code not in (0x0000, 0xB000):
                    raise PacsNoAnswer(f"C-GET status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return received


def ask_destination(dest: Destination, patient_id: str, issuer: str = "", *, exclude_study: str = "",
                    calling_ae: str, timeout: float, tls: TLSSettings | None = None) -> DestinationAnswer:
    """Query and retrieve one destination's musclenode SRs of a patient, read back; never raises
    for a destination that does not answer (the answer says so).
    """
    answer = DestinationAnswer(dest.name)
    try:
        answer.studies, series = find_sr_series(dest, patient_id, issuer, exclude_study=exclude_study,
                                                calling_ae=calling_ae, timeout=timeout, tls=tls)
        datasets = (get_series(dest, patient_id, series, calling_ae=calling_ae, timeout=timeout, tls=tls)
                    if series else [])
    except (PacsNoAnswer, ConfigError) as exc:   # ConfigError: the node's TLS files do not load
        answer.error = str(exc)
        return answer
    except (OSError, RuntimeError) as exc:   # a socket error, or pynetdicom's on a lost association
        answer.error = f"{type(exc).__name__}: {exc}"
        return answer
    answer.answered = True
    for ds in datasets:
        if str(ds.get("StudyInstanceUID", "")) == exclude_study or not is_musclenode_report(ds):
            continue
        if str(ds.get("PatientID", "")) != patient_id:
            continue
        try:
            answer.reports.append(read_report(ds))
        except (ValueError, AttributeError, KeyError) as exc:   # not as reports.sr writes it
            log.warning("SR %s from %s not read: %s", ds.get("SOPInstanceUID", "?"), dest.name, exc)
    answer.srs = len(answer.reports)
    return answer


def has_earlier_visits(conn: Connection, subject_key: str, study_uid: str) -> bool:
    """Whether the node holds values of another study of the subject (its own or from PACS)."""
    for table in (db.measurements, db.pacs_history):
        found = conn.execute(select(table.c.id).where(and_(table.c.subject_key == subject_key,
                                                           table.c.study_uid != study_uid)).limit(1)).first()
        if found is not None:
            return True
    return False


def record(conn: Connection, subject_key: str, answers: Sequence[DestinationAnswer]) -> HistoryResult:
    """Record the newest SR of each study the destinations returned as the subject's history
    (replacing what ``pacs_history`` held for those studies); an audit entry per destination.
    """
    result = HistoryResult(list(answers))
    origin = {r.sop_instance_uid: a.destination for a in answers for r in a.reports}
    chosen = latest_per_study([r for a in answers for r in a.reports])
    now = time.time()
    for report in chosen:
        conn.execute(delete(db.pacs_history).where(and_(db.pacs_history.c.subject_key == subject_key,
                                                        db.pacs_history.c.study_uid == report.study_instance_uid)))
        for v in report.values:
            conn.execute(insert(db.pacs_history).values(
                subject_key=subject_key, study_uid=report.study_instance_uid, study_date=report.study_date,
                region=v.region, side=v.side, metric=v.metric, value=v.value, unit=v.unit,
                algorithm_version=v.algorithm_version, roi=v.roi, source=v.source,
                sr_uid=report.sop_instance_uid, destination=origin[report.sop_instance_uid], fetched_at=now))
        srs, values = result.recorded_by_destination.get(origin[report.sop_instance_uid], (0, 0))
        result.recorded_by_destination[origin[report.sop_instance_uid]] = (srs + 1, values + len(report.values))
        result.recorded_studies += 1
        result.recorded_values += len(report.values)
    return result


def rebuild_history(engine: Engine, destinations: Sequence[Destination], subject_key: str, patient_id: str,
                    issuer: str = "", *, exclude_study: str = "", calling_ae: str, timeout: float,
                    context: str = "", tls: TLSSettings | None = None) -> HistoryResult:
    """Ask each destination with ``query`` for the patient's musclenode SRs and record their
    values as the subject's history (see :func:`record`); an audit entry ``history-query``
    per destination with its counts (``context`` names why, e.g. the study of a job), or
    why it did not answer. Never raises for a destination that does not answer.
    """
    answers = [ask_destination(d, patient_id, issuer, exclude_study=exclude_study, calling_ae=calling_ae,
                               timeout=timeout, tls=tls) for d in destinations if d.query]
    with engine.begin() as conn:
        result = record(conn, subject_key, answers)
        for a in answers:
            srs, values = result.recorded_by_destination.get(a.destination, (0, 0))
            where = f"to={a.destination}" + (f" {context}" if context else "")
            if a.answered:
                detail = (f"{where}: {a.studies} earlier studies, {a.srs} musclenode SRs retrieved, "
                          f"{srs} recorded with {values} values")
            else:
                detail = f"{where}: no answer ({a.error})"
            db.record_audit(conn, "history-query", detail)
    for a in answers:
        if not a.answered:
            log.warning("history from %s: no answer (%s)", a.destination, a.error)
    return result
