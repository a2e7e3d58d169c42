"""The node's SCP over real associations: DCMTK echoscu/storescu and pynetdicom as the
scanner. Instances are on disk before Success; duplicates stored once; bad input
quarantined with a clear reason; the node keeps running."""

import copy
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import write_datasets
from pynetdicom import AE
from sqlalchemy import func, select

from node import db
from node.demo_peers import push

needs_dcmtk = pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK is not installed")


def count(node, table):
    with node.engine.begin() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


@needs_dcmtk
def test_echo_with_dcmtk(make_node):
    node = make_node()
    r = subprocess.run(["/usr/bin/echoscu", "-aec", "MUSCLENODE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@needs_dcmtk
def test_storescu_study_is_stored_durably_and_once(make_node, thigh_visits, tmp_path):
    (_, datasets), _ = thigh_visits
    files = write_datasets(datasets, tmp_path / "scanner")
    node = make_node(complete_after=3600)
    cmd = ["/usr/bin/storescu", "-aec", "MUSCLENODE", "-aet", "SCANNER", "127.0.0.1", str(node.port), *map(str, files)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert count(node, db.instances) == len(files)
    with node.engine.begin() as conn:
        rows = conn.execute(select(db.instances)).all()
        study = conn.execute(select(db.studies)).one()
    assert study.n_instances == len(files) and study.state == "receiving"
    assert study.subject_key == "patient:MUSCLENODE-DEMO:T-0001"
    for row in rows:  # the stored file is the instance, byte for byte in its data set
        stored = pydicom.dcmread(row.path)
        assert stored.SOPInstanceUID == row.sop_uid
        assert Path(row.path).parent.parent.name == study.study_uid
    assert not list((node.store.root / "tmp").iterdir())  # no temporary file left behind
    # the same study again: nothing stored twice
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert count(node, db.instances) == len(files)
    assert sum(1 for _ in (node.store.root / "store").rglob("*.dcm")) == len(files)


def _ct(datasets):
    ct = copy.deepcopy(datasets[0])
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ct.Modality = "CT"
    return ct


def test_non_mr_instance_is_quarantined_with_reason(make_node, thigh_visits):
    (_, datasets), _ = thigh_visits
    node = make_node(complete_after=3600)
    assert push([_ct(datasets)], "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0]
    with node.engine.begin() as conn:
        q = conn.execute(select(db.quarantine)).one()
    assert "CT Image Storage is not processed" in q.reason
    assert Path(q.path).exists() and Path(q.path).with_suffix(".txt").read_text().startswith("CT Image")
    assert count(node, db.instances) == 0


def test_truncated_instance_is_rejected_and_node_keeps_running(make_node, thigh_visits, tmp_path):
    (_, datasets), _ = thigh_visits
    node = make_node(complete_after=3600)
    good = write_datasets(datasets[:1], tmp_path / "one")[0]
    bad = tmp_path / "truncated.dcm"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) - 5000])
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(datasets[0].SOPClassUID, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
    assert assoc.is_established
    status = assoc.send_c_store(bad)   # pynetdicom sends the file's bytes as they are
    assert status.Status == 0xA900
    assert "truncated" in str(status.get("ErrorComment", ""))
    status = assoc.send_c_store(good)  # the same association still works
    assert status.Status == 0x0000
    assoc.release()
    with node.engine.begin() as conn:
        q = conn.execute(select(db.quarantine)).one()
    assert "pixel data is truncated" in q.reason
    assert Path(q.path).exists()
    assert count(node, db.instances) == 1


def test_instance_without_study_uid_is_rejected(make_node, thigh_visits):
    (_, datasets), _ = thigh_visits
    node = make_node(complete_after=3600)
    ds = copy.deepcopy(datasets[1])
    del ds.StudyInstanceUID
    assert push([ds], "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0xA900]
    with node.engine.begin() as conn:
        assert "StudyInstanceUID is missing" in conn.execute(select(db.quarantine.c.reason)).scalar_one()


def test_rows_lost_to_a_power_cut_are_recovered_from_the_store(make_node, tmp_path):
    """Instance rows are committed without waiting for the disk (the files are fsync'd first): a
    power cut may take the last rows. At the next start the node records every stored file that
    has no row, and quarantines one it cannot read; the study then completes with all its instances.
    """
    from conftest import node_config, small_phantom, wait_until

    from quant.synthetic.phantom import phantom_datasets
    datasets = phantom_datasets(small_phantom(shape=(4, 64, 96), seed=11), uid_seed="power-cut")
    config = node_config(tmp_path, complete_after=3600)
    node = make_node(config)
    assert set(push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    with node.engine.begin() as conn:
        rows = conn.execute(select(db.instances.c.sop_uid, db.instances.c.path)
                            .order_by(db.instances.c.received_at)).all()
    node.stop()
    assert len(rows) == len(datasets)
    lost = rows[len(rows) // 2:]           # the tail of the push: rows gone, files kept
    engine = db.make_engine(config.database_url)
    with engine.begin() as conn:
        conn.execute(db.instances.delete().where(db.instances.c.sop_uid.in_([r.sop_uid for r in lost])))
        conn.execute(db.studies.delete())   # the study row was made in the lost tail too, say
    engine.dispose()
    torn = Path(lost[0].path)                # and one file was cut short (it was never acknowledged)
    torn.write_bytes(torn.read_bytes()[:2000])
    node = make_node(node_config(tmp_path, complete_after=1.0))
    with node.engine.begin() as conn:
        n_rows = conn.execute(select(func.count()).select_from(db.instances)).scalar_one()
        quarantined = conn.execute(select(db.quarantine.c.sop_uid, db.quarantine.c.reason)).all()
        recovered = conn.execute(select(func.count()).select_from(db.audit)
                                 .where(db.audit.c.event == "row-recovered")).scalar_one()
    assert n_rows == len(datasets) - 1 and recovered == len(lost) - 1
    assert [q.sop_uid for q in quarantined] == [lost[0].sop_uid]
    assert "without its database row and unreadable" in quarantined[0].reason
    assert not torn.exists()
    def processed():
        with node.engine.connect() as conn:
            s = conn.execute(select(db.studies)).first()
        return s if s is not None and s.state == "done" else None
    study = wait_until(processed, timeout=120, what="the recovered study processed")
    assert study.n_instances == len(datasets) - 1
