"""The node's DICOM SCP: C-ECHO and C-STORE, on a plain port, a DICOM TLS port, or both.

The upper layer is the node's own (:mod:`node.ul`: a thread per association, the data set
taken as it comes, the command set read by hand). The C-STORE handler here parses the
instance's header (the elements it records and those that size the pixels; the rest is
decoded in full by the job that reads it), stores it durably and records it, and only then
returns Success. No processing happens in the association thread.

On the TLS port the handshake runs in the connection's own thread with a time limit, so a
peer that stalls or fails it never holds up the others; a refused peer is logged with its
address and the reason, and the node goes on.
"""

from __future__ import annotations

import logging
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pydicom import uid
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from sqlalchemy.exc import SQLAlchemyError

from reports.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

from . import db, ul
from .access import REJECTED_PERMANENT, SERVICE_USER, AccessPolicy
from .errors import InstanceRejected
from .ingest import Entry, Ingest
from .instances import (
    KEPT_SOP_CLASSES,
    MAX_PIXEL_BYTES,
    ReceivedHeader,
    instance_ids,
    parse_instance,
    received_fields,
    sop_class_name,
)
from .store import Store
from .text import printable

log = logging.getLogger(__name__)

#: Transfer syntaxes accepted: the uncompressed ones and the usual lossless compressions.
TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,        # retired, still sent by old scanners
    uid.JPEGLosslessSV1,            # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    uid.JPEGLossless,               # JPEG Lossless (Process 14)
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.RLELossless,
]

#: Time limits of an association (seconds): the A-ASSOCIATE-RQ must come within ACSE_TIMEOUT of
#: the connection (a half-open connection that says nothing is closed then), a DIMSE message within
#: DIMSE_TIMEOUT, and a connection silent for NETWORK_TIMEOUT is aborted.
ACSE_TIMEOUT = 30.0
DIMSE_TIMEOUT = 60.0
NETWORK_TIMEOUT = 120.0
#: The longest PDU read when the node's maximum PDU length is 0 (unlimited); with a maximum set,
#: PDUs up to max(that maximum, MIN_PDU_RECEIVE) are read. A longer PDU length field aborts the
#: association before anything is allocated for it.
MAX_PDU_RECEIVE = 64 << 20
MIN_PDU_RECEIVE = 1 << 20
#: The largest data set one C-STORE may carry (as received, before any inflation): the largest
#: image the node decodes (:data:`node.instances.MAX_PIXEL_BYTES`) and 64 MiB of header. A longer
#: one aborts its association.
MAX_DATA_SET = MAX_PIXEL_BYTES + (64 << 20)
#: Associations served at once (plain and TLS ports together); one more is rejected-transient.
MAX_ASSOCIATIONS = 32
REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class _Received:
    """What one association stored: who sent it, from where, when, and how many instances of each study."""

    def __init__(self, calling: str, address: str, started: float):
        self.calling = calling
        self.address = address
        self.started = started
        self.stored: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.last_entry: Entry | None = None   # the last instance it journalled (placed in order)


class Receiver:
    """Binds the store to the node's storage SCP (:mod:`node.ul`); ``access`` decides who may
    associate (default: any calling AE, and the called AE title must be ``ae_title``).
    ``on_stored`` is called after each new instance is stored (the node wakes its completion
    monitor with it).

    ``ae`` is a pynetdicom application entity that holds what the SCP accepts (its supported
    presentation contexts), its maximum PDU length and its time limits; the upper layer reads
    them at each new connection.
    """

    def __init__(self, store: Store, ae_title: str, *, max_pdu: int = 0, access: AccessPolicy | None = None,
                 on_stored: Callable[[], None] = lambda: None, journal_mb: int = 0):
        self.store = store
        self.journal_mb = journal_mb
        self.ae_title = ae_title
        self.on_stored = on_stored
        self.access = access or AccessPolicy(ae_title)
        self._lock = threading.Lock()
        self._active = 0   # associations open (accepted, not ended)
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.acse_timeout = ACSE_TIMEOUT
        self.ae.dimse_timeout = DIMSE_TIMEOUT
        self.ae.network_timeout = NETWORK_TIMEOUT
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:   # always set in pynetdicom's storage contexts
                self.ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.server: ul.StorageServer | None = None
        self.tls_server: ul.StorageServer | None = None
        self.ingest: Ingest | None = None

    def _start_ingest(self) -> None:
        """Open the ingest journal (once; :func:`node.ingest.open_journal` first replays those dead
        processes left), unless ``journal_mb`` is 0.
        """
        if self.ingest is None and self.journal_mb:
            self.ingest = Ingest(self.store, lambda: self.on_stored(), half_bytes=self.journal_mb << 19)

    def settings(self) -> ul.Settings:
        """What the upper layer accepts and its limits, as ``ae`` holds them now."""
        agreed = int(self.ae.maximum_pdu_size or 0)
        return ul.Settings(contexts=self.ae.supported_contexts, max_pdu=agreed,
                           acse_timeout=self.ae.acse_timeout, network_timeout=self.ae.network_timeout,
                           max_pdu_read=max(agreed, MIN_PDU_RECEIVE) if agreed else MAX_PDU_RECEIVE,
                           max_message=MAX_DATA_SET)

    def start(self, bind_address: str, port: int) -> ul.StorageServer:
        """Listen on ``bind_address``:``port`` (0: any free port) in a background thread; returns the server."""
        self._start_ingest()
        self.server = ul.StorageServer((bind_address, port), self)
        ul.serve_in_thread(self.server, f"musclenode-dicom-{port}")
        log.info("DICOM SCP %s listening on %s:%d", self.ae_title, bind_address, self.port)
        return self.server

    def start_tls(self, bind_address: str, port: int, context: ssl.SSLContext) -> ul.StorageServer:
        """Listen for DICOM TLS on ``bind_address``:``port`` (0: any free port) with the server
        ``context`` (see :func:`node.tls.server_context`), in a background thread; returns the server.
        """
        self._start_ingest()
        self.tls_server = ul.StorageServer((bind_address, port), self, ssl_context=context)
        ul.serve_in_thread(self.tls_server, f"musclenode-dicom-tls-{port}")
        log.info("DICOM TLS SCP %s listening on %s:%d (client certificate %s)", self.ae_title, bind_address,
                 self.tls_port, "required" if context.verify_mode == ssl.CERT_REQUIRED else "optional")
        return self.tls_server

    @property
    def port(self) -> int:
        """The plain TCP port the SCP listens on (the one picked when started with port 0)."""
        if self.server is None:
            raise RuntimeError("the plain SCP is not started")
        return self.server.server_address[1]

    @property
    def tls_port(self) -> int:
        """The DICOM TLS port the SCP listens on (the one picked when started with port 0)."""
        if self.tls_server is None:
            raise RuntimeError("the TLS SCP is not started")
        return self.tls_server.server_address[1]

    def stop(self) -> None:
        """Stop listening (associations in progress are closed); a second call does nothing."""
        for server in (self.server, self.tls_server):
            if server is not None:
                server.shutdown()
        self.server = self.tls_server = None
        if self.ingest is not None:   # what was answered is placed, then the journal is removed
            self.ingest.close()
            self.ingest = None

    def on_ended(self) -> None:
        """An association it accepted has ended: one fewer open."""
        with self._lock:
            self._active -= 1

    def on_release(self, assoc: ul.Association) -> None:
        """A-RELEASE-RQ: wait until the instances the association stored are placed and recorded."""
        got: _Received | None = assoc.app_state
        if got is not None and got.last_entry is not None and self.ingest is not None:
            if not self.ingest.wait([got.last_entry]):
                log.warning("association from %s released before its instances were recorded (the store is "
                            "failing: %s)", got.calling, self.ingest.failing or "slow")

    def on_request(self, calling: str, called: str, address: str) -> tuple[int, int, int] | None:
        """A-ASSOCIATE-RQ received: None to accept it, or the A-ASSOCIATE-RJ (rejected-permanent,
        service-user, reason 3 or 7), with an audit entry, when the access policy refuses it.
        """
        refusal = self.access.check(calling, called, address)
        if refusal is None:
            with self._lock:
                if self._active >= MAX_ASSOCIATIONS:
                    log.warning("association from %s at %s refused: %d associations already open",
                                printable(calling, 16), address, self._active)
                    return REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED
                self._active += 1
            return None
        log.warning("association from %s at %s to %s refused (A-ASSOCIATE-RJ reason %d): %s",
                    printable(calling, 16), address, printable(called, 16), refusal.reason, printable(refusal.why))
        with self.store.engine.begin() as conn:
            db.record_audit(conn, "association-rejected",
                            f"calling={printable(calling, 16)} called={printable(called, 16)} from={address} "
                            f"reason={refusal.reason}: {printable(refusal.why, 120)}")
        return REJECTED_PERMANENT, SERVICE_USER, refusal.reason

    def on_closed(self, assoc: ul.Association) -> None:
        """Connection closed: one ``received`` audit entry per study the association stored
        (calling AE, address, study UID, instance count, start of the association).
        """
        got: _Received | None = assoc.app_state
        if got is None:
            return
        started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(got.started))
        with self.store.engine.begin() as conn:
            for study_uid in sorted(set(got.stored) | set(got.duplicates)):
                dup = f" duplicates={got.duplicates[study_uid]}" if got.duplicates[study_uid] else ""
                db.record_audit(conn, "received", f"study={study_uid} instances={got.stored[study_uid]}{dup} "
                                                  f"from={got.calling}@{got.address} association-start={started}")

    def on_store(self, assoc: ul.Association, context: PresentationContext, message_id: int, sop_class: str,
                 sop_uid: str, data: bytes) -> tuple[int, str]:
        """C-STORE: check, store durably and record the instance, then Success; a failure status
        and its reason (with the instance quarantined where possible) otherwise.
        """
        calling = printable(assoc.calling_ae, 16)
        code, comment, study_uid, duplicate = self._store(
            part10(data, sop_class, sop_uid, str(context.transfer_syntax[0]), calling), sop_uid, calling, assoc)
        if code == SUCCESS and study_uid:
            got = self._received(assoc, calling)
            (got.duplicates if duplicate else got.stored)[study_uid] += 1
        return code, comment

    @staticmethod
    def _received(assoc: ul.Association, calling: str) -> _Received:
        if assoc.app_state is None:
            assoc.app_state = _Received(calling, assoc.address, assoc.started)
        return assoc.app_state

    def _store(self, data: bytes, sop_uid: str, calling: str, assoc: ul.Association | None = None
               ) -> tuple[int, str, str, bool]:
        """Check, store and record one Part 10 instance: (status, reason, study UID, duplicate).

        An instance is journalled (:mod:`node.ingest`: durable before the answer, its file and
        row placed behind it); without a journal, or when it is larger than half the journal,
        it is stored and recorded before the answer.
        """
        try:
            # parse_instance inflates a deflated data set within bounds, never pydicom; the
            # elements are decoded in full by the job that reads the instance (quarantined then)
            ds = parse_instance(data, decode_all=False)
            if str(ds.SOPInstanceUID) != sop_uid:
                raise InstanceRejected("SOPInstanceUID of the data set differs from the request's "
                                       "Affected SOP Instance UID")
            ids = instance_ids(ds)
            # what the row records (header counts for completion by protocol, never pixels): the
            # node's own header (its values converted already) is made into it after the answer,
            # by the placer; a data set pydicom read (converting values when asked, which may fail), now
            row: dict[str, Any] | ReceivedHeader = ds if isinstance(ds, ReceivedHeader) else received_fields(ds)
        except InstanceRejected as exc:
            return (*self._reject(data, str(exc), sop_uid, calling, DATASET_DOES_NOT_MATCH), "", False)
        except Exception as exc:  # a value that pydicom decodes only now, of any type
            return (*self._reject(data, f"the data set cannot be decoded: {type(exc).__name__}: "
                                        f"{printable(exc, 120)}", sop_uid, calling, CANNOT_UNDERSTAND), "", False)
        sop_class, study_uid = ids["sop_class_uid"], ids["study_uid"]
        if sop_class not in KEPT_SOP_CLASSES:
            # Kept (nothing is lost) but not processed: the sender is told Success, if it was kept.
            kept = self._quarantine(data, f"{sop_class_name(sop_class)} is not processed by musclenode "
                                          "(only MR images, SEG and SR are kept)", sop_uid, calling, study_uid)
            return (SUCCESS, "", "", False) if kept else (OUT_OF_RESOURCES, "cannot keep the instance", "", False)
        try:
            path = self.store.instance_path(study_uid, ids["series_uid"], ids["sop_uid"])
            if self.ingest is not None and assoc is not None and self.ingest.takes(len(data)):
                entry = self.ingest.receive(data, path, row, calling)
                self._received(assoc, calling).last_entry = entry
                return SUCCESS, "", study_uid, False
            stored = self.store.store_instance(data, calling_ae=calling,
                                               **(row if isinstance(row, dict)
                                                  else received_fields(row)))  # type: ignore[arg-type]
            if not stored.duplicate:
                self.on_stored()
        except ValueError as exc:  # an invalid UID cannot name a file
            return (*self._reject(data, str(exc), sop_uid, calling, DATASET_DOES_NOT_MATCH), "", False)
        except (OSError, SQLAlchemyError) as exc:   # a full disk, a database that stays away
            # nothing of it was kept (Store.store_instance removes the file again): Out of Resources
            log.error("C-STORE from %s: cannot store SOP %s: %s", calling, printable(sop_uid), printable(exc, 200))
            return OUT_OF_RESOURCES, "cannot store the instance", "", False
        return SUCCESS, "", study_uid, stored.duplicate

    def _quarantine(self, data, reason, sop_uid, calling, study_uid="") -> bool:
        try:
            self.store.quarantine(data, reason, sop_uid=sop_uid, study_uid=study_uid, calling_ae=calling)
            return True
        except (OSError, SQLAlchemyError) as exc:
            log.error("cannot quarantine SOP %s: %s", printable(sop_uid), printable(exc, 200))
            return False

    def _reject(self, data, reason, sop_uid, calling, code) -> tuple[int, str]:
        kept = self._quarantine(data, reason, sop_uid, calling)
        log.warning("rejected SOP %s from %s: %s", printable(sop_uid or "?"), calling, printable(reason, 200))
        return (code if kept else OUT_OF_RESOURCES), _comment(reason)


def _comment(text: str) -> str:
    """An Error Comment (LO, default character repertoire): text from the data set escaped and cut."""
    return printable(text, 64).encode("ascii", "replace").decode("ascii")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10(data: bytes, sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """A received data set as a DICOM file (PS3.10): preamble, "DICM", File Meta Information
    (the request's SOP class and instance, the transfer syntax of its presentation context,
    the node's implementation, the sender's AE title) and the data set's bytes as received.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\0\1"),
        _meta_element(0x0002, b"UI", sop_class.encode("ascii", "replace")),
        _meta_element(0x0003, b"UI", sop_uid.encode("ascii", "replace")),
        _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16]),
    ))
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body + data
