"""The running node: SCP + study completion + job runner + sender, over one database.

On start it resumes what the database says is unfinished: studies still receiving
complete once quiet (counting from their last instance), jobs left running run again,
and sends not yet acknowledged are retried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from . import db
from .completion import CompletionMonitor
from .config import Config
from .jobs import JobContext, JobRunner, requeue_running
from .scp import Receiver
from .send import Sender
from .store import Store
from .tls import client_context, server_context

log = logging.getLogger(__name__)


class Node:
    """One musclenode instance. ``start()`` returns once the SCP listens."""

    def __init__(self, config: Config, *, poll_seconds: float = 0.5):
        self.config = config
        self.poll = poll_seconds
        data_dir = Path(config.node.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = db.make_engine(config.database_url)
        self.store = Store(data_dir, self.engine)
        self.receiver = Receiver(self.store, config.node.ae_title, max_pdu=config.node.max_pdu_bytes)
        # TLS files are read now, so that one missing or wrong stops the node before it listens
        # (ConfigError naming the key); the sender and workers read them again for each association.
        tls = config.node.tls
        self.tls_context = server_context(tls) if tls is not None else None
        if tls is not None and any(d.tls for d in config.destinations):
            client_context(tls)
        ctx = JobContext(config.database_url, str(data_dir.resolve()), tuple(d.name for d in config.destinations),
                         config.t2.options(), compartments=config.rois.compartments,
                         atlases=config.rois.atlases,
                         history_sources=tuple(d for d in config.destinations if d.query),
                         calling_ae=config.node.ae_title, query_timeout=config.send.query_timeout_seconds,
                         pdf_destinations=tuple(d.name for d in config.destinations if d.pdf), tls=tls)
        self.sender = Sender(self.engine, config.destinations, config.send, calling_ae=config.node.ae_title,
                             poll_seconds=poll_seconds, tls=tls)
        self.jobs = JobRunner(self.engine, ctx, executor=config.jobs.executor, workers=config.jobs.workers,
                              lease_seconds=config.jobs.lease_seconds, poll_seconds=poll_seconds,
                              on_done=self.sender.wake)
        self.completion = CompletionMonitor(self.engine, config.node.complete_after_seconds,
                                            poll_seconds=poll_seconds, on_complete=self.jobs.wake)
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

    def listening(self) -> str:
        """Where the SCP listens, in words: ``"0.0.0.0:11112 and 0.0.0.0:2762 (DICOM TLS)"``."""
        bind = self.config.node.bind_address
        where = [f"{bind}:{self.port}"] if self.receiver.server is not None else []
        if self.receiver.tls_server is not None:
            where.append(f"{bind}:{self.tls_port} (DICOM TLS)")
        return " and ".join(where)

    def start(self) -> Node:
        """Start the job runner (workers warmed up), completion monitor, sender and SCP, in that order;
        returns the node.
        """
        resumed = requeue_running(self.engine)
        if resumed:
            log.info("resuming %d job(s) left running", resumed)
        self.jobs.start()        # returns once the workers have their kernels compiled or loaded
        self.completion.start()
        self.sender.start()
        node = self.config.node
        if node.port:
            self.receiver.start(node.bind_address, node.port)
        if node.tls is not None and self.tls_context is not None:
            self.receiver.start_tls(node.bind_address, node.tls.port, self.tls_context)
        if self.web is not None:
            self.web.start()
        ports = " ".join(([f"port={self.port}"] if node.port else [])
                         + ([f"tls_port={self.tls_port}"] if node.tls is not None else []))
        with self.engine.begin() as conn:
            db.record_audit(conn, "node-started", f"ae={node.ae_title} {ports}")
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
        self.engine.dispose()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def status_report(engine: Engine) -> dict[str, Any]:
    """Studies (with the ROIs each was measured in and a carried set's registration quality),
    jobs, pending sends, quarantine and readers' ROI sets, as plain data (for ``musclenode status``).
    """
    with engine.begin() as conn:
        studies = [dict(r._mapping) for r in conn.execute(
            select(db.studies.c.study_uid, db.studies.c.state, db.studies.c.revision, db.studies.c.n_instances,
                   db.studies.c.study_date, db.studies.c.message).order_by(db.studies.c.id)).all()]
        jobs = [dict(r._mapping) for r in conn.execute(
            select(db.jobs.c.id, db.jobs.c.study_uid, db.jobs.c.revision, db.jobs.c.state, db.jobs.c.attempts,
                   db.jobs.c.message).order_by(db.jobs.c.id)).all()]
        sends = [dict(r._mapping) for r in conn.execute(
            select(db.outbox.c.id, db.outbox.c.destination, db.outbox.c.state, db.outbox.c.attempts,
                   db.outbox.c.next_try_at, db.outbox.c.last_error, db.outputs.c.kind, db.outputs.c.study_uid,
                   db.outputs.c.sop_uid)
            .join(db.outputs, db.outputs.c.id == db.outbox.c.output_id).order_by(db.outbox.c.id)).all()]
        quarantined = [dict(r._mapping) for r in conn.execute(
            select(db.quarantine.c.path, db.quarantine.c.reason, db.quarantine.c.sop_uid,
                   db.quarantine.c.calling_ae).order_by(db.quarantine.c.id)).all()]
        n_instances = conn.execute(select(func.count()).select_from(db.instances)).scalar_one()
        rois = {r.study_uid: dict(r._mapping) for r in conn.execute(
            select(db.study_rois.c.study_uid, db.study_rois.c.source, db.study_rois.c.seg_sop_uid,
                   db.study_rois.c.n_rois, db.study_rois.c.dice, db.study_rois.c.mismatch,
                   db.study_rois.c.needs_review)).all()}
        roi_sets = [dict(r._mapping) for r in conn.execute(
            select(db.roi_sets.c.subject_key, db.roi_sets.c.region, db.roi_sets.c.study_uid, db.roi_sets.c.study_date,
                   db.roi_sets.c.seg_sop_uid, db.roi_sets.c.n_rois).order_by(db.roi_sets.c.id)).all()]
    for s in studies:
        s["rois"] = rois.get(s["study_uid"])
    return dict(studies=studies, jobs=jobs, sends=sends, quarantine=quarantined, n_instances=n_instances,
                roi_sets=roi_sets)
