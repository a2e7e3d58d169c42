"""Durable storage of received instances and of the node's outputs.

Every file is written to a temporary file in the same file system, fsync'd, renamed
into place and its directory fsync'd: after :func:`durable_write` returns, the bytes
survive a power cut. Only then does the database learn of the file, and only then does
the C-STORE response say Success.

Layout under ``data_dir``::

    store/<study>/<series>/<sop>.dcm     received instances
    quarantine/<time>-<n>.dcm (+ .txt)   what could not be accepted, with the reason
    results/<study>/<kind>-<sop>.dcm     SEG and SR made by the node
    tmp/                                 temporary files (same file system)
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from . import db
from .db import StudyState
from .text import printable

log = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_counter = itertools.count()
T = TypeVar("T")


def durable_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` atomically and durably (tmp file, fsync, rename, fsync dir)."""
    write_file(path, data, tmp_dir, sync=True)


def write_file(path: Path, data: bytes, tmp_dir: Path, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (tmp file, rename); with ``sync``, durably (the file
    fsync'd before the rename, its folder after). Without it, for a file whose bytes the ingest
    journal (:mod:`node.ingest`) holds durably until the file system is synced.
    """
    tmp = tmp_dir / f"{os.getpid()}-{next(_counter)}.part"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:   # a study or series seen for the first time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def safe_uid(uid: str, what: str) -> str:
    """``uid`` stripped of padding; ValueError (naming it ``what``) unless it is a valid DICOM UID,
    which also makes it safe as a file name.
    """
    uid = str(uid).strip().rstrip("\x00")
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"{what} {uid[:70]!r} is not a valid DICOM UID")
    return uid


@dataclass(frozen=True)
class StoredInstance:
    """Where a received instance was stored, and whether it had been received before."""

    path: Path
    duplicate: bool


class Store:
    """The file side of the node's data directory, plus the rows that go with files."""

    def __init__(self, data_dir: Path, engine: Engine):
        self.root = Path(data_dir)
        self.engine = engine
        self._ingest: Engine | None = None   # db.ingest_engine(engine), made when the first instance is stored
        self.tmp = self.root / "tmp"
        for d in ("store", "quarantine", "results", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The file of a received instance: ``store/<study>/<series>/<sop>.dcm``."""
        return (self.root / "store" / safe_uid(study_uid, "StudyInstanceUID")
                / safe_uid(series_uid, "SeriesInstanceUID") / f"{safe_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def result_path(self, study_uid: str, kind: str, sop_uid: str) -> Path:
        """The file of a SEG or SR the node made: ``results/<study>/<kind>-<sop>.dcm``."""
        return self.root / "results" / safe_uid(study_uid, "StudyInstanceUID") / f"{kind}-{sop_uid}.dcm"

    def write_result(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably."""
        durable_write(path, data, self.tmp)

    #: Pauses between tries of a database write that failed for want of a connection (PostgreSQL
    #: restarted, a backend terminated): the C-STORE waits this long (8 s in all) before it is refused.
    db_retry_delays: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)

    def _with_retries(self, work: Callable[[], T]) -> T:
        """Run ``work`` (one transaction) again after a lost database connection; a server
        database (PostgreSQL) gets ``db_retry_delays``; SQLite errors other than a lost
        connection (a full disk, say) are raised at once.
        """
        for delay in (*self.db_retry_delays, None):
            try:
                return work()
            except DBAPIError as exc:
                retry = exc.connection_invalidated or self.engine.dialect.name != "sqlite"
                if delay is None or not retry:
                    raise
                log.warning("database write failed (%s); trying again in %.2f s", printable(exc.orig, 120), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def store_instance(self, data: bytes, *, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str,
                       subject_key: str, study_date: str, calling_ae: str = "", time_point: str = "",
                       facts: dict[str, Any] | None = None) -> StoredInstance:
        """Durably store one received instance and record it (with ``facts``, the columns of
        :func:`node.instances.instance_facts`); a duplicate is stored once.

        A new instance of a study already processed re-opens the study (state
        ``receiving``), so that its results are superseded, never silently mixed.

        Raises OSError (the file cannot be written: a full disk) or a SQLAlchemy error (the
        database cannot record it, after retries): then nothing of the instance is kept (a file
        written for it is removed again), and the sender must be told it was not stored.
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        now = time.time()

        def seen() -> bool:
            with self.engine.begin() as conn:
                found = conn.execute(select(db.instances.c.id).where(db.instances.c.sop_uid == sop_uid)).first()
            return found is not None

        def record_duplicate() -> None:
            with self.engine.begin() as conn:
                db.record_audit(conn, "duplicate", f"sop={sop_uid} study={study_uid} from={calling_ae}")

        if self._with_retries(seen) and path.exists():
            self._with_retries(record_duplicate)
            return StoredInstance(path, True)
        existed = path.exists()   # a file without its row: left by a crash between the write and the commit
        durable_write(path, data, self.tmp)

        def record() -> StoredInstance:
            with self.ingest_engine.begin() as conn:
                return self._record(conn, path, len(data), now, study_uid=study_uid, series_uid=series_uid,
                                    sop_uid=sop_uid, sop_class_uid=sop_class_uid, subject_key=subject_key,
                                    study_date=study_date, calling_ae=calling_ae, time_point=time_point,
                                    facts=facts)
        try:
            return self._with_retries(record)
        except BaseException:
            if not existed:    # no row for it: no file either
                try:
                    os.unlink(path)
                except OSError as exc:
                    log.error("cannot remove %s after a failed database write: %s", path, exc)
            raise

    @property
    def ingest_engine(self) -> Engine:
        """The engine instance rows are recorded with (:func:`node.db.ingest_engine`)."""
        if self._ingest is None:
            self._ingest = db.ingest_engine(self.engine)
        return self._ingest

    def close(self) -> None:
        """Close the ingest engine's connections (the caller disposes of ``engine``)."""
        if self._ingest is not None and self._ingest is not self.engine:
            self._ingest.dispose()
        self._ingest = None

    #: Series folders changed up to this long before the newest recorded instance are looked at
    #: by :meth:`recover_rows` (rows lost to a power cut are those of the last seconds).
    recovery_margin_seconds = 600.0

    def recover_rows(self) -> int:
        """Record the received files that have no database row (their commit was lost to a power
        cut: rows are committed without waiting for the disk, files are fsync'd first); a file
        that cannot be read is quarantined. Looks only at series folders changed since shortly
        before the newest recorded instance. Returns how many rows were recovered.
        """
        from .errors import InstanceRejected
        with self.engine.begin() as conn:
            newest = conn.execute(select(func.max(db.instances.c.received_at))).scalar()
        since = None if newest is None else newest - self.recovery_margin_seconds
        recovered = 0
        for study_dir in sorted(p for p in (self.root / "store").iterdir() if p.is_dir()):
            for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
                if since is not None and series_dir.stat().st_mtime < since:
                    continue
                files = {p.stem: p for p in series_dir.glob("*.dcm")}
                with self.engine.begin() as conn:
                    known = set(conn.execute(select(db.instances.c.sop_uid)
                                             .where(db.instances.c.sop_uid.in_(list(files)))).scalars())
                for sop_uid in sorted(set(files) - known):
                    path = files[sop_uid]
                    try:
                        fields = self.fields_for(path.read_bytes(), path)
                    except (InstanceRejected, ValueError, OSError, EOFError, KeyError, AttributeError) as exc:
                        self.quarantine(None, f"found in the store without its database row and unreadable: "
                                              f"{type(exc).__name__}: {printable(exc, 120)}", sop_uid=sop_uid,
                                        source=path)
                        continue
                    with self.engine.begin() as conn:
                        self._record(conn, path, path.stat().st_size, path.stat().st_mtime, calling_ae="",
                                     **fields)
                        db.record_audit(conn, "row-recovered", f"sop={sop_uid} study={fields['study_uid']}")
                    recovered += 1
        if recovered:
            log.warning("recovered the database rows of %d stored instance(s) (lost to a crash before their "
                        "commit reached the disk)", recovered)
        return recovered

    def fields_for(self, data: bytes, path: Path, *, decode_all: bool = True) -> dict[str, Any]:
        """What is recorded of the instance ``data`` (:func:`node.instances.received_fields`), which
        must belong at ``path`` in the store; :class:`node.errors.InstanceRejected` otherwise.
        """
        from .errors import InstanceRejected
        from .instances import parse_instance, received_fields
        fields = received_fields(parse_instance(data, decode_all=decode_all))
        if path != self.instance_path(fields["study_uid"], fields["series_uid"], fields["sop_uid"]):
            raise InstanceRejected("its UIDs do not match where it is stored")
        return fields

    @staticmethod
    def _record(conn, path: Path, size: int, now: float, *, calling_ae: str, facts: dict[str, Any] | None = None,
                **fields: str) -> StoredInstance:
        """The rows of one stored instance (in the caller's transaction; :func:`record_instances`)."""
        new = record_instances(conn, [(path, size, now, calling_ae, dict(fields, facts=facts))])[0]
        return StoredInstance(path, not new)

    def quarantine_stored(self, instance_id: int, path: Path, reason: str, *, sop_uid: str, study_uid: str) -> None:
        """Move an instance already stored out of its study into quarantine, with the reason
        (a file that turned out unreadable, a reader's SEG that cannot be used).
        """
        if path.exists():
            self.quarantine(None, reason, sop_uid=sop_uid, study_uid=study_uid, source=path)
        with self.engine.begin() as conn:
            conn.execute(delete(db.instances).where(db.instances.c.id == instance_id))

    def quarantine(self, data: bytes | None, reason: str, *, sop_uid: str = "", study_uid: str = "",
                   calling_ae: str = "", source: Path | None = None) -> Path:
        """Keep what could not be accepted, with the reason beside it; never lose it."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.root / "quarantine" / f"{stamp}-{os.getpid()}-{next(_counter)}.dcm"
        if source is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, path)
        else:
            durable_write(path, data or b"", self.tmp)
        durable_write(path.with_suffix(".txt"), (reason + "\n").encode(), self.tmp)
        with self.engine.begin() as conn:
            conn.execute(insert(db.quarantine).values(path=str(path), reason=reason, sop_uid=sop_uid,
                                                     study_uid=study_uid, received_at=time.time(),
                                                     calling_ae=calling_ae))
            db.record_audit(conn, "quarantined",
                            f"sop={printable(sop_uid or '?')} from={calling_ae}: {printable(reason, 200)}")
        log.warning("quarantined %s (SOP %s): %s", path.name, printable(sop_uid or "?"), printable(reason, 200))
        return path


def record_instances(conn: Connection, rows: list[tuple[Path, int, float, str, dict[str, Any]]]
                     ) -> list[bool]:
    """Record stored instances (path, size, time, calling AE, :func:`node.instances.received_fields`)
    in the caller's transaction: their rows (one statement for all), their studies opened,
    counted, or re-opened when an instance arrives after processing (so that results are
    superseded, never silently mixed). Returns, for each, whether it was new (a SOP Instance
    UID already recorded, or twice in ``rows``, is a duplicate: audited, not counted).
    """
    sops = [f["sop_uid"] for *_, f in rows]
    known = set(conn.execute(select(db.instances.c.sop_uid).where(db.instances.c.sop_uid.in_(sops))).scalars())
    values: dict[str, dict[str, Any]] = {}
    for path, size, now, calling_ae, f in rows:
        if f["sop_uid"] not in known and f["sop_uid"] not in values:
            values[f["sop_uid"]] = dict(sop_uid=f["sop_uid"], study_uid=f["study_uid"], series_uid=f["series_uid"],
                                        sop_class_uid=f["sop_class_uid"], path=str(path), size=size, received_at=now,
                                        calling_ae=calling_ae, **(f.get("facts") or {}))
    # another receiver may record the same instance meanwhile: what was inserted is what RETURNING says
    inserted = db.insert_many_ignore(conn, db.instances, list(values.values()), key="sop_uid")
    new: list[bool] = []
    by_study: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    firsts: dict[str, dict[str, Any]] = {}
    for _path, _size, now, calling_ae, f in rows:
        is_new = f["sop_uid"] in inserted
        new.append(is_new)
        if not is_new:
            db.record_audit(conn, "duplicate", f"sop={f['sop_uid']} study={f['study_uid']} from={calling_ae}")
            continue
        inserted.discard(f["sop_uid"])   # a second copy in ``rows`` is a duplicate
        by_study[f["study_uid"]].append((now, calling_ae, f["sop_uid"]))
        firsts.setdefault(f["study_uid"], f)
    for study_uid, got in by_study.items():
        f = firsts[study_uid]
        first_at, calling_ae, sop_uid = got[0]
        last_at = got[-1][0]
        row = conn.execute(select(db.studies.c.state).where(db.studies.c.study_uid == study_uid)).first()
        if row is None:
            count = conn.execute(select(func.count()).select_from(db.instances)
                                 .where(db.instances.c.study_uid == study_uid)).scalar_one()
            created = db.insert_ignore(conn, db.studies, dict(
                study_uid=study_uid, subject_key=f["subject_key"], study_date=f["study_date"],
                state=StudyState.RECEIVING, revision=0, n_instances=count, first_received_at=first_at,
                last_received_at=last_at, message="", time_point=f["time_point"]))
            if created:
                db.record_audit(conn, "study-opened", f"study={study_uid} from={calling_ae}")
                continue
            row = conn.execute(select(db.studies.c.state).where(db.studies.c.study_uid == study_uid)).first()
        changes: dict[str, Any] = dict(n_instances=db.studies.c.n_instances + len(got), last_received_at=last_at)
        if row is not None and row.state != StudyState.RECEIVING:
            changes.update(state=StudyState.RECEIVING, message=f"re-opened by a late instance ({row.state} before)")
            db.record_audit(conn, "study-reopened", f"study={study_uid} sop={sop_uid} from={calling_ae}")
        conn.execute(update(db.studies).where(db.studies.c.study_uid == study_uid).values(**changes))
    return new
