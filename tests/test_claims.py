"""Claims of jobs and sends by several runners on one database (issue 14): concurrent claimers
never take the same job or outbox row twice (PostgreSQL ``FOR UPDATE SKIP LOCKED`` and the
send claim lock; SQLite's conditional updates), a live holder's lease is renewed, a dead
one's job is taken over once its lease runs out, and a row claimed by one sender holds back
its subject's later outputs for the others."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import insert, select

from node import db
from node.config import SendSettings
from node.holders import dead_local_holders, node_id
from node.jobs import claim_job, renew_leases, requeue_dead_local, requeue_running
from node.send import claim_due, release_claims


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'claims.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    eng = db.make_engine(url)
    yield eng
    eng.dispose()


def _jobs(engine, n: int, now: float) -> None:
    with engine.begin() as conn:
        for k in range(n):
            uid = f"1.2.826.0.1.{k}"
            conn.execute(insert(db.studies).values(study_uid=uid, subject_key=f"S{k}", study_date="20260101",
                                                   state="complete", revision=1, n_instances=1,
                                                   first_received_at=now + k, last_received_at=now + k))
            conn.execute(insert(db.jobs).values(study_uid=uid, revision=1, state="pending", attempts=0,
                                                created_at=now, message=""))


def _outbox(engine, subjects: list[str], now: float, *, destinations=("pacs",)) -> None:
    """One study per entry of ``subjects`` (its date from its position: the order they must go in),
    one output each, one outbox row per destination."""
    with engine.begin() as conn:
        for k, subject in enumerate(subjects):
            uid = f"1.2.826.0.2.{k}"
            conn.execute(insert(db.studies).values(study_uid=uid, subject_key=subject, study_date=f"2026{k + 1:04d}",
                                                   state="done", revision=1, n_instances=1,
                                                   first_received_at=now + k, last_received_at=now + k))
            job = conn.execute(insert(db.jobs).values(study_uid=uid, revision=1, state="done", attempts=1,
                                                      created_at=now, message="")).inserted_primary_key[0]
            out = conn.execute(insert(db.outputs).values(study_uid=uid, kind="sr", sop_uid=f"{uid}.9",
                                                         path=f"/nowhere/{k}.dcm", job_id=job,
                                                         created_at=now)).inserted_primary_key[0]
            for dest in destinations:
                conn.execute(insert(db.outbox).values(output_id=out, destination=dest, state="pending", attempts=0,
                                                      next_try_at=now, last_error=""))


def _race(n_threads: int, work) -> list:
    """Run ``work(k)`` in ``n_threads`` threads released at once; their results, in thread order."""
    barrier = threading.Barrier(n_threads)
    results: list = [None] * n_threads
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            barrier.wait()
            results[k] = work(k)
        except BaseException as exc:   # reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_concurrent_job_claims_never_take_a_job_twice(engine):
    n_jobs, n_threads = 60, 8
    _jobs(engine, n_jobs, time.time())

    def claim_all(k: int) -> list[int]:
        mine = []
        while (claimed := claim_job(engine, 60, claimed_by=f"host-{k}:1")) is not None:
            mine.append(claimed[0])
        return mine
    got = _race(n_threads, claim_all)
    every = [j for mine in got for j in mine]
    assert len(every) == len(set(every)) == n_jobs             # each job claimed once, none left behind
    with engine.begin() as conn:
        rows = {r.id: r for r in conn.execute(select(db.jobs)).all()}
        studies = conn.execute(select(db.studies.c.state)).scalars().all()
    for k, mine in enumerate(got):
        assert all(rows[j].claimed_by == f"host-{k}:1" and rows[j].attempts == 1 for j in mine)
    assert {r.state for r in rows.values()} == {"running"} and set(studies) == {"processing"}
    print(f"\n{engine.dialect.name}: {n_jobs} jobs claimed by {n_threads} threads: "
          f"{sorted(len(m) for m in got)} each")


def test_concurrent_send_claims_never_take_a_row_twice(engine):
    subjects = [f"S{k}" for k in range(40)]
    _outbox(engine, subjects, time.time() - 5, destinations=("pacs", "archive"))
    settings = SendSettings(timeout_seconds=5.0)
    got = _race(8, lambda k: [r.id for r in claim_due(engine, settings, holder=f"host-{k}:1")])
    every = [i for mine in got for i in mine]
    assert len(every) == len(set(every)) == 80
    with engine.begin() as conn:
        rows = {r.id: r for r in conn.execute(select(db.outbox)).all()}
    for k, mine in enumerate(got):
        assert all(rows[i].claimed_by == f"host-{k}:1" and rows[i].claimed_until > time.time() + 20 for i in mine)
    # claimed rows are nobody else's until released
    assert claim_due(engine, settings, holder="late:1") == []
    assert release_claims(engine, {"host-0:1"}) == len(got[0])
    assert sorted(r.id for r in claim_due(engine, settings, holder="late:1")) == sorted(got[0])


def test_a_claimed_row_holds_back_its_subjects_later_outputs(engine):
    now = time.time()
    _outbox(engine, ["A", "B", "A"], now - 5)     # A's first visit, B's, A's second
    settings = SendSettings(timeout_seconds=5.0)
    with engine.begin() as conn:   # sender 1 holds A's first visit's row (it is sending it)
        first_a = conn.execute(select(db.outbox.c.id).order_by(db.outbox.c.id)).scalars().first()
        conn.execute(db.outbox.update().where(db.outbox.c.id == first_a)
                     .values(claimed_until=now + 60, claimed_by="sender-1:1"))
    got = claim_due(engine, settings, holder="sender-2:1")
    assert [r.subject_key for r in got] == ["B"]    # A's second visit waits behind its first
    with engine.begin() as conn:   # sender 1 sent it: A's second visit may go now
        conn.execute(db.outbox.update().where(db.outbox.c.id == first_a)
                     .values(state="sent", claimed_until=0.0))
    assert [(r.subject_key, r.study_uid) for r in claim_due(engine, settings, holder="sender-2:1")] == \
        [("A", "1.2.826.0.2.2")]


def test_lease_renewed_while_alive_taken_over_once_dead(engine):
    now = time.time()
    _jobs(engine, 1, now)
    assert claim_job(engine, 2.0, now=now, claimed_by="w1:1") is not None
    assert claim_job(engine, 2.0, now=now + 1, claimed_by="w2:2") is None          # its lease runs
    assert renew_leases(engine, [1], 2.0, "w1:1", now=now + 1.5) == 1              # heartbeat: until now + 3.5
    assert claim_job(engine, 2.0, now=now + 3, claimed_by="w2:2") is None
    assert renew_leases(engine, [1], 2.0, "w2:2", now=now + 3) == 0                # not w2's to renew
    assert claim_job(engine, 2.0, now=now + 4, claimed_by="w2:2") == (1, "1.2.826.0.1.0")   # w1 died: taken over
    assert renew_leases(engine, [1], 2.0, "w1:1", now=now + 4) == 0                # w1's claim is gone
    with engine.begin() as conn:
        job = conn.execute(select(db.jobs)).one()
        audit = conn.execute(select(db.audit.c.detail).where(db.audit.c.event == "job-takeover")).scalars().all()
    assert (job.state, job.attempts, job.claimed_by) == ("running", 2, "w2:2")
    assert len(audit) == 1 and "from=w1:1 by=w2:2" in audit[0]


def test_start_requeues_only_dead_local_holders(engine):
    """A worker on a shared database frees what a dead process of its own host held, at once;
    a job held by a live process or by another host waits for its lease."""
    import subprocess
    import sys
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    holders = [f"{host}:{gone.pid}", f"{host}:{os.getppid()}", "elsewhere:1", node_id()]
    assert dead_local_holders(set(holders)) == {f"{host}:{gone.pid}", node_id()}
    assert dead_local_holders({node_id()}, fresh_start=False) == set()
    now = time.time()
    _jobs(engine, len(holders), now)
    for job_id, holder in enumerate(holders, start=1):
        assert claim_job(engine, 600, now=now, claimed_by=holder) == (job_id, f"1.2.826.0.1.{job_id - 1}")
    assert requeue_dead_local(engine) == 2
    with engine.begin() as conn:
        states = [(j.state, j.claimed_by) for j in conn.execute(select(db.jobs).order_by(db.jobs.c.id))]
    assert states == [("pending", ""), ("running", holders[1]), ("running", "elsewhere:1"), ("pending", "")]
    assert requeue_running(engine) == 2                                  # the single node takes every one back
    counts = Counter(s for s, in _states(engine))
    assert counts == {"pending": 4}


def _states(engine):
    with engine.begin() as conn:
        return conn.execute(select(db.jobs.c.state)).all()


def test_role_is_configured_and_checked():
    from node.config import ConfigError, config_from_dict
    assert config_from_dict({}).node.role == "all"
    assert config_from_dict({"node": {"role": "worker", "port": 0}}).node.role == "worker"   # no port: fine
    for bad, key in (({"role": "sender"}, "node.role"), ({"role": "receiver", "port": 0}, "node.port")):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"node": bad})
        assert info.value.key == key


def test_a_worker_opens_no_dicom_port_and_a_receiver_runs_no_jobs(tmp_path):
    from dataclasses import replace

    from conftest import node_config

    from node.service import Node
    config = node_config(tmp_path)
    for role, listens, works in (("worker", False, True), ("receiver", True, False)):
        node = Node(replace(config, node=replace(config.node, role=role)), poll_seconds=0.2).start()
        try:
            assert (node.receiver.server is not None) == listens
            assert node.jobs._thread.is_alive() == node.sender._thread.is_alive() == works
            assert node.completion._thread.is_alive()
            if not listens:
                assert node.listening() == ""
                with socket.socket() as s, pytest.raises(ConnectionRefusedError):   # nothing listens there
                    s.connect(("127.0.0.1", config.node.port))
        finally:
            node.stop()
    with node.engine.begin() as conn:
        started = conn.execute(select(db.audit.c.detail).where(db.audit.c.event == "node-started")).scalars().all()
    assert started == ["ae=MUSCLENODE role=worker", f"ae=MUSCLENODE port={config.node.port} role=receiver"]

