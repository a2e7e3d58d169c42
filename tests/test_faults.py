"""Faults, each a test that kills or breaks something real: SIGKILL of the node during a
parallel push, SIGKILL of a worker during a job, PACS down for an hour, a full disk, and
PostgreSQL restarted under load. Real processes, signals, sockets and file systems."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import free_port, node_config, small_phantom, wait_until
from dicom_builders import mr_slice
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select, update

from node import db
from node.config import Destination
from node.demo_peers import MiniPACS, push
from quant.synthetic.phantom import phantom_datasets

ROOT = Path(__file__).resolve().parents[1]
MR = "1.2.840.10008.5.1.4.1.1.4"
slow = pytest.mark.slow


# --- helpers -------------------------------------------------------------------------------------------------------

def tiny_series(n: int, *, study_uid: str, series_number: int = 3, offset: int = 0) -> list[pydicom.Dataset]:
    """``n`` synthetic 32x32 MR slices of one series of ``study_uid`` (nothing to quantify: skipped)."""
    series_uid = generate_uid()
    rng = np.random.default_rng(series_number)
    return [mr_slice(position=(0.0, 0.0, 5.0 * (i + offset)), rows=32, cols=32, series_uid=series_uid,
                     study_uid=study_uid, instance_number=i + 1, series_number=series_number,
                     pixels=rng.integers(0, 1000, (32, 32), dtype=np.uint16))
            for i in range(n)]


def scu_push(datasets, port: int, statuses: dict[str, int | None], stop: threading.Event | None = None) -> None:
    """C-STORE ``datasets`` over one association, recording each instance's status (None: no
    answer, the association was lost)."""
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MR, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MUSCLENODE")
    if not assoc.is_established:
        for ds in datasets:
            statuses[str(ds.SOPInstanceUID)] = None
        return
    try:
        for ds in datasets:
            sop = str(ds.SOPInstanceUID)
            if stop is not None and stop.is_set() or not assoc.is_established:
                statuses[sop] = None
                continue
            try:
                rsp = assoc.send_c_store(ds)
                statuses[sop] = int(rsp.Status) if "Status" in rsp else None
            except Exception:
                statuses[sop] = None
    finally:
        if assoc.is_established:
            assoc.release()


def parallel_push(groups, port: int, statuses: dict) -> list[threading.Thread]:
    threads = [threading.Thread(target=scu_push, args=(g, port, statuses), daemon=True) for g in groups]
    for t in threads:
        t.start()
    return threads


def write_config(path: Path, port: int, data_dir: Path, *, executor: str = "inline", complete_after: float = 1.0,
                 extra: str = "") -> Path:
    path.write_text(f'[node]\nbind_address = "127.0.0.1"\nport = {port}\ndata_dir = "{data_dir}"\n'
                    f'complete_after_seconds = {complete_after}\n[jobs]\nexecutor = "{executor}"\n{extra}')
    return path


class Serve:
    """A ``musclenode serve`` process (``--role role`` when given), in its own process group, as under systemd."""

    def __init__(self, config: Path, log: Path, role: str | None = None):
        self.log = open(log, "ab")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        roles = ["--role", role] if role else []
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", *roles, "--config", str(config)],
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True)
        self.line = self.proc.stdout.readline().decode()   # "listening on ..." once the workers are warm
        expected = f"role {role}" if role else "listening on"
        assert expected in self.line, f"serve did not start: {self.line!r} {log.read_text()[-3000:]}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def holder(self) -> str:
        """What ``claimed_by`` says for this node's claims."""
        return f"{socket.gethostname()}:{self.proc.pid}"

    def kill(self, group: bool = False) -> None:
        """SIGKILL the node (``group``: with its worker processes, as systemd's KillMode does)."""
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # no worker outlives the test
        except ProcessLookupError:
            pass
        self.log.close()


def workers_of(pid: int) -> list[int]:
    """The job worker processes (multiprocessing spawn children) of process ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


def sqlite_engine(data_dir: Path):
    return db.make_engine(f"sqlite:///{data_dir / 'musclenode.db'}")


def table(engine, t):
    with engine.begin() as conn:
        return conn.execute(select(t).order_by(t.c.id)).all()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


# --- 1. SIGKILL of the node during a 500-instance push on four associations ----------------------------------------

@slow
def test_sigkill_of_the_node_during_a_parallel_push(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    cfg = write_config(tmp_path / "node.toml", port, data, complete_after=8.0)
    studies = [generate_uid(), generate_uid()]
    groups = [tiny_series(125, study_uid=studies[k // 2], series_number=k + 1) for k in range(4)]
    everything = [ds for g in groups for ds in g]
    statuses: dict[str, int | None] = {}
    node = Serve(cfg, tmp_path / "node.log")
    try:
        t0 = time.time()
        threads = parallel_push(groups, port, statuses)
        wait_until(lambda: sum(1 for s in statuses.values() if s == 0) >= 150, timeout=60, interval=0.01,
                   what="150 instances acknowledged")
        node.kill()                                         # SIGKILL mid-push
        killed_after = time.time() - t0
        for t in threads:
            t.join(60)
        acked = {sop for sop, s in statuses.items() if s == 0}
        assert 150 <= len(acked) < 500, len(acked)
        engine = sqlite_engine(data)
        rows = {r.sop_uid: r for r in table(engine, db.instances)}
        for r in rows.values():                             # no row without its file
            assert Path(r.path).exists()
        n_rows = len(rows)   # the others acknowledged are in the ingest journal, placed at the restart
        engine.dispose()

        node = Serve(cfg, tmp_path / "node.log")            # restart (the journal is replayed before it listens)
        # every instance that got Success is on disk, whole, and in the database
        engine = sqlite_engine(data)
        rows = {r.sop_uid: r for r in table(engine, db.instances)}
        assert acked <= set(rows), f"{len(acked - set(rows))} acknowledged instances have no row"
        for sop in acked:
            assert pydicom.dcmread(rows[sop].path).SOPInstanceUID == sop
        for r in rows.values():
            assert Path(r.path).exists()
        engine.dispose()
        # the scanner sends what was not acknowledged
        resend = [ds for ds in everything if str(ds.SOPInstanceUID) not in acked]
        statuses2: dict[str, int | None] = {}
        for t in parallel_push([resend[k::4] for k in range(4)], port, statuses2):
            t.join(120)
        assert set(statuses2.values()) == {0}
        engine = sqlite_engine(data)
        wait_until(lambda: len([j for j in table(engine, db.jobs) if j.state in ("done", "skipped")]) == 2,
                   timeout=90, what="both studies processed")
        time.sleep(2.0)   # nothing more is queued
        jobs = table(engine, db.jobs)
        st = {s.study_uid: s for s in table(engine, db.studies)}
        assert len(table(engine, db.instances)) == 500
        assert sorted(j.study_uid for j in jobs) == sorted(studies)       # completed once, processed once
        assert all(j.revision == 1 and j.attempts == 1 for j in jobs)
        assert all(st[u].revision == 1 and st[u].n_instances == 250 for u in studies)
        engine.dispose()
        print(f"\nSIGKILL after {killed_after:.2f} s: {len(acked)} acknowledged, {n_rows} rows at the kill "
              f"(the rest placed from the journal at the restart); "
              f"{len(resend)} sent again after the restart")
    finally:
        node.stop()


# --- 2. SIGKILL of a worker in the middle of a job -----------------------------------------------------------------

def _job(engine):
    jobs = table(engine, db.jobs)
    return jobs[0] if jobs else None


def _kill_worker_of_attempt(node: Serve, engine, attempt: int) -> int:
    wait_until(lambda: (j := _job(engine)) is not None and j.state == "running" and j.attempts == attempt,
               timeout=120, interval=0.05, what=f"attempt {attempt} running")
    pids = wait_until(lambda: workers_of(node.pid), timeout=30, interval=0.05, what="the worker process")
    assert _job(engine).state == "running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids[0]


@slow
def test_sigkill_of_a_worker_mid_job_is_retried_then_failed(tmp_path):
    data = tmp_path / "data"
    port = free_port()
    pacs = MiniPACS(tmp_path / "pacs")
    pacs_port = pacs.start()
    cfg = write_config(tmp_path / "node.toml", port, data, executor="process", extra=(
        "max_attempts = 3\n[[destinations]]\nname = \"pacs\"\nae_title = \"DEMOPACS\"\nhost = \"127.0.0.1\"\n"
        f"port = {pacs_port}\n"))
    datasets = phantom_datasets(small_phantom(shape=(6, 96, 160), seed=3), uid_seed="fault-worker")
    node = Serve(cfg, tmp_path / "node.log")
    try:
        engine = sqlite_engine(data)
        assert set(push(datasets, "127.0.0.1", port, called_ae="MUSCLENODE")) == {0}
        t0 = time.time()
        _kill_worker_of_attempt(node, engine, 1)            # the node sees its pool break: attempt 2
        _kill_worker_of_attempt(node, engine, 2)
        node.kill(group=True)                               # the node dies too, mid attempt 2
        assert _job(engine).state == "running"
        node = Serve(cfg, tmp_path / "node.log")            # restart: the job runs again (attempt 3) ...
        _kill_worker_of_attempt(node, engine, 3)            # ... and its worker dies once more: failed
        job = wait_until(lambda: (j := _job(engine)) is not None and j.state == "failed" and j,
                         timeout=60, what="the job failed")
        elapsed = time.time() - t0
        assert job.attempts == 3 and "crashed 3 times" in job.message and "worker process died" in job.message
        status = cli(cfg, "status")
        assert status.returncode == 0 and "failed" in status.stdout and "crashed 3 times" in status.stdout, \
            status.stdout
        # nothing half-made was recorded or sent
        assert table(engine, db.outputs) == [] and table(engine, db.outbox) == []
        time.sleep(1.0)
        assert pacs.received == []
        assert table(engine, db.studies)[0].state == "failed"
        print(f"\nthree attempts killed, failed after {elapsed:.1f} s")
        engine.dispose()
    finally:
        node.stop()
        pacs.stop()


def test_a_lost_job_on_its_last_attempt_is_failed_not_run_again(tmp_path):
    """Lease expiry (another node's worker died) and a restart both respect [jobs] max_attempts."""
    from node.jobs import claim_job, requeue_running
    engine = db.make_engine(f"sqlite:///{tmp_path / 'n.db'}")
    now = time.time()
    with engine.begin() as conn:
        for k in (1, 2):
            conn.execute(db.studies.insert().values(study_uid=f"1.2.{k}", state="processing", revision=1,
                                                    n_instances=1, first_received_at=now, last_received_at=now))
            conn.execute(db.jobs.insert().values(study_uid=f"1.2.{k}", revision=1, state="running", attempts=k,
                                                 lease_until=now - 1, created_at=now, message=""))
    assert claim_job(engine, 60, max_attempts=2) == (1, "1.2.1")     # attempt 2 of job 1 ...
    assert claim_job(engine, 60, max_attempts=2) is None             # job 2's last attempt was lost
    jobs = table(engine, db.jobs)
    assert jobs[0].attempts == 2 and jobs[1].state == "failed" and "gave up after 2" in jobs[1].message
    assert requeue_running(engine, max_attempts=2) == 0               # ... which was its last one
    assert [j.state for j in table(engine, db.jobs)] == ["failed", "failed"]
    assert [s.state for s in table(engine, db.studies)] == ["failed", "failed"]


# --- 3. PACS down while five studies complete, up an hour later ----------------------------------------------------

@slow
def test_pacs_down_for_an_hour_delivers_everything_once_in_study_order(make_node, tmp_path):
    pacs = MiniPACS(tmp_path / "pacs")
    pacs_port = free_port()                                  # nothing listens there yet: PACS is down
    dest = Destination("pacs", "DEMOPACS", "127.0.0.1", pacs_port)
    node = make_node(node_config(tmp_path, destinations=[dest], retry_initial=3600.0, retry_max=7200.0,
                                 complete_after=1.0))
    visits = [("A-1", "20250101"), ("B-1", "20250105"), ("A-1", "20250701"), ("B-1", "20250705"),
              ("A-1", "20260101")]
    t0 = time.time()
    for k, (pid, date) in enumerate(visits):                 # five studies complete while PACS is down
        ph = small_phantom(shape=(4, 64, 112), seed=20 + k, muscle_ff=0.05 + 0.01 * k)
        dss = phantom_datasets(ph, patient_id=pid, study_date=date, uid_seed=f"fault-pacs-{k}")
        assert set(push(dss, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}

    def outbox():
        return table(node.engine, db.outbox)

    def processed_and_tried():
        jobs = table(node.engine, db.jobs)
        return (len(jobs) == 5 and all(j.state == "done" for j in jobs)
                and len({r.output_id for r in outbox() if r.attempts >= 1}) >= 2)
    wait_until(processed_and_tried, timeout=240, what="five studies processed, the first sends failed")
    processed = time.time() - t0
    time.sleep(1.5)   # several sender ticks
    with node.engine.begin() as conn:
        study_of = {o.id: o.study_uid for o in conn.execute(select(db.outputs)).all()}
        kind_of = {o.id: o.kind for o in conn.execute(select(db.outputs)).all()}
        subject_of = {s.study_uid: (s.subject_key, s.study_date) for s in conn.execute(select(db.studies)).all()}
    firsts = {u for u, (_, d) in subject_of.items() if d in ("20250101", "20250105")}
    for r in outbox():    # each subject's first visit failed and waits an hour; its later visits wait behind it
        assert r.state == "pending"
        if study_of[r.output_id] in firsts and kind_of[r.output_id] not in ("pmap", "summary"):
            assert r.attempts >= 1 and r.next_try_at > time.time() + 3000
        elif study_of[r.output_id] in firsts:   # maps and page are made after SEG and SR: held back behind them
            assert r.attempts == 0 or r.next_try_at > time.time() + 3000
        else:
            assert r.attempts == 0, "a later visit was tried before its subject's first"
    first_a = min((u for u, (_, d) in subject_of.items() if d == "20250101"))
    pacs.start(pacs_port)                                   # PACS is back ...
    try:
        # ... and an hour passes for every row but those of subject A's first visit: A's later
        # visits must wait for it, B's go
        with node.engine.begin() as conn:
            late = [o for o, u in study_of.items() if u != first_a]
            conn.execute(update(db.outbox).where(db.outbox.c.output_id.in_(late)).values(next_try_at=time.time()))
        node.sender.wake()
        b_studies = {u for u, (_, d) in subject_of.items() if d in ("20250105", "20250705")}
        wait_until(lambda: all(r.state == "sent" for r in outbox() if study_of[r.output_id] in b_studies),
                   timeout=60, what="subject B's outputs")
        time.sleep(1.0)
        assert {st for _, _, st, _ in pacs.received} == b_studies            # A held back behind its first visit
        with node.engine.begin() as conn:                    # the hour is over for A's first visit too
            conn.execute(update(db.outbox).where(db.outbox.c.state == "pending").values(next_try_at=time.time()))
        node.sender.wake()
        wait_until(lambda: all(r.state == "sent" for r in outbox()), timeout=60, what="every output sent")
        time.sleep(1.0)
        rows = outbox()
        received = [(st, p.name) for _, _, st, p in pacs.received]
        # each output delivered once; one outbox row per output and destination
        assert len(received) == len(rows) == len({p for _, p in received}) == 4 * 5   # no PDF: pdf = false
        assert len({r.output_id for r in rows}) == len(rows)
        # in study order per subject
        for subject in ("A-1", "B-1"):
            order = [subject_of[st][1] for st, _ in received if subject in subject_of[st][0]]
            assert order == sorted(order) and len(set(order)) in (2, 3), order
        print(f"\nfive studies processed in {processed:.1f} s; {len(rows)} outputs delivered once, in order")
    finally:
        pacs.stop()


# --- 4. Disk full -------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> int:
    written = 0
    with open(path, "ab") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
                written += 65536
        except OSError:
            pass
    try:
        with open(path, "ab") as fh:   # the last bytes too, a page at a time
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass
    return written


@slow
def test_disk_full_refuses_with_out_of_resources_and_recovers(make_node, small_disk):
    node = make_node(node_config(small_disk, complete_after=60.0))
    data = small_disk / "node-data"
    study = generate_uid()
    filler = small_disk / "filler"
    _fill(filler)
    refused = tiny_series(5, study_uid=study, series_number=1)
    assert push(refused, "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0xA700] * 5

    def instance_files():
        return sorted(p.name for p in (data / "store").rglob("*.dcm"))

    def check_nothing_half_stored(statuses, datasets):
        rows = {r.sop_uid for r in table(node.engine, db.instances)}
        files = set(instance_files())
        for ds, s in zip(datasets, statuses, strict=True):
            sop = str(ds.SOPInstanceUID)
            assert (sop in rows) == (s == 0) == (f"{sop}.dcm" in files), (sop, hex(s))
        assert list((data / "tmp").iterdir()) == []

    check_nothing_half_stored([0xA700] * 5, refused)
    assert table(node.engine, db.instances) == [] and instance_files() == []
    # a little room: some fit, the rest are refused, none is half-stored
    with open(filler, "r+b") as fh:
        fh.truncate(max(filler.stat().st_size - 65536, 0))
    some = tiny_series(12, study_uid=study, series_number=2)
    statuses = [push([ds], "127.0.0.1", node.port, called_ae="MUSCLENODE")[0] for ds in some]
    assert set(statuses) <= {0, 0xA700} and 0xA700 in statuses, statuses
    check_nothing_half_stored(statuses, some)
    filler.unlink()                                           # space returns: the node takes instances again
    again = tiny_series(5, study_uid=study, series_number=3)
    assert push(again, "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0] * 5
    assert push(refused, "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0] * 5
    check_nothing_half_stored([0] * 10, again + refused)
    print(f"\nwith 64 KiB free: {statuses.count(0)} stored, {statuses.count(0xA700)} refused with 0xA700")
    node.stop()


# --- 5. PostgreSQL restarted under load ----------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of its own (initdb, pg_ctl) on a free port, so that the
    test can restart a real server without touching the shared one."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="musclenode-pg-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self._run(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *args) -> None:
        r = subprocess.run([*self.as_user, *map(str, args)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {r.stdout[-1000:]} {r.stderr[-1000:]}")

    def ctl(self, *args: str) -> None:
        self._run(PG_BIN / "pg_ctl", "-D", self.data, "-w", "-l", self.dir / "log",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", *args)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        try:
            self.ctl("-m", "immediate", "stop")
        except RuntimeError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg():
    pytest.importorskip("psycopg")
    if not (PG_BIN / "initdb").exists() or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed")
    pg = PrivatePostgres()
    pg.ctl("start")
    yield pg
    pg.close()


@slow
@pytest.mark.postgres
def test_postgres_restarted_under_load(private_pg, make_node, tmp_path):
    node = make_node(node_config(tmp_path, database_url=private_pg.url, complete_after=3.0))
    studies = [generate_uid() for _ in range(4)]
    groups = [tiny_series(60, study_uid=u, series_number=k + 1) for k, u in enumerate(studies)]
    everything = [ds for g in groups for ds in g]
    statuses: dict[str, int | None] = {}
    restarts = []
    threads = parallel_push([groups[0] + groups[1], groups[2] + groups[3]], node.port, statuses)
    for k, mode in enumerate(("fast", "immediate")):       # a clean restart, then a crash-like one
        wait_until(lambda n=60 * (k + 1): len(statuses) >= n, timeout=60, interval=0.02, what="instances under way")
        t = time.time()
        private_pg.ctl("-m", mode, "restart")
        restarts.append(time.time() - t)
    for t in threads:
        t.join(120)
    assert len(statuses) == 240 and set(statuses.values()) <= {0, 0xA700}, set(statuses.values())
    acked = {sop for sop, s in statuses.items() if s == 0}
    rows = {r.sop_uid: r for r in table(node.engine, db.instances)}
    assert acked <= set(rows)                                 # no acknowledged instance lost
    assert all(Path(r.path).exists() for r in rows.values())
    refused = [ds for ds in everything if str(ds.SOPInstanceUID) not in acked]
    if refused:                                               # what was refused is sent again, as a scanner does
        assert set(push(refused, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    # the work goes on: every study completes and is processed once
    try:
        wait_until(lambda: len([j for j in table(node.engine, db.jobs) if j.state in ("done", "skipped")]) == 4,
                   timeout=60, what="four studies processed after the restarts")
    except AssertionError:
        print("jobs", table(node.engine, db.jobs), "studies", table(node.engine, db.studies))
        raise
    assert len(table(node.engine, db.instances)) == 240
    assert sorted(j.study_uid for j in table(node.engine, db.jobs)) == sorted(studies)
    assert all(s.n_instances == 60 for s in table(node.engine, db.studies))
    print(f"\nPostgreSQL restarted twice ({', '.join(f'{s:.1f} s' for s in restarts)}) under load: "
          f"{len(acked)} acknowledged at once, {len(refused)} refused with 0xA700 and sent again")
