"""Hostile input through a running node (issue 13): mutated files over real associations,
memory bombs refused before they are decoded, and malformed PDUs over raw sockets.

Every mutated file that reaches the SCP gets a DICOM status and, when it cannot be used, a
quarantine entry with its reason; memory bombs cost at most ``BOMB_PEAK_BYTES``; a malformed
PDU aborts its own connection while an association beside it stores to the end.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from dicom_builders import mr_series
from fuzz_mutations import encode, make_seeds, random_mutant, with_transfer_syntax
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from node import db
from node.errors import InstanceRejected
from node.instances import parse_instance

N_MUTANTS = 300
BOMB_PEAK_BYTES = 200 << 20
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]


@pytest.fixture(autouse=True)
def quiet():
    """pydicom and pynetdicom log every odd value and every abort; hundreds would flood the report."""
    loggers = [logging.getLogger(n) for n in ("pydicom", "pynetdicom", "node")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def _scu() -> AE:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for cls in (MRImageStorage, EnhancedMRImageStorage, "1.2.840.10008.5.1.4.1.1.2"):
        ae.add_requested_context(cls, TRANSFER_SYNTAXES)
    return ae


def _echo(port: int) -> int:
    assoc = _scu().associate("127.0.0.1", port, ae_title="MUSCLENODE")
    assert assoc.is_established, "the node does not associate any more"
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _quarantine(node) -> list:
    with node.engine.begin() as conn:
        return conn.execute(select(db.quarantine)).all()


@pytest.mark.slow
def test_mutated_files_get_a_status_and_unusable_ones_are_quarantined(make_node, tmp_path):
    node = make_node(complete_after=3600)
    seeds = make_seeds()
    rng = random.Random(13)
    ae = _scu()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
    statuses: dict[int, int] = {}
    failures, unsendable, reassociations = 0, 0, 0
    t0 = time.time()
    for i in range(N_MUTANTS):
        what, data = random_mutant(seeds, rng)
        path = tmp_path / f"mutant-{i}.dcm"
        path.write_bytes(data)
        if not assoc.is_established:
            reassociations += 1
            assoc = ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
            assert assoc.is_established, f"the node refuses associations after mutant {i - 1}"
        try:
            status = assoc.send_c_store(path)   # the file's bytes as they are, never re-encoded
        except Exception:  # pynetdicom reads the file meta (and inflates) before sending: it never leaves
            unsendable += 1
            continue
        if not assoc.is_established and "Status" not in status:
            continue   # the association was aborted: the next mutant opens a new one
        code = int(status.Status)
        statuses[code] = statuses.get(code, 0) + 1
        assert code in (0x0000, 0xA900, 0xC000), f"mutant {i} ({what}): status 0x{code:04X}"
        if code != 0x0000:
            failures += 1
            assert status.get("ErrorComment"), f"mutant {i} ({what}): a failure without a reason"
    if assoc.is_established:
        assoc.release()
    elapsed = time.time() - t0
    sent = sum(statuses.values())
    assert sent >= N_MUTANTS * 0.6, f"only {sent} of {N_MUTANTS} mutants reached the node ({unsendable} unsendable)"
    rows = _quarantine(node)
    assert len(rows) >= failures   # every refused file is kept, with its reason beside it
    for row in rows:
        assert row.reason.strip()
        assert Path(row.path).exists() and Path(row.path).with_suffix(".txt").read_text().strip()
    assert _echo(node.port) == 0x0000   # the node keeps serving
    print(f"{sent} mutants sent in {elapsed:.1f} s: statuses {statuses}, {len(rows)} quarantined, "
          f"{unsendable} unsendable, {reassociations} re-associations")


# ---- memory bombs ------------------------------------------------------------------------------

def _mr(**kw):
    return mr_series(1, **kw)[0]


def _absurd_dimensions() -> bytes:
    ds = _mr()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.PixelData = b"\0" * 64
    return encode(ds)


def _wrong_pixel_length() -> bytes:
    ds = _mr()
    ds.PixelData = bytes(ds.PixelData) * 4
    return encode(ds)


def _deflate_bomb(path: Path, inflated: int = 1 << 30) -> Path:
    """An MR instance in Deflated Explicit VR LE whose data set inflates to ``inflated`` bytes
    (a Pixel Data of zeros), written without ever holding the inflated bytes in memory.
    """
    ds = _mr()
    ds.Rows = ds.Columns = 16384
    ds.NumberOfFrames = 2
    del ds.PixelData
    plain = encode(ds)
    header = with_transfer_syntax(plain, ExplicitVRLittleEndian)
    meta_end = len(header) - len(_body(plain))
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as fh:
        fh.write(with_transfer_syntax(plain[:meta_end], DeflatedExplicitVRLittleEndian))
        fh.write(packer.compress(plain[meta_end:] + pixel_header))
        chunk = b"\0" * (16 << 20)
        for _ in range(inflated // len(chunk)):
            fh.write(packer.compress(chunk))
        fh.write(packer.flush())
    return path


def _body(data: bytes) -> bytes:
    from fuzz_mutations import _split
    return _split(data)[1]


@pytest.mark.parametrize("make, reason", [
    (_absurd_dimensions, "more than the node decodes"),
    (_wrong_pixel_length, "pixel data has"),
])
def test_memory_bombs_are_refused_before_decoding(make, reason):
    data = make()
    tracemalloc.start()
    try:
        with pytest.raises(InstanceRejected, match=reason):
            parse_instance(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BOMB_PEAK_BYTES


def test_deflate_bomb_is_refused_within_bounded_memory(tmp_path):
    bomb = _deflate_bomb(tmp_path / "bomb.dcm")
    data = bomb.read_bytes()
    assert len(data) < 8 << 20   # a few MB that would inflate to 1 GiB
    tracemalloc.start()
    try:
        with pytest.raises(InstanceRejected, match="deflate bomb"):
            parse_instance(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < BOMB_PEAK_BYTES, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.slow
def test_memory_bombs_over_an_association_fail_and_are_quarantined(make_node, tmp_path):
    node = make_node(complete_after=3600)
    files = {"dimensions": tmp_path / "dims.dcm", "length": tmp_path / "length.dcm"}
    files["dimensions"].write_bytes(_absurd_dimensions())
    files["length"].write_bytes(_wrong_pixel_length())
    # (the deflate bomb is tested on parse_instance, the SCP's own path: pynetdicom's SCU inflates
    # a deflated file before sending it, so it cannot carry one)
    assoc = _scu().associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
    assert assoc.is_established
    tracemalloc.start()   # the node runs in this process: its handler's allocations are traced
    try:
        peaks = {}
        for name, path in files.items():
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            status = assoc.send_c_store(path)
            _, peak = tracemalloc.get_traced_memory()
            peaks[name] = peak - before
            assert int(status.Status) == 0xA900, name
            assert status.ErrorComment
    finally:
        tracemalloc.stop()
        assoc.release()
    for name, peak in peaks.items():
        assert peak < BOMB_PEAK_BYTES, f"{name}: {peak / 2**20:.0f} MiB"
    reasons = sorted(row.reason for row in _quarantine(node))
    assert len(reasons) == 2
    assert any("more than the node decodes" in r for r in reasons) and any("pixel data has" in r for r in reasons)
    print("peak allocations per bomb (MiB):", {k: round(v / 2**20, 1) for k, v in peaks.items()})


# ---- malformed PDUs ----------------------------------------------------------------------------

def _associate_rq_bytes() -> bytes:
    """The bytes of a real A-ASSOCIATE-RQ from pynetdicom (caught by a listening socket)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        ae = _scu()
        ae.acse_timeout = 2
        t = threading.Thread(target=lambda: ae.associate("127.0.0.1", port, ae_title="MUSCLENODE"), daemon=True)
        t.start()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            header = conn.recv(6, socket.MSG_WAITALL)
            (length,) = struct.unpack(">I", header[2:])
            body = conn.recv(length, socket.MSG_WAITALL)
        t.join(10)
    return header + body


def _closed_by_peer(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """(True if the node closed the connection or sent an A-ABORT within ``within`` s, what it sent)."""
    sock.settimeout(0.2)
    got = b""
    end = time.time() + within
    while time.time() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:   # reset by the node
            return True, got
        if not chunk:
            return True, got
        got += chunk
        if b"\x07\x00" in got[:2] or (got[:1] == b"\x07"):
            return True, got
    return False, got


def _pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


RQ = None


def _malformed(kind: str) -> list[bytes]:
    assert RQ is not None
    p_data = _pdu(0x04, struct.pack(">IB", 6, 1) + b"\x03\x00\x00\x00\x00\x00")
    return {
        "truncated": [RQ[: len(RQ) // 2]],
        "oversized length": [_pdu(0x01, RQ[6:], length=0xFFFFFFFF)],
        "P-DATA before A-ASSOCIATE-RQ": [p_data],
        "second A-ASSOCIATE-RQ": [RQ, RQ],
        "garbage": [bytes(random.Random(5).randrange(256) for _ in range(512))],
        "unknown PDU type": [_pdu(0x99, b"\0" * 64)],
        "half-open": [],
    }[kind]


KINDS = ["truncated", "oversized length", "P-DATA before A-ASSOCIATE-RQ", "second A-ASSOCIATE-RQ", "garbage",
         "unknown PDU type", "half-open"]


@pytest.mark.slow
def test_malformed_pdus_abort_only_their_association(make_node):
    global RQ
    RQ = _associate_rq_bytes()
    assert RQ[0] == 0x01
    node = make_node(complete_after=3600)
    node.receiver.ae.acse_timeout = 2.0   # a half-open connection is closed after this
    datasets = mr_series(40, series_description="WATER")
    results: list[int] = []

    def store_slowly() -> None:   # a scanner storing all the while, on its own association
        assoc = _scu().associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
        assert assoc.is_established
        for ds in datasets:
            results.append(int(assoc.send_c_store(ds).Status))
            time.sleep(0.05)
        assoc.release()

    scanner = threading.Thread(target=store_slowly)
    scanner.start()
    outcomes = {}
    for kind in KINDS:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            for pdu in _malformed(kind):
                sock.sendall(pdu)
                if kind == "second A-ASSOCIATE-RQ" and pdu is RQ:
                    time.sleep(0.3)   # the A-ASSOCIATE-AC (or RJ) comes first
            if kind == "truncated":
                sock.shutdown(socket.SHUT_WR)   # the sender stops mid-PDU
            t0 = time.time()
            closed, got = _closed_by_peer(sock, within=15)
            outcomes[kind] = (closed, round(time.time() - t0, 1), got[:1].hex())
            assert closed, f"{kind}: the node kept the connection open"
    scanner.join(60)
    assert results == [0x0000] * len(datasets), "the association beside the malformed ones did not complete"
    assert _echo(node.port) == 0x0000
    assert outcomes["oversized length"][1] < 5, "the node waited for 4 GiB"
    print("malformed PDUs (closed, seconds, first byte back):", outcomes)
