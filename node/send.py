"""Sending results to destinations (C-STORE SCU) from the outbox, with retries.

Each output x destination is a row with a state, attempts and the next try time. A
failed send is retried with exponential backoff (``retry_initial_seconds`` doubling up
to ``retry_max_seconds``) for as long as it takes: nothing is dropped because PACS was
down, and the rows survive a restart.

Per destination, a subject's outputs go in study order (study date, then the order the
studies were received, then the order the outputs were made): an output waits while an
earlier one of the same subject to the same destination is still pending and not yet due,
and within one association a failed C-STORE holds back the rest of that subject's outputs.

Several senders may share one database (``musclenode serve --role worker`` on several
hosts): a sender first claims the rows it is about to send (``outbox.claimed_until``, a
send lease, and ``outbox.claimed_by``, ``"host:pid"``), then sends them and records the
result, which releases the claim. A row claimed by another sender holds back the subject's
later outputs to that destination just as a row not yet due does, so the study order holds
across senders; a dead sender's rows are free again once its send lease has passed. On
PostgreSQL claims are made one sender at a time (a transaction-level advisory lock): rows
are not read ``FOR UPDATE SKIP LOCKED`` here, because a skipped row (one another sender is
recording as failed, say) would be invisible, and its subject's later outputs could then
overtake it. On SQLite each row is claimed by a conditional ``UPDATE`` whose row count says
whether this sender won it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import and_, select, text, update
from sqlalchemy.engine import Engine

from . import db
from .config import Destination, SendSettings, TLSSettings
from .db import OutboxState
from .holders import dead_local_holders, node_id
from .loop import PollingLoop
from .tls import scu_ae, tls_args

log = logging.getLogger(__name__)
_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and warnings that mean "stored"

#: What the node sends (reports/), by SOP class: deploy/CONFORMANCE.md lists these, and
#: tests/test_conformance.py and tests/test_node_e2e.py check it.
SENT_SOP_CLASSES = {
    SegmentationStorage: "SEG of the tissues, muscles and compartments (reports/seg.py)",
    Comprehensive3DSRStorage: "TID 1500 Measurement Report (reports/sr.py)",
    ParametricMapStorage: "fat fraction, water T2, B1 and T2-fit fat fraction maps (reports/pmap.py)",
    SecondaryCaptureImageStorage: "one-page summary as an image (reports/summary.py)",
    EncapsulatedPDFStorage: "one-page summary as PDF, to destinations with pdf = true (reports/summary.py)",
}
#: Transfer syntaxes proposed for each of them, preferred first (the files are Explicit VR Little Endian).
SENT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def backoff_seconds(attempts: int, settings: SendSettings) -> float:
    """Delay before the next try after ``attempts`` failed tries."""
    return min(settings.retry_initial_seconds * 2 ** max(attempts - 1, 0), settings.retry_max_seconds)


#: The error of an output not tried because an earlier one of its subject failed (its row is left as it is).
HELD_BACK = "held back: an earlier output of the same subject was not sent"


def store_files(dest: Destination, paths: list[str], *, calling_ae: str, timeout: float,
                tls: TLSSettings | None = None, groups: dict[str, str] | None = None) -> dict[str, str]:
    """C-STORE files to one destination over one association, in order; map path -> error ('' if
    stored). With ``groups`` (path -> a subject), once a file of a group fails, the group's later
    files are not sent (error :data:`HELD_BACK`), so that they never arrive before it.

    With ``dest.tls`` the association runs over DICOM TLS: the node presents ``tls.certificate``
    and verifies the destination's certificate against ``tls.ca_certificates`` and its name
    (see :func:`node.tls.tls_args`); a destination that fails either is not sent to.
    """
    datasets = {p: pydicom.dcmread(p) for p in paths}
    ae = scu_ae(calling_ae, timeout)
    for cls in sorted({str(ds.SOPClassUID) for ds in datasets.values()}):
        ae.add_requested_context(cls, list(SENT_TRANSFER_SYNTAXES))
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args(dest, tls))
    if not assoc.is_established:
        why = ("association rejected" if assoc.is_rejected else
               "no association (destination down, or the TLS handshake failed?)" if dest.tls else
               "no association (destination down?)")
        return {p: f"{why}: {dest.ae_title}@{dest.host}:{dest.port}" for p in paths}
    result: dict[str, str] = {}
    failed_groups: set[str] = set()
    try:
        for p, ds in datasets.items():
            group = (groups or {}).get(p, p)
            if group in failed_groups:
                result[p] = HELD_BACK
                continue
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # pynetdicom raises on a lost association
                result[p] = f"C-STORE failed: {exc}"
                continue
            code = getattr(status, "Status", None)
            result[p] = "" if code in _OK else (f"C-STORE status 0x{code:04X}" if code is not None
                                                 else "no C-STORE response (association lost)")
            if result[p]:
                failed_groups.add(group)
    finally:
        if assoc.is_established:
            assoc.release()
    return result


#: The key of the PostgreSQL advisory lock that makes senders claim one at a time.
SEND_CLAIM_LOCK = 0x6D6E5F73656E64   # "mn_send"

def send_lease_seconds(n_rows: int, settings: SendSettings) -> float:
    """How long a sender keeps the ``n_rows`` rows it claimed: long enough for the association and
    every C-STORE of them to time out (``timeout_seconds`` each, plus four for the association).
    A dead sender's rows are free for another after that.
    """
    return settings.timeout_seconds * (n_rows + 4)


def claim_due(engine: Engine, settings: SendSettings, *, holder: str, now: float | None = None) -> list:
    """Claim for ``holder`` every outbox row that is due and not held back (see the module's
    docstring); returns the claimed rows in study order (with the output's path, SOP UID,
    kind, study and subject).
    """
    now = time.time() if now is None else now
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SEND_CLAIM_LOCK})
        rows = conn.execute(select(db.outbox.c.id, db.outbox.c.destination, db.outbox.c.attempts,
                                   db.outbox.c.next_try_at, db.outbox.c.claimed_until, db.outputs.c.path,
                                   db.outputs.c.sop_uid, db.outputs.c.kind, db.outputs.c.study_uid,
                                   db.studies.c.subject_key)
                            .join(db.outputs, db.outputs.c.id == db.outbox.c.output_id)
                            .outerjoin(db.studies, db.studies.c.study_uid == db.outputs.c.study_uid)
                            .where(db.outbox.c.state == OutboxState.PENDING)
                            .order_by(db.studies.c.study_date, db.studies.c.first_received_at, db.outputs.c.id,
                                      db.outbox.c.id)).all()
        waiting: set[tuple[str, str]] = set()   # (destination, subject) with an earlier output not yet due or held
        claimed = []
        for r in rows:
            key = (r.destination, r.subject_key or r.study_uid)
            if key in waiting:
                continue
            if r.next_try_at > now or r.claimed_until > now:
                waiting.add(key)
                continue
            res = conn.execute(update(db.outbox)
                               .where(and_(db.outbox.c.id == r.id, db.outbox.c.state == OutboxState.PENDING,
                                           db.outbox.c.claimed_until <= now))
                               .values(claimed_until=now + send_lease_seconds(1, settings), claimed_by=holder))
            if res.rowcount != 1:   # another sender took it since it was read (SQLite): its subject waits
                waiting.add(key)
                continue
            claimed.append(r)
        if claimed:
            conn.execute(update(db.outbox).where(db.outbox.c.id.in_([r.id for r in claimed]))
                         .values(claimed_until=now + send_lease_seconds(len(claimed), settings)))
    return claimed


def release_claims(engine: Engine, holders: set[str] | None = None) -> int:
    """Release the claims on pending outbox rows of ``holders`` (all claims with None); returns
    how many. A node calls it at start for what its own dead predecessors held.
    """
    if holders is not None and not holders:
        return 0
    which = and_(db.outbox.c.state == OutboxState.PENDING, db.outbox.c.claimed_until > 0)
    if holders is not None:
        which = and_(which, db.outbox.c.claimed_by.in_(sorted(holders)))
    with engine.begin() as conn:
        return conn.execute(update(db.outbox).where(which).values(claimed_until=0.0, claimed_by="")).rowcount


def release_dead_local_claims(engine: Engine) -> int:
    """Release the outbox claims held on this host by processes that are gone
    (:func:`node.jobs.dead_local_holders`); returns how many.
    """
    with engine.begin() as conn:
        holders = set(conn.execute(select(db.outbox.c.claimed_by).distinct()
                                   .where(and_(db.outbox.c.state == OutboxState.PENDING,
                                               db.outbox.c.claimed_until > 0))).scalars())
    return release_claims(engine, dead_local_holders(holders))


def _mine(row_id: int, holder: str):
    return and_(db.outbox.c.id == row_id, db.outbox.c.state == OutboxState.PENDING, db.outbox.c.claimed_by == holder)


def send_due(engine: Engine, destinations: dict[str, Destination], settings: SendSettings, *,
             calling_ae: str, now: float | None = None, tls: TLSSettings | None = None,
             holder: str | None = None) -> tuple[int, int]:
    """Claim (for ``holder``, default this process's ``"host:pid"``) and try every outbox row
    that is due (over DICOM TLS with ``tls`` to destinations marked ``tls``); return (sent,
    failed). Each subject's outputs go in study order (see the module's docstring): one not yet
    due, or claimed by another sender, holds back the subject's later ones to the same
    destination. Recording the result releases the claim; a row whose claim another sender
    took over meanwhile (this one outlived its send lease) is left to that sender.
    """
    holder = holder or node_id()
    rows = claim_due(engine, settings, holder=holder, now=now)
    by_dest = defaultdict(list)
    group: dict[str, str] = {}
    for r in rows:
        by_dest[r.destination].append(r)
        group[r.path] = r.subject_key or r.study_uid
    sent = failed = 0
    for name, items in by_dest.items():
        dest = destinations.get(name)
        if dest is None:
            errors = {r.path: f"destination {name!r} is not in the configuration" for r in items}
        else:
            try:
                errors = store_files(dest, [r.path for r in items], calling_ae=calling_ae,
                                     timeout=settings.timeout_seconds, tls=tls, groups=group)
            except Exception as exc:  # an unreadable output or a network error: retried later
                errors = {r.path: f"{type(exc).__name__}: {exc}" for r in items}
        with engine.begin() as conn:
            for r in items:
                err = errors.get(r.path, "not sent")
                if err == HELD_BACK:   # not tried: due again at once, after the one that failed
                    conn.execute(update(db.outbox).where(_mine(r.id, holder)).values(claimed_until=0.0))
                    continue
                if not err:
                    res = conn.execute(update(db.outbox).where(_mine(r.id, holder))
                                       .values(state=OutboxState.SENT, sent_at=time.time(), attempts=r.attempts + 1,
                                               last_error="", claimed_until=0.0))
                    if res.rowcount != 1:
                        continue
                    peer = f" ({dest.ae_title}@{dest.host}:{dest.port})" if dest is not None else ""
                    db.record_audit(conn, "sent", f"study={r.study_uid} {r.kind}={r.sop_uid} to={name}{peer}")
                    sent += 1
                else:
                    delay = backoff_seconds(r.attempts + 1, settings)
                    conn.execute(update(db.outbox).where(_mine(r.id, holder))
                                 .values(attempts=r.attempts + 1, next_try_at=time.time() + delay, last_error=err,
                                         claimed_until=0.0))
                    failed += 1
        tried = [e for e in errors.values() if e != HELD_BACK]
        if any(tried):
            log.warning("sending to %s: %d failed, retry with backoff (first error: %s)", name,
                        sum(1 for e in tried if e), next(e for e in tried if e))
    return sent, failed


class Sender(PollingLoop):
    """The loop that empties the outbox: every ``poll_seconds``, and at once when woken
    (a job has just added results).
    """

    thread_name = "musclenode-send"
    stop_timeout_seconds = 60.0   # a send in progress

    def __init__(self, engine: Engine, destinations: tuple[Destination, ...], settings: SendSettings, *,
                 calling_ae: str, poll_seconds: float = 0.5, tls: TLSSettings | None = None,
                 holder: str | None = None):
        super().__init__(poll_seconds)
        self.tls = tls
        self.engine = engine
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.calling_ae = calling_ae
        self.holder = holder   # outbox.claimed_by of what it claims (None: this process's "host:pid")

    def tick(self) -> None:
        """Send what is due (see :func:`send_due`)."""
        send_due(self.engine, self.destinations, self.settings, calling_ae=self.calling_ae, tls=self.tls,
                 holder=self.holder)
