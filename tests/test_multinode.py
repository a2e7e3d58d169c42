"""Several node processes on one PostgreSQL database and one storage root (issue 14): two
receivers and two workers, real ``musclenode serve --role ...`` processes. A dozen studies
are pushed at both receivers (two of them split across both), one worker is SIGKILLed while
it runs a job, and every study is still processed once and every output delivered once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import free_port, small_phantom, wait_until
from sqlalchemy import select
from test_faults import Serve

from node import db
from node.demo_peers import MiniPACS, push
from node.worker import PDF_KIND
from quant.synthetic.phantom import phantom_datasets

N_STUDIES = 12
LEASE = 10.0


def write_config(path: Path, *, port: int, data_dir: Path, url: str, orthanc, pacs_port: int) -> Path:
    path.write_text(f"""[node]
bind_address = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
complete_after_seconds = 3.0
[database]
url = "{url}"
[jobs]
executor = "inline"
lease_seconds = {LEASE}
max_attempts = 3
[send]
retry_initial_seconds = 0.5
retry_max_seconds = 2.0
timeout_seconds = 3.0
[[destinations]]
name = "orthanc"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
[[destinations]]
name = "counter"
ae_title = "DEMOPACS"
host = "127.0.0.1"
port = {pacs_port}
""")
    return path


def table(engine, t):
    with engine.begin() as conn:
        return conn.execute(select(t).order_by(t.c.id)).all()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.peers
def test_two_receivers_two_workers_one_killed(tmp_path, pg_url, orthanc):
    data = tmp_path / "shared-data"            # the storage root every node shares
    pacs = MiniPACS(tmp_path / "counter")      # counts every delivery, duplicates too
    pacs_port = pacs.start()
    ports = [free_port(), free_port()]
    configs = [write_config(tmp_path / f"node{k}.toml", port=ports[k % 2], data_dir=data, url=pg_url,
                            orthanc=orthanc, pacs_port=pacs_port) for k in range(2)]
    engine = db.make_engine(pg_url)
    nodes: list[Serve] = []
    try:
        t0 = time.time()
        receivers = [Serve(configs[k], tmp_path / f"receiver{k}.log", "receiver") for k in range(2)]
        nodes += receivers
        workers = [Serve(configs[k], tmp_path / f"worker{k}.log", "worker") for k in range(2)]
        nodes += workers
        started = time.time() - t0
        for w in workers:   # a worker opens no DICOM port
            assert "no DICOM port" in w.line
        studies = []
        for k in range(N_STUDIES):
            ph = small_phantom(shape=(4, 64, 112), seed=40 + k, muscle_ff=0.04 + 0.01 * (k % 5))
            studies.append(phantom_datasets(ph, patient_id=f"MN-{k:02d}", study_date="20260301",
                                            uid_seed=f"multinode-{k}"))
        # studies 0-9 whole to one receiver or the other; 10 and 11 split across both
        loads: list[list] = [[], []]
        for k, dss in enumerate(studies):
            if k < 10:
                loads[k % 2].append(dss)
            else:
                loads[0].append(dss[::2])
                loads[1].append(dss[1::2])
        statuses: list[int] = []

        def push_all(r: int) -> None:
            for dss in loads[r]:
                statuses.extend(push(dss, "127.0.0.1", ports[r], called_ae="MUSCLENODE"))
        pushers = [threading.Thread(target=push_all, args=(r,)) for r in range(2)]
        t_push = time.time()
        for t in pushers:
            t.start()
        # SIGKILL worker 0 (the node and everything in it) while it runs a job
        w0 = workers[0]

        def running_on_w0():
            return [j for j in table(engine, db.jobs) if j.state == "running" and j.claimed_by == w0.holder]
        held = wait_until(running_on_w0, timeout=120, interval=0.05, what="worker 0 running a job")
        w0.kill(group=True)
        killed_at = time.time() - t_push
        for t in pushers:
            t.join(120)
        n_pushed = sum(len(s) for s in studies)
        assert len(statuses) == n_pushed and set(statuses) == {0}
        lost_jobs = {j.id for j in table(engine, db.jobs) if j.state == "running" and j.claimed_by == w0.holder}
        assert {j.id for j in held} <= lost_jobs | {j.id for j in table(engine, db.jobs) if j.state == "done"}
        assert lost_jobs, "worker 0 had finished its job when it was killed"
        # sends worker 0 had claimed when it died may have reached a PACS already: those may come twice
        in_flight = {r.id for r in table(engine, db.outbox) if r.state == "pending" and r.claimed_by == w0.holder
                     and r.claimed_until > 0}

        def all_sent():
            jobs = table(engine, db.jobs)
            box = table(engine, db.outbox)
            return (len(jobs) == N_STUDIES and all(j.state == "done" for j in jobs)
                    and box and all(r.state == "sent" for r in box))
        wait_until(all_sent, timeout=240, interval=0.5, what="every study processed and every output sent")
        elapsed = time.time() - t_push
        time.sleep(2.0)   # nothing more is queued or sent

        # every instance kept, once, on the shared storage root
        instances = table(engine, db.instances)
        assert len(instances) == len({i.sop_uid for i in instances}) == n_pushed
        assert all(Path(i.path).is_file() and Path(i.path).is_relative_to(data) for i in instances)
        # every study processed exactly once: one job per study, revision 1, done
        st = {s.study_uid: s for s in table(engine, db.studies)}
        jobs = table(engine, db.jobs)
        uids = {str(dss[0].StudyInstanceUID) for dss in studies}
        assert set(st) == uids and sorted(j.study_uid for j in jobs) == sorted(uids)
        assert all(s.revision == 1 and s.state == "done" and s.n_instances == 16 for s in st.values())
        assert all(j.revision == 1 and j.state == "done" for j in jobs)
        # the killed worker's job was taken over by the other worker, as a second attempt
        w1 = workers[1]
        for j in jobs:
            if j.id in lost_jobs:
                assert (j.attempts, j.claimed_by) == (2, w1.holder), j
            else:
                assert j.attempts == 1 and j.claimed_by in (w0.holder, w1.holder), j
        with engine.begin() as conn:
            audit = conn.execute(select(db.audit.c.event, db.audit.c.detail)).all()
        takeovers = [d for e, d in audit if e == "job-takeover"]
        assert len(takeovers) == len(lost_jobs) and all(f"from={w0.holder} by={w1.holder}" in d for d in takeovers)
        assert Counter(e for e, _ in audit)["study-complete"] == N_STUDIES
        # every output sent exactly once to each destination
        outputs = {o.id: o for o in table(engine, db.outputs)}
        box = table(engine, db.outbox)
        sendable = {o.id for o in outputs.values() if o.kind != PDF_KIND}   # no destination takes PDF here
        assert sorted(r.output_id for r in box) == sorted(2 * list(sendable))
        assert {r.destination for r in box} == {"orthanc", "counter"}
        sent_events = Counter(d.split(" to=")[0] + " to=" + d.split(" to=")[1].split(" ")[0]
                              for e, d in audit if e == "sent")
        expected = Counter(f"study={outputs[r.output_id].study_uid} {outputs[r.output_id].kind}="
                           f"{outputs[r.output_id].sop_uid} to={r.destination}" for r in box)
        assert sent_events == expected                                # one "sent" per outbox row
        sops = {outputs[i].sop_uid for i in sendable}
        delivered = Counter(p.name.split("-", 1)[1].removesuffix(".dcm") for _, _, _, p in pacs.received)
        twice_ok = {outputs[r.output_id].sop_uid for r in box if r.id in in_flight}
        assert set(delivered) == sops
        assert all(n == 1 for sop, n in delivered.items() if sop not in twice_ok), delivered
        in_orthanc = Counter(orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
                             for i in orthanc.get("/instances"))
        assert in_orthanc == Counter(sops)
        longest = max(j.finished_at - j.started_at for j in jobs)   # > LEASE: the heartbeat kept its lease
        print(f"\n4 nodes started in {started:.1f} s; {n_pushed} instances of {N_STUDIES} studies pushed at 2 "
              f"receivers; worker 0 SIGKILLed {killed_at:.1f} s in, holding job(s) {sorted(lost_jobs)}; all "
              f"processed once and {len(box)} sends made once in {elapsed:.1f} s "
              f"({len(in_flight)} send(s) in flight at the kill); longest attempt {longest:.1f} s "
              f"(lease {LEASE:g} s)")
    finally:
        for n in nodes:
            n.stop()
        pacs.stop()
        engine.dispose()
