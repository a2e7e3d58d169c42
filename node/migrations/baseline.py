"""The baseline schema (revision 0001) as tables: node/db.py's tables as released at commit 3c9fd39,
frozen. :func:`node.migrations.upgrade` adopts a database an earlier version made (tables, no
``alembic_version``) by creating the baseline tables and columns it lacks before stamping it
0001, and revision 0001 creates them in a new database. tests/test_migrations.py checks
them against that release's own db.py (tests/data/db_previous_release.py). Never edit them to
follow node/db.py.
"""

from __future__ import annotations

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
)

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

