"""``musclenode reprocess``: measure a trial's studies again with the current algorithm version.

The selected studies (all, one subject's, or those on or after a date) that were last
processed by another version are queued as a new revision each (``jobs.trigger =
"reprocess"``), oldest visit first per subject, so that a later visit's SR is compared
with its earlier visits' values of the same version. Their new SRs name the old ones in
the Predecessor Documents Sequence (:func:`node.processing.build_outputs`); earlier values
of another version are never compared (:func:`node.processing.comparisons_for`).

Everything is in the database, so the command survives interruption: run it again and it
goes on with the studies not yet done at this version, and those it queued before.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection, Engine, Row

import quant

from . import db
from .completion import queue_job
from .db import JobState, StudyState

log = logging.getLogger(__name__)

#: ``jobs.trigger`` of the jobs this command queues.
TRIGGER = "reprocess"

_UNFINISHED = (JobState.PENDING, JobState.RUNNING)
#: Study states left alone: still receiving, or queued or processing by another cause.
_BUSY_STATES = (StudyState.RECEIVING, StudyState.COMPLETE, StudyState.PROCESSING)


def parse_study_date(text: str) -> str:
    """``--since``: a study date ``YYYY-MM-DD`` or ``YYYYMMDD`` as the DICOM ``YYYYMMDD``;
    ``ValueError`` otherwise.
    """
    digits = text.strip().replace("-", "")
    try:
        dt.datetime.strptime(digits, "%Y%m%d")
    except ValueError:
        raise ValueError(f"--since must be a study date YYYY-MM-DD or YYYYMMDD, got {text!r}") from None
    if len(digits) != 8:
        raise ValueError(f"--since must be a study date YYYY-MM-DD or YYYYMMDD, got {text!r}")
    return digits


def subject_matches(subject_key: str, wanted: str) -> bool:
    """Whether ``--subject`` names this subject: its subject key itself
    (``trial:<sponsor>:<subject ID>`` or ``patient:<issuer>:<Patient ID>``), or the
    Clinical Trial Subject ID or Patient ID in it.
    """
    wanted = wanted.strip()
    if subject_key == wanted:
        return True
    parts = subject_key.split(":", 2)
    return len(parts) == 3 and parts[2] == wanted


@dataclass
class Selection:
    """What one run works on: the studies it queued now (in queueing order), those a
    run before queued that are not done yet, and how many it left alone and why.
    """

    queued: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    current: int = 0        # already processed by this version
    busy: int = 0           # receiving, or queued or processing for another reason (done by this version anyway)

    @property
    def studies(self) -> list[str]:
        """Every study of the run."""
        return [*self.in_flight, *self.queued]


def _latest_jobs(conn: Connection) -> dict[str, Row]:
    """Each study's job of its highest revision."""
    out: dict[str, Row] = {}
    for j in conn.execute(select(db.jobs.c.study_uid, db.jobs.c.revision, db.jobs.c.state, db.jobs.c.trigger,
                                 db.jobs.c.algorithm_version).order_by(db.jobs.c.revision, db.jobs.c.id)):
        out[j.study_uid] = j
    return out


def _measured_versions(conn: Connection) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for uid, version in conn.execute(select(db.measurements.c.study_uid, db.measurements.c.algorithm_version)
                                     .distinct()):
        out.setdefault(uid, set()).add(version)
    return out


def processed_version(job, measured: set[str]) -> str:
    """The algorithm version a study was last processed by: its last job's, or (a job that
    ended before ``jobs.algorithm_version`` was recorded) its measurements' one version.
    """
    if job.algorithm_version:
        return job.algorithm_version
    return next(iter(measured)) if len(measured) == 1 and job.state == JobState.DONE else ""


def select_and_queue(engine: Engine, version: str, *, subject: str | None = None, since: str | None = None,
                     send: bool = False, version_note: str = "", now: float | None = None) -> Selection:
    """Queue a new revision of every selected study not processed by ``version`` (``subject``:
    a subject key, Clinical Trial Subject ID or Patient ID; ``since``: ``YYYYMMDD``, studies
    on or after it; neither: all), by subject and study date; studies with a reprocessing
    job not finished yet are taken over, not queued again. Returns the :class:`Selection`.
    """
    now = time.time() if now is None else now
    sel = Selection()
    with engine.begin() as conn:
        studies = conn.execute(select(db.studies.c.study_uid, db.studies.c.subject_key, db.studies.c.study_date,
                                      db.studies.c.state, db.studies.c.revision)).all()
        latest = _latest_jobs(conn)
        measured = _measured_versions(conn)
    chosen = [s for s in studies if (subject is None or subject_matches(s.subject_key, subject))
              and (since is None or (s.study_date and s.study_date >= since))]
    chosen.sort(key=lambda s: (s.subject_key, s.study_date, s.study_uid))
    for s in chosen:
        job = latest.get(s.study_uid)
        if job is not None and job.state in _UNFINISHED:
            if job.trigger == TRIGGER:
                sel.in_flight.append(s.study_uid)
            else:
                sel.busy += 1
            continue
        if job is None or s.state in _BUSY_STATES:
            sel.busy += 1
            continue
        if processed_version(job, measured.get(s.study_uid, set())) == version:
            sel.current += 1
            continue
        with engine.begin() as conn:
            res = conn.execute(update(db.studies)
                               .where(and_(db.studies.c.study_uid == s.study_uid,
                                           db.studies.c.revision == s.revision, db.studies.c.state == s.state))
                               .values(state=StudyState.COMPLETE, revision=s.revision + 1,
                                       message=f"reprocess: queued for {version}"))
            if res.rowcount != 1:   # it changed meanwhile (a late instance): it is processed anyway
                sel.busy += 1
                continue
            job_id = queue_job(conn, s.study_uid, s.revision + 1, now, trigger=TRIGGER, send=send,
                               version_note=version_note)
            db.record_audit(conn, "study-reprocess", f"study={s.study_uid} revision={s.revision + 1} job={job_id} "
                                                     f"version={version} send={'yes' if send else 'no'}")
        sel.queued.append(s.study_uid)
    return sel


@dataclass(frozen=True)
class Progress:
    """Where a run stands: studies finished (``failed`` of them failed) of ``total``."""

    done: int
    failed: int
    total: int

    @property
    def finished(self) -> bool:
        """Every study of the run is done (or failed)."""
        return self.done >= self.total


def progress(engine: Engine, tracked: set[str]) -> Progress:
    """How many of ``tracked`` are finished: their last job ended. Studies that got a
    reprocessing job meanwhile (a later visit re-compared) join ``tracked``.
    """
    with engine.begin() as conn:
        latest = _latest_jobs(conn)
    tracked.update(uid for uid, j in latest.items() if j.trigger == TRIGGER and j.state in _UNFINISHED)
    done = failed = 0
    for uid in tracked:
        j = latest.get(uid)
        if j is not None and j.state not in _UNFINISHED:
            done += 1
            failed += j.state == JobState.FAILED
    return Progress(done, failed, len(tracked))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressBar:
    """A one-line progress bar on ``stream``: redrawn in place on a terminal, a line per change
    otherwise (a log file, a pipe). Shows done/total, the rate (studies per minute, of this
    run) and the time left at that rate.
    """

    width = 30

    def __init__(self, stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.clock = clock
        self.t0 = clock()
        self.start_done: int | None = None
        self.last = ""

    def line(self, p: Progress) -> str:
        """The bar's text for ``p``."""
        if self.start_done is None:
            self.start_done = p.done
        filled = self.width * p.done // p.total if p.total else self.width
        minutes = (self.clock() - self.t0) / 60
        now_done = p.done - self.start_done
        rate = now_done / minutes if minutes > 0 and now_done else 0.0
        left = p.total - p.done
        eta = _duration(left / rate * 60) if rate > 0 else ("0m00s" if not left else "--")
        failed = f", {p.failed} failed" if p.failed else ""
        return (f"reprocess [{'#' * filled}{'.' * (self.width - filled)}] {p.done}/{p.total} studies{failed}  "
                f"{rate:.1f}/min  {eta} left")

    def show(self, p: Progress) -> None:
        """Draw ``p`` (on a non-terminal only when the count changed)."""
        text = self.line(p)
        if self.tty:
            self.stream.write("\r" + text.ljust(len(self.last)))
        elif text.split("  ")[0] != self.last.split("  ")[0]:
            self.stream.write(text + "\n")
        else:
            return
        self.stream.flush()
        self.last = text

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def watch(engine: Engine, tracked: set[str], bar: ProgressBar, stop: threading.Event,
          poll_seconds: float = 0.5, wake: threading.Event | None = None) -> Progress:
    """Show the run's progress until every study of ``tracked`` is finished or ``stop`` is set;
    returns the last :class:`Progress`.
    """
    wake = wake or threading.Event()
    while True:
        p = progress(engine, tracked)
        bar.show(p)
        if p.finished or stop.is_set():
            return p
        wake.wait(poll_seconds)
        wake.clear()


def studies_of(uids: Iterable[str]) -> str:
    """How many studies, in words."""
    n = len(list(uids))
    return f"{n} stud{'y' if n == 1 else 'ies'}"


def version() -> str:
    """The current algorithm version (what measurements and jobs are compared with)."""
    return quant.ALGORITHM_VERSION
