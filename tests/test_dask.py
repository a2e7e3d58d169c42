"""``[jobs] executor = "dask"``: jobs run as tasks of a real ``distributed.LocalCluster`` (a scheduler
on TCP, worker processes under nannies) with the node's database on PostgreSQL; a worker
killed in the middle of a job is replaced by Dask and the study is recorded once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from conftest import free_port, node_config, small_phantom, wait_until
from sqlalchemy import func, select

from node import db
from node.config import ConfigError, JobSettings, config_from_dict
from node.demo_peers import push
from node.jobs import JobRunner
from node.worker import JobContext
from quant.synthetic.phantom import phantom_datasets


@pytest.fixture
def cluster():
    """Two single-threaded worker processes over TCP; the scheduler gives a task up after its
    workers died 3 times (the default, set here so the test does not depend on it).
    """
    import dask
    from distributed import Client, LocalCluster
    with dask.config.set({"distributed.scheduler.allowed-failures": 3}):
        lc = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp",
                          host="127.0.0.1", dashboard_address=None, silence_logs=40)
    client = Client(lc.scheduler_address, set_as_default=False)
    yield lc, client
    client.close()
    lc.close()


def test_dask_needs_a_scheduler_address():
    with pytest.raises(ConfigError, match=r"jobs\.scheduler_address: required with jobs\.executor = \"dask\""):
        config_from_dict({"jobs": {"executor": "dask"}})
    with pytest.raises(ConfigError, match=r"jobs\.scheduler_address: expected a Dask scheduler address"):
        config_from_dict({"jobs": {"executor": "dask", "scheduler_address": "tcp://host"}})
    cfg = config_from_dict({"jobs": {"executor": "dask", "scheduler_address": "tcp://10.0.0.5:8786"}})
    assert cfg.jobs.scheduler_address == "tcp://10.0.0.5:8786"


def test_an_unreachable_scheduler_stops_the_start_with_a_clear_error(tmp_path, monkeypatch):
    import node.dask_executor as de
    monkeypatch.setattr(de, "CONNECT_TIMEOUT", 2.0)
    address = f"tcp://127.0.0.1:{free_port()}"     # nothing listens there
    engine = db.make_engine(f"sqlite:///{tmp_path / 'n.db'}")
    runner = JobRunner(engine, JobContext("sqlite://", str(tmp_path)), executor="dask", scheduler_address=address)
    t0 = time.time()
    with pytest.raises(de.SchedulerUnreachable, match=rf"jobs\.scheduler_address: no Dask scheduler answered at "
                                                      rf"{address} within 2 s") as info:
        runner.start()
    assert isinstance(info.value, ConfigError)                 # `musclenode serve` says so and exits 2
    assert time.time() - t0 < 30
    assert not runner._thread.is_alive()
    engine.dispose()


def _studies(n: int, seed: int = 0):
    return [phantom_datasets(small_phantom(shape=(4, 80, 128), seed=seed + k, muscle_ff=0.05 + 0.01 * k),
                             patient_id=f"DASK-{seed + k}", uid_seed=f"dask-{seed + k}") for k in range(n)]


def _rows(engine, table):
    with engine.begin() as conn:
        return conn.execute(select(table)).all()


def _counted_once(engine, n_studies: int) -> None:
    """Each study: one job, done; one set of measurements; each output recorded once."""
    jobs = _rows(engine, db.jobs)
    assert len(jobs) == n_studies and {j.state for j in jobs} == {"done"}, [(j.id, j.state, j.message) for j in jobs]
    assert {s.state for s in _rows(engine, db.studies)} == {"done"}
    with engine.begin() as conn:
        per_job = dict(conn.execute(select(db.measurements.c.job_id, func.count()).group_by(db.measurements.c.job_id))
                       .all())
        dup = conn.execute(select(db.measurements.c.study_uid, db.measurements.c.side, db.measurements.c.metric,
                                  db.measurements.c.roi, db.measurements.c.source, func.count())
                           .group_by(db.measurements.c.study_uid, db.measurements.c.side, db.measurements.c.metric,
                                     db.measurements.c.roi, db.measurements.c.source)
                           .having(func.count() > 1)).all()
        outputs = conn.execute(select(db.outputs.c.study_uid, db.outputs.c.kind)).all()
    assert sorted(per_job) == sorted(j.id for j in jobs) and min(per_job.values()) > 10
    assert dup == []
    assert len(outputs) == len(set(outputs)) and {u for u, _ in outputs} == {j.study_uid for j in jobs}


@pytest.mark.slow
@pytest.mark.postgres
def test_studies_run_on_a_dask_cluster_and_a_lost_worker_is_retried(pg_url, cluster, make_node, tmp_path):
    lc, client = cluster
    cfg = node_config(tmp_path, database_url=pg_url)
    cfg = dataclasses.replace(cfg, jobs=JobSettings(workers=2, executor="dask", scheduler_address=lc.scheduler_address))
    t0 = time.time()
    node = make_node(cfg)
    workers = client.run(os.getpid)                 # address -> pid of the two worker processes
    assert len(workers) == 2 and os.getpid() not in workers.values()
    t_ready = time.time()

    # 1. three studies, two at a time on the two workers
    studies = _studies(3)
    for datasets in studies:
        assert set(push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    wait_until(lambda: (jobs := _rows(node.engine, db.jobs)) and len(jobs) == 3
               and all(j.state == "done" for j in jobs), timeout=180, what="three studies done on Dask")
    t_three = time.time()
    _counted_once(node.engine, 3)
    assert all(j.attempts == 1 for j in _rows(node.engine, db.jobs))
    assert set(client.run(os.getpid).values()) == set(workers.values())   # no worker was lost so far

    # 2. the worker running the fourth study's task is SIGKILLed mid-task. The job on this small phantom
    # takes well under a second, so the current workers hold it before its outputs for a few seconds:
    # the kill then lands inside execute_job whatever the machine's speed. A replacement worker is a new
    # process without the pause.
    def pause_before_outputs(seconds: float = 6.0) -> None:
        import node.worker as w
        build = w.build_outputs

        def paused(*args, **kwargs):
            time.sleep(seconds)
            return build(*args, **kwargs)
        w.build_outputs = paused
    client.run(pause_before_outputs)
    (extra,) = _studies(1, seed=10)
    assert set(push(extra, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}

    def processing():
        busy = {w: [k for k in keys if str(k).startswith("musclenode-execute_job-")]
                for w, keys in client.processing().items()}
        return next(((w, ks[0]) for w, ks in busy.items() if ks), None)
    address, key = wait_until(processing, timeout=60, interval=0.05, what="the fourth job's task on a worker")
    job = wait_until(lambda: next((j for j in _rows(node.engine, db.jobs) if j.state == "running"), None),
                     timeout=30, interval=0.05, what="its job row running")
    time.sleep(0.5)                                  # inside execute_job, in the pause before its outputs
    os.kill(workers[address], signal.SIGKILL)
    with node.engine.begin() as conn:
        assert conn.execute(select(db.jobs.c.state).where(db.jobs.c.id == job.id)).scalar_one() == "running"
        assert conn.execute(select(func.count()).select_from(db.outputs)
                            .where(db.outputs.c.study_uid == job.study_uid)).scalar_one() == 0
    t_kill = time.time()
    wait_until(lambda: next(j for j in _rows(node.engine, db.jobs) if j.id == job.id).state == "done",
               timeout=180, what="the fourth study done after its worker was killed")
    t_done = time.time()
    _counted_once(node.engine, 4)
    job = next(j for j in _rows(node.engine, db.jobs) if j.id == job.id)
    assert job.attempts == 1                          # Dask ran the task again; the node did not have to
    # the scheduler's record of the task: processing on the killed worker, released when that worker was
    # removed, then processing on another one, which finished it
    moves = [(e[2], e[3], str(e[5])) for e in client.story(key) if e[0] == "scheduler" and e[1] == key]
    assert [f for _, f, _ in moves].count("processing") == 2, moves
    assert any(s == "processing" and f != "memory" and "worker" in stimulus for s, f, stimulus in moves), moves
    lost = next(i for i, (s, f, stimulus) in enumerate(moves) if s == "processing" and "worker" in stimulus)
    assert ("processing", "memory") in [m[:2] for m in moves[lost:]], moves
    assert address not in client.run(os.getpid) or client.run(os.getpid)[address] != workers[address]
    print(f"\nDask: ready in {t_ready - t0:.1f} s; 3 studies in {t_three - t_ready:.1f} s; "
          f"the killed worker's study done {t_done - t_kill:.1f} s after the kill")
