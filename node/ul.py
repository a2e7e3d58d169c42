"""The node's DICOM upper layer as a storage SCP: one thread per association, nothing decoded
that the reply does not need.

pynetdicom is a general DICOM toolkit: each PDU passes three threads (socket reader, state
machine, association), its command set is decoded by pydicom and its data set copied several
times. That is about 5 ms of CPU per 128 KiB instance, more than the durable write it waits
for. A storage SCP needs little of it: this module reads each PDU by its length into one
buffer, takes the data set's fragments as they come, reads the command set's few elements by
hand (Implicit VR Little Endian, PS3.7 Section 6.3.1) and writes the reply the same way, all in
the association's own thread.

What it reuses from pynetdicom is the association negotiation, once per association: the
A-ASSOCIATE-RQ/AC/RJ PDUs (:mod:`pynetdicom.pdu`) and the acceptance of presentation contexts
and SCP/SCU roles (:func:`pynetdicom.presentation.negotiate_as_acceptor`).

PS3.8 Section 9 gives the PDUs: A-ASSOCIATE-RQ (1), -AC (2), -RJ (3), P-DATA-TF (4),
A-RELEASE-RQ (5), -RP (6) and A-ABORT (7), each a 6-byte header (type, reserved, 4-byte
big-endian length) and its body. A PDU that is unknown, out of order, longer than the node
reads, or not whole aborts its association (A-ABORT, source service-provider) and closes its
connection, never the node.
"""

from __future__ import annotations

import logging
import re
import socket
import socketserver
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from reports.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

from .text import printable

log = logging.getLogger(__name__)

# PDU types (PS3.8 Table 9-1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
# A-ABORT reasons of the service provider (PS3.8 Table 9-26)
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06
# DIMSE command fields and values (PS3.7 Annex E)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

_HEADER = struct.Struct(">BBI")
_PDV = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")
_UID = re.compile(rb"[0-9]+(\.[0-9]+)*")


class AssociationAborted(Exception):
    """The association ends here: the peer broke the protocol, closed or went silent."""


@dataclass
class Message:
    """A DIMSE message as received: its command elements (raw values keyed by element number
    of group 0000) and its data set's bytes, if it has one.
    """

    context_id: int
    command: dict[int, bytes]
    data: bytearray | None = None

    def us(self, element: int) -> int | None:
        """An unsigned short of the command set (None when absent or not 2 bytes)."""
        value = self.command.get(element)
        return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None

    def ui(self, element: int) -> str:
        """A UID of the command set, padding removed ("" when absent)."""
        return self.command.get(element, b"").rstrip(b"\0 ").decode("ascii", "replace")


@dataclass
class Association:
    """One accepted association: who is on the other side and what was agreed."""

    calling_ae: str
    called_ae: str
    address: str
    port: int
    contexts: dict[int, PresentationContext] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    app_state: Any = None           # the application's own per-association record


class Application(Protocol):
    """What the upper layer asks of the node (:class:`node.scp.Receiver`)."""

    ae_title: str

    def settings(self) -> Settings:
        """Current limits and contexts (read at each new connection, so a test may change them)."""

    def on_request(self, calling: str, called: str, address: str) -> tuple[int, int, int] | None:
        """None to accept an A-ASSOCIATE-RQ (then :meth:`on_ended` follows when its connection
        ends), or (result, source, reason) of the A-ASSOCIATE-RJ.
        """

    def on_ended(self) -> None:
        """The connection of an association :meth:`on_request` accepted has ended."""

    def on_store(self, assoc: Association, context: PresentationContext, message_id: int, sop_class: str,
                 sop_uid: str, data: bytes) -> tuple[int, str]:
        """Store one instance (``data``: the data set in the context's transfer syntax); returns
        the C-STORE status and an error comment ("" for none).
        """

    def on_release(self, assoc: Association) -> None:
        """A-RELEASE-RQ received: return when the association's instances are all recorded."""

    def on_closed(self, assoc: Association) -> None:
        """The association's connection is closed (by a release, an abort or the peer)."""


@dataclass(frozen=True)
class Settings:
    """The limits and contexts of the SCP."""

    contexts: list[PresentationContext]
    max_pdu: int                  # the maximum PDU length the node announces (0: none)
    acse_timeout: float | None    # for the A-ASSOCIATE-RQ after the connection (None: no limit)
    network_timeout: float | None  # for a PDU after that
    max_pdu_read: int             # a PDU length field over this aborts the association
    max_message: int              # a data set over this aborts the association


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (Implicit VR Little Endian) of ``elements`` (element number, raw value),
    with its group length.
    """
    body = b"".join(_element(e, v) for e, v in sorted(elements))
    return _ELEMENT.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(body)) + body


def decode_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set (Implicit VR Little Endian, group 0000 only), keyed by
    element number; :class:`AssociationAborted` if it is not one.
    """
    out: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise AssociationAborted("a command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise AssociationAborted(f"a command set holds ({group:04X},{element:04X}) of length {length}: "
                                     "not a command element")
        out[element] = bytes(data[offset:offset + length])
        offset += length
    return out


def _is_uid(value: bytes) -> bool:
    """Whether ``value`` is a DICOM UID (digits and dots, at most 64 characters)."""
    return 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def _pdu(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(kind, 0, len(body)) + body


def abort_pdu(source: int, reason: int) -> bytes:
    """An A-ABORT PDU (source 0: service-user, 2: service-provider)."""
    return _pdu(ABORT, bytes((0, 0, source, reason)))


class Connection:
    """The upper layer of one connection, from the A-ASSOCIATE-RQ to its release or abort."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], app: Application):
        self.sock = sock
        self.address = address
        self.app = app
        self.settings = app.settings()
        self.assoc: Association | None = None
        self.admitted = False   # the application counted this association in (on_request accepted it)

    # ---- the transport -----------------------------------------------------------------------

    def _read_exactly(self, n: int) -> memoryview:
        view = memoryview(bytearray(n))
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as exc:
                raise AssociationAborted("the peer sent nothing within the time limit") from exc
            except OSError as exc:
                raise AssociationAborted(f"the connection failed: {exc}") from exc
            if k == 0:
                raise AssociationAborted("the peer closed the connection" + (" inside a PDU" if got else ""))
            got += k
        return view

    def read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU's type and body; its length is checked before anything is read for it."""
        kind, _, length = _HEADER.unpack(self._read_exactly(6))
        if length > self.settings.max_pdu_read:
            raise self.abort(INVALID_PARAMETER, f"PDU length {length} is over the limit of "
                                                f"{self.settings.max_pdu_read} bytes")
        return kind, self._read_exactly(length)

    def send(self, data: bytes) -> None:
        """Send ``data``; :class:`AssociationAborted` if the connection fails."""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise AssociationAborted(f"the connection failed: {exc}") from exc

    def abort(self, reason: int, why: str) -> AssociationAborted:
        """Send an A-ABORT (service-provider, ``reason``); returns the exception that ends the association."""
        try:
            self.sock.sendall(abort_pdu(2, reason))
        except OSError:
            pass
        return AssociationAborted(why)

    # ---- the association -----------------------------------------------------------------------

    def serve(self) -> None:
        """Serve the connection to its end; never raises."""
        peer = f"{self.address[0]}:{self.address[1]}"
        try:
            self.sock.settimeout(self.settings.acse_timeout)
            kind, body = self.read_pdu()
            if kind != ASSOCIATE_RQ:
                raise self.abort(UNEXPECTED_PDU if kind in range(2, 8) else UNRECOGNIZED_PDU,
                                 f"PDU type 0x{kind:02X} before an A-ASSOCIATE-RQ")
            if not self.associate(bytes(body)):
                return
            self.sock.settimeout(self.settings.network_timeout)
            self.run()
        except AssociationAborted as exc:
            level = logging.DEBUG if "closed the connection" in str(exc) and "inside" not in str(exc) else logging.INFO
            log.log(level, "association from %s ended: %s", peer, exc)
        except Exception:   # never the node: this association ends, the others go on
            log.exception("association from %s aborted by an unexpected error", peer)
            self.abort(0, "an unexpected error")
        finally:
            if self.assoc is not None:
                try:
                    self.app.on_closed(self.assoc)
                except Exception:
                    log.exception("the end of the association from %s was not recorded", peer)
            if self.admitted:
                self.app.on_ended()

    def associate(self, body: bytes) -> bool:
        """Negotiate: send the A-ASSOCIATE-AC (True) or -RJ (False)."""
        rq_pdu = A_ASSOCIATE_RQ()
        try:
            rq_pdu.decode(_HEADER.pack(ASSOCIATE_RQ, 0, len(body)) + body)
            rq = rq_pdu.to_primitive()
        except Exception as exc:   # pynetdicom raises several types on a corrupt A-ASSOCIATE-RQ
            raise self.abort(INVALID_PARAMETER, f"the A-ASSOCIATE-RQ cannot be read: {type(exc).__name__}") from exc
        calling = str(rq.calling_ae_title or "").strip()
        called = str(rq.called_ae_title or "").strip()
        refusal = self.app.on_request(calling, called, self.address[0])
        self.admitted = refusal is None
        if refusal is not None:
            rj = A_ASSOCIATE()
            rj.result, rj.result_source, rj.diagnostic = refusal
            rj_pdu = A_ASSOCIATE_RJ()
            rj_pdu.from_primitive(rj)
            self.send(rj_pdu.encode())
            return False
        roles = {UID(item.sop_class_uid): (item.scu_role, item.scp_role) for item in rq.user_information or []
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid}
        result, ac_roles = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                 self.settings.contexts, roles)
        ac = A_ASSOCIATE()
        ac.application_context_name = UID(APPLICATION_CONTEXT)
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = result
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, implementation, version, *ac_roles]
        ac_pdu = A_ASSOCIATE_AC()
        ac_pdu.from_primitive(ac)
        self.send(ac_pdu.encode())
        self.assoc = Association(calling, called, self.address[0], self.address[1],
                                 contexts={int(cx.context_id): cx for cx in result
                                           if cx.result == 0x00 and cx.context_id is not None})
        return True

    def run(self) -> None:
        """Receive DIMSE messages and answer each, until A-RELEASE-RQ or an abort."""
        command = bytearray()
        pending: Message | None = None   # a command whose data set is still coming
        while True:
            kind, body = self.read_pdu()
            if kind == RELEASE_RQ:
                if self.assoc is not None:
                    self.app.on_release(self.assoc)
                self.send(_pdu(RELEASE_RP, b"\0\0\0\0"))
                return
            if kind == ABORT:
                raise AssociationAborted("the peer aborted the association")
            if kind != P_DATA_TF:
                raise self.abort(UNEXPECTED_PDU if kind in range(1, 8) else UNRECOGNIZED_PDU,
                                 f"PDU type 0x{kind:02X} during the association")
            offset, end = 0, len(body)
            while offset < end:
                if offset + 6 > end:
                    raise self.abort(INVALID_PARAMETER, "a P-DATA-TF ends inside a PDV header")
                length, context_id, control = _PDV.unpack_from(body, offset)
                start, stop = offset + 6, offset + 4 + length
                if length < 2 or stop > end:
                    raise self.abort(INVALID_PARAMETER, f"a PDV of length {length} does not fit its P-DATA-TF")
                offset = stop
                if self.assoc is None or context_id not in self.assoc.contexts:
                    raise self.abort(INVALID_PARAMETER, f"a PDV on presentation context {context_id}, "
                                                        "which was not accepted")
                if control & 0x01:   # a command fragment
                    if pending is not None:
                        raise self.abort(UNEXPECTED_PDU, "a command fragment where a data set fragment was due")
                    command += body[start:stop]
                    if control & 0x02:
                        message = Message(context_id, decode_command(command))
                        command = bytearray()
                        if message.us(0x0800) == NO_DATA_SET:
                            self.answer(message)
                        else:
                            message.data = bytearray()
                            pending = message
                else:                # a data set fragment
                    if pending is None or pending.data is None or context_id != pending.context_id:
                        raise self.abort(UNEXPECTED_PDU, "a data set fragment without its command")
                    if len(pending.data) + (stop - start) > self.settings.max_message:
                        raise self.abort(INVALID_PARAMETER, f"a data set of over {self.settings.max_message} "
                                                            "bytes: refused")
                    pending.data += body[start:stop]
                    if control & 0x02:
                        self.answer(pending)
                        pending = None

    def answer(self, message: Message) -> None:
        """Act on one whole message and send its response."""
        assert self.assoc is not None
        context = self.assoc.contexts[message.context_id]
        field_ = message.us(0x0100) or 0
        message_id = message.us(0x0110) or 0
        sop_class = message.ui(0x0002) or str(context.abstract_syntax)
        extra: list[tuple[int, bytes]] = []
        if field_ == C_STORE_RQ and message.data is not None:
            sop_uid = message.ui(0x1000)
            status, comment = self.app.on_store(self.assoc, context, message_id, sop_class, sop_uid,
                                                bytes(message.data))
            extra.append((0x1000, sop_uid.encode()))
            if comment:
                extra.append((0x0902, comment.encode("ascii", "replace")[:64]))
        elif field_ == C_ECHO_RQ:
            status = 0x0000
        else:   # a request the node does not serve on this context: its response, "unrecognized operation"
            status = UNRECOGNIZED_OPERATION
            log.info("association from %s: command 0x%04X refused (the node serves C-STORE and C-ECHO)",
                     self.assoc.address, field_)
        reply = [(0x0002, sop_class.encode()), (0x0100, struct.pack("<H", field_ | 0x8000)),
                 (0x0120, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", NO_DATA_SET)),
                 (0x0900, struct.pack("<H", status)), *extra]
        # Affected SOP Class and Instance UID are optional in a response (PS3.7 Table 9.3-2: U(=));
        # a value from the request that is not a UID is left out rather than echoed
        encoded = encode_command([(e, v) for e, v in reply if e not in (0x0002, 0x1000) or _is_uid(v)])
        self.send(_pdu(P_DATA_TF, _PDV.pack(len(encoded) + 2, message.context_id, 0x03) + encoded))


class StorageServer(socketserver.ThreadingTCPServer):
    """A listening socket and a thread per connection, each a :class:`Connection`; with
    ``ssl_context``, DICOM TLS, the handshake done in the connection's thread within
    ``handshake_timeout`` seconds (a peer that stalls or fails it never holds up the others).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    block_on_close = False
    handshake_timeout = 10.0

    def __init__(self, address: tuple[str, int], app: Application, ssl_context: ssl.SSLContext | None = None):
        self.app = app
        self.ssl_context = ssl_context
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, socketserver.BaseRequestHandler)

    def process_request_thread(self, request, client_address) -> None:
        """One connection: TLS handshake if any, then the association, then close."""
        sock: socket.socket = request
        with self._lock:
            self._open.add(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                try:
                    sock.settimeout(self.handshake_timeout)
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ValueError) as exc:   # ssl.SSLError, a timeout, a reset
                    reason = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else str(exc)
                    log.warning("DICOM TLS: refused %s:%s: %s", *client_address[:2],
                                printable(reason or type(exc).__name__, 200))
                    return
                with self._lock:
                    self._open.add(sock)
            Connection(sock, client_address, self.app).serve()
        finally:
            with self._lock:
                self._open.discard(request)
                self._open.discard(sock)
            self.shutdown_request(sock)

    def shutdown(self) -> None:
        """Stop accepting and close the connections still open (their threads then end)."""
        super().shutdown()
        self.server_close()
        with self._lock:
            still = list(self._open)
        for sock in still:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve_in_thread(server: StorageServer, name: str) -> threading.Thread:
    """Run ``server.serve_forever`` in a daemon thread named ``name``."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


