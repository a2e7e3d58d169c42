"""Jobs: one row per study revision to process; a runner claims rows atomically (with a
lease) and runs :func:`execute_job` in a local process pool (or inline).

:func:`execute_job` is a plain top-level function of picklable arguments, so any
executor (a process pool here, a Dask cluster later) can run it; it records its results
in the database itself, in one transaction.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import multiprocessing
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.engine import Engine

from quant.errors import QuantError
from quant.pipeline import NoDixonError
from reports.longitudinal import PriorValue

from . import CHATTY_LOGGERS, db
from .processing import build_outputs, cached_atoms, encode, load_datasets, parse_date, series_summary
from .store import Store
from .studies import requeue_later_visits

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class JobContext:
    """What a worker needs to run a job (picklable)."""

    database_url: str
    data_dir: str
    destinations: tuple[str, ...] = ()
    t2_options: object = None     # quant.t2stage.T2Options


@functools.lru_cache(maxsize=4)
def _engine(url: str) -> Engine:
    return db.make_engine(url)


def _priors(conn, subject: str, study_uid: str, study_date: str) -> dict:
    rows = conn.execute(select(db.measurements).where(and_(db.measurements.c.subject_key == subject,
                                                           db.measurements.c.study_uid != study_uid))).all()
    out: dict = defaultdict(list)
    for r in rows:
        d = parse_date(r.study_date)
        if d is None or (study_date and r.study_date >= study_date):
            continue
        out[(r.region, r.side, r.metric)].append(PriorValue(r.study_uid, d, r.value))
    return dict(out)


def _finish(engine: Engine, job_id: int, study_uid: str, revision: int, state: str, message: str) -> None:
    now = time.time()
    with engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == job_id)
                     .values(state=state, finished_at=now, lease_until=None, message=message))
        conn.execute(update(db.studies).where(and_(db.studies.c.study_uid == study_uid,
                                                   db.studies.c.state == "processing",
                                                   db.studies.c.revision == revision))
                     .values(state="done" if state in ("done", "skipped") else "failed", message=message))
        db.record_audit(conn, f"job-{state}", f"job={job_id} study={study_uid}: {message}")


def execute_job(ctx: JobContext, job_id: int) -> str:
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
        if r.path.exists():
            store.quarantine(None, r.reason, sop_uid=row.sop_uid, study_uid=job.study_uid, source=r.path)
        with engine.begin() as conn:
            conn.execute(delete(db.instances).where(db.instances.c.id == row.id))
    if not datasets:
        _finish(engine, job_id, job.study_uid, job.revision, "skipped", "no MR images in this study")
        return "skipped"
    with engine.begin() as conn:
        priors = _priors(conn, study.subject_key, job.study_uid, study.study_date)
        earlier = conn.execute(select(db.outputs.c.path).where(and_(db.outputs.c.study_uid == job.study_uid,
                                                                    db.outputs.c.kind == "sr"))).scalars().all()
    previous_srs = [pydicom.dcmread(p) for p in earlier if Path(p).exists()]
    t_loaded = time.time()
    try:
        out = build_outputs(datasets, priors, previous_srs, t2_options=ctx.t2_options,
                            atoms=cached_atoms(Path(ctx.data_dir) / "cache"))
    except NoDixonError as exc:
        _finish(engine, job_id, job.study_uid, job.revision, "skipped", str(exc))
        log.warning("job %d: %s", job_id, exc)
        return "skipped"
    except QuantError as exc:
        _finish(engine, job_id, job.study_uid, job.revision, "failed", f"{type(exc).__name__}: {exc}")
        log.error("job %d failed: %s", job_id, exc)
        return "failed"
    now = t_built = time.time()
    paths = {}
    for kind, ds in (("seg", out.seg), ("sr", out.sr)):
        path = store.result_path(out.study_uid, kind, str(ds.SOPInstanceUID))
        store.write_result(path, encode(ds))
        paths[kind] = (str(ds.SOPInstanceUID), path)
    with engine.begin() as conn:
        before = {(r.region, r.side, r.metric): r.value for r in conn.execute(
            select(db.measurements).where(db.measurements.c.study_uid == job.study_uid))}
        conn.execute(delete(db.measurements).where(db.measurements.c.study_uid == job.study_uid))
        for m in out.analysis.measurements:
            conn.execute(insert(db.measurements).values(
                subject_key=study.subject_key, study_uid=job.study_uid, study_date=study.study_date,
                region=m.region, side=m.side.value, metric=m.metric, value=m.value, unit=m.unit,
                algorithm_version=m.algorithm_version, model=m.model, job_id=job_id))
        conn.execute(delete(db.series).where(db.series.c.study_uid == job.study_uid))
        for uid, kind, reason, desc in series_summary(out.analysis):
            conn.execute(insert(db.series).values(study_uid=job.study_uid, series_uid=uid, kind=kind,
                                                  reason=reason, description=desc))
        for kind, (sop_uid, path) in paths.items():
            db.insert_ignore(conn, db.outputs, dict(study_uid=job.study_uid, kind=kind, sop_uid=sop_uid,
                                                    path=str(path), job_id=job_id, created_at=now))
            output_id = conn.execute(select(db.outputs.c.id).where(db.outputs.c.sop_uid == sop_uid)).scalar_one()
            for dest in ctx.destinations:
                db.insert_ignore(conn, db.outbox, dict(output_id=output_id, destination=dest, state="pending",
                                                       attempts=0, next_try_at=now, last_error=""))
    notes = "; ".join(out.analysis.notes)
    _finish(engine, job_id, job.study_uid, job.revision, "done",
            f"{len(out.analysis.measurements)} measurements, region {out.analysis.segmentation.region.value} "
            f"({out.analysis.segmentation.region_reason})" + (f"; {notes}" if notes else ""))
    after = {(m.region, m.side.value, m.metric): m.value for m in out.analysis.measurements}
    if after != before:  # new or changed values: later visits compare against them
        requeue_later_visits(engine, study.subject_key, job.study_uid, study.study_date)
    log.info("job %d done: study %s in %.1f s (read %.1f s, analysis and SEG/SR %.1f s, store %.1f s)",
             job_id, job.study_uid, time.time() - t_start, t_loaded - t_start, t_built - t_loaded,
             time.time() - t_built)
    return "done"


def _init_worker(level: int) -> None:
    """Spawned workers start with no logging set up: give them the parent's level and
    format, so that what a job logs reaches the node's log (stderr, journald)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def _new_pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker, initargs=(logging.getLogger().getEffectiveLevel(),))


def warm_up() -> float:
    """Import the pipeline and run its numba kernels once on tiny inputs, so that a fresh
    worker process loads the compiled kernels before the first exam arrives; returns the
    seconds it took."""
    t0 = time.time()
    import numpy as np

    from quant.epg import MeseParameters
    from quant.fatfraction import fat_fraction
    from quant.metrics import slice_sums
    from quant.t2 import build_dictionary, fit_water_t2
    fat_fraction(np.ones((1, 2, 2), np.float32), np.ones((1, 2, 2), np.float32))
    slice_sums(np.ones((1, 2, 2), np.int32), np.zeros((1, 2, 2), np.float32), 2)
    params = MeseParameters(n_echoes=4, echo_spacing_ms=10.0, profile="none")
    d = build_dictionary(params, np.arange(20.0, 25.0), np.array([0.9, 1.0, 1.1]))
    fit_water_t2(np.ones((2, 4), np.float32), d)
    return time.time() - t0


def claim_job(engine: Engine, lease_seconds: float, now: float | None = None) -> tuple[int, str] | None:
    """Atomically claim the oldest pending job (or one whose lease ran out)."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        cands = conn.execute(select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.revision)
                             .where(or_(db.jobs.c.state == "pending",
                                        and_(db.jobs.c.state == "running", db.jobs.c.lease_until < now)))
                             .order_by(db.jobs.c.id).limit(5)).all()
    for c in cands:
        with engine.begin() as conn:
            res = conn.execute(update(db.jobs).where(and_(
                db.jobs.c.id == c.id, or_(db.jobs.c.state == "pending",
                                          and_(db.jobs.c.state == "running", db.jobs.c.lease_until < now))))
                .values(state="running", attempts=db.jobs.c.attempts + 1, started_at=now,
                        lease_until=now + lease_seconds))
            if res.rowcount == 1:
                conn.execute(update(db.studies).where(and_(db.studies.c.study_uid == c.study_uid,
                                                           db.studies.c.state == "complete",
                                                           db.studies.c.revision == c.revision))
                             .values(state="processing"))
                return c.id, c.study_uid
    return None


def requeue_running(engine: Engine) -> int:
    """On start of a single node: jobs left running by a previous process run again."""
    with engine.begin() as conn:
        res = conn.execute(update(db.jobs).where(db.jobs.c.state == "running")
                           .values(state="pending", lease_until=None))
        if res.rowcount:
            db.record_audit(conn, "jobs-resumed", f"{res.rowcount} job(s) left running by a previous start")
        return res.rowcount


class JobRunner:
    """Claims jobs and runs them, ``workers`` at a time, in processes or inline."""

    def __init__(self, engine: Engine, ctx: JobContext, *, executor: str = "process", workers: int = 1,
                 lease_seconds: float = 600.0, poll_seconds: float = 0.5, on_done=None):
        self.engine, self.ctx = engine, ctx
        self.kind, self.workers = executor, workers
        self.lease, self.poll = lease_seconds, poll_seconds
        self.on_done = on_done or (lambda: None)   # called when a job ends (e.g. wake the sender)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="musclenode-jobs", daemon=True)
        self._pool: cf.Executor | None = None
        self._running: dict[cf.Future, int] = {}

    def start(self) -> None:
        if self.kind == "process":
            self._pool = _new_pool(self.workers)
            for _ in range(self.workers):  # load the kernels before the first exam, not during it
                self._pool.submit(warm_up)
        self._thread.start()

    def wake(self) -> None:
        """Look for jobs now (a study has just completed), not at the next poll."""
        self._wake.set()

    def _job_ended(self, _future=None) -> None:
        self._wake.set()     # a worker is free
        self.on_done()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # the loop must survive a database hiccup; it is logged
                log.exception("job runner loop error")
            self._wake.wait(self.poll)
            self._wake.clear()

    def _tick(self) -> None:
        for fut in [f for f in self._running if f.done()]:
            job_id = self._running.pop(fut)
            exc = fut.exception()
            if exc is not None:
                self._crashed(job_id, exc)
        while len(self._running) < self.workers and not self._stop.is_set():
            claimed = claim_job(self.engine, self.lease)
            if claimed is None:
                return
            job_id, study_uid = claimed
            log.info("job %d: processing study %s", job_id, study_uid)
            if self._pool is None:
                try:
                    execute_job(self.ctx, job_id)
                except Exception as exc:
                    self._crashed(job_id, exc)
                self.on_done()
            else:
                try:
                    fut = self._pool.submit(execute_job, self.ctx, job_id)
                except RuntimeError as exc:  # a broken pool: make a new one, retry later
                    self._crashed(job_id, exc)
                    return
                self._running[fut] = job_id
                fut.add_done_callback(self._job_ended)

    def _crashed(self, job_id: int, exc: BaseException) -> None:
        log.error("job %d crashed: %s: %s", job_id, type(exc).__name__, exc)
        if isinstance(exc, cf.process.BrokenProcessPool) and self._pool is not None:
            self._pool = _new_pool(self.workers)
        with self.engine.begin() as conn:
            job = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
        if job.attempts < MAX_ATTEMPTS:
            with self.engine.begin() as conn:
                conn.execute(update(db.jobs).where(db.jobs.c.id == job_id)
                             .values(state="pending", lease_until=None,
                                     message=f"attempt {job.attempts} crashed: {type(exc).__name__}: {exc}"))
        else:
            _finish(self.engine, job_id, job.study_uid, job.revision, "failed",
                    f"crashed {job.attempts} times; last: {type(exc).__name__}: {exc}")
