"""The ingest journal (node/ingest.py): records read back whole, seals, a killed node's
journal replayed at the next start, halves reused under load, group commit from many threads.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_faults import tiny_series

from node import db
from node.demo_peers import push
from node.ingest import Entry, Ingest, Journal, open_journal, read_journal
from node.instances import NO_FACTS, instance_facts, parse_instance, received_fields
from node.store import Store


def _encoded(datasets) -> list[bytes]:
    import io

    from pydicom.filewriter import dcmwrite
    out = []
    for ds in datasets:
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


@pytest.fixture
def store(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    yield Store(tmp_path / "data", engine)
    engine.dispose()


def _append(journal: Journal, store: Store, data: bytes) -> Entry:
    fields = received_fields(parse_instance(data, decode_all=False))
    path = store.instance_path(fields["study_uid"], fields["series_uid"], fields["sop_uid"])
    return journal.append(str(path.relative_to(store.root)), data,
                          lambda half: Entry(path, data, fields, "SCANNER", 0.0, half))


def test_records_read_back_whole_and_a_seal_erases_them(store):
    blobs = _encoded(tiny_series(6, study_uid=generate_uid()))
    journal = Journal.create(store.root / "journal", 64 << 10)
    for b in blobs:
        _append(journal, store, b)
    assert [d for _, d in read_journal(journal.path)] == blobs
    assert journal.synced == journal.written == 6
    with open(journal.path, "r+b") as fh:          # a torn last record: its CRC no longer matches
        rel_last_at = journal.pos - len(blobs[-1]) + 100
        fh.seek(journal.active * journal.half_bytes + rel_last_at)
        fh.write(b"\xff" * 8)
    assert [d for _, d in read_journal(journal.path)] == blobs[:-1]
    for _ in range(6):
        journal.placed(journal.active)
    journal.seal(journal.to_seal(active=True))
    assert read_journal(journal.path) == []
    _append(journal, store, blobs[0])               # written again from the start, a new cycle
    assert [d for _, d in read_journal(journal.path)] == [blobs[0]]   # none of the older cycle after it
    journal.close()


def test_a_killed_nodes_journal_is_replayed_at_the_next_start(store):
    study = generate_uid()
    blobs = _encoded(tiny_series(5, study_uid=study))
    journal = Journal.create(store.root / "journal", 1 << 20)
    for b in blobs:
        _append(journal, store, b)
    journal.close()                                 # the process dies: nothing placed, nothing sealed
    assert not list((store.root / "store").rglob("*.dcm"))
    reopened = open_journal(store, 1 << 20)         # the next start
    assert reopened.path == journal.path            # the same file, reused once replayed and sealed
    with store.engine.connect() as conn:
        rows = conn.execute(select(db.instances)).all()
        study_row = conn.execute(select(db.studies)).one()
        audit = [r.event for r in conn.execute(select(db.audit))]
    assert len(rows) == 5 and all(Path(r.path).read_bytes() in blobs for r in rows)
    assert study_row.study_uid == study and study_row.n_instances == 5
    assert audit.count("row-recovered") == 5
    assert read_journal(reopened.path) == []
    reopened.close()


def test_a_journal_a_live_process_holds_is_left_alone(store):
    journal = Journal.create(store.root / "journal", 64 << 10)
    _append(journal, store, _encoded(tiny_series(1, study_uid=generate_uid()))[0])
    fd = os.open(journal.path, os.O_RDWR)
    try:   # flock locks belong to the open file: a second open in this process is refused like another process
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    other = open_journal(store, 64 << 10)
    assert other.path != journal.path and journal.path.exists()
    with store.engine.connect() as conn:
        assert conn.execute(select(db.instances)).all() == []
    other.close()
    journal.close()


def test_halves_are_reused_under_load_and_every_instance_is_placed_once(store):
    """A journal of 2 x 64 KiB takes 120 instances of about 3 KiB from 4 threads: its halves
    fill, are sealed once placed and synced, and are written again; every instance is placed
    and recorded once, in its study's count.
    """
    wakes = []
    ingest = Ingest(store, lambda: wakes.append(1), half_bytes=64 << 10)
    study = generate_uid()
    blobs = _encoded([ds for k in range(4) for ds in tiny_series(30, study_uid=study, series_number=k + 1)])
    entries: list[Entry] = []

    def send(part: list[bytes]) -> None:
        for b in part:
            fields = received_fields(parse_instance(b, decode_all=False))
            path = store.instance_path(fields["study_uid"], fields["series_uid"], fields["sop_uid"])
            entries.append(ingest.receive(b, path, fields, "SCANNER"))

    threads = [threading.Thread(target=send, args=(blobs[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ingest.wait(entries, timeout=30)
    cycles_used = ingest.journal.cycle
    ingest.close()
    with store.engine.connect() as conn:
        rows = conn.execute(select(db.instances)).all()
        study_row = conn.execute(select(db.studies)).one()
    assert len(rows) == 120 and len({r.sop_uid for r in rows}) == 120
    assert study_row.n_instances == 120
    assert sorted(Path(r.path).read_bytes() for r in rows) == sorted(blobs)
    assert ingest.journal.written == 120 and ingest.journal.synced == 120
    assert cycles_used > 4, "the halves were not reused"
    assert wakes and read_journal(ingest.journal.path) == []
    assert not list((store.root / "tmp").iterdir())


def test_the_placer_makes_each_row_from_the_header_read_before_the_answer(store):
    """The SCP hands the placer the header its own reader made (values converted already); the
    placer records from it what :func:`received_fields` records. A header whose facts cannot be
    read (not seen) still gets its row, with its UIDs and without the facts, and the placer goes on.
    """
    ingest = Ingest(store, lambda: None)
    blobs = _encoded(tiny_series(4, study_uid=generate_uid()))
    headers = [parse_instance(b, decode_all=False) for b in blobs]
    assert all(type(h).__name__ == "ReceivedHeader" for h in headers)
    expected = [received_fields(h) for h in headers]

    class Unreadable:
        def __init__(self, header):
            self.header = header

        def __getattr__(self, name):
            if name in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
                return getattr(self.header, name)
            raise ValueError("an unreadable value")

        def get(self, *args):
            raise ValueError("an unreadable value")

    entries = [ingest.receive(b, store.instance_path(f["study_uid"], f["series_uid"], f["sop_uid"]),
                              Unreadable(h) if k == 3 else h, "SCANNER")
               for k, (b, h, f) in enumerate(zip(blobs, headers, expected, strict=True))]
    assert ingest.wait(entries, timeout=30)
    ingest.close()
    assert [e.fields for e in entries[:3]] == expected[:3]
    assert entries[3].fields == dict(sop_uid=expected[3]["sop_uid"], sop_class_uid=expected[3]["sop_class_uid"],
                                     study_uid=expected[3]["study_uid"], series_uid=expected[3]["series_uid"],
                                     subject_key="", study_date="", time_point="", facts=NO_FACTS)
    with store.engine.connect() as conn:
        rows = {r.sop_uid: r for r in conn.execute(select(db.instances)).all()}
    assert sorted(rows) == sorted(f["sop_uid"] for f in expected)
    for f in expected[:3]:
        assert {k: getattr(rows[f["sop_uid"]], k) for k in f["facts"]} == f["facts"]
    assert instance_facts(Unreadable(headers[3])) == NO_FACTS   # what instance_facts gives for no readable value


def test_an_association_released_finds_its_instances_recorded(make_node):
    node = make_node(complete_after=3600)
    datasets = tiny_series(40, study_uid=generate_uid())
    assert push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0] * 40
    with node.engine.connect() as conn:   # read at once: the release waited for the placer
        assert len(conn.execute(select(db.instances)).all()) == 40
        assert conn.execute(select(db.studies.c.n_instances)).scalar_one() == 40


def test_associations_over_the_limit_are_rejected_transient(make_node):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.scp import MAX_ASSOCIATIONS
    node = make_node(complete_after=3600)
    ae = AE("SCANNER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE") for _ in range(MAX_ASSOCIATIONS)]
    assert all(a.is_established for a in held)
    extra = ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
    assert extra.is_rejected
    rj = extra.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    held[0].release()
    again = ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE")   # one fewer open: served
    assert again.is_established and again.send_c_echo().Status == 0
    for a in [again, *held[1:]]:
        a.release()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_record_instances_counts_each_instance_once(backend, tmp_path, request):
    """One group with an instance twice and one already recorded (sent again): each is recorded
    and counted once, the copies audited as duplicates; on SQLite and PostgreSQL.
    """
    from node.store import record_instances
    url = f"sqlite:///{tmp_path / 'n.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = db.make_engine(url)
    store = Store(tmp_path / "data", engine)
    blobs = _encoded(tiny_series(4, study_uid=generate_uid()))
    fields = [received_fields(parse_instance(b, decode_all=False)) for b in blobs]
    row = [(store.instance_path(f["study_uid"], f["series_uid"], f["sop_uid"]), 10, 1.0, "SCANNER", f)
           for f in fields]
    with engine.begin() as conn:
        assert record_instances(conn, [row[0]]) == [True]
    with engine.begin() as conn:
        assert record_instances(conn, [row[1], row[0], row[2], row[1], row[3]]) == [True, False, True, False, True]
    with engine.connect() as conn:
        assert len(conn.execute(select(db.instances)).all()) == 4
        assert conn.execute(select(db.studies.c.n_instances)).scalar_one() == 4
        assert [r.event for r in conn.execute(select(db.audit))].count("duplicate") == 2
    engine.dispose()


def test_a_full_journal_refuses_rather_than_wait_for_ever(store):
    """Both halves hold instances not placed (the placer is stuck): an append waits
    ``seal_wait_seconds`` and is refused (C-STORE then answers Out of Resources)."""
    from node.ingest import NoSpace
    blobs = _encoded(tiny_series(8, study_uid=generate_uid()))
    journal = Journal.create(store.root / "journal", 2 * len(blobs[0]) + 600)
    journal.seal_wait_seconds = 0.2
    for b in blobs[:4]:   # two per half
        _append(journal, store, b)
    with pytest.raises(NoSpace, match="journal is full"):
        _append(journal, store, blobs[4])
    journal.close()
