"""``musclenode reprocess``: which studies it selects, that a rerun goes on where an interrupted
one stopped (SIGINT, SIGKILL), ``--send``/``--no-send``, Predecessor Documents, and that an
SR never compares values of two algorithm versions.

The "old version" is real: the studies are first processed in a subprocess whose
``quant.ALGORITHM_VERSION`` is set (by a ``sitecustomize`` on its path) before any of
musclenode is imported, so its measurements, jobs and SR UIDs carry that version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from conftest import small_phantom, wait_until
from sqlalchemy import insert, select

import quant
from node import db
from node.completion import complete_quiet_studies
from node.instances import instance_facts, subject_key
from node.processing import encode
from node.reprocess import (
    TRIGGER,
    Progress,
    ProgressBar,
    parse_study_date,
    select_and_queue,
    subject_matches,
)
from node.store import Store
from quant.synthetic.phantom import phantom_datasets

ROOT = Path(__file__).resolve().parents[1]
OLD = "musclenode-quant 0.0.9"
CURRENT = quant.ALGORITHM_VERSION

SITECUSTOMIZE = """
import os
_v = os.environ.get("MUSCLENODE_TEST_ALGORITHM_VERSION")
if _v:
    import quant
    quant.ALGORITHM_VERSION = _v
"""

PROCESS_PENDING = """
import sys
from node import db
from node.jobs import claim_job
from node.worker import JobContext, execute_job
url, data_dir = sys.argv[1], sys.argv[2]
engine = db.make_engine(url)
ctx = JobContext(url, data_dir, ("pacs",))
while (claimed := claim_job(engine, 600.0)) is not None:
    execute_job(ctx, claimed[0])
"""


# --- selection (database only) ---------------------------------------------------------------------------------------

def _study(conn, uid, key, date, state="done", revision=1, version=OLD, job_state="done", trigger=""):
    conn.execute(insert(db.studies).values(study_uid=uid, subject_key=key, study_date=date, state=state,
                                           revision=revision, n_instances=1, first_received_at=0, last_received_at=0,
                                           message=""))
    if revision:
        conn.execute(insert(db.jobs).values(study_uid=uid, revision=revision, state=job_state, attempts=1,
                                            created_at=0, message="", trigger=trigger,
                                            algorithm_version=version if job_state not in ("pending", "running")
                                            else ""))


@pytest.fixture
def engine(tmp_path):
    return db.make_engine(f"sqlite:///{tmp_path / 'musclenode.db'}")


def test_selection_by_all_subject_and_date_is_ordered_and_idempotent(engine):
    with engine.begin() as conn:
        _study(conn, "1.2.2", "trial:ACME:S-02", "20260301")
        _study(conn, "1.2.1", "trial:ACME:S-02", "20260101")
        _study(conn, "1.1.1", "patient:HOSP:P-01", "20260201")
        _study(conn, "1.1.2", "patient:HOSP:P-01", "20260801", version=CURRENT)   # already current
        _study(conn, "1.3.1", "patient::P-03", "20260901", state="receiving", revision=0)   # busy
        _study(conn, "1.3.2", "patient::P-03", "20260902", state="complete", job_state="pending")   # busy

    # --since: studies on or after the date only, YYYY-MM-DD or YYYYMMDD
    sel = select_and_queue(engine, CURRENT, since=parse_study_date("2026-03-01"), version_note="v2 segmentation")
    assert sel.queued == ["1.2.2"] and sel.current == 1 and sel.busy == 2
    # --subject: a Patient ID (or the key itself) selects that subject's studies
    sel = select_and_queue(engine, CURRENT, subject="P-01")
    assert sel.queued == ["1.1.1"] and sel.current == 1
    # --all: by subject key, then study date; those queued before are taken over, not queued again
    sel = select_and_queue(engine, CURRENT, send=True)
    assert sel.queued == ["1.2.1"] and sel.in_flight == ["1.1.1", "1.2.2"] and sel.current == 1 and sel.busy == 2
    assert select_and_queue(engine, CURRENT).queued == []

    with engine.begin() as conn:
        jobs = {j.study_uid: j for j in conn.execute(select(db.jobs).where(db.jobs.c.trigger == TRIGGER))}
        studies = {s.study_uid: s for s in conn.execute(select(db.studies))}
    assert set(jobs) == {"1.2.2", "1.1.1", "1.2.1"}
    assert jobs["1.2.2"].version_note == "v2 segmentation" and not jobs["1.2.2"].send and jobs["1.2.1"].send
    assert all(j.state == "pending" and j.revision == 2 for j in jobs.values())
    assert all(studies[u].state == "complete" and studies[u].revision == 2 for u in jobs)

    # once done at this version, a rerun selects nothing
    with engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.trigger == TRIGGER)
                     .values(state="done", algorithm_version=CURRENT))
        conn.execute(db.studies.update().where(db.studies.c.study_uid.in_(list(jobs))).values(state="done"))
    sel = select_and_queue(engine, CURRENT)
    assert sel.queued == [] and sel.in_flight == [] and sel.current == 4


def test_subject_keys_and_dates():
    assert subject_matches("trial:ACME:S-02", "S-02") and subject_matches("trial:ACME:S-02", "trial:ACME:S-02")
    assert subject_matches("patient::P-01", "P-01") and not subject_matches("patient::P-01", "P-0")
    assert parse_study_date("20260301") == parse_study_date("2026-03-01") == "20260301"
    for bad in ("2026-13-01", "yesterday", "2026-03-01T10:00"):
        with pytest.raises(ValueError):
            parse_study_date(bad)


def test_progress_bar_shows_count_rate_and_time_left(tmp_path):
    now = [0.0]
    with open(tmp_path / "bar", "w") as stream:
        bar = ProgressBar(stream, clock=lambda: now[0])
        bar.show(Progress(2, 0, 10))           # 2 done before this run
        now[0] = 120.0
        bar.show(Progress(6, 1, 10))           # 4 in 2 min: 2/min, 4 left: 2 min
        bar.show(Progress(6, 1, 10))           # no change: no new line when not a terminal
    lines = (tmp_path / "bar").read_text().splitlines()
    assert len(lines) == 2
    assert "2/10 studies" in lines[0] and "-- left" in lines[0]
    assert "6/10 studies, 1 failed" in lines[1] and "2.0/min" in lines[1] and "2m00s left" in lines[1]
    assert "[" + "#" * 18 + "." * 12 + "]" in lines[1]


# --- end to end: real processing, real subprocesses and signals ---------------------------------------------------

def _setup(tmp_path: Path, studies) -> tuple[Path, object]:
    """A node's data folder holding ``studies`` (lists of datasets), each processed once by the
    OLD algorithm version (outputs queued for the destination ``pacs``); returns (config, engine).
    """
    data = tmp_path / "node-data"
    data.mkdir()
    url = f"sqlite:///{data / 'musclenode.db'}"
    engine = db.make_engine(url)
    store = Store(data, engine)
    for datasets in studies:
        for ds in datasets:
            store.store_instance(encode(ds), study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                                 sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                 subject_key=subject_key(ds), study_date=str(ds.StudyDate), facts=instance_facts(ds))
    assert len(complete_quiet_studies(engine, 0.0, now=time.time() + 1)) == len(studies)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", MUSCLENODE_TEST_ALGORITHM_VERSION=OLD)
    subprocess.run([sys.executable, "-c", PROCESS_PENDING, url, str(data)], env=env, check=True, timeout=600)
    with engine.begin() as conn:
        assert {r.algorithm_version for r in conn.execute(select(db.measurements))} == {OLD}
        assert {j.state for j in conn.execute(select(db.jobs))} == {"done"}
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n\n[jobs]\nexecutor = "inline"\nworkers = 1\n\n'
                      f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n')
    return config, engine


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _reprocess(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", "reprocess", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _rows(engine, table, *where):
    with engine.begin() as conn:
        return conn.execute(select(table).where(*where).order_by(table.c.id)).all()


def _replaced(sr) -> list[str]:
    return [i.ReferencedSOPInstanceUID for s in sr.get("PredecessorDocumentsSequence", [])
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]


def _latest_sr(engine, study_uid):
    out = _rows(engine, db.outputs, db.outputs.c.study_uid == study_uid, db.outputs.c.kind == "sr")[-1]
    return out, pydicom.dcmread(out.path)


@pytest.mark.slow
def test_reprocess_supersedes_the_srs_and_never_mixes_versions(tmp_path, thigh_visits):
    from test_node_e2e import sr_numbers, value

    (_, d1), (_, d2) = thigh_visits
    uid1, uid2 = str(d1[0].StudyInstanceUID), str(d2[0].StudyInstanceUID)
    config, engine = _setup(tmp_path, [d1, d2])
    old_sr = {uid: _latest_sr(engine, uid)[0].sop_uid for uid in (uid1, uid2)}
    old_outbox = len(_rows(engine, db.outbox))
    assert old_outbox > 0

    # visit 2 only (--since), sent: visit 1 still has the old version's values, which it must not be compared with
    r = _reprocess(config, "--since", "2026-07-01", "--send", "--version-note", "EPG dictionary v2")
    assert r.returncode == 0, r.stderr
    assert "1 study queued" in r.stdout and "1 already at this version" not in r.stdout
    assert "1/1 studies" in r.stderr
    (job,) = _rows(engine, db.jobs, db.jobs.c.trigger == TRIGGER)
    assert (job.study_uid, job.state, job.send, job.version_note, job.algorithm_version) == (
        uid2, "done", True, "EPG dictionary v2", CURRENT)
    out2, sr2 = _latest_sr(engine, uid2)
    assert out2.job_id == job.id and _replaced(sr2) == [old_sr[uid2]]
    assert not [n for n in sr_numbers(sr2) if "since baseline" in n[1].lower()]   # no comparison across versions
    assert "Not compared: measured by another algorithm version" in str(sr2)        # and the SR says why
    new_outputs = {o.id for o in _rows(engine, db.outputs, db.outputs.c.job_id == job.id)
                   if o.kind != "summary-pdf"}   # the PDF goes only where a destination has pdf = true
    assert {b.output_id for b in _rows(engine, db.outbox)} >= new_outputs             # --send: queued for PACS
    n_outbox = len(_rows(engine, db.outbox))

    # everything else (--all), not sent: visit 1 at the new version, then visit 2 compared with it again
    r = _reprocess(config, "--all")
    assert r.returncode == 0, r.stderr
    assert "1 study queued" in r.stdout and "1 already at this version" in r.stdout
    assert "2/2 studies" in r.stderr          # visit 2's re-comparison joined the run
    jobs = _rows(engine, db.jobs, db.jobs.c.trigger == TRIGGER)
    assert [(j.study_uid, j.state, j.send) for j in jobs] == [(uid2, "done", True), (uid1, "done", False),
                                                             (uid2, "done", False)]
    assert len(_rows(engine, db.outbox)) == n_outbox                                  # --no-send: nothing more
    assert {m.algorithm_version for m in _rows(engine, db.measurements)} == {CURRENT}
    _, sr2b = _latest_sr(engine, uid2)
    assert _replaced(sr2b) == [old_sr[uid2], out2.sop_uid]
    assert "measured by another algorithm version" not in str(sr2b)
    _, sr1 = _latest_sr(engine, uid1)
    assert _replaced(sr1) == [old_sr[uid1]]
    v = {(m.study_uid, m.side, m.metric): m.value for m in _rows(engine, db.measurements) if not m.roi}
    nums = sr_numbers(sr2b)
    assert value(nums, "right thigh muscle", "Interval since baseline") == 182
    assert value(nums, "right thigh muscle", "Change in area since baseline") == pytest.approx(
        v[(uid2, "right", "csa_mm2")] - v[(uid1, "right", "csa_mm2")], abs=0.5 + 1e-9)
    audit = [a.event for a in _rows(engine, db.audit)]
    assert audit.count("reprocess-started") == 2 and audit.count("reprocess-finished") == 2

    # a third run has nothing to do
    r = _reprocess(config, "--all")
    assert r.returncode == 0 and "0 studies queued" in r.stdout and "2 already at this version" in r.stdout
    assert len(_rows(engine, db.jobs, db.jobs.c.trigger == TRIGGER)) == 3


@pytest.mark.slow
def test_interrupted_reprocess_goes_on_where_it_stopped(tmp_path, thigh_visits):
    (_, d1), (_, d2) = thigh_visits
    d3 = phantom_datasets(small_phantom(seed=31), patient_id="T-0002", study_date="20260301", uid_seed="third")
    config, engine = _setup(tmp_path, [d1, d2, d3])

    def done():
        return [j for j in _rows(engine, db.jobs, db.jobs.c.trigger == TRIGGER) if j.state == "done"]

    def start():
        return subprocess.Popen([sys.executable, "-m", "node.cli", "reprocess", "--all", "--config", str(config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                start_new_session=True)

    # 1: Ctrl-C once the first study is done: it stops after the study in progress
    proc = start()
    try:
        wait_until(lambda: len(done()) >= 1, timeout=300, what="the first study reprocessed")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "stopped:" in out and "run the same command again" in out
    first = {j.id: j.finished_at for j in done()}
    assert 1 <= len(first) < 3

    # 2: SIGKILL once one more is done: the study in progress is left running, claimed by a dead process
    proc = start()
    try:
        wait_until(lambda: len(done()) > len(first), timeout=300, what="one more study reprocessed")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    second = {j.id: j.finished_at for j in done()}

    # 3: goes on with what is left, redoing nothing done
    r = _reprocess(config, "--all")
    assert r.returncode == 0, r.stderr
    assert "0 studies queued" in r.stdout and "from an earlier run" in r.stdout
    jobs = _rows(engine, db.jobs, db.jobs.c.trigger == TRIGGER)
    assert len(jobs) == 3 and {j.state for j in jobs} == {"done"}
    assert {j.study_uid for j in jobs} == {str(d[0].StudyInstanceUID) for d in (d1, d2, d3)}
    assert {j.id: j.finished_at for j in jobs if j.id in second} == second   # not run again
    assert {m.algorithm_version for m in _rows(engine, db.measurements)} == {CURRENT}
    assert not _rows(engine, db.outbox, db.outbox.c.output_id.in_(
        [o.id for o in _rows(engine, db.outputs, db.outputs.c.job_id.in_([j.id for j in jobs]))]))
