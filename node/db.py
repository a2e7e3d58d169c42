"""The node's database: every hand-off (instance, study, job, measurement, output,
send) is a row, so a crash at any point resumes where it stopped.

SQLAlchemy Core; SQLite (WAL) by default, PostgreSQL when configured.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError


class StudyState(StrEnum):
    """``studies.state``: receiving -> complete (job queued) -> processing -> done | failed |
    waiting_for_rois (hand, head-neck without a reader's ROIs yet); a late instance (a reader's
    SEG too) re-opens a study (back to receiving).
    """

    RECEIVING = "receiving"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    WAITING_FOR_ROIS = "waiting_for_rois"   # a hand or head-neck exam: measured once a reader sends ROIs


class JobState(StrEnum):
    """``jobs.state``: pending -> running -> done | skipped (nothing to quantify) | failed |
    waiting_for_rois (measured in a reader's ROIs only, and none yet).
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    WAITING_FOR_ROIS = "waiting_for_rois"


class OutboxState(StrEnum):
    """``outbox.state`` of one output to one destination: pending (retried until sent) -> sent."""

    PENDING = "pending"
    SENT = "sent"


metadata = MetaData()

studies = Table(
    "studies", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("subject_key", String(200), nullable=False, default=""),
    Column("study_date", String(8), nullable=False, default=""),
    Column("state", String(16), nullable=False),  # receiving | complete | processing | done | failed
    Column("revision", Integer, nullable=False, default=0),  # how many times it was completed
    Column("n_instances", Integer, nullable=False, default=0),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("time_point", String(64), nullable=False, default="", server_default=""),   # Clinical Trial Time Point ID
)

instances = Table(
    "instances", metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("series_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("size", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("calling_ae", String(16), nullable=False, default=""),
    # What the header declares, recorded at store time (node.instances.instance_facts), so that
    # node.completion can tell a series complete without reading the files again.
    Column("header", Text, nullable=False, default="", server_default=""),   # JSON: recognition + protocol match
    Column("echo_times", String(200), nullable=False, default="", server_default=""),   # "10;20" (ms)
    Column("images_in_acquisition", Integer, nullable=False, default=0, server_default="0"),
    Column("echo_train_length", Integer, nullable=False, default=0, server_default="0"),
    Column("temporal_positions", Integer, nullable=False, default=0, server_default="0"),
    Column("echo_number", Integer, nullable=False, default=0, server_default="0"),
    Column("temporal_position", Integer, nullable=False, default=0, server_default="0"),
    Column("slice_key", String(64), nullable=False, default="", server_default=""),
    Column("n_frames", Integer, nullable=False, default=1, server_default="1"),
)

quarantine = Table(
    "quarantine", metadata,
    Column("id", Integer, primary_key=True),
    Column("path", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("sop_uid", String(64), nullable=False, default=""),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("received_at", Float, nullable=False),
    Column("calling_ae", String(16), nullable=False, default=""),
)

series = Table(
    "series", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("series_uid", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("reason", Text, nullable=False),
    Column("description", Text, nullable=False, default=""),
    UniqueConstraint("study_uid", "series_uid"),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("revision", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # pending | running | done | skipped | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_until", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("message", Text, nullable=False, default=""),
    # Several nodes on one database (issue 14): who holds the claim ("host:pid", "" when none),
    # why the job exists ("" a completed study, "reprocess" musclenode reprocess), whether its
    # outputs are sent to the destinations, and the operator's note for a reprocessing run.
    Column("claimed_by", String(128), nullable=False, default="", server_default=""),
    Column("trigger", String(16), nullable=False, default="", server_default=""),
    Column("send", Boolean, nullable=False, default=True, server_default="1"),
    Column("version_note", Text, nullable=False, default="", server_default=""),
    # the algorithm version (quant.ALGORITHM_VERSION) the job ran with, set when it ends ("" before
    # this column, or a job given up on): musclenode reprocess selects the studies it is not current for
    Column("algorithm_version", String(64), nullable=False, default="", server_default=""),
    UniqueConstraint("study_uid", "revision"),
)
Index("ix_jobs_state", jobs.c.state)

def _value_columns(*, study_index: bool) -> list[Column]:
    """The columns of one measured value of one visit (new objects for each table)."""
    return [
        Column("id", Integer, primary_key=True),
        Column("subject_key", String(200), nullable=False, index=True),
        Column("study_uid", String(64), nullable=False, index=study_index),
        Column("study_date", String(8), nullable=False),
        Column("region", String(64), nullable=False),
        Column("side", String(8), nullable=False),
        Column("metric", String(32), nullable=False),
        Column("value", Float, nullable=False),
        Column("unit", String(16), nullable=False),
        Column("algorithm_version", String(64), nullable=False),
    ]


measurements = Table(
    "measurements", metadata,
    *_value_columns(study_index=True),
    Column("model", String(64), nullable=False, default=""),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    # "" for the whole region; else a muscle or compartment and where it came from
    Column("roi", String(128), nullable=False, default="", server_default=""),
    Column("source", String(16), nullable=False, default="", server_default=""),
)

pacs_history = Table(   # a subject's earlier values read back from the SRs the node (or an earlier one) sent to PACS
    "pacs_history", metadata,
    *_value_columns(study_index=False),
    Column("roi", String(128), nullable=False, default=""),      # "" for the whole region
    Column("source", String(16), nullable=False, default=""),    # the ROI's source ("" for the whole region)
    Column("sr_uid", String(64), nullable=False),                # the SR it was read from
    Column("destination", String(64), nullable=False),          # the [[destinations]] entry that held it
    Column("fetched_at", Float, nullable=False),
)

tokens = Table(   # bearer tokens of the web API: only a hash is kept
    "tokens", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),            # coordinator | admin
    Column("token_hash", String(64), nullable=False, unique=True),   # SHA-256 hex of the token
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

scores = Table(   # clinical scores per subject and visit, uploaded by a coordinator (POST /api/v1/scores)
    "scores", metadata,
    Column("id", Integer, primary_key=True),
    Column("subject_key", String(200), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),        # the visit it was matched to
    Column("name", String(64), nullable=False),             # alsfrs_r, knee_extension, ...
    Column("value", Float, nullable=False),
    Column("unit", String(32), nullable=False, default=""),
    Column("uploaded_at", Float, nullable=False),
    UniqueConstraint("study_uid", "name"),
)

subject_groups = Table(   # a subject's group (trial arm, fast or slow progressor)
    "subject_groups", metadata,
    Column("id", Integer, primary_key=True),
    Column("subject_key", String(200), nullable=False, unique=True),
    Column("name", String(64), nullable=False),
)

roi_sets = Table(   # a reader's ROI set of a subject: the visit it was drawn on and what carrying it needs
    "roi_sets", metadata,
    Column("id", Integer, primary_key=True),
    Column("subject_key", String(200), nullable=False, index=True),
    Column("region", String(16), nullable=False),
    Column("study_uid", String(64), nullable=False),       # the visit it was drawn on
    Column("study_date", String(8), nullable=False, default=""),
    Column("seg_sop_uid", String(64), nullable=False, unique=True),   # the reader's SEG
    Column("n_rois", Integer, nullable=False),
    Column("path", Text, nullable=False),                  # anatomy, labels and sides (node.roisets)
    Column("created_at", Float, nullable=False),
)

study_rois = Table(   # the ROIs a study was last measured in, and the quality of a carried set
    "study_rois", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("source", String(16), nullable=False),          # reader | carried | automatic | atlas
    Column("seg_sop_uid", String(64), nullable=False, default=""),   # the reader's SEG they come from
    Column("n_rois", Integer, nullable=False),
    Column("dice", Float, nullable=True),
    Column("mismatch", Float, nullable=True),
    Column("needs_review", Boolean, nullable=False, default=False),
    Column("updated_at", Float, nullable=False),
)

outputs = Table(
    "outputs", metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # seg | sr
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("path", Text, nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("created_at", Float, nullable=False),
)

outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True),
    Column("output_id", Integer, ForeignKey("outputs.id"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),  # pending | sent
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_try_at", Float, nullable=False),
    Column("last_error", Text, nullable=False, default=""),
    Column("sent_at", Float, nullable=True),
    # a sender claims due rows until then (several nodes sending from one database), 0 = unclaimed
    Column("claimed_until", Float, nullable=False, default=0.0, server_default="0"),
    Column("claimed_by", String(128), nullable=False, default="", server_default=""),
    UniqueConstraint("output_id", "destination"),
)
Index("ix_outbox_state", outbox.c.state, outbox.c.next_try_at)

audit = Table(
    "audit", metadata,
    Column("id", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("event", String(32), nullable=False),
    Column("detail", Text, nullable=False),  # UIDs and AE titles only, never patient names
)


def _sqlite_engine(url, synchronous: str) -> Engine:
    """An SQLite engine whose connections use the write-ahead log, a 60 s busy timeout and
    ``PRAGMA synchronous`` = ``synchronous`` (FULL: a commit waits for the disk).
    """
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()
    return engine


def make_engine(url: str, *, migrate: bool = True) -> Engine:
    """An engine for ``url``, its schema brought to the newest revision (:func:`node.migrations.upgrade`)
    unless ``migrate`` is False. SQLite gets WAL and a busy timeout so that the SCP threads, the node
    and its worker processes can share the file.

    Raises
    ------
    node.errors.SchemaError
        The database was made by a newer version (a revision this version does not know).
    """
    engine = _sqlite_engine(url, "FULL") if url.startswith("sqlite") else create_engine(url, pool_pre_ping=True)
    if migrate:
        from .migrations import upgrade
        upgrade(engine)
    return engine


def ingest_engine(engine: Engine) -> Engine:
    """The engine the SCP records received instances with. On SQLite, a second engine on the same
    file whose connections commit with ``synchronous=NORMAL``: a commit does not wait for the WAL
    to reach the disk (the next checkpoint, or any other connection's commit, syncs it). A power
    cut may so lose the last rows, never the files: each is fsync'd before its row is written, and
    :meth:`node.store.Store.recover_rows` records files without a row at the next start (a power
    cut stops the node too). PostgreSQL gets ``engine`` itself, committing synchronously: its
    server may crash and restart while the node runs on, and nothing would recover the rows then.
    """
    if engine.dialect.name != "sqlite":
        return engine
    return _sqlite_engine(engine.url, "NORMAL")


def record_audit(conn: Connection, event_name: str, detail: str) -> None:
    """Append an event (e.g. ``node-started``) to the audit table."""
    conn.execute(insert(audit).values(at=time.time(), event=event_name, detail=detail))


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """Insert a row unless a unique key already holds it; True if inserted.

    SQLite and PostgreSQL get ``INSERT ... ON CONFLICT DO NOTHING``, which stays inside the
    caller's transaction: with Python's sqlite3 module a SAVEPOINT opened before any other
    statement starts a transaction of its own, and its RELEASE commits the row on its own
    (a row recorded although the rest of the transaction then failed, on a full disk say).
    """
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        make = sqlite_insert if dialect == "sqlite" else pg_insert
        stmt = make(table).values(**values).on_conflict_do_nothing().returning(*table.primary_key.columns)
        return conn.execute(stmt).first() is not None
    try:
        with conn.begin_nested():
            conn.execute(insert(table).values(**values))
        return True
    except IntegrityError:
        return False


def insert_many_ignore(conn: Connection, table: Table, rows: list[dict[str, Any]], key: str) -> set[Any]:
    """Insert ``rows`` (the same keys in each) in one statement executed for all of them; on
    SQLite and PostgreSQL a row a unique key already holds is skipped. Returns the ``key``
    column's values of the rows inserted.
    """
    if not rows:
        return set()
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        make = sqlite_insert if dialect == "sqlite" else pg_insert
        stmt = make(table).on_conflict_do_nothing().returning(table.c[key])
        return set(conn.execute(stmt, rows).scalars())
    return {row[key] for row in rows if insert_ignore(conn, table, row)}


__all__ = ["metadata", "studies", "instances", "quarantine", "series", "jobs", "measurements", "pacs_history",
           "roi_sets",
           "study_rois", "tokens", "scores", "subject_groups", "outputs",
           "outbox", "audit", "make_engine", "record_audit", "insert_ignore", "select", "update", "Boolean"]
