"""Results reach PACS even when it was down: retried with backoff, across a node restart."""

import pytest
from conftest import Orthanc, node_config, wait_until
from sqlalchemy import select

from node import db
from node.config import Destination, SendSettings
from node.demo_peers import push
from node.send import backoff_seconds


def test_backoff_doubles_up_to_the_maximum():
    s = SendSettings(retry_initial_seconds=5, retry_max_seconds=60)
    assert [backoff_seconds(n, s) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]


def _outbox(node):
    with node.engine.begin() as conn:
        return conn.execute(select(db.outbox)).all()


def test_pacs_down_then_up_across_restart(make_node, thigh_visits, tmp_path):
    pytest.importorskip("highdicom")
    if not __import__("shutil").which("Orthanc") and not __import__("os").path.exists("/usr/sbin/Orthanc"):
        pytest.skip("Orthanc is not installed")
    (_, datasets), _ = thigh_visits
    pacs = Orthanc(tmp_path / "orthanc")          # ports chosen, not started: PACS is down
    dest = Destination("pacs", "ORTHANC", "127.0.0.1", pacs.dicom_port)
    config = node_config(tmp_path, destinations=[dest], retry_initial=0.5, retry_max=1.0)
    node = make_node(config)
    assert all(s == 0 for s in push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE"))
    rows = wait_until(lambda: [r for r in _outbox(node) if r.attempts >= 2] if len(_outbox(node)) == 7 else None,
                      timeout=120, what="two failed send attempts")
    assert all(r.state == "pending" and "no association" in r.last_error for r in rows)
    node.stop()
    pacs.start()
    try:
        node2 = make_node(config)                 # a restart on the same data: the outbox resumes
        wait_until(lambda: all(r.state == "sent" for r in _outbox(node2)), timeout=60, what="sends after restart")
        study_uid = str(datasets[0].StudyInstanceUID)
        modalities = sorted(pacs.get(f"/instances/{i['ID']}/simplified-tags")["Modality"]
                            for i in pacs.instances_of_study(study_uid))
        assert modalities == ["OT"] * 5 + ["SEG", "SR"]   # OT: the parametric maps (FF, T2W, B1, FF_T2), summary page
        # nothing is delivered twice: the outbox has one row per output and destination (no PDF: pdf = false)
        assert len(_outbox(node2)) == 7
    finally:
        pacs.stop()
