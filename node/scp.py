"""The node's DICOM SCP: C-ECHO and C-STORE, on a plain port, a DICOM TLS port, or both.

The C-STORE handler is thin, as in pynetdicom's examples: it checks the instance,
stores it durably and records it, and only then returns Success. No processing happens
in the association thread.

On the TLS port the handshake runs in the connection's own thread with a time limit
(:class:`TLSAssociationServer`), so a peer that stalls or fails it never holds up the
acceptor; a refused peer is logged with its address and the reason, and the node goes on.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .access import REJECTED_PERMANENT, SERVICE_USER, AccessPolicy
from .errors import InstanceRejected
from .instances import KEPT_SOP_CLASSES, parse_instance, received_fields, sop_class_name
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

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:   # LO, default character repertoire: text from the data set is escaped and cut
        status.ErrorComment = printable(comment, 64).encode("ascii", "replace").decode("ascii")
    return status


class BoundedSocket(AssociationSocket):
    """pynetdicom's association socket, refusing a PDU whose length field is over the limit.

    pynetdicom reads a PDU by its 4-byte length field, whatever it says (up to 4 GiB); here a
    length over :data:`MAX_PDU_RECEIVE` (or the node's maximum PDU length, when set) is a
    transport error: the association is aborted and the connection closed, nothing read.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` from the peer; OSError if that is more than one PDU may hold."""
        agreed = int(self.assoc.acceptor.maximum_length or 0)
        limit = max(agreed, MIN_PDU_RECEIVE) if agreed else MAX_PDU_RECEIVE
        if nr_bytes > limit:
            log.warning("association from %s: PDU length %d is over the limit of %d bytes: aborted",
                        self.assoc.requestor.address, nr_bytes, limit)
            raise OSError(f"PDU length {nr_bytes} is over the limit of {limit} bytes")
        return super().recv(nr_bytes)


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler with a :class:`BoundedSocket` for each association."""

    def _create_association(self):
        assoc = super()._create_association()
        # the socket pynetdicom made has already queued its connection event: give it the
        # bounded read rather than a second socket (which would queue the event twice)
        if type(assoc.dul.socket) is AssociationSocket:
            assoc.dul.socket.__class__ = BoundedSocket
        return assoc


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accept loop.

    pynetdicom wraps each accepted socket in the acceptor thread, handshake included; here the
    socket is wrapped without a handshake, which then runs in the connection's thread under
    ``handshake_timeout`` seconds. A failed handshake closes that connection only.
    """

    handshake_timeout = 10.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection and wrap it for TLS (the handshake is left to its thread)."""
        if self.socket is None or self.ssl_context is None:   # set by the constructor for this server
            raise RuntimeError("the TLS server has no socket or no SSL context")
        client, address = self.socket.accept()
        return self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request, client_address) -> None:
        """Complete the TLS handshake (or refuse the peer), then serve the association."""
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ValueError) as exc:   # ssl.SSLError, a timeout, a reset
            reason = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else str(exc)
            log.warning("DICOM TLS: refused %s:%s: %s", *client_address[:2], reason or type(exc).__name__)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


class _Received:
    """What one association stored: who sent it, from where, when, and how many instances of each study."""

    def __init__(self, calling: str, address: str):
        self.calling = calling
        self.address = address
        self.started = time.time()
        self.stored: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()


class Receiver:
    """Binds the store to a pynetdicom application entity; ``access`` decides who may associate
    (default: any calling AE, and the called AE title must be ``ae_title``). ``on_stored`` is
    called after each new instance is stored (the node wakes its completion monitor with it).
    """

    def __init__(self, store: Store, ae_title: str, *, max_pdu: int = 0, access: AccessPolicy | None = None,
                 on_stored: Callable[[], None] = lambda: None):
        self.store = store
        self.on_stored = on_stored
        self.access = access or AccessPolicy(ae_title)
        self._received: dict[object, _Received] = {}
        self._lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.acse_timeout = ACSE_TIMEOUT
        self.ae.dimse_timeout = DIMSE_TIMEOUT
        self.ae.network_timeout = NETWORK_TIMEOUT
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:   # always set in pynetdicom's storage contexts
                self.ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        self.server: ThreadedAssociationServer | None = None
        self.tls_server: TLSAssociationServer | None = None

    def _handlers(self) -> list[evt.EventHandlerType]:
        return [(evt.EVT_REQUESTED, self.handle_requested), (evt.EVT_C_STORE, self.handle_store),
                (evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_CONN_CLOSE, self.handle_closed)]

    def start(self, bind_address: str, port: int) -> ThreadedAssociationServer:
        """Listen on ``bind_address``:``port`` (0: any free port) in a background thread; returns the server."""
        server = self.ae.make_server((bind_address, port), evt_handlers=self._handlers(),
                                     request_handler=BoundedRequestHandler)
        thread = threading.Thread(target=server.serve_forever, name=f"musclenode-dicom-{port}", daemon=True)
        thread.start()
        self.ae._servers.append(server)   # as AE.start_server does: AssociationServer.shutdown removes it
        self.server = server
        log.info("DICOM SCP %s listening on %s:%d", self.ae.ae_title, bind_address, self.port)
        return server

    def start_tls(self, bind_address: str, port: int, context: ssl.SSLContext) -> TLSAssociationServer:
        """Listen for DICOM TLS on ``bind_address``:``port`` (0: any free port) with the server
        ``context`` (see :func:`node.tls.server_context`), in a background thread; returns the server.
        """
        server = self.ae.make_server((bind_address, port), ssl_context=context, evt_handlers=self._handlers(),
                                     server_class=TLSAssociationServer, request_handler=BoundedRequestHandler)
        if not isinstance(server, TLSAssociationServer):   # make_server builds the class it is given
            raise RuntimeError("pynetdicom did not build the TLS server")
        thread = threading.Thread(target=server.serve_forever, name=f"musclenode-dicom-tls-{port}", daemon=True)
        thread.start()
        self.ae._servers.append(server)   # as AE.start_server does: AssociationServer.shutdown removes it
        self.tls_server = server
        log.info("DICOM TLS SCP %s listening on %s:%d (client certificate %s)", self.ae.ae_title, bind_address,
                 self.tls_port, "required" if context.verify_mode == ssl.CERT_REQUIRED else "optional")
        return server

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

    def handle_requested(self, event: evt.Event) -> None:
        """A-ASSOCIATE-RQ received: refuse it with A-ASSOCIATE-RJ (rejected-permanent, service-user,
        reason 3 or 7) and an audit entry unless the access policy allows it.
        """
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        address = str(assoc.requestor.address)
        refusal = self.access.check(calling, called, address)
        if refusal is None:
            return
        log.warning("association from %s at %s to %s refused (A-ASSOCIATE-RJ reason %d): %s",
                    printable(calling, 16), address, printable(called, 16), refusal.reason, printable(refusal.why))
        try:
            with self.store.engine.begin() as conn:
                db.record_audit(conn, "association-rejected",
                                f"calling={printable(calling, 16)} called={printable(called, 16)} from={address} "
                                f"reason={refusal.reason}: {printable(refusal.why, 120)}")
        finally:
            assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, refusal.reason)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()

    def handle_closed(self, event: evt.Event) -> None:
        """Connection closed: one ``received`` audit entry per study the association stored
        (calling AE, address, study UID, instance count, start of the association).
        """
        with self._lock:
            got = self._received.pop(event.assoc, None)
        if got is None:
            return
        started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(got.started))
        with self.store.engine.begin() as conn:
            for study_uid in sorted(set(got.stored) | set(got.duplicates)):
                dup = f" duplicates={got.duplicates[study_uid]}" if got.duplicates[study_uid] else ""
                db.record_audit(conn, "received", f"study={study_uid} instances={got.stored[study_uid]}{dup} "
                                                  f"from={got.calling}@{got.address} association-start={started}")

    def _count(self, event: evt.Event, calling: str, study_uid: str, duplicate: bool) -> None:
        with self._lock:
            got = self._received.get(event.assoc)
            if got is None:
                got = self._received[event.assoc] = _Received(calling, str(event.assoc.requestor.address))
            (got.duplicates if duplicate else got.stored)[study_uid] += 1

    def handle_echo(self, event: evt.Event) -> int:
        """C-ECHO handler: always Success."""
        return SUCCESS

    def handle_store(self, event: evt.Event) -> Dataset | int:
        """C-STORE handler: check, store durably and record the instance, then return Success;
        a failure status (with the instance quarantined where possible) otherwise.
        """
        calling = printable(str(event.assoc.requestor.ae_title).strip(), 16)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:
            log.error("C-STORE from %s: cannot encode the received data set: %s", calling, printable(exc, 200))
            return _status(CANNOT_UNDERSTAND, "cannot read the data set")
        request = event.request   # a C-STORE request in this handler
        sop_uid = str(request.AffectedSOPInstanceUID or "") if isinstance(request, C_STORE) else ""
        try:
            # parse_instance inflates a deflated data set within bounds, never pydicom
            ds = parse_instance(data)
            if str(ds.SOPInstanceUID) != sop_uid:
                raise InstanceRejected("SOPInstanceUID of the data set differs from the request's "
                                       "Affected SOP Instance UID")
            fields = received_fields(ds)   # header counts for completion by protocol (never decodes pixels)
        except InstanceRejected as exc:
            return self._reject(data, str(exc), sop_uid, calling, DATASET_DOES_NOT_MATCH)
        except Exception as exc:  # a value that pydicom decodes only now, of any type
            return self._reject(data, f"the data set cannot be decoded: {type(exc).__name__}: {printable(exc, 120)}",
                                sop_uid, calling, CANNOT_UNDERSTAND)
        sop_class, study_uid = fields["sop_class_uid"], fields["study_uid"]
        if sop_class not in KEPT_SOP_CLASSES:
            # Kept (nothing is lost) but not processed: the sender is told Success, if it was kept.
            kept = self._quarantine(data, f"{sop_class_name(sop_class)} is not processed by musclenode "
                                          "(only MR images, SEG and SR are kept)", sop_uid, calling, study_uid)
            return SUCCESS if kept else _status(OUT_OF_RESOURCES, "cannot keep the instance")
        try:
            stored = self.store.store_instance(data, calling_ae=calling, **fields)
        except ValueError as exc:  # an invalid UID cannot name a file
            return self._reject(data, str(exc), sop_uid, calling, DATASET_DOES_NOT_MATCH)
        except (OSError, SQLAlchemyError) as exc:   # a full disk, a database that stays away
            # nothing of it was kept (Store.store_instance removes the file again): Out of Resources
            log.error("C-STORE from %s: cannot store SOP %s: %s", calling, printable(sop_uid), printable(exc, 200))
            return _status(OUT_OF_RESOURCES, "cannot store the instance")
        self._count(event, calling, study_uid, stored.duplicate)
        if not stored.duplicate:
            self.on_stored()
        return SUCCESS

    def _quarantine(self, data, reason, sop_uid, calling, study_uid="") -> bool:
        try:
            self.store.quarantine(data, reason, sop_uid=sop_uid, study_uid=study_uid, calling_ae=calling)
            return True
        except (OSError, SQLAlchemyError) as exc:
            log.error("cannot quarantine SOP %s: %s", printable(sop_uid), printable(exc, 200))
            return False

    def _reject(self, data, reason, sop_uid, calling, code) -> Dataset:
        kept = self._quarantine(data, reason, sop_uid, calling)
        log.warning("rejected SOP %s from %s: %s", printable(sop_uid or "?"), calling, printable(reason, 200))
        return _status(code if kept else OUT_OF_RESOURCES, reason)


