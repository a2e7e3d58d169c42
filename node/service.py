"""The running node: SCP + study completion + job runner + sender, over one database.

On start it resumes what the database says is unfinished: studies still receiving
complete once quiet (counting from their last instance), jobs left running run again,
and sends not yet acknowledged are retried.

Its role (``[node] role``, ``musclenode serve --role``) says which parts one process runs,
so that several processes on several hosts can share one database and one storage root:

- ``receiver``: the SCP (plain and TLS ports) and the completion monitor;
- ``worker``: the job runner (with its lease heartbeat), the sender, and the completion
  monitor too, so that quiet studies complete even while no receiver runs (completing is
  a conditional row update: the study completes once, whoever sees it first); no DICOM port;
- ``all`` (the default): everything, a single node.

The web server runs in any role where ``[web] enabled``. At start, a node that runs jobs
takes back what was left running: ``all`` on SQLite (the single-host node) every running
job, as it always did; ``worker``, and ``all`` on PostgreSQL, only the jobs (and outbox
claims) held on this host by a process that is gone, leaving other nodes' jobs to their
lease (:mod:`node.jobs`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, func, literal, select
from sqlalchemy.engine import Engine

from . import db
from .access import AccessPolicy
from .completion import CompletionMonitor
from .config import Config
from .jobs import JobRunner, requeue_dead_local, requeue_running
from .scp import Receiver
from .send import Sender, release_claims, release_dead_local_claims
from .store import Store
from .tls import client_context, server_context
from .worker import job_context

log = logging.getLogger(__name__)


class Node:
    """One musclenode instance. ``start()`` returns once the SCP listens."""

    def __init__(self, config: Config, *, poll_seconds: float = 0.5):
        self.config = config
        self.role = config.node.role
        self.poll = poll_seconds
        data_dir = Path(config.node.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = db.make_engine(config.database_url)
        self.store = Store(data_dir, self.engine)
        access = AccessPolicy(config.node.ae_title, config.node.allowed_calling_aes,
                              config.node.require_called_ae_title)
        self.receiver = Receiver(self.store, config.node.ae_title, max_pdu=config.node.max_pdu_bytes, access=access,
                                 journal_mb=config.node.journal_mb)
        # TLS files are read now, so that one missing or wrong stops the node before it listens
        # (ConfigError naming the key); the sender and workers read them again for each association.
        tls = config.node.tls
        self.tls_context = server_context(tls) if tls is not None else None
        if tls is not None and any(d.tls for d in config.destinations):
            client_context(tls)
        ctx = job_context(config)
        self.sender = Sender(self.engine, config.destinations, config.send, calling_ae=config.node.ae_title,
                             poll_seconds=poll_seconds, tls=tls)
        self.jobs = JobRunner(self.engine, ctx, executor=config.jobs.executor, workers=config.jobs.workers,
                              lease_seconds=config.jobs.lease_seconds, poll_seconds=poll_seconds,
                              max_attempts=config.jobs.max_attempts, on_done=self.sender.wake,
                              scheduler_address=config.jobs.scheduler_address)
        self.completion = CompletionMonitor(self.engine, config.node.complete_after_seconds,
                                            protocols=config.protocols, poll_seconds=poll_seconds,
                                            on_complete=self.jobs.wake)
        self.receiver.on_stored = self.completion.wake   # a new instance may complete its study's protocol
        self.web = None
        if config.web.enabled:
            from .web.server import WebServer
            self.web = WebServer(self.engine, data_dir, config.web.bind_address, config.web.port)

    @property
    def port(self) -> int:
        """The plain TCP port the node's SCP listens on (``RuntimeError`` with ``node.port = 0``)."""
        return self.receiver.port

    @property
    def tls_port(self) -> int:
        """The DICOM TLS port the node's SCP listens on (``RuntimeError`` without ``[node.tls]``)."""
        return self.receiver.tls_port

    @property
    def receives(self) -> bool:
        """Whether this node runs the SCP (role ``receiver`` or ``all``)."""
        return self.role in ("receiver", "all")

    @property
    def works(self) -> bool:
        """Whether this node runs jobs and sends (role ``worker`` or ``all``)."""
        return self.role in ("worker", "all")

    def listening(self) -> str:
        """Where the SCP listens, in words: ``"0.0.0.0:11112 and 0.0.0.0:2762 (DICOM TLS)"``
        (``""`` for a worker, which does not listen).
        """
        bind = self.config.node.bind_address
        where = [f"{bind}:{self.port}"] if self.receiver.server is not None else []
        if self.receiver.tls_server is not None:
            where.append(f"{bind}:{self.tls_port} (DICOM TLS)")
        return " and ".join(where)

    def _resume(self) -> None:
        """Take back the jobs and sends a previous process left claimed (see the module's docstring)."""
        max_attempts = self.config.jobs.max_attempts
        if self.role == "all" and self.engine.dialect.name == "sqlite":   # the single node of its database
            resumed = requeue_running(self.engine, max_attempts)
            release_claims(self.engine)
        else:
            resumed = requeue_dead_local(self.engine, max_attempts)
            release_dead_local_claims(self.engine)
        if resumed:
            log.info("resuming %d job(s) left running", resumed)

    def start(self) -> Node:
        """Start the job runner (workers warmed up), completion monitor, sender and SCP, in that order,
        as far as the node's role runs them; returns the node.
        """
        if self.receives and self.engine.dialect.name == "sqlite":
            # files whose row a power cut took (SQLite rows of instances are committed without a WAL sync)
            self.store.recover_rows()
        if self.works:
            self._resume()
            self.jobs.start()        # returns once the workers have their kernels compiled or loaded
        self.completion.start()
        if self.works:
            self.sender.start()
        node = self.config.node
        if self.receives and node.port:
            self.receiver.start(node.bind_address, node.port)
        if self.receives and node.tls is not None and self.tls_context is not None:
            self.receiver.start_tls(node.bind_address, node.tls.port, self.tls_context)
        if self.web is not None:
            self.web.start()
        ports = " ".join(([f"port={self.port}"] if self.receiver.server is not None else [])
                         + ([f"tls_port={self.tls_port}"] if self.receiver.tls_server is not None else []))
        role = f" role={self.role}" if self.role != "all" else ""
        with self.engine.begin() as conn:
            db.record_audit(conn, "node-started", f"ae={node.ae_title} {ports}{role}".replace("  ", " "))
        return self

    def stop(self) -> None:
        """Stop the SCP first (no new instances), then the background threads; dispose of the engine."""
        self.receiver.stop()
        if self.web is not None:
            self.web.stop()
        self.completion.stop()
        self.jobs.stop()
        self.sender.stop()
        with self.engine.begin() as conn:
            db.record_audit(conn, "node-stopped", f"ae={self.config.node.ae_title}")
        self.store.close()
        self.engine.dispose()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


#: What ``musclenode status`` lists of each kind by default (counts always cover everything).
STATUS_LIMIT = 20


def _shown_state():
    """A study's state as shown: ``skipped`` where the study is done but its latest job was skipped
    (the study row says ``done``, as the web API expects; see :func:`node.web.queries.visits`).
    """
    latest = (select(db.jobs.c.study_uid, func.max(db.jobs.c.id).label("job_id"))
              .group_by(db.jobs.c.study_uid).subquery())
    shown = case((and_(db.studies.c.state == db.StudyState.DONE, db.jobs.c.state == db.JobState.SKIPPED),
                  literal(db.JobState.SKIPPED.value)), else_=db.studies.c.state).label("shown_state")
    joined = (db.studies.outerjoin(latest, latest.c.study_uid == db.studies.c.study_uid)
              .outerjoin(db.jobs, db.jobs.c.id == latest.c.job_id))
    return shown, joined


def status_report(engine: Engine, *, state: str | None = None, since: float | None = None,
                  limit: int = STATUS_LIMIT) -> dict[str, Any]:
    """A summary of the node for ``musclenode status``, as plain data.

    ``study_counts``, ``job_counts`` and ``send_counts`` count every row per state (a study whose
    latest job was skipped counts as ``skipped``). ``studies`` are the ``limit`` most recently
    received studies (state ``state`` only, received at or after ``since`` if given, a time in
    seconds since the epoch), newest first, each with the ROIs it was measured in;
    ``n_studies_matching`` is how many match. ``jobs`` lists the latest ``limit`` jobs not done (a running one with the
    node process that holds it, ``claimed_by``),
    ``sends`` the first ``limit`` pending sends, ``quarantine`` and ``roi_sets`` the latest ``limit``
    entries, with their totals in ``n_quarantine`` and ``n_roi_sets``.
    """
    shown, joined = _shown_state()
    where = []
    if state:
        where.append(shown == state)
    if since is not None:
        where.append(db.studies.c.last_received_at >= since)
    with engine.begin() as conn:
        study_counts = {str(r[0]): int(r[1]) for r in conn.execute(
            select(shown, func.count()).select_from(joined).group_by(shown)).all()}
        n_matching = conn.execute(select(func.count()).select_from(joined).where(*where)).scalar_one()
        studies = [dict(r._mapping) for r in conn.execute(
            select(db.studies.c.study_uid, shown.label("state"), db.studies.c.revision, db.studies.c.n_instances,
                   db.studies.c.study_date, db.studies.c.last_received_at, db.studies.c.message,
                   db.jobs.c.message.label("job_message"))
            .select_from(joined).where(*where)
            .order_by(db.studies.c.last_received_at.desc(), db.studies.c.id.desc()).limit(limit)).all()]
        job_counts = {str(r[0]): int(r[1]) for r in conn.execute(
            select(db.jobs.c.state, func.count()).group_by(db.jobs.c.state)).all()}
        jobs = [dict(r._mapping) for r in conn.execute(
            select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.revision, db.jobs.c.state, db.jobs.c.attempts,
                   db.jobs.c.claimed_by, db.jobs.c.message).where(db.jobs.c.state != db.JobState.DONE)
            .order_by(db.jobs.c.id.desc()).limit(limit)).all()]
        send_counts = {str(r[0]): int(r[1]) for r in conn.execute(
            select(db.outbox.c.state, func.count()).group_by(db.outbox.c.state)).all()}
        sends = [dict(r._mapping) for r in conn.execute(
            select(db.outbox.c.id, db.outbox.c.destination, db.outbox.c.state, db.outbox.c.attempts,
                   db.outbox.c.next_try_at, db.outbox.c.last_error, db.outputs.c.kind, db.outputs.c.study_uid,
                   db.outputs.c.sop_uid)
            .join(db.outputs, db.outputs.c.id == db.outbox.c.output_id)
            .where(db.outbox.c.state != db.OutboxState.SENT).order_by(db.outbox.c.id).limit(limit)).all()]
        n_quarantine = conn.execute(select(func.count()).select_from(db.quarantine)).scalar_one()
        quarantined = [dict(r._mapping) for r in conn.execute(
            select(db.quarantine.c.path, db.quarantine.c.reason, db.quarantine.c.sop_uid,
                   db.quarantine.c.calling_ae).order_by(db.quarantine.c.id.desc()).limit(limit)).all()]
        n_instances = conn.execute(select(func.count()).select_from(db.instances)).scalar_one()
        listed = [s["study_uid"] for s in studies]
        rois = {r.study_uid: dict(r._mapping) for r in conn.execute(
            select(db.study_rois.c.study_uid, db.study_rois.c.source, db.study_rois.c.seg_sop_uid,
                   db.study_rois.c.n_rois, db.study_rois.c.dice, db.study_rois.c.mismatch,
                   db.study_rois.c.needs_review).where(db.study_rois.c.study_uid.in_(listed))).all()}
        n_roi_sets = conn.execute(select(func.count()).select_from(db.roi_sets)).scalar_one()
        roi_sets = [dict(r._mapping) for r in conn.execute(
            select(db.roi_sets.c.subject_key, db.roi_sets.c.region, db.roi_sets.c.study_uid, db.roi_sets.c.study_date,
                   db.roi_sets.c.seg_sop_uid, db.roi_sets.c.n_rois)
            .order_by(db.roi_sets.c.id.desc()).limit(limit)).all()]
    for s in studies:
        s["rois"] = rois.get(s["study_uid"])
        if s["state"] == db.JobState.SKIPPED and s["job_message"]:
            s["message"] = s["job_message"]
        del s["job_message"]
    return dict(n_instances=n_instances, study_counts=study_counts, n_studies=sum(study_counts.values()),
                n_studies_matching=n_matching, studies=studies, job_counts=job_counts, jobs=jobs,
                send_counts=send_counts, sends=sends, n_quarantine=n_quarantine, quarantine=quarantined,
                n_roi_sets=n_roi_sets, roi_sets=roi_sets)


def audit_entries(engine: Engine, *, since: float | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The audit log, oldest first: ``at`` (seconds since the epoch), ``event`` and ``detail`` of each
    entry made at or after ``since``; with ``limit``, only the ``limit`` most recent of them.
    """
    q = select(db.audit.c.id, db.audit.c.at, db.audit.c.event, db.audit.c.detail)
    if since is not None:
        q = q.where(db.audit.c.at >= since)
    q = q.order_by(db.audit.c.id.desc())
    if limit is not None:
        q = q.limit(limit)
    with engine.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q).all()]
    return rows[::-1]
