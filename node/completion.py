"""Study completion: a study is complete, and its job queued, as soon as the series its
protocol expects are all complete (``[[protocols]]``, :mod:`node.protocols`), or, as the
fallback for a study that matches no protocol or never completes, when no instance
arrived for ``complete_after_seconds``. Completion is a row update plus a job row in one
transaction, so a restart resumes: the quiet time counts from the last instance
received (a stored time), not from the restart. A visit with new values also re-queues
the subject's later visits, so that their SRs compare against it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine

from . import db
from .config import Protocol
from .db import JobState, StudyState
from .loop import PollingLoop
from .protocols import readiness

log = logging.getLogger(__name__)


def queue_job(conn: Connection, study_uid: str, revision: int, now: float, *, trigger: str = "", send: bool = True,
              version_note: str = "") -> int:
    """Insert the pending job of a study's new revision; returns its id. ``trigger``, ``send``
    and ``version_note`` go to the job's columns (``"reprocess"``: ``musclenode reprocess``).
    """
    key = conn.execute(insert(db.jobs).values(study_uid=study_uid, revision=revision, state=JobState.PENDING,
                                              attempts=0, created_at=now, message="", trigger=trigger, send=send,
                                              version_note=version_note)).inserted_primary_key
    if key is None:   # only for a multi-row insert
        raise RuntimeError("the job insert returned no primary key")
    return key[0]


def complete_quiet_studies(engine: Engine, quiet_seconds: float, now: float | None = None) -> list[int]:
    """Mark every quiet ``receiving`` study complete and queue a job for it; return the job ids."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        rows = conn.execute(select(db.studies.c.study_uid, db.studies.c.revision, db.studies.c.last_received_at)
                            .where(and_(db.studies.c.state == StudyState.RECEIVING,
                                        db.studies.c.last_received_at <= now - quiet_seconds))).all()
    created = []
    for row in rows:
        job_id = _complete(engine, row, now, f"quiet for {quiet_seconds:g} s")
        if job_id is not None:
            created.append(job_id)
    return created


#: The ``instances`` columns :func:`node.protocols.readiness` reads.
_FACT_COLUMNS = (db.instances.c.series_uid, db.instances.c.sop_class_uid, db.instances.c.header,
                 db.instances.c.echo_times, db.instances.c.images_in_acquisition, db.instances.c.echo_train_length,
                 db.instances.c.temporal_positions, db.instances.c.echo_number, db.instances.c.temporal_position,
                 db.instances.c.slice_key, db.instances.c.n_frames, db.instances.c.received_at)


def complete_protocol_studies(engine: Engine, protocols: Sequence[Protocol], now: float | None = None,
                              checked: dict[str, tuple] | None = None) -> list[int]:
    """Mark every ``receiving`` study that is ready by its protocol complete and queue a job
    for it at once; return the job ids. ``checked`` (kept by the caller between calls) holds
    the studies found not ready, so that one is looked at again only when an instance arrived.
    """
    if not protocols:
        return []
    now = time.time() if now is None else now
    checked = {} if checked is None else checked
    with engine.begin() as conn:
        studies = conn.execute(select(db.studies.c.study_uid, db.studies.c.revision, db.studies.c.last_received_at,
                                      db.studies.c.n_instances)
                               .where(db.studies.c.state == StudyState.RECEIVING)).all()
    for uid in set(checked) - {s.study_uid for s in studies}:
        del checked[uid]
    created = []
    for study in studies:
        key = (study.revision, study.n_instances, study.last_received_at)
        if checked.get(study.study_uid) == key:
            continue
        with engine.begin() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(*_FACT_COLUMNS)
                                                           .where(db.instances.c.study_uid == study.study_uid))]
            reopened_at = conn.execute(select(func.max(db.jobs.c.created_at))
                                       .where(db.jobs.c.study_uid == study.study_uid)).scalar()
        try:
            verdict = readiness(protocols, rows, reopened_at)
        except Exception:   # a header nobody foresaw: this study falls back to the quiet time, the others go on
            log.exception("study %s: cannot tell whether its protocol's series are complete", study.study_uid)
            checked[study.study_uid] = key
            continue
        if not verdict.ready:
            log.debug("study %s not ready: %s", study.study_uid, verdict.reason)
            checked[study.study_uid] = key
            continue
        job_id = _complete(engine, study, now, verdict.reason)
        if job_id is not None:
            created.append(job_id)
    return created


def _complete(engine: Engine, row, now: float, why: str) -> int | None:
    """Mark study ``row`` complete and queue its job, unless an instance arrived since it was
    read (another ``last_received_at``); returns the job id, or None.
    """
    with engine.begin() as conn:
        res = conn.execute(update(db.studies)
                           .where(and_(db.studies.c.study_uid == row.study_uid,
                                       db.studies.c.state == StudyState.RECEIVING,
                                       db.studies.c.last_received_at == row.last_received_at))
                           .values(state=StudyState.COMPLETE, revision=row.revision + 1))
        if res.rowcount != 1:
            return None
        job_id = queue_job(conn, row.study_uid, row.revision + 1, now)
        db.record_audit(conn, "study-complete", f"study={row.study_uid} revision={row.revision + 1} job={job_id} "
                        f"by={why}")
    log.info("study %s complete (revision %d, %s): job %d queued", row.study_uid, row.revision + 1, why, job_id)
    return job_id


def requeue_later_visits(engine: Engine, subject_key: str, study_uid: str, study_date: str, *,
                         trigger: str = "", send: bool = True, version_note: str = "") -> list[int]:
    """Queue a new revision of every processed later visit of the subject, because a
    visit before them (``study_date``) has new or changed values: an earlier visit
    that arrives late, or is reprocessed, must show up as the baseline or previous visit
    in the later visits' SRs. Their new SRs supersede the old ones. Returns the job ids.

    Only a job whose values changed calls this, so re-comparing does not cascade: a later
    visit's own values do not change when only its comparisons do. ``trigger``, ``send`` and
    ``version_note`` are the causing job's columns, passed on to the new jobs, so that a
    reprocessing run's re-comparisons are part of it (and not sent with ``--no-send``).
    """
    if not subject_key or not study_date:
        return []
    return _requeue(engine, subject_key, study_uid, db.studies.c.study_date > study_date,
                    f"re-compare: an earlier visit ({study_date}) has new values", "study-recompare",
                    f"earlier={study_uid}", job=dict(trigger=trigger, send=send, version_note=version_note))


def requeue_for_roi_set(engine: Engine, subject_key: str, study_uid: str, region: str, *,
                        trigger: str = "", send: bool = True, version_note: str = "") -> list[int]:
    """Queue a new revision of every other processed visit of the subject measured as
    ``region`` that has no reader ROI set of its own there: a reader's new ROI set (drawn on
    ``study_uid``) is carried to them and they are measured again in it. Returns the job ids
    (``trigger``, ``send``, ``version_note``: the causing job's columns, as for
    :func:`requeue_later_visits`).
    """
    if not subject_key:
        return []
    measured_here = select(db.measurements.c.study_uid).where(db.measurements.c.region == region)
    own = select(db.roi_sets.c.study_uid).where(and_(db.roi_sets.c.subject_key == subject_key,
                                                     db.roi_sets.c.region == region))
    which = or_(and_(db.studies.c.study_uid.in_(measured_here), db.studies.c.study_uid.not_in(own)),
                db.studies.c.state == StudyState.WAITING_FOR_ROIS)
    return _requeue(engine, subject_key, study_uid, which,
                    f"ROIs: a reader's ROI set drawn on study {study_uid} is carried to this visit",
                    "study-carry-rois", f"rois-from={study_uid}", waiting=True,
                    job=dict(trigger=trigger, send=send, version_note=version_note))


def _requeue(engine: Engine, subject_key: str, study_uid: str, which, message: str, event: str,
             detail: str, waiting: bool = False, job: dict | None = None) -> list[int]:
    """Queue a new revision of the subject's other processed, measured studies matching
    ``which`` (``waiting``: studies waiting for ROIs too).
    """
    now = time.time()
    created = []
    with engine.begin() as conn:
        measured = select(db.measurements.c.study_uid).distinct()
        ready = and_(db.studies.c.state.in_((StudyState.DONE, StudyState.PROCESSING)),
                     db.studies.c.study_uid.in_(measured))
        if waiting:
            ready = or_(ready, db.studies.c.state == StudyState.WAITING_FOR_ROIS)
        rows = conn.execute(select(db.studies.c.study_uid, db.studies.c.revision, db.studies.c.state)
                            .where(and_(db.studies.c.subject_key == subject_key,
                                        db.studies.c.study_uid != study_uid,
                                        which, ready))).all()
        for row in rows:
            res = conn.execute(update(db.studies)
                               .where(and_(db.studies.c.study_uid == row.study_uid,
                                           db.studies.c.revision == row.revision,
                                           db.studies.c.state == row.state))
                               .values(state=StudyState.COMPLETE, revision=row.revision + 1, message=message))
            if res.rowcount != 1:
                continue
            job_id = queue_job(conn, row.study_uid, row.revision + 1, now, **(job or {}))
            db.record_audit(conn, event, f"study={row.study_uid} revision={row.revision + 1} job={job_id} {detail}")
            created.append(job_id)
    for job_id in created:
        log.info("job %d queued (%s, %s)", job_id, event, detail)
    return created


class CompletionMonitor(PollingLoop):
    """The loop that completes studies ready by protocol (at once when woken by a new
    instance) and quiet studies (every ``poll_seconds``), and calls ``on_complete`` (e.g.
    wake the job runner) when it queued a job. Ticks are at least ``min_interval_seconds``
    apart, so that a stream of instances does not keep it busy.
    """

    thread_name = "musclenode-completion"

    def __init__(self, engine: Engine, quiet_seconds: float, *, protocols: Sequence[Protocol] = (),
                 poll_seconds: float = 0.5, min_interval_seconds: float = 0.1,
                 on_complete: Callable[[], None] = lambda: None):
        super().__init__(poll_seconds)
        self.engine, self.quiet = engine, quiet_seconds
        self.protocols = tuple(protocols)
        self.min_interval = min_interval_seconds
        self.on_complete = on_complete
        self._checked: dict[str, tuple] = {}
        self._last_tick = 0.0

    def tick(self) -> None:
        """Complete the studies ready by protocol, then the quiet ones; wake whoever waits for
        jobs if any was queued.
        """
        pause = self._last_tick + self.min_interval - time.monotonic()
        if pause > 0 and self._stop.wait(pause):
            return
        self._last_tick = time.monotonic()
        created = complete_protocol_studies(self.engine, self.protocols, checked=self._checked)
        created += complete_quiet_studies(self.engine, self.quiet)
        if created:
            self.on_complete()
