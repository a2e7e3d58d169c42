"""What a worker does with one job: read the study's instances, quantify them, build the
SEG, SR, parametric maps and summary page, store them, and record measurements, outputs and sends in one transaction.

:func:`execute_job` is a plain top-level function of picklable arguments, so any
executor can run it (the node's process pool, or inline in the runner's thread).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.engine import Connection, Engine

import quant
from quant.errors import NeedsRoisError, QuantError
from quant.pipeline import NoDixonError
from quant.t2stage import T2Options
from reports.longitudinal import PriorValue

from . import CHATTY_LOGGERS, db, history, roisets
from .completion import requeue_for_roi_set, requeue_later_visits
from .config import Config, Destination, TLSSettings
from .db import JobState, OutboxState, StudyState
from .processing import (
    build_outputs,
    cached_atoms,
    encode,
    is_reader_seg,
    load_datasets,
    output_datasets,
    parse_date,
    prior_key,
    series_summary,
    with_summary,
)
from .store import Store
from .text import install_safe_formatter, printable

log = logging.getLogger(__name__)


#: The output kind of the summary page as Encapsulated PDF (see :func:`node.processing.output_datasets`).
PDF_KIND = "summary-pdf"
#: The output kinds a job records in its second transaction, after its SEG and SR.
LATER_KINDS = ("pmap", "summary", PDF_KIND)


@dataclass(frozen=True)
class JobContext:
    """What a worker needs to run a job (picklable)."""

    database_url: str
    data_dir: str
    destinations: tuple[str, ...] = ()
    t2_options: T2Options | None = None
    history_sources: tuple[Destination, ...] = ()   # destinations with query = true (node.history)
    calling_ae: str = "MUSCLENODE"
    query_timeout: float = 5.0
    compartments: bool = True     # automatic compartments where no reader's ROIs ([rois] compartments)
    atlases: int = 3              # other subjects' reader sets to fuse ([rois] atlases)
    pdf_destinations: tuple[str, ...] = ()   # those of ``destinations`` with pdf = true
    tls: TLSSettings | None = None   # [node.tls]: the certificates for history sources with tls = true

    def destinations_for(self, kind: str) -> tuple[str, ...]:
        """The destinations an output of ``kind`` is sent to: the summary PDF only to those
        that accept an Encapsulated PDF (``pdf = true``), every other output to all.
        """
        if kind == PDF_KIND:
            return tuple(d for d in self.destinations if d in self.pdf_destinations)
        return self.destinations



def job_context(config: Config) -> JobContext:
    """The workers' context for ``config`` (the node's, and ``musclenode reprocess``'s)."""
    return JobContext(config.database_url, str(Path(config.node.data_dir).resolve()),
                      tuple(d.name for d in config.destinations), config.t2.options(),
                      compartments=config.rois.compartments, atlases=config.rois.atlases,
                      history_sources=tuple(d for d in config.destinations if d.query),
                      calling_ae=config.node.ae_title, query_timeout=config.send.query_timeout_seconds,
                      pdf_destinations=tuple(d.name for d in config.destinations if d.pdf), tls=config.node.tls)


@functools.lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    return db.make_engine(url)


def _priors(conn, subject: str, study_uid: str, study_date: str) -> dict:
    """The subject's earlier values by :func:`prior_key`: the node's own measurements, and
    those read back from PACS (``pacs_history``) for studies it has not measured itself.
    """
    rows = conn.execute(select(db.measurements).where(and_(db.measurements.c.subject_key == subject,
                                                           db.measurements.c.study_uid != study_uid))).all()
    measured = {r.study_uid for r in rows}
    rows += [r for r in conn.execute(select(db.pacs_history).where(and_(
        db.pacs_history.c.subject_key == subject, db.pacs_history.c.study_uid != study_uid))).all()
        if r.study_uid not in measured]
    out: dict = defaultdict(list)
    for r in rows:
        d = parse_date(r.study_date)
        if d is None or (study_date and r.study_date >= study_date):
            continue
        out[prior_key(r.region, r.side, r.metric, r.roi, r.source)].append(
            PriorValue(r.study_uid, d, r.value, r.algorithm_version))
    return dict(out)


def _history_from_pacs(engine: Engine, ctx: JobContext, subject: str, study_uid: str, datasets) -> str | None:
    """For a subject the node has no earlier visit of: its history from the destinations with
    ``query`` (:func:`node.history.rebuild_history`). Returns the SR's history note
    (``"pacs-no-answer"`` when a destination did not answer), else None.
    """
    if not ctx.history_sources:
        return None
    with engine.begin() as conn:
        if history.has_earlier_visits(conn, subject, study_uid):
            return None
    ds = next(d for d in datasets if not is_reader_seg(d))
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if not patient_id:
        return None
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    result = history.rebuild_history(engine, ctx.history_sources, subject, patient_id, issuer,
                                     exclude_study=study_uid, calling_ae=ctx.calling_ae, timeout=ctx.query_timeout,
                                     context=f"study={study_uid}", tls=ctx.tls)
    log.info("history of study %s's subject from PACS: %d earlier studies, %d values recorded%s", study_uid,
             result.recorded_studies, result.recorded_values,
             f"; {len(result.unanswered)} destination(s) did not answer" if result.unanswered else "")
    return "pacs-no-answer" if result.unanswered else None


_STUDY_STATE = {JobState.DONE: StudyState.DONE, JobState.SKIPPED: StudyState.DONE, JobState.FAILED: StudyState.FAILED,
                JobState.WAITING_FOR_ROIS: StudyState.WAITING_FOR_ROIS}


def _finish(engine: Engine, job_id: int, study_uid: str, revision: int, state: JobState, message: str,
            conn: Connection | None = None) -> None:
    """Record the end of a job and its study's state (in ``conn``'s transaction, if given)."""
    if conn is None:
        with engine.begin() as own:
            return _finish(engine, job_id, study_uid, revision, state, message, own)
    conn.execute(update(db.jobs).where(db.jobs.c.id == job_id)
                 .values(state=state, finished_at=time.time(), lease_until=None, message=message,
                         algorithm_version=quant.ALGORITHM_VERSION))
    conn.execute(update(db.studies).where(and_(db.studies.c.study_uid == study_uid,
                                               db.studies.c.state == StudyState.PROCESSING,
                                               db.studies.c.revision == revision))
                 .values(state=_STUDY_STATE[state], message=message))
    db.record_audit(conn, f"job-{state.value}", f"job={job_id} study={study_uid}: {printable(message, 300)}")


def _quarantine_refused(store: Store, files, refusals, study_uid: str) -> None:
    """Quarantine each reader's SEG that cannot be used, with the reason."""
    by_sop = {f.sop_uid: f for f in files}
    for sop_uid, reason in refusals:
        refused = by_sop.get(sop_uid)
        if refused is not None:
            store.quarantine_stored(refused.id, Path(refused.path), reason, sop_uid=sop_uid, study_uid=study_uid)


def _write_outputs(store: Store, out, kinds: tuple[str, ...] | None = None) -> dict[str, tuple[str, Path]]:
    """Write the study's objects (those of ``kinds``, default all but :data:`LATER_KINDS`: the
    SEG and SR) to the store; returns ``{SOP Instance UID: (kind, path)}``.
    """
    paths = {}
    for kind, ds in output_datasets(out):
        if (kind in kinds) if kinds is not None else (kind not in LATER_KINDS):
            path = store.result_path(out.study_uid, kind, str(ds.SOPInstanceUID))
            store.write_result(path, encode(ds))
            paths[str(ds.SOPInstanceUID)] = (kind, path)
    return paths


def _record_outputs(conn, ctx: JobContext, job, paths: dict[str, tuple[str, Path]]) -> None:
    """Record the written objects of ``job`` and queue each for its destinations (same transaction)."""
    now = time.time()
    for sop_uid, (kind, path) in paths.items():
        db.insert_ignore(conn, db.outputs, dict(study_uid=job.study_uid, kind=kind, sop_uid=sop_uid,
                                                path=str(path), job_id=job.id, created_at=now))
        output_id = conn.execute(select(db.outputs.c.id).where(db.outputs.c.sop_uid == sop_uid)).scalar_one()
        for dest in ctx.destinations_for(kind) if job.send else ():   # musclenode reprocess --no-send
            db.insert_ignore(conn, db.outbox, dict(output_id=output_id, destination=dest, state=OutboxState.PENDING,
                                                   attempts=0, next_try_at=now, last_error=""))
    if paths:
        made = " ".join(f"{kind}={sop_uid}" for sop_uid, (kind, _) in paths.items())
        kept = "" if job.send or not ctx.destinations else " (not sent: --no-send)"
        db.record_audit(conn, "made", f"study={job.study_uid} job={job.id} revision={job.revision}: {made}{kept}")


def execute_job(ctx: JobContext, job_id: int) -> JobState:
    """Process the study of one job and record everything it made; returns the final state."""
    t_start = time.time()
    engine = _engine(ctx.database_url)
    store = Store(Path(ctx.data_dir), engine)
    with engine.begin() as conn:
        job = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
        study = conn.execute(select(db.studies).where(db.studies.c.study_uid == job.study_uid)).one()
        files = conn.execute(select(db.instances.c.id, db.instances.c.path, db.instances.c.sop_uid)
                             .where(db.instances.c.study_uid == job.study_uid)).all()
    datasets, rejected = load_datasets([Path(f.path) for f in files])
    by_path = {f.path: f for f in files}
    for r in rejected:  # unreadable instances leave the study for quarantine, with the reason
        row = by_path[str(r.path)]
        store.quarantine_stored(row.id, r.path, r.reason, sop_uid=row.sop_uid, study_uid=job.study_uid)
    if not [d for d in datasets if not is_reader_seg(d)]:
        _finish(engine, job_id, job.study_uid, job.revision, JobState.SKIPPED, "no MR images in this study")
        return JobState.SKIPPED
    history_note = _history_from_pacs(engine, ctx, study.subject_key, job.study_uid, datasets)
    with engine.begin() as conn:
        priors = _priors(conn, study.subject_key, job.study_uid, study.study_date)
        references = roisets.references_for(conn, study.subject_key, job.study_uid)
        atlases = roisets.atlases_for(conn, study.subject_key, ctx.atlases)
        earlier = conn.execute(select(db.outputs.c.path).where(and_(db.outputs.c.study_uid == job.study_uid,
                                                                    db.outputs.c.kind == "sr"))).scalars().all()
    previous_srs = [pydicom.dcmread(p) for p in earlier if Path(p).exists()]
    t_loaded = time.time()
    try:
        out = build_outputs(datasets, priors, previous_srs, t2_options=ctx.t2_options,
                            atoms=cached_atoms(Path(ctx.data_dir) / "cache"), carry_from=references,
                            atlases=atlases, compartments=ctx.compartments,
                            history_note=history_note if not priors else None, summary=False)
    except NeedsRoisError as exc:   # hand, head-neck: measured once a reader's ROIs arrive (or are carried)
        _quarantine_refused(store, files, exc.refusals, job.study_uid)
        _finish(engine, job_id, job.study_uid, job.revision, JobState.WAITING_FOR_ROIS, str(exc))
        log.info("job %d: study %s is waiting for ROIs", job_id, job.study_uid)
        return JobState.WAITING_FOR_ROIS
    except NoDixonError as exc:
        _finish(engine, job_id, job.study_uid, job.revision, JobState.SKIPPED, str(exc))
        log.warning("job %d: %s", job_id, printable(exc, 300))
        return JobState.SKIPPED
    except QuantError as exc:
        _finish(engine, job_id, job.study_uid, job.revision, JobState.FAILED, f"{type(exc).__name__}: {exc}")
        log.error("job %d failed: %s", job_id, printable(exc, 300))
        return JobState.FAILED
    _quarantine_refused(store, files, out.analysis.roi_refusals, job.study_uid)
    t_built = time.time()
    # SEG and SR are recorded (and so sent) first; the parametric maps, the summary page, the
    # measurements and the rest follow in a second transaction, so that PACS has the results
    # about a second sooner and the database shows a study's values only with all its outputs.
    # A crash between the two runs the job again: the same inputs make the same UIDs, so
    # nothing is recorded or sent twice.
    paths = _write_outputs(store, out)
    with engine.begin() as conn:
        _record_outputs(conn, ctx, job, paths)
    _tell_recorded()
    t_sent = time.time()
    out = with_summary(out)
    page = _write_outputs(store, out, kinds=LATER_KINDS)
    reference = roisets.reference_of(out.analysis)
    new_roi_set = False
    with engine.begin() as conn:
        before = {prior_key(r.region, r.side, r.metric, r.roi, r.source): (r.value, r.algorithm_version)
                  for r in conn.execute(
            select(db.measurements).where(db.measurements.c.study_uid == job.study_uid))}
        conn.execute(delete(db.measurements).where(db.measurements.c.study_uid == job.study_uid))
        for m in out.analysis.measurements:
            conn.execute(insert(db.measurements).values(
                subject_key=study.subject_key, study_uid=job.study_uid, study_date=study.study_date,
                region=m.region, side=m.side.value, metric=m.metric, value=m.value, unit=m.unit,
                algorithm_version=m.algorithm_version, model=m.model, job_id=job_id,
                roi=m.roi, source=m.source if m.roi else ""))
        roisets.record_study_rois(conn, job.study_uid, out.analysis)
        if reference is not None:
            new_roi_set = roisets.keep_reference(store, conn, study.subject_key, job.study_uid, study.study_date,
                                                 reference)
        conn.execute(delete(db.series).where(db.series.c.study_uid == job.study_uid))
        for uid, kind, reason, desc in series_summary(out.analysis):
            conn.execute(insert(db.series).values(study_uid=job.study_uid, series_uid=uid, kind=kind,
                                                  reason=reason, description=desc))
        _record_outputs(conn, ctx, job, page)
        notes = "; ".join([*out.analysis.notes, *(["earlier visits not retrieved: PACS did not answer"]
                                                  if history_note and not priors else [])])
        _finish(engine, job_id, job.study_uid, job.revision, JobState.DONE,
                f"{len(out.analysis.measurements)} measurements, region {out.analysis.segmentation.region.value} "
                f"({out.analysis.segmentation.region_reason})" + (f"; {notes}" if notes else ""), conn)
    after = {prior_key(m.region, m.side.value, m.metric, m.roi, m.source): (m.value, m.algorithm_version)
             for m in out.analysis.measurements}
    cause = dict(trigger=job.trigger, send=job.send, version_note=job.version_note)   # passed on to the re-queued
    if new_roi_set and reference is not None:   # a reader's new ROI set: the subject's other visits are measured in it
        requeue_for_roi_set(engine, study.subject_key, job.study_uid, reference.region, **cause)
    if after != before:  # new or changed values (or version): later visits compare against them
        requeue_later_visits(engine, study.subject_key, job.study_uid, study.study_date, **cause)
    log.info("job %d done: study %s in %.1f s (read %.1f s, analysis and SEG/SR %.1f s, store %.1f s, "
             "maps and summary page %.1f s)", job_id, job.study_uid, time.time() - t_start, t_loaded - t_start,
             t_built - t_loaded, t_sent - t_built, time.time() - t_sent)
    return JobState.DONE


#: Called when a job has recorded its SEG and SR (before its maps and summary page): the node's
#: process pool sets an event the node waits on (:func:`_init_worker`), so that its sender
#: starts at once rather than at its next poll. None: nobody to tell (Dask, a command).
_results_recorded: Callable[[], None] | None = None


def _tell_recorded() -> None:
    if _results_recorded is not None:
        try:
            _results_recorded()
        except Exception:   # a wake-up only: the sender's poll finds the rows anyway
            log.debug("could not tell the node that results were recorded", exc_info=True)


#: How much lower than the node's the CPU priority of its worker processes is (``nice``).
WORKER_NICENESS = 10


def _init_worker(level: int, threads: int | None = None, recorded=None) -> None:
    """Spawned workers start with no logging set up: give them the parent's level and
    format, so that what a job logs reaches the node's log (stderr, journald). They run
    :data:`WORKER_NICENESS` below the node's priority, and numba's parallel kernels on
    ``threads`` threads (:func:`node.jobs.kernel_threads`; None: numba's default). ``recorded``
    (a ``multiprocessing`` event of the node) is set each time a job has recorded its results.
    """
    global _results_recorded
    if recorded is not None:
        _results_recorded = recorded.set
    if threads is not None:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    install_safe_formatter()
    try:   # below the node's priority: the SCP's threads get a busy CPU first (ingest during a job)
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):   # no nice() on this platform
        pass
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
