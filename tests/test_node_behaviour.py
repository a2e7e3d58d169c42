"""How the node behaves around the happy path: compressed input, a study without Dixon,
late instances, restarts, and Orthanc as the sender."""

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import node_config, small_phantom, wait_until, write_datasets
from sqlalchemy import select

from node import db
from node.config import Destination
from node.demo_peers import push
from quant.synthetic.phantom import phantom_datasets

needs_dcmtk = pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK is not installed")


def rows(node, table):
    with node.engine.begin() as conn:
        return conn.execute(select(table).order_by(table.c.id)).all()


def measured(node, study_uid):
    return {(r.side, r.metric): r.value for r in rows(node, db.measurements)
            if r.study_uid == study_uid and not r.roi}


@needs_dcmtk
@pytest.mark.parametrize("tool,args,ts,propose", [
    ("/usr/bin/dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70", "-xs"),   # JPEG Lossless SV1
    ("/usr/bin/dcmcrle", [], "1.2.840.10008.1.2.5", "-xr"),             # RLE Lossless
    ("/usr/bin/dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80", "-xt"),    # JPEG-LS Lossless
])
def test_lossless_compressed_study_is_stored_and_quantified(make_node, thigh_visits, tmp_path, tool, args, ts,
                                                            propose):
    (phantom, datasets), _ = thigh_visits
    plain = write_datasets(datasets, tmp_path / "plain")
    packed = []
    for p in plain:
        out = tmp_path / "packed" / p.name
        out.parent.mkdir(exist_ok=True)
        subprocess.run([tool, *args, str(p), str(out)], check=True, capture_output=True)
        packed.append(out)
    assert pydicom.dcmread(packed[0]).file_meta.TransferSyntaxUID == ts
    node = make_node(complete_after=0.5)
    r = subprocess.run(["/usr/bin/storescu", "-R", propose,
                        "-aec", "MUSCLENODE", "127.0.0.1", str(node.port), *map(str, packed)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stored = rows(node, db.instances)
    assert len(stored) == len(packed)
    assert pydicom.dcmread(stored[0].path).file_meta.TransferSyntaxUID == ts   # kept as sent
    study_uid = str(datasets[0].StudyInstanceUID)
    got = wait_until(lambda: measured(node, study_uid), timeout=120, what="measurements")
    for (side, metric), truth in phantom.truth.items():
        if metric == "csa_mm2":
            assert got[(side.value, metric)] == pytest.approx(truth, rel=0.03)


def test_study_without_dixon_is_skipped_with_a_reason(make_node, tmp_path):
    ph = small_phantom(seed=21)
    datasets = phantom_datasets(ph, patient_id="NODIXON", uid_seed="nodixon")
    t1 = [d for d in datasets if d.SeriesDescription.endswith("_in")]
    for d in t1:   # an ordinary T1 series: not Dixon
        d.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
        d.SeriesDescription = "t1_tse_tra"
    node = make_node(complete_after=0.5)
    assert set(push(t1, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    job = wait_until(lambda: [j for j in rows(node, db.jobs) if j.state not in ("pending", "running")],
                     timeout=60, what="job end")[0]
    assert job.state == "skipped"
    assert "no Dixon water and fat series" in job.message and "t1_tse_tra: unknown" in job.message
    study = rows(node, db.studies)[0]
    assert study.state == "done" and "no Dixon" in study.message
    # the node still works
    assert push(datasets[:1], "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0]


def test_late_instance_reopens_study_and_results_supersede(make_node, tmp_path):
    ph = small_phantom(seed=22)
    datasets = phantom_datasets(ph, patient_id="LATE", uid_seed="late")
    n_slices = ph.water.shape[0]
    late = [d for d in datasets if d.InstanceNumber > n_slices - 2]   # the last two slices of each series
    first = [d for d in datasets if d.InstanceNumber <= n_slices - 2]
    node = make_node(destinations=[], complete_after=0.5)
    push(first, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: [j for j in rows(node, db.jobs) if j.state == "done"], timeout=60, what="first job")
    sr1 = {r.sop_uid for r in rows(node, db.outputs) if r.kind == "sr"}
    push(late, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    jobs = wait_until(lambda: (lambda js: js if len(js) == 2 and js[1].state == "done" else None)(rows(node, db.jobs)),
                      timeout=60, what="second job")
    assert [j.revision for j in jobs] == [1, 2]
    study = rows(node, db.studies)[0]
    assert study.revision == 2 and study.n_instances == len(datasets) and study.state == "done"
    sr2 = {r.sop_uid for r in rows(node, db.outputs) if r.kind == "sr"} - sr1
    assert len(sr2) == 1                      # a new SR, not the old one again
    new_sr = pydicom.dcmread(next(r.path for r in rows(node, db.outputs) if r.sop_uid in sr2))
    replaced = [i.ReferencedSOPInstanceUID for s in new_sr.PredecessorDocumentsSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert replaced == list(sr1)              # and it says which SR it replaces
    # measurements are those of the last revision only, never a mix
    ms = [r for r in rows(node, db.measurements) if not r.roi]
    assert len(ms) == 8 and {r.job_id for r in ms} == {jobs[1].id}


def test_restart_resumes_a_study_still_receiving(make_node, tmp_path):
    ph = small_phantom(seed=23)
    datasets = phantom_datasets(ph, patient_id="RESTART", uid_seed="restart")
    config = node_config(tmp_path, complete_after=1.5)
    node = make_node(config)
    push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    node.stop()                               # before the study was complete
    assert rows(node, db.jobs) == []
    node2 = make_node(config)
    wait_until(lambda: [j for j in rows(node2, db.jobs) if j.state == "done"], timeout=60, what="job after restart")
    assert len([r for r in rows(node2, db.measurements) if not r.roi]) == 8


def test_restart_requeues_a_job_left_running(make_node, tmp_path):
    ph = small_phantom(seed=24)
    datasets = phantom_datasets(ph, patient_id="CRASH", uid_seed="crash")
    config = node_config(tmp_path, complete_after=3600)
    node = make_node(config)
    push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    node.stop()
    with node.engine.begin() as conn:   # as if the node died while a worker held the job
        conn.execute(db.jobs.insert().values(study_uid=str(datasets[0].StudyInstanceUID), revision=1,
                                             state="running", attempts=1, lease_until=9e18, created_at=0))
        conn.execute(db.studies.update().values(state="processing", revision=1))
    node2 = make_node(config)
    job = wait_until(lambda: [j for j in rows(node2, db.jobs) if j.state == "done"], timeout=60, what="job")[0]
    assert job.attempts == 2


@pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(), reason="Orthanc is not installed")
def test_orthanc_sends_a_study_to_the_node_and_gets_results(make_node, orthanc, tmp_path, thigh_visits):
    (phantom, datasets), _ = thigh_visits
    node = make_node(destinations=[Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
                     complete_after=1.0)
    for p in write_datasets(datasets, tmp_path / "upload"):
        orthanc.post("/instances", p.read_bytes())
    orthanc.stop()   # restart Orthanc with the node as a known modality
    orthanc.start(modalities={"musclenode": ["MUSCLENODE", "127.0.0.1", node.port]})
    study_uid = str(datasets[0].StudyInstanceUID)
    study_id = next(f["ID"] for f in orthanc.post("/tools/lookup", study_uid) if f["Type"] == "Study")
    job = orthanc.post("/modalities/musclenode/store", json.dumps({"Resources": [study_id], "Synchronous": True}))
    assert job.get("InstancesCount", len(datasets)) == len(datasets)
    def modalities():
        return {orthanc.get(f"/instances/{i['ID']}/simplified-tags").get("Modality")
                for i in orthanc.instances_of_study(study_uid)}
    # the SEG, the SR and the parametric maps (Modality OT) come back beside the images
    wait_until(lambda: len(orthanc.instances_of_study(study_uid)) > len(datasets) + 2
               and {"SEG", "SR", "OT"} <= modalities(), timeout=120, what="SEG, SR and maps back in Orthanc")
    # recorded with the maps and the summary page, after SEG and SR are on their way
    got = wait_until(lambda: measured(node, study_uid), timeout=60, what="measurements")
    for (side, metric), truth in phantom.truth.items():
        if metric == "ff_percent":
            assert abs(got[(side.value, metric)] - truth) < 1.0


def test_earlier_visit_arriving_late_updates_the_later_visits_comparison(make_node, thigh_visits):
    """Visit 2 arrives (and is reported) before visit 1: when visit 1 is processed, visit 2
    is re-compared, and its new SR carries the change since visit 1 and supersedes the SR
    without it. Visit 1 itself has no earlier visit, so nothing cascades."""
    from test_node_e2e import sr_numbers, value

    (_, d1), (_, d2) = thigh_visits
    # 2 s quiet: on a loaded machine a 0.5 s pause within a push completed visit 1 early (a 4th job)
    node = make_node(destinations=[], complete_after=2.0)
    uid1, uid2 = str(d1[0].StudyInstanceUID), str(d2[0].StudyInstanceUID)
    assert set(push(d2, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    wait_until(lambda: [j for j in rows(node, db.jobs) if j.state == "done"], timeout=120, what="visit 2 job")
    first_sr = {r.sop_uid for r in rows(node, db.outputs) if r.kind == "sr" and r.study_uid == uid2}
    nums = sr_numbers(pydicom.dcmread(next(r.path for r in rows(node, db.outputs) if r.sop_uid in first_sr)))
    assert not [n for n in nums if "since baseline" in n[1].lower()]

    assert set(push(d1, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    jobs = wait_until(lambda: (lambda js: js if len(js) == 3 and all(j.state == "done" for j in js) else None)(
        rows(node, db.jobs)), timeout=300, what="visit 1 and the re-compare of visit 2")
    assert [j.study_uid for j in jobs] == [uid2, uid1, uid2] and jobs[2].revision == 2
    study2 = next(s for s in rows(node, db.studies) if s.study_uid == uid2)
    assert study2.state == "done" and study2.revision == 2
    new_sr = {r.sop_uid for r in rows(node, db.outputs) if r.kind == "sr" and r.study_uid == uid2} - first_sr
    assert len(new_sr) == 1
    sr = pydicom.dcmread(next(r.path for r in rows(node, db.outputs) if r.sop_uid in new_sr))
    nums = sr_numbers(sr)
    assert value(nums, "right thigh muscle", "Interval since baseline") == 182
    v1 = measured(node, uid1)
    v2 = measured(node, uid2)
    assert value(nums, "right thigh muscle", "Change in area since baseline") == pytest.approx(
        v2[("right", "csa_mm2")] - v1[("right", "csa_mm2")], abs=0.5 + 1e-9)   # written to 1 mm2
    replaced = [i.ReferencedSOPInstanceUID for s in sr.PredecessorDocumentsSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert replaced == list(first_sr)
    audit = [r.event for r in rows(node, db.audit)]
    assert audit.count("study-recompare") == 1
    time.sleep(1.5)                                   # and nothing more is queued
    assert len(rows(node, db.jobs)) == 3
