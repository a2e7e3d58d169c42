"""Study completion: a study is complete when no instance arrived for
``complete_after_seconds``. Completion is a row update plus a job row in one
transaction, so a restart resumes: the quiet time counts from the last instance
received (a stored time), not from the restart."""

from __future__ import annotations

import logging
import time

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Engine

from . import db

log = logging.getLogger(__name__)


def complete_quiet_studies(engine: Engine, quiet_seconds: float, now: float | None = None) -> list[int]:
    """Mark every quiet ``receiving`` study complete and queue a job for it; return the job ids."""
    now = time.time() if now is None else now
    created = []
    with engine.begin() as conn:
        rows = conn.execute(select(db.studies.c.study_uid, db.studies.c.revision, db.studies.c.last_received_at)
                            .where(and_(db.studies.c.state == "receiving",
                                        db.studies.c.last_received_at <= now - quiet_seconds))).all()
    for row in rows:
        with engine.begin() as conn:
            # Only if nothing arrived since we looked (the same last_received_at).
            res = conn.execute(update(db.studies)
                               .where(and_(db.studies.c.study_uid == row.study_uid,
                                           db.studies.c.state == "receiving",
                                           db.studies.c.last_received_at == row.last_received_at))
                               .values(state="complete", revision=row.revision + 1))
            if res.rowcount != 1:
                continue
            job_id = conn.execute(insert(db.jobs).values(
                study_uid=row.study_uid, revision=row.revision + 1, state="pending", attempts=0,
                created_at=now, message="")).inserted_primary_key[0]
            db.record_audit(conn, "study-complete", f"study={row.study_uid} revision={row.revision + 1} job={job_id}")
        log.info("study %s complete (revision %d): job %d queued", row.study_uid, row.revision + 1, job_id)
        created.append(job_id)
    return created
