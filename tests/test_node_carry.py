"""Issue 10's acceptance through the node: a reader's compartments, built by highdicom and
sent by DCMTK storescu to the baseline visit, become the subject's ROI set; the node carries
them by registration to the follow-up (repositioned 8 mm / -5 mm / 5 degrees, muscle 7 %
thinner, anterior compartment fattier), measures them there within CSA 5 %, FF 1.5 pp and
fRMA 6 % of truth, with the change since baseline in the SR, sends a SEMIAUTOMATIC SEG that
names the reader's SEG, and a reader's correction of the carried ROIs replaces them."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import wait_until
from sqlalchemy import select
from test_node_reader_rois import _reader_seg, _rows, _series, _storescu

from node import db
from node.demo_peers import push
from quant.enums import COMPARTMENTS, Region, Roi, SeriesKind
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets

pytestmark = [pytest.mark.peers,
              pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK is not installed")]

CSA_TOL, FF_TOL_PP, FRMA_TOL = 0.05, 1.5, 0.06
KW = dict(shape=(8, 160, 256), snr=40, supersample=3, bias_field=0.3, fascia_mm=1.0, compartments=True)


def _sr_groups(path: str) -> dict:
    return {g.tracking_identifier: g for g in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()}


def _values(group) -> dict[str, float]:
    return {m.name.meaning: m.value for m in group.get_measurements()}


def _outputs(node, study_uid: str, kind: str):
    return [r for r in _rows(node, db.outputs) if r.study_uid == study_uid and r.kind == kind]


def _done(node, n_jobs: int) -> bool:
    jobs = _rows(node, db.jobs)
    return len(jobs) >= n_jobs and all(j.state in ("done", "skipped", "failed", "waiting_for_rois") for j in jobs)


def _check_truth(rows, truth: dict, metrics=("csa_mm2", "ff_percent", "frma_mm2")) -> None:
    """Each ROI row of ``metrics`` within the acceptance tolerance of its truth."""
    tolerance = {"csa_mm2": CSA_TOL, "ff_percent": FF_TOL_PP, "frma_mm2": FRMA_TOL}
    checked = 0
    for r in rows:
        value = truth.get((r.side, r.roi, r.metric))
        if value is None or r.metric not in metrics:
            continue
        err = r.value - value if r.metric == "ff_percent" else r.value / value - 1
        assert abs(err) <= tolerance[r.metric], f"{r.side} {r.roi} {r.metric}: {err:+.4f}"
        checked += 1
    assert checked >= len(metrics)


def _per_side_masks(labels: np.ndarray, side: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """One segment per ROI and side, labelled like the node's own SEG ("right thigh ... (carried)")."""
    masks, words = [], []
    for i, name in enumerate(names, start=1):
        for code, side_word in ((1, "right"), (2, "left")):
            masks.append((labels == i) & (side == code))
            words.append(f"{side_word} thigh {name.replace('_', ' ')} (carried)")
    return np.stack(masks, axis=-1).astype(np.uint8), words


def test_reader_rois_are_carried_to_the_follow_up_and_a_correction_replaces_them(make_node, tmp_path):
    v1 = make_leg_phantom(Region.THIGH, seed=11, **KW)
    v2 = make_leg_phantom(Region.THIGH, seed=12, shift_mm=(8.0, -5.0, 0.0), rotation_deg=5.0, muscle_scale=0.93,
                          compartment_ff={Roi.ANTERIOR_COMPARTMENT.value: 0.10}, **KW)
    d1 = phantom_datasets(v1, patient_id="CARRY", study_date="20260101", uid_seed="carry-baseline")
    d2 = phantom_datasets(v2, patient_id="CARRY", study_date="20260701", uid_seed="carry-follow-up")
    s1, s2 = str(d1[0].StudyInstanceUID), str(d2[0].StudyInstanceUID)
    node = make_node(destinations=[], complete_after=0.5)
    push(d1, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: _done(node, 1), timeout=120, what="baseline job")
    push(d2, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: _done(node, 2), timeout=120, what="follow-up job")

    # the reader outlines the compartments on the baseline visit and sends the SEG
    names = [r.value for r in COMPARTMENTS[Region.THIGH]]
    masks = np.stack([v1.compartment == i + 1 for i in range(len(names))], axis=-1).astype(np.uint8)
    labels = [n.replace("_", " ").capitalize() for n in names]   # generic property type: labels name the ROIs
    reader = _reader_seg(_series(d1, SeriesKind.WATER), masks, labels)
    reader.save_as(tmp_path / "reader.dcm", enforce_file_format=True)
    _storescu(tmp_path / "reader.dcm", node.port)
    # baseline re-measured in the reader's ROIs, then the follow-up in the carried ones
    wait_until(lambda: _done(node, 4) and len(_outputs(node, s2, "sr")) == 2, timeout=240, what="carried follow-up")
    sets = _rows(node, db.roi_sets)
    assert [(r.study_uid, r.seg_sop_uid, r.region, r.n_rois) for r in sets] == \
        [(s1, str(reader.SOPInstanceUID), "thigh", 3)]
    kinds = {r.study_uid: r for r in _rows(node, db.study_rois)}
    assert kinds[s1].source == "reader" and kinds[s2].source == "carried" and not kinds[s2].needs_review
    assert kinds[s2].dice > 0.93 and kinds[s2].mismatch < 0.25

    # the follow-up's values from the carried ROIs against truth
    rows = [r for r in _rows(node, db.measurements) if r.study_uid == s2 and r.roi]
    assert {r.source for r in rows} == {"carried"} and {r.roi for r in rows} == set(names)
    _check_truth(rows, v2.compartment_truth)

    # its SR: carried groups with the change since baseline and the registration quality
    sr2 = max(_outputs(node, s2, "sr"), key=lambda r: r.id)
    groups = _sr_groups(sr2.path)
    g = groups["right thigh anterior compartment (carried)"]
    vals = _values(g)
    assert float(vals["Dice of carried regions with the visit's muscle"]) > 0.9
    assert float(vals["Residual image mismatch after registration"]) < 0.25
    baseline = [r.value for r in _rows(node, db.measurements) if r.study_uid == s1 and r.roi == "anterior_compartment"
                and r.side == "right" and r.metric == "ff_percent"]
    change = vals.get("Change in fat fraction since baseline")
    ff_now = next(r.value for r in rows if r.side == "right" and r.roi == "anterior_compartment"
                  and r.metric == "ff_percent")
    assert change is not None, sorted(vals)
    assert abs(float(change) - (ff_now - baseline[0])) <= 0.05 + 1e-9   # the SR writes FF to 0.1 pp
    assert float(change) > 5.0   # the anterior compartment got fattier (3 % -> 10 %)
    assert float(vals["Fat fraction at baseline"]) == pytest.approx(baseline[0], abs=0.05 + 1e-9)
    # the tracking UID is the same for the reader's ROI at baseline and the carried one
    sr1 = max(_outputs(node, s1, "sr"), key=lambda r: r.id)
    g1 = _sr_groups(sr1.path)["right thigh anterior compartment (reader)"]
    assert g1.tracking_uid == g.tracking_uid

    # the SEG: SEMIAUTOMATIC carried segments naming the reader's SEG; both validate and read back
    from validators import dciodvfy_errors, dcmqi_seg_readback, tid1500_readback
    seg2 = max(_outputs(node, s2, "seg"), key=lambda r: r.id)
    ds = pydicom.dcmread(seg2.path)
    carried = [s for s in ds.SegmentSequence if "(carried)" in s.SegmentLabel]
    assert len(carried) == 6 and {s.SegmentAlgorithmType for s in carried} == {"SEMIAUTOMATIC"}
    other = ds.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == s1
    assert other.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        reader.SOPInstanceUID
    for path in (seg2.path, sr2.path):
        assert dciodvfy_errors(Path(path)) == [], path
    dcmqi_seg_readback(Path(seg2.path), tmp_path / "dcmqi")
    tid1500_readback(Path(sr2.path), tmp_path / "tid1500.json")
    hd.seg.segread(seg2.path)

    # status shows the carried set's quality
    from node.service import status_report
    report = status_report(node.engine)
    st = {s["study_uid"]: s for s in report["studies"]}
    assert st[s2]["rois"]["source"] == "carried" and st[s2]["rois"]["needs_review"] is False
    json.dumps(report, default=str)

    # the reader corrects the carried ROIs on the follow-up: the right anterior compartment
    # loses its two last slices; the correction becomes that visit's ROI set
    corrected = v2.compartment.copy()
    cut = (corrected == 1) & (v2.side == 1)
    cut[:-2] = False
    corrected[cut] = 0
    cmasks, cwords = _per_side_masks(corrected, v2.side, names)
    fix = _reader_seg(_series(d2, SeriesKind.WATER), cmasks, cwords)
    fix.save_as(tmp_path / "fix.dcm", enforce_file_format=True)
    n_jobs = len(_rows(node, db.jobs))
    _storescu(tmp_path / "fix.dcm", node.port)
    wait_until(lambda: _done(node, n_jobs + 1) and len(_outputs(node, s2, "sr")) == 3, timeout=180,
               what="corrected follow-up")
    assert {r.study_uid: r.source for r in _rows(node, db.study_rois)}[s2] == "reader"
    rows = {(r.side, r.roi, r.metric): (r.value, r.source) for r in _rows(node, db.measurements)
            if r.study_uid == s2 and r.roi}
    assert {src for _, src in rows.values()} == {"reader"}
    assert set(r for _, r, _ in rows) == set(names)   # the correction's per-side labels name the same ROIs
    vol = rows[("right", "anterior_compartment", "vol_ml")][0]
    truth = v2.compartment_truth[("right", "anterior_compartment", "vol_ml")]
    assert abs(vol / (truth * 6 / 8) - 1) < 0.05, (vol, truth)
    left = rows[("left", "anterior_compartment", "vol_ml")][0]
    assert abs(left / v2.compartment_truth[("left", "anterior_compartment", "vol_ml")] - 1) < 0.05
    # the baseline keeps its own reader set: not measured again
    assert len(_outputs(node, s1, "sr")) == 2
    jobs = _rows(node, db.jobs)
    assert all(j.state == "done" for j in jobs), [(j.study_uid, j.state, j.message) for j in jobs]


def test_a_database_of_the_previous_schema_gains_the_roi_columns(tmp_path):
    """A node database made before ROI support (measurements without roi/source) is upgraded
    in place when the node opens it; its rows stay and read as whole-region values."""
    import sqlite3
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE measurements (id INTEGER PRIMARY KEY, subject_key VARCHAR(200) NOT NULL, "
                "study_uid VARCHAR(64) NOT NULL, study_date VARCHAR(8) NOT NULL, region VARCHAR(64) NOT NULL, "
                "side VARCHAR(8) NOT NULL, metric VARCHAR(32) NOT NULL, value FLOAT NOT NULL, unit VARCHAR(16) "
                "NOT NULL, algorithm_version VARCHAR(64) NOT NULL, model VARCHAR(64) NOT NULL, job_id INTEGER "
                "NOT NULL)")
    con.execute("INSERT INTO measurements VALUES (1, 's', '1.2', '20260101', 'thigh', 'right', 'csa_mm2', 1.5, "
                "'mm2', 'v', 'm', 1)")
    con.commit()
    con.close()
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        row = conn.execute(select(db.measurements)).one()
    assert (row.roi, row.source, row.value) == ("", "", 1.5)


def test_label_of_the_nodes_own_seg_names_the_roi():
    from quant.reader_rois import _canonical, _own_label
    assert _own_label("right thigh anterior compartment (carried)") == "anterior_compartment"
    assert _own_label("left calf triceps surae (reader)") == "triceps_surae"
    assert _own_label("left lower leg anterior compartment (carried)") == "anterior_compartment"
    assert _own_label("right head and neck paraspinal (carried)") == "paraspinal"
    assert _own_label("right thigh vastus lateralis (carried)") == "vastus_lateralis"
    assert _own_label("right thigh Anterior compartment (reader)") == "anterior_compartment"
    assert _canonical("Vastus medialis") == "vastus_medialis"
    assert _own_label("vastus lateralis") == "" and _own_label("right thigh Gluteus X (reader)") == "Gluteus X"


def test_a_hand_waits_for_rois_then_is_measured_in_them_at_every_visit(make_node, tmp_path):
    """A hand exam is measured in a reader's ROIs only: without them the study waits
    (state and job ``waiting_for_rois``, audit log, status), not skipped nor failed; the
    reader's SEG (storescu) gets it measured, and the next visit is measured in the same
    ROIs carried by registration: CSA within 5 %, FF within 1.5 pp of truth."""
    from test_hand import _reader_seg as hand_seg
    from test_hand import _water

    from node.service import status_report
    from quant.synthetic.hand_phantom import hand_exam_datasets, make_hand_phantom

    p1 = make_hand_phantom(seed=11)
    p2 = make_hand_phantom(seed=12, shift_mm=(4.0, -3.0, 0.0), rotation_deg=5.0)
    d1 = hand_exam_datasets(p1, uid_seed="node-hand-1", study_date="20260101", patient_id="HAND")
    d2 = hand_exam_datasets(p2, uid_seed="node-hand-2", study_date="20260701", patient_id="HAND")
    s1, s2 = str(d1[0].StudyInstanceUID), str(d2[0].StudyInstanceUID)
    node = make_node(destinations=[], complete_after=0.5)
    push(d1, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: _done(node, 1), timeout=120, what="hand job")
    job = _rows(node, db.jobs)[0]
    assert job.state == "waiting_for_rois" and "waiting for ROIs" in job.message
    study = {s["study_uid"]: s for s in status_report(node.engine)["studies"]}[s1]
    assert study["state"] == "waiting_for_rois"
    assert any(a.event == "job-waiting_for_rois" for a in _rows(node, db.audit))
    assert not _outputs(node, s1, "sr")

    reader = hand_seg(p1, _water(d1)[0])
    reader.save_as(tmp_path / "hand.dcm", enforce_file_format=True)
    _storescu(tmp_path / "hand.dcm", node.port)
    wait_until(lambda: _done(node, 2) and _outputs(node, s1, "sr"), timeout=120, what="hand measured")
    push(d2, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: _done(node, 3) and _outputs(node, s2, "sr"), timeout=180, what="hand follow-up")
    assert {r.study_uid: r.source for r in _rows(node, db.study_rois)} == {s1: "reader", s2: "carried"}
    rows = [r for r in _rows(node, db.measurements) if r.study_uid == s2 and r.roi]
    assert {r.source for r in rows} == {"carried"} and len({r.roi for r in rows}) == 3
    _check_truth(rows, p2.compartment_truth, ("csa_mm2", "ff_percent"))
    # the SR of the follow-up compares with the baseline's ROI values
    groups = _sr_groups(max(_outputs(node, s2, "sr"), key=lambda r: r.id).path)
    carried = [g for k, g in groups.items() if "(carried)" in k]
    assert carried and all("Area at baseline" in _values(g) for g in carried)


def test_other_subjects_reader_sets_become_atlases(make_node):
    """Once the node holds reader ROI sets of two other subjects, a new subject's thigh is
    measured in those sets registered to it and fused (source ``atlas``, the agreement in
    the SR and status), not in the automatic compartments: CSA within 5 % and FF within
    1.5 pp of truth."""
    from node.demo import _water_series
    from node.demo_peers import reader_seg

    kw = dict(KW, shape=(6, 160, 256))
    names = {i + 1: r.value for i, r in enumerate(COMPARTMENTS[Region.THIGH])}
    node = make_node(destinations=[], complete_after=0.5)
    n_jobs = 0
    for k, (seed, gap) in enumerate(((21, 30.0), (22, 50.0)), start=1):   # two readers' subjects
        ph = make_leg_phantom(Region.THIGH, seed=seed, leg_gap_mm=gap, **kw)
        dss = phantom_datasets(ph, patient_id=f"ATLAS-{k}", uid_seed=f"atlas-{k}")
        push(dss, "127.0.0.1", node.port, called_ae="MUSCLENODE")
        wait_until(lambda n=n_jobs + 1: _done(node, n), timeout=180, what=f"atlas subject {k}")
        push([reader_seg(_water_series(dss), ph.compartment, names)], "127.0.0.1", node.port,
             called_ae="MUSCLENODE", calling_ae="READER")
        n_jobs += 2
        wait_until(lambda n=n_jobs: _done(node, n), timeout=180, what=f"atlas subject {k}'s ROIs")
    assert len(_rows(node, db.roi_sets)) == 2
    target = make_leg_phantom(Region.THIGH, seed=23, shift_mm=(6.0, 4.0, 0.0), rotation_deg=-4.0,
                              compartment_ff={Roi.ANTERIOR_COMPARTMENT.value: 0.08}, **kw)
    dss = phantom_datasets(target, patient_id="NEW", uid_seed="atlas-target")
    study = str(dss[0].StudyInstanceUID)
    push(dss, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: _done(node, n_jobs + 1) and _outputs(node, study, "sr"), timeout=180, what="target")
    rois = {r.study_uid: r for r in _rows(node, db.study_rois)}[study]
    assert rois.source == "atlas" and rois.dice > 0.8   # the lowest voter agreement
    rows = [r for r in _rows(node, db.measurements) if r.study_uid == study and r.roi]
    assert {r.source for r in rows} == {"atlas"} and {r.roi for r in rows} == set(names.values())
    _check_truth(rows, target.compartment_truth, ("csa_mm2", "ff_percent"))
    groups = _sr_groups(_outputs(node, study, "sr")[0].path)
    atlas = [g for k, g in groups.items() if "(atlas)" in k]
    assert len(atlas) == 6 and all(_values(g)["Mean agreement of fused atlases"] > 0.8 for g in atlas)
    from validators import dciodvfy_errors
    for kind in ("seg", "sr"):
        assert dciodvfy_errors(Path(_outputs(node, study, kind)[0].path)) == [], kind
    ds = pydicom.dcmread(_outputs(node, study, "seg")[0].path)
    assert {s.SegmentAlgorithmType for s in ds.SegmentSequence if "(atlas)" in s.SegmentLabel} == {"AUTOMATIC"}


def test_a_calf_readers_triceps_surae_is_carried_to_the_follow_up(make_node, tmp_path):
    """The calf: a reader outlines the triceps surae only, coded SCT 53451005 "Triceps surae
    muscle structure" (storescu); the node carries it to the repositioned follow-up (muscle 7 %
    thinner, triceps surae +10 pp FF): CSA within 5 %, FF within 1.5 pp, fRMA within 6 % of
    truth, the change since baseline in the SR; SEG and SR validate and read back."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from validators import dciodvfy_errors, dcmqi_seg_readback

    kw = dict(KW, shape=(8, 160, 256))
    v1 = make_leg_phantom(Region.CALF, seed=41, **kw)
    v2 = make_leg_phantom(Region.CALF, seed=42, shift_mm=(8.0, -5.0, 0.0), rotation_deg=5.0, muscle_scale=0.93,
                          compartment_ff={Roi.TRICEPS_SURAE.value: 0.10}, **kw)
    d1 = phantom_datasets(v1, patient_id="CALF", study_date="20260101", uid_seed="calf-1")
    d2 = phantom_datasets(v2, patient_id="CALF", study_date="20260701", uid_seed="calf-2")
    s2 = str(d2[0].StudyInstanceUID)
    node = make_node(destinations=[], complete_after=0.5)
    push(d1, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    push(d2, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: _done(node, 2), timeout=180, what="both calf visits")
    label = COMPARTMENTS[Region.CALF].index(Roi.TRICEPS_SURAE) + 1
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="TS",
        segmented_property_category=CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=CodedConcept("53451005", "SCT", "Triceps surae muscle structure"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL, tracking_uid=hd.UID(), tracking_id="TS")
    seg = hd.seg.Segmentation(
        source_images=_series(d1, SeriesKind.WATER), pixel_array=(v1.compartment == label).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[desc],
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Reader viewer", manufacturer_model_name="viewer", software_versions="1",
        device_serial_number="1")
    seg.save_as(tmp_path / "ts.dcm", enforce_file_format=True)
    _storescu(tmp_path / "ts.dcm", node.port)
    wait_until(lambda: _done(node, 4) and len(_outputs(node, s2, "sr")) == 2, timeout=240, what="carried calf")
    rows = [r for r in _rows(node, db.measurements) if r.study_uid == s2 and r.roi]
    assert {(r.roi, r.source) for r in rows} == {("triceps_surae", "carried")}
    _check_truth(rows, v2.compartment_truth)
    sr2 = max(_outputs(node, s2, "sr"), key=lambda r: r.id)
    g = _sr_groups(sr2.path)["left lower leg triceps surae (carried)"]
    assert float(_values(g)["Change in fat fraction since baseline"]) > 5.0
    seg2 = max(_outputs(node, s2, "seg"), key=lambda r: r.id)
    ds = pydicom.dcmread(seg2.path)
    ts = [s for s in ds.SegmentSequence if "triceps surae" in s.SegmentLabel]
    assert len(ts) == 2 and ts[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "53451005"
    for path in (seg2.path, sr2.path):
        assert dciodvfy_errors(Path(path)) == [], path
    dcmqi_seg_readback(Path(seg2.path), tmp_path / "dcmqi")
