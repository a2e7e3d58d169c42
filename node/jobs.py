"""The job queue: one row per study revision to process; a runner claims rows atomically
(with a lease) and runs :func:`node.worker.execute_job` in a local process pool (or inline).

Several nodes may share one database (``musclenode serve --role worker``, README "Several
nodes"): a claim names its holder (``jobs.claimed_by``, ``"host:pid"``), on PostgreSQL it
locks the row it takes (``SELECT ... FOR UPDATE SKIP LOCKED``), and the holder renews its
lease (every ``lease_seconds / 3``) while the job runs. A job whose holder died is taken
over by any runner once its lease has run out, as a new attempt (``[jobs] max_attempts``).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import and_, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .db import JobState, StudyState
from .holders import dead_local_holders, node_id
from .loop import PollingLoop
from .text import printable
from .warmup import warm_up
from .worker import JobContext, _finish, _init_worker, execute_job

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


def kernel_threads(workers: int, cores: int | None = None) -> int:
    """Threads of numba's parallel kernels in each of ``workers`` local worker processes: the cores
    shared among them (at least 1). One worker keeps every core (a single study is fastest); two
    workers on two cores get one thread each, since OpenMP threads spin while they wait and two
    jobs with a thread per core made 0.53x the studies per minute of one (``bench/scale.py``).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, cores // max(1, workers))


_SPAWN = multiprocessing.get_context("spawn")


def _new_pool(workers: int, recorded=None) -> cf.ProcessPoolExecutor:
    """A pool of ``workers`` spawned worker processes; each sets the event ``recorded`` when a job
    has recorded its results (:func:`node.worker._init_worker`).
    """
    return cf.ProcessPoolExecutor(workers, mp_context=_SPAWN, initializer=_init_worker,
                                  initargs=(logging.getLogger().getEffectiveLevel(), kernel_threads(workers),
                                            recorded))


def _lost_message(attempts: int) -> str:
    return (f"gave up after {attempts} attempt(s): the worker (or the node) died during each "
            "([jobs] max_attempts)")


def _give_up(engine: Engine, job_id: int, study_uid: str, revision: int, attempts: int, still_running) -> bool:
    """Mark a job whose every attempt was lost ``failed`` (only while ``still_running`` holds
    for its row); its study too. True if this call failed it.
    """
    with engine.begin() as conn:
        failed = _give_up_in(conn, job_id, study_uid, revision, attempts, still_running)
    if failed:
        log.error("job %d (study %s): %s", job_id, study_uid, _lost_message(attempts))
    return failed


def _give_up_in(conn: Connection, job_id: int, study_uid: str, revision: int, attempts: int, still_running) -> bool:
    """:func:`_give_up` inside the caller's transaction."""
    message = _lost_message(attempts)
    res = conn.execute(update(db.jobs).where(and_(db.jobs.c.id == job_id, still_running))
                       .values(state=JobState.FAILED, finished_at=time.time(), lease_until=None, message=message))
    if res.rowcount != 1:
        return False
    conn.execute(update(db.studies).where(and_(db.studies.c.study_uid == study_uid,
                                               db.studies.c.revision == revision,
                                               db.studies.c.state.in_((StudyState.COMPLETE,
                                                                       StudyState.PROCESSING))))
                 .values(state=StudyState.FAILED, message=message))
    db.record_audit(conn, "job-failed", f"job={job_id} study={study_uid}: {message}")
    return True


def claim_job(engine: Engine, lease_seconds: float, now: float | None = None,
              max_attempts: int = MAX_ATTEMPTS, claimed_by: str | None = None) -> tuple[int, str] | None:
    """Atomically claim the oldest pending job (or one whose lease ran out) for ``claimed_by``
    (default :func:`node_id`); a job whose lease ran out on its ``max_attempts``-th attempt is
    failed instead of run again.

    On PostgreSQL the candidates are read with ``SELECT ... FOR UPDATE SKIP LOCKED`` and the
    claim is made in the same transaction, so that runners on several hosts never take the
    same job and never wait for one another. On SQLite (one writer at a time) the claim is a
    conditional ``UPDATE ... WHERE state = 'pending'`` (or lease run out) whose row count
    tells whether this call won it.
    """
    now = time.time() if now is None else now
    holder = claimed_by or node_id()
    lost = and_(db.jobs.c.state == JobState.RUNNING, db.jobs.c.lease_until < now)
    claimable = or_(db.jobs.c.state == JobState.PENDING, and_(lost, db.jobs.c.attempts < max_attempts))
    query = (select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.revision, db.jobs.c.state, db.jobs.c.attempts,
                    db.jobs.c.claimed_by)
             .where(or_(db.jobs.c.state == JobState.PENDING, lost)).order_by(db.jobs.c.id).limit(5))
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for c in conn.execute(query.with_for_update(skip_locked=True)).all():
                if c.state == JobState.RUNNING and c.attempts >= max_attempts:
                    if _give_up_in(conn, c.id, c.study_uid, c.revision, c.attempts, lost):
                        log.error("job %d (study %s): %s", c.id, c.study_uid, _lost_message(c.attempts))
                    continue
                if _take(conn, c, claimable, holder, lease_seconds, now):
                    return c.id, c.study_uid
        return None
    with engine.begin() as conn:
        cands = conn.execute(query).all()
    for c in cands:
        if c.state == JobState.RUNNING and c.attempts >= max_attempts:
            _give_up(engine, c.id, c.study_uid, c.revision, c.attempts, lost)
            continue
        with engine.begin() as conn:
            if _take(conn, c, claimable, holder, lease_seconds, now):
                return c.id, c.study_uid
    return None


def _take(conn: Connection, c, claimable, holder: str, lease_seconds: float, now: float) -> bool:
    """Claim job row ``c`` for ``holder`` if ``claimable`` still holds for it; its study is then
    ``processing``. A job taken over from a holder whose lease ran out is audited. True if taken.
    """
    res = conn.execute(update(db.jobs).where(and_(db.jobs.c.id == c.id, claimable))
                       .values(state=JobState.RUNNING, attempts=db.jobs.c.attempts + 1, started_at=now,
                               lease_until=now + lease_seconds, claimed_by=holder))
    if res.rowcount != 1:
        return False
    conn.execute(update(db.studies).where(and_(db.studies.c.study_uid == c.study_uid,
                                               db.studies.c.state == StudyState.COMPLETE,
                                               db.studies.c.revision == c.revision))
                 .values(state=StudyState.PROCESSING))
    if c.state == JobState.RUNNING:
        db.record_audit(conn, "job-takeover", f"job={c.id} study={c.study_uid} attempt={c.attempts + 1} "
                        f"from={c.claimed_by or '?'} by={holder}: its lease ran out")
        log.warning("job %d (study %s): taken over from %s, whose lease ran out (attempt %d)", c.id, c.study_uid,
                    c.claimed_by or "?", c.attempts + 1)
    return True


def requeue_running(engine: Engine, max_attempts: int = MAX_ATTEMPTS, *, holders: set[str] | None = None) -> int:
    """On start of a single node: jobs left running by a previous process run again, unless
    that was their ``max_attempts``-th attempt (the node, or the worker, died each time):
    those are failed with the reason. Returns how many were queued again.

    With ``holders``, only the running jobs claimed by one of them (``jobs.claimed_by``): on a
    database shared by several nodes, a node requeues only what its own dead predecessors held
    (:func:`dead_local_holders`), never a job another node is running.
    """
    running = db.jobs.c.state == JobState.RUNNING
    if holders is not None:
        if not holders:
            return 0
        running = and_(running, db.jobs.c.claimed_by.in_(sorted(holders)))
    with engine.begin() as conn:
        left = conn.execute(select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.revision, db.jobs.c.attempts)
                            .where(running)).all()
    for job in left:
        if job.attempts >= max_attempts:
            _give_up(engine, job.id, job.study_uid, job.revision, job.attempts, running)
    with engine.begin() as conn:
        res = conn.execute(update(db.jobs).where(and_(running, db.jobs.c.attempts < max_attempts))
                           .values(state=JobState.PENDING, lease_until=None, claimed_by=""))
        if res.rowcount:
            db.record_audit(conn, "jobs-resumed", f"{res.rowcount} job(s) left running by a previous start")
        return res.rowcount


def requeue_dead_local(engine: Engine, max_attempts: int = MAX_ATTEMPTS) -> int:
    """On start of a node that shares its database: requeue the running jobs claimed on this
    host by a process that is gone (:func:`dead_local_holders`); returns how many. Jobs held
    by other hosts are left to their lease.
    """
    with engine.begin() as conn:
        holders = set(conn.execute(select(db.jobs.c.claimed_by).distinct()
                                   .where(db.jobs.c.state == JobState.RUNNING)).scalars())
    return requeue_running(engine, max_attempts, holders=dead_local_holders(holders))


def renew_leases(engine: Engine, job_ids: list[int], lease_seconds: float, holder: str,
                 now: float | None = None) -> int:
    """Extend the lease of the jobs ``job_ids`` that are still running under ``holder``'s claim
    to ``now + lease_seconds``; returns how many were renewed (fewer: a job was taken over).
    """
    if not job_ids:
        return 0
    now = time.time() if now is None else now
    with engine.begin() as conn:
        res = conn.execute(update(db.jobs).where(and_(db.jobs.c.id.in_(job_ids),
                                                      db.jobs.c.state == JobState.RUNNING,
                                                      db.jobs.c.claimed_by == holder))
                           .values(lease_until=now + lease_seconds))
        return res.rowcount


class LeaseKeeper(PollingLoop):
    """The heartbeat of a job runner: every ``lease_seconds / 3`` it renews the lease of the jobs
    the runner holds, so that a long job is not taken over while its node lives.
    """

    thread_name = "musclenode-lease"

    def __init__(self, engine: Engine, lease_seconds: float, held: Callable[[], list[int]], holder: str):
        super().__init__(lease_seconds / 3)
        self.engine, self.lease, self.held, self.holder = engine, lease_seconds, held, holder

    def tick(self) -> None:
        """Renew the leases of the jobs held now."""
        ids = self.held()
        renewed = renew_leases(self.engine, ids, self.lease, self.holder)
        if renewed < len(ids):
            log.warning("lease of %d of %d running job(s) not renewed: taken over by another node, or finished",
                        len(ids) - renewed, len(ids))


class JobRunner(PollingLoop):
    """Claims jobs and runs them, ``workers`` at a time, in processes or inline."""

    thread_name = "musclenode-jobs"
    stop_timeout_seconds = 30.0

    def __init__(self, engine: Engine, ctx: JobContext, *, executor: str = "process", workers: int = 1,
                 lease_seconds: float = 600.0, poll_seconds: float = 0.5,
                 on_done: Callable[[], None] | None = None,
                 warm_up_timeout: float = 600.0, max_attempts: int = MAX_ATTEMPTS, claimed_by: str | None = None,
                 scheduler_address: str = ""):
        super().__init__(poll_seconds)
        self.engine, self.ctx = engine, ctx
        self.kind, self.workers = executor, workers
        self.lease = lease_seconds
        self.max_attempts = max_attempts
        self.warm_up_timeout = warm_up_timeout
        self.scheduler_address = scheduler_address   # executor "dask": the Dask scheduler (node.dask_executor)
        self.on_done = on_done or (lambda: None)   # called when a job ends (e.g. wake the sender)
        # set by a worker process when a job has recorded its SEG and SR: on_done is called then
        # too (the sender starts before the job has made its maps and summary page)
        self._recorded = _SPAWN.Event() if executor == "process" else None
        self._recorded_thread: threading.Thread | None = None
        self._pool: cf.Executor | None = None
        self._running: dict[cf.Future, int] = {}
        self._unrecorded: list[tuple[int, BaseException]] = []   # crashes the database did not take yet
        self.holder = claimed_by or node_id()   # jobs.claimed_by of what this runner claims
        self._held: set[int] = set()            # the jobs it runs now, whose leases the keeper renews
        self._held_lock = threading.Lock()
        self.keeper = LeaseKeeper(engine, lease_seconds, self.held, self.holder)

    def held(self) -> list[int]:
        """The ids of the jobs this runner holds (claimed and not yet collected)."""
        with self._held_lock:
            return sorted(self._held)

    def _hold(self, job_id: int, holding: bool) -> None:
        with self._held_lock:
            (self._held.add if holding else self._held.discard)(job_id)

    def start(self) -> None:
        """Start the worker pool and the runner thread; with process workers, returns once each
        worker has compiled or loaded the numba kernels (or ``warm_up_timeout`` has passed); with
        ``dask``, once the scheduler answered and its workers did the same
        (:class:`node.dask_executor.SchedulerUnreachable` if it did not answer).
        """
        if self.kind == "process":
            self._pool = _new_pool(self.workers, self._recorded)
            # every worker compiles (fresh install) or loads (cached) the kernels before the
            # node accepts its first association, so the first study is as fast as the rest
            cache = str(Path(self.ctx.data_dir) / "cache")   # the node's EPG tables: built once, then loaded
            warming = [self._pool.submit(warm_up, cache) for _ in range(self.workers)]
            done, _ = cf.wait(warming, timeout=self.warm_up_timeout)
            seconds = [f.result() for f in done if f.exception() is None]
            log.info("%d worker(s) ready (warm-up %s s)", len(seconds), ", ".join(f"{s:.1f}" for s in seconds))
        elif self.kind == "dask":   # jobs as tasks of a Dask cluster; ``workers`` = jobs in flight at once
            from .dask_executor import start_dask_executor
            self._pool = start_dask_executor(self.scheduler_address, str(Path(self.ctx.data_dir) / "cache"),
                                             warm_up_timeout=self.warm_up_timeout)
        self.keeper.start()
        if self._recorded is not None:
            self._recorded_thread = threading.Thread(target=self._watch_recorded, name="musclenode-jobs-recorded",
                                                     daemon=True)
            self._recorded_thread.start()
        super().start()

    def _watch_recorded(self) -> None:
        """Call ``on_done`` each time a worker process says a job recorded its results."""
        event = self._recorded
        while event is not None and not self.stopping:
            if event.wait(timeout=0.5):
                event.clear()
                self.on_done()

    def _job_ended(self, _future=None) -> None:
        self.wake()          # a worker is free
        self.on_done()

    def stop(self) -> None:
        """Stop the runner thread and the pool; jobs not yet started are cancelled."""
        super().stop()
        self.keeper.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def tick(self) -> None:
        """Collect finished jobs, then claim and start jobs while a worker is free."""
        for job_id, lost in self._unrecorded[:]:   # the database was away when they crashed
            self._unrecorded.remove((job_id, lost))
            self._crashed(job_id, lost)
        for fut in [f for f in self._running if f.done()]:
            job_id = self._running.pop(fut)
            self._hold(job_id, False)
            exc = fut.exception()
            if exc is not None:
                self._crashed(job_id, exc)
        while len(self._running) < self.workers and not self.stopping:
            claimed = claim_job(self.engine, self.lease, max_attempts=self.max_attempts, claimed_by=self.holder)
            if claimed is None:
                return
            job_id, study_uid = claimed
            log.info("job %d: processing study %s", job_id, study_uid)
            self._hold(job_id, True)
            if self._pool is None:
                try:
                    execute_job(self.ctx, job_id)
                except Exception as exc:
                    self._crashed(job_id, exc)
                finally:
                    self._hold(job_id, False)
                self.on_done()
            else:
                try:
                    fut = self._pool.submit(execute_job, self.ctx, job_id)
                except RuntimeError as exc:  # a broken pool: make a new one, retry later
                    self._hold(job_id, False)
                    self._crashed(job_id, exc)
                    return
                self._running[fut] = job_id
                fut.add_done_callback(self._job_ended)

    def _crashed(self, job_id: int, exc: BaseException) -> None:
        log.error("job %d crashed: %s: %s", job_id, type(exc).__name__, printable(exc, 300))
        if isinstance(exc, cf.process.BrokenProcessPool) and self._pool is not None:
            self._pool = _new_pool(self.workers, self._recorded)
        try:
            self._record_crash(job_id, exc)
        except SQLAlchemyError:   # the database is away (PostgreSQL restarting): recorded on a later tick
            log.warning("job %d: its crash is recorded once the database answers", job_id)
            self._unrecorded.append((job_id, exc))

    def _record_crash(self, job_id: int, exc: BaseException) -> None:
        with self.engine.begin() as conn:
            job = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
        if job.state != JobState.RUNNING or job.claimed_by not in (self.holder, ""):
            log.warning("job %d: not recorded as crashed here, %s holds it now", job_id, job.claimed_by or "nobody")
            return
        if job.attempts < self.max_attempts:
            with self.engine.begin() as conn:
                conn.execute(update(db.jobs).where(db.jobs.c.id == job_id)
                             .values(state=JobState.PENDING, lease_until=None, claimed_by="",
                                     message=f"attempt {job.attempts} crashed: {type(exc).__name__}: {exc}"))
        else:
            lost = " (the worker process died)" if isinstance(exc, cf.process.BrokenProcessPool) else ""
            _finish(self.engine, job_id, job.study_uid, job.revision, JobState.FAILED,
                    f"crashed {job.attempts} times{lost}; last: {type(exc).__name__}: {exc} ([jobs] max_attempts)")
