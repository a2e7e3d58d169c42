"""Received instances on their way to the store: a journal written before the answer, the
files and rows placed behind it, in groups.

The SCP answers a C-STORE once its instance is durable. Writing the instance's own file
durably costs two fsyncs (the file, then its folder after the rename) and the database row a
transaction, all before the answer. Here the instance is appended to a journal instead, with
one ``fdatasync`` shared by every association that appended meanwhile (a group commit), and
the answer goes out. A placer thread then writes the files into the store (``store/<study>/
<series>/<sop>.dcm``, renamed into place) and records their rows, many in one transaction.

The journal is one file in two halves, written with zeros when it is made (an ``fdatasync``
of data over blocks already written does not wait for the file system's own journal). A half is sealed (its first record
erased, ``fdatasync``) once every instance in it is placed and the file system is synced
(``syncfs``): only then may it be written again. A node that stops cleanly leaves an empty
journal and removes it; a node killed leaves records that the next node to start replays
(files written where missing, rows recorded where missing, from the file itself). A journal
is locked (``flock``) by the process that writes it, so a starting node replays only those of
dead processes.

An association's release (or end) waits for its instances to be placed, so a sender that has
released finds every instance it stored in the database.

Records: ``MNJ1``, the half's cycle number, the length and CRC-32 of what follows, the
length of the path, the path (relative to the data directory) and the instance's bytes.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import queue
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import db
from .instances import NO_FACTS, ReceivedHeader, instance_ids, received_fields
from .store import Store, record_instances, write_file
from .text import printable

log = logging.getLogger(__name__)

MAGIC = b"MNJ1"
_RECORD = struct.Struct("<4sIIIH")   # magic, cycle, length of path + data, CRC-32 of them, length of path
#: Bytes of one half of the journal (the file is twice this): about 120 MR slices of 128 KiB.
HALF_BYTES = 16 << 20
#: Free space the data directory must keep beyond an instance (twice its size: the journal
#: holds it while its file is written) before an instance is accepted: short of it, C-STORE
#: answers Out of Resources.
RESERVE_BYTES = 256 << 10
#: The free space of the data directory is asked again after this long, or at every instance
#: once less than SPACE_MARGIN_BYTES beyond what the instance needs is left.
SPACE_CHECK_SECONDS, SPACE_MARGIN_BYTES = 0.25, 256 << 20


class NoSpace(OSError):
    """The data directory cannot take the instance now (C-STORE: Out of Resources)."""


def _syncfs(path: Path) -> None:
    """Flush the file system holding ``path`` to its disk (``syncfs``; ``sync`` where that is missing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@dataclass
class Entry:
    """One received instance between its answer and its row."""

    path: Path
    data: bytes
    #: What its row records (:func:`node.instances.received_fields`), or the header to make it
    #: from (:class:`node.instances.ReceivedHeader`, its values converted): the placer makes it then
    fields: dict[str, Any] | ReceivedHeader
    calling_ae: str
    received_at: float
    half: int
    done: threading.Event = field(default_factory=threading.Event)

    def row_fields(self) -> dict[str, Any]:
        """The fields of its row (made from the header once)."""
        if not isinstance(self.fields, dict):
            header = self.fields
            try:
                self.fields = received_fields(header)  # type: ignore[arg-type]  # reads like a data set
            except Exception as exc:   # not seen (its values were read before the answer): the row, without the facts
                log.error("the facts of SOP %s cannot be read: %s", printable(self.path.stem), printable(exc, 160))
                self.fields = dict(instance_ids(header),  # type: ignore[arg-type]
                                   subject_key="", study_date="", time_point="", facts=dict(NO_FACTS))
        return self.fields


class Journal:
    """The journal file of one receiving process: append (group-committed), seal.

    Made by :func:`open_journal`, which replays the journals dead processes left and reuses one.
    """

    #: An append that finds both halves full waits this long for the placer (then Out of Resources).
    seal_wait_seconds = 30.0

    def __init__(self, fd: int, path: Path, half_bytes: int):
        self.fd, self.path, self.half_bytes = fd, path, half_bytes
        self.lock = threading.Condition()
        self.sync_lock = threading.Lock()
        # the cycle numbers of this process's records: never those of records an earlier process
        # left further on in a half (a replay stops at the first record of another cycle)
        self.active, self.pos, self.cycle = 0, 0, (time.time_ns() >> 20) & 0x7FFFFFFF
        self.sealed = [True, True]       # a half that holds no record that is not placed and synced
        self.pending = [0, 0]            # records of each half not yet placed
        self.written = self.synced = 0   # records appended; records known durable

    @classmethod
    def create(cls, folder: Path, half_bytes: int) -> Journal:
        """A new journal file in ``folder``, locked, written with zeros and synced."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.journal"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:   # written, not only allocated: an fdatasync then has no extent to convert, only data
            zeros = b"\0" * (1 << 20)
            for offset in range(0, 2 * half_bytes, len(zeros)):
                os.pwrite(fd, zeros[:2 * half_bytes - offset], offset)
            os.fsync(fd)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise NoSpace(f"cannot make the journal: {exc}") from exc
        return cls(fd, path, half_bytes)

    def append(self, rel_path: str, data: bytes, make_entry: Callable[[int], Entry]) -> Entry:
        """Append one record and make it durable (an ``fdatasync`` shared with the appends of
        other threads meanwhile); returns its entry (``make_entry(half)``). NoSpace if the record
        can never fit a half.
        """
        path_bytes = rel_path.encode()
        size = _RECORD.size + len(path_bytes) + len(data)
        if size > self.half_bytes:
            raise NoSpace("the instance is larger than a half of the journal")
        crc = zlib.crc32(data, zlib.crc32(path_bytes))
        with self.lock:
            if self.pos + size > self.half_bytes:
                other = 1 - self.active
                end = time.monotonic() + self.seal_wait_seconds
                while not self.sealed[other]:     # the placer seals it once its instances are placed
                    if time.monotonic() > end:
                        raise NoSpace("the ingest journal is full: its instances are not placed yet")
                    self.lock.wait(1.0)
                self.active, self.pos, self.cycle = other, 0, self.cycle + 1
            half, offset = self.active, self.active * self.half_bytes + self.pos
            header = _RECORD.pack(MAGIC, self.cycle, len(path_bytes) + len(data), crc, len(path_bytes))
            os.pwritev(self.fd, [header, path_bytes, data], offset)
            self.pos += size
            self.sealed[half] = False
            self.pending[half] += 1
            self.written += 1
            mine = self.written
            entry = make_entry(half)
        with self.sync_lock:
            if self.synced < mine:
                target = self.written
                os.fdatasync(self.fd)
                self.synced = target
        return entry

    def placed(self, half: int) -> None:
        """One record of ``half`` is placed (its file written, its row committed)."""
        with self.lock:
            self.pending[half] -= 1

    def to_seal(self, active: bool) -> list[int]:
        """The halves whose records are all placed but which are not sealed yet (the one being
        written too when ``active``: when the placer is idle).
        """
        with self.lock:
            return [h for h in (0, 1) if not self.sealed[h] and self.pending[h] == 0
                    and (h != self.active or (active and self.pos > 0))]

    def seal(self, halves: list[int]) -> None:
        """Seal ``halves`` (the caller has synced the placed files): their first record is erased,
        durably; the active one is then written again from its start.
        """
        with self.lock:
            for h in halves:
                if self.pending[h]:
                    continue
                os.pwrite(self.fd, b"\0" * _RECORD.size, h * self.half_bytes)
                self.sealed[h] = True
                if h == self.active:
                    self.pos, self.cycle = 0, self.cycle + 1
            os.fdatasync(self.fd)
            self.lock.notify_all()

    def close(self) -> None:
        """Close the file (and its lock: the next node to start replays or reuses it)."""
        os.close(self.fd)


def read_journal(path: Path) -> list[tuple[str, bytes]]:
    """The records of a journal left by a process that died: (relative path, bytes), in order
    within each half, each whole (its CRC-32 matches) and of its half's current cycle. The file
    is mapped, not read: a sealed half costs the page of its first record.
    """
    size = path.stat().st_size
    if size < 2 * _RECORD.size:
        return []
    out: list[tuple[int, int, str, bytes]] = []
    half = size // 2
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for h in (0, 1):
            pos, cycle = h * half, None
            end = pos + half
            while pos + _RECORD.size <= end:
                magic, rec_cycle, length, crc, path_len = _RECORD.unpack_from(data, pos)
                if magic != MAGIC or (cycle is not None and rec_cycle != cycle) \
                        or pos + _RECORD.size + length > end or path_len > length:
                    break
                start = pos + _RECORD.size
                rel, body = data[start:start + path_len], data[start + path_len:start + length]
                if zlib.crc32(body, zlib.crc32(rel)) != crc:
                    break
                cycle = rec_cycle
                out.append((rec_cycle, pos, rel.decode(), body))
                pos += _RECORD.size + length
    out.sort(key=lambda r: (r[0], r[1]))   # the older half first
    return [(p, d) for _, _, p, d in out]


class Ingest:
    """The journal and placer of one receiving node (see the module's text)."""

    #: While the placer cannot place (a database restarting, a full disk), a C-STORE waits this
    #: long for it to recover before it is answered Out of Resources.
    failing_wait_seconds = 8.0
    #: The longest pause between the placer's tries.
    max_retry_seconds = 0.5
    #: How long the placer gathers instances into one group after the first.
    batch_seconds = 0.02

    def __init__(self, store: Store, on_stored: Callable[[], None], half_bytes: int = HALF_BYTES):
        self.store = store
        self.on_stored = on_stored
        self.journal = open_journal(store, half_bytes)
        self.queue: queue.Queue[Entry | None] = queue.Queue()
        self.failing: str = ""          # why the placer cannot place now ("" when it can)
        self._space_lock = threading.Lock()
        self._root_prefix = os.path.join(str(store.root), "")   # "<data directory>/"
        self._free, self._space_checked = 0, -1e9   # free bytes of the data directory, as last asked (less since)
        self.thread = threading.Thread(target=self._run, name="musclenode-placer", daemon=True)
        self.thread.start()

    # ---- receiving ----------------------------------------------------------------------------

    def takes(self, size: int, rel_path_bytes: int = 256) -> bool:
        """Whether an instance of ``size`` bytes fits a half of the journal (else it is stored before its answer)."""
        return _RECORD.size + rel_path_bytes + size <= self.journal.half_bytes

    def receive(self, data: bytes, path: Path, fields: dict[str, Any] | ReceivedHeader, calling_ae: str) -> Entry:
        """Journal one instance durably and queue it for placing; NoSpace when the data directory
        (or the placer, failing) cannot take it now.
        """
        end = time.monotonic() + self.failing_wait_seconds
        while self.failing and time.monotonic() < end:   # a database restarting: the sender waits a little
            time.sleep(0.05)
        if self.failing:
            raise NoSpace(f"the store cannot take instances now: {self.failing}")
        if not self._has_room(2 * len(data) + RESERVE_BYTES):
            raise NoSpace("the data directory is full")
        text, root = str(path), self._root_prefix
        rel = text[len(root):] if text.startswith(root) else str(path.relative_to(self.store.root))
        entry = self.journal.append(rel, data, lambda half: Entry(path, data, fields, calling_ae, time.time(), half))
        self.queue.put(entry)
        return entry

    def _has_room(self, need: int) -> bool:
        """Whether the data directory has ``need`` bytes free. ``statvfs`` costs about 0.1 ms on
        a busy disk, so it is asked at most every :data:`SPACE_CHECK_SECONDS` while there is
        :data:`SPACE_MARGIN_BYTES` to spare, the instances taken since subtracted; nearer full,
        for every instance.
        """
        with self._space_lock:
            now = time.monotonic()
            if self._space_checked + SPACE_CHECK_SECONDS < now or self._free < need + SPACE_MARGIN_BYTES:
                st = os.statvfs(self.store.root)
                self._free, self._space_checked = st.f_bavail * st.f_frsize, now
            if self._free < need:
                return False
            self._free -= need
            return True

    def wait(self, entries: list[Entry], timeout: float = 60.0) -> bool:
        """Wait until ``entries`` are placed (a sender's release); False if they were not within ``timeout``."""
        end = time.monotonic() + timeout
        for e in entries:
            if not e.done.wait(max(0.0, end - time.monotonic())):
                return False
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Place what is queued and seal the journal (left for the next start to reuse); records
        the placer could not place stay in it, for the next start to replay.
        """
        self.queue.put(None)
        self.thread.join(timeout)
        if not self.thread.is_alive() and self.journal.pending == [0, 0]:
            halves = [h for h in (0, 1) if not self.journal.sealed[h]]
            if halves:
                _syncfs(self.store.root)
                self.journal.seal(halves)
        self.journal.close()

    # ---- placing ------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.05
        batch: list[Entry] = []
        stopping = False
        while True:
            if not batch:
                try:
                    item = self.queue.get(timeout=0.5)
                except queue.Empty:
                    self._seal_placed(active=True)   # idle: what is placed is synced and its half reused
                    continue
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
                # what else comes within batch_seconds goes in the same transaction (a group costs
                # about as much as one row; an association's release waits for it, no answer does).
                # The placer sleeps meanwhile rather than wait on the queue: woken by every
                # instance, it would take the interpreter from the associations each time.
                if not stopping:
                    time.sleep(self.batch_seconds)
                while len(batch) < 256 and not stopping:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
            if batch:
                try:
                    self._place(batch)
                except Exception as exc:   # a full disk, a database away: try again, refuse meanwhile
                    self.failing = f"{type(exc).__name__}: {printable(exc, 160)}"
                    log.error("cannot place %d received instance(s) (trying again in %.1f s): %s", len(batch),
                              delay, self.failing)
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_retry_seconds)
                    continue
                self.failing, delay = "", 0.05
                for e in batch:
                    self.journal.placed(e.half)
                    e.data = b""
                    e.done.set()
                batch = []
                try:
                    self.on_stored()
                except Exception:
                    log.exception("the completion monitor could not be woken")
                self._seal_placed(active=False)   # a full half, so that appends can go on into it
            if stopping and self.queue.empty() and not batch:
                return

    def _seal_placed(self, active: bool) -> None:
        halves = self.journal.to_seal(active)
        if halves:
            try:
                _syncfs(self.store.root)
                self.journal.seal(halves)
            except OSError as exc:   # the half stays unsealed (its records replayable); tried again later
                log.error("cannot seal the ingest journal: %s", printable(exc, 160))

    def _place(self, batch: list[Entry]) -> None:
        """Write the files of ``batch`` (renamed into place, not synced: the journal holds them
        until the next seal) and record their rows in one transaction.
        """
        for e in batch:
            if not e.path.exists():
                write_file(e.path, e.data, self.store.tmp)
        with self.store.ingest_engine.begin() as conn:
            record_instances(conn, [(e.path, len(e.data), e.received_at, e.calling_ae, e.row_fields()) for e in batch])


def open_journal(store: Store, half_bytes: int) -> Journal:
    """The journal of this process in ``store``'s data directory (``journal/``). The journals of dead
    processes (those no live process has locked) are replayed first (:func:`replay`); one of
    the right size is then sealed and reused, the others removed. A new one is made if none is left.
    """
    folder = store.root / "journal"
    folder.mkdir(parents=True, exist_ok=True)
    chosen: Journal | None = None
    for path in sorted(folder.glob("*.journal")):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue   # a live process writes it
        records = read_journal(path)
        if records:
            replay(store, records, path.name)
        if chosen is None and path.stat().st_size == 2 * half_bytes:
            os.pwrite(fd, b"\0" * _RECORD.size, 0)
            os.pwrite(fd, b"\0" * _RECORD.size, half_bytes)
            os.fdatasync(fd)
            chosen = Journal(fd, path, half_bytes)
        else:
            os.close(fd)
            path.unlink()
    return chosen if chosen is not None else Journal.create(folder, half_bytes)


def replay(store: Store, records: list[tuple[str, bytes]], name: str) -> None:
    """Place and record journalled instances a dead process answered for: each file written
    where it is missing, each row recorded where it is missing (audited ``row-recovered``),
    an unreadable one quarantined; then the file system is synced.
    """
    from .errors import InstanceRejected
    recovered = 0
    for rel, data in records:
        target = store.root / rel
        try:
            fields = store.fields_for(data, target, decode_all=False)
        except (InstanceRejected, ValueError) as exc:
            store.quarantine(data, f"journalled but unreadable: {printable(exc, 160)}")
            continue
        write_file(target, data, store.tmp)   # whole, even where a crash left it half-written
        with store.engine.begin() as conn:
            if record_instances(conn, [(target, len(data), time.time(), "", fields)])[0]:
                db.record_audit(conn, "row-recovered", f"sop={fields['sop_uid']} study={fields['study_uid']} "
                                                       "(from the ingest journal)")
                recovered += 1
    _syncfs(store.root)
    log.warning("journal %s: %d instance(s) replayed, %d of them not recorded before (the node that wrote it "
                "stopped without placing them)", name, len(records), recovered)
