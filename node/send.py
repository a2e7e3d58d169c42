"""Sending results to destinations (C-STORE SCU) from the outbox, with retries.

Each output x destination is a row with a state, attempts and the next try time. A
failed send is retried with exponential backoff (``retry_initial_seconds`` doubling up
to ``retry_max_seconds``) for as long as it takes: nothing is dropped because PACS was
down, and the rows survive a restart.

Per destination, a subject's outputs go in study order (study date, then the order the
studies were received, then the order the outputs were made): an output waits while an
earlier one of the same subject to the same destination is still pending and not yet due,
and within one association a failed C-STORE holds back the rest of that subject's outputs.
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
from pynetdicom import AE
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from . import db
from .config import Destination, SendSettings, TLSSettings
from .db import OutboxState
from .loop import PollingLoop
from .tls import tls_args

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
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
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


def send_due(engine: Engine, destinations: dict[str, Destination], settings: SendSettings, *,
             calling_ae: str, now: float | None = None, tls: TLSSettings | None = None) -> tuple[int, int]:
    """Try every outbox row that is due (over DICOM TLS with ``tls`` to destinations marked
    ``tls``); return (sent, failed). Each subject's outputs go in study order (see the module's
    docstring): one not yet due holds back the subject's later ones to the same destination.
    """
    now = time.time() if now is None else now
    with engine.begin() as conn:
        rows = conn.execute(select(db.outbox.c.id, db.outbox.c.destination, db.outbox.c.attempts,
                                   db.outbox.c.next_try_at, db.outputs.c.path, db.outputs.c.sop_uid,
                                   db.outputs.c.kind, db.outputs.c.study_uid, db.studies.c.subject_key)
                            .join(db.outputs, db.outputs.c.id == db.outbox.c.output_id)
                            .outerjoin(db.studies, db.studies.c.study_uid == db.outputs.c.study_uid)
                            .where(db.outbox.c.state == OutboxState.PENDING)
                            .order_by(db.studies.c.study_date, db.studies.c.first_received_at, db.outputs.c.id,
                                      db.outbox.c.id)).all()
    by_dest = defaultdict(list)
    waiting: set[tuple[str, str]] = set()   # (destination, subject) with an earlier output not yet due
    group: dict[str, str] = {}
    for r in rows:
        key = (r.destination, r.subject_key or r.study_uid)
        if key in waiting:
            continue
        if r.next_try_at > now:
            waiting.add(key)
            continue
        by_dest[r.destination].append(r)
        group[r.path] = key[1]
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
                    continue
                if not err:
                    conn.execute(update(db.outbox).where(db.outbox.c.id == r.id)
                                 .values(state=OutboxState.SENT, sent_at=time.time(), attempts=r.attempts + 1,
                                         last_error=""))
                    peer = f" ({dest.ae_title}@{dest.host}:{dest.port})" if dest is not None else ""
                    db.record_audit(conn, "sent", f"study={r.study_uid} {r.kind}={r.sop_uid} to={name}{peer}")
                    sent += 1
                else:
                    delay = backoff_seconds(r.attempts + 1, settings)
                    conn.execute(update(db.outbox).where(db.outbox.c.id == r.id)
                                 .values(attempts=r.attempts + 1, next_try_at=time.time() + delay, last_error=err))
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
                 calling_ae: str, poll_seconds: float = 0.5, tls: TLSSettings | None = None):
        super().__init__(poll_seconds)
        self.tls = tls
        self.engine = engine
        self.destinations = {d.name: d for d in destinations}
        self.settings = settings
        self.calling_ae = calling_ae

    def tick(self) -> None:
        """Send what is due (see :func:`send_due`)."""
        send_due(self.engine, self.destinations, self.settings, calling_ae=self.calling_ae, tls=self.tls)
