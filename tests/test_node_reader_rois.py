"""A reader's ROIs sent to the node as DICOM SEG (DCMTK storescu plays the viewer): the visit
is measured again in those ROIs and a new SR supersedes the old one; a SEG the node cannot
use is quarantined with the reason and the study's results stay as they were."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import wait_until
from highdicom.sr import CodedConcept
from sqlalchemy import select

from node import db
from node.demo_peers import push
from quant.enums import COMPARTMENTS, Region, SeriesKind
from quant.pipeline import group_by_series
from quant.series import classify_series
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets
from quant.volume import assemble_volume

pytestmark = [pytest.mark.peers,
              pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK is not installed")]
GENERIC = CodedConcept("102292000", "SCT", "Skeletal muscle structure of lower limb")


def _rows(node, table):
    with node.engine.begin() as conn:
        return conn.execute(select(table).order_by(table.c.id)).all()


def _series(datasets, kind: SeriesKind):
    for dss in group_by_series(datasets).values():
        if classify_series(dss).kind is kind:
            vol = assemble_volume(dss)
            by_uid = {ds.SOPInstanceUID: ds for ds in dss}
            return [by_uid[u] for u in vol.sop_instance_uids]
    raise AssertionError(kind)


def _reader_seg(sources, masks: np.ndarray, labels: list[str]) -> pydicom.Dataset:
    descs = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=label,
        segmented_property_category=CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=GENERIC, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=hd.UID(), tracking_id=label) for i, label in enumerate(labels)]
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Reader viewer", manufacturer_model_name="viewer",
        software_versions="1", device_serial_number="1")


def _storescu(path: Path, port: int) -> None:
    r = subprocess.run(["/usr/bin/storescu", "-R", "-aec", "MUSCLENODE", "-aet", "READER", "127.0.0.1", str(port),
                        str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _groups(node, sop_uids: set[str]):
    path = next(r.path for r in _rows(node, db.outputs) if r.sop_uid in sop_uids)
    return hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()


def test_reader_seg_remeasures_the_visit_and_a_bad_one_is_quarantined(make_node, tmp_path):
    ph = make_leg_phantom(Region.THIGH, shape=(6, 96, 160), compartments=True, seed=31, supersample=3)
    datasets = phantom_datasets(ph, patient_id="READER", uid_seed="reader")
    node = make_node(destinations=[], complete_after=0.5)
    push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: [j for j in _rows(node, db.jobs) if j.state == "done"], timeout=90, what="first job")
    sr1 = {r.sop_uid for r in _rows(node, db.outputs) if r.kind == "sr"}
    first = {g.tracking_identifier for g in _groups(node, sr1)}   # each leg and its automatic compartments
    assert {"right thigh muscle", "left thigh muscle", "right thigh anterior compartment (automatic)"} <= first
    assert len(first) == 8

    # a SEG of the wrong grid (one frame shifted) is quarantined with the reason; results stay
    water = _series(datasets, SeriesKind.WATER)
    rois = COMPARTMENTS[Region.THIGH]
    masks = np.stack([ph.compartment == i + 1 for i in range(len(rois))], axis=-1).astype(np.uint8)
    labels = [r.value.replace("_", " ") for r in rois]
    bad = _reader_seg(water, masks, labels)
    bad.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[2] += 2.0
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    _storescu(tmp_path / "bad.dcm", node.port)
    wait_until(lambda: [r for r in _rows(node, db.quarantine) if r.sop_uid == str(bad.SOPInstanceUID)],
               timeout=90, what="quarantined SEG")
    wait_until(lambda: len(_rows(node, db.jobs)) == 2 and _rows(node, db.jobs)[1].state == "done", timeout=90,
               what="second job")
    reason = next(r.reason for r in _rows(node, db.quarantine) if r.sop_uid == str(bad.SOPInstanceUID))
    assert "reader SEG not used" in reason and "frame" in reason
    assert {r.sop_uid for r in _rows(node, db.outputs) if r.kind == "sr"} == sr1   # the same SR, nothing new

    # the reader's compartments: the visit is measured again in them, a new SR supersedes
    good = _reader_seg(water, masks, labels)
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    _storescu(tmp_path / "good.dcm", node.port)
    wait_until(lambda: len(_rows(node, db.jobs)) == 3 and _rows(node, db.jobs)[2].state == "done", timeout=90,
               what="third job")
    sr2 = {r.sop_uid for r in _rows(node, db.outputs) if r.kind == "sr"} - sr1
    assert len(sr2) == 1
    groups = {g.tracking_identifier: g for g in _groups(node, sr2)}
    assert "right thigh anterior compartment (reader)" in groups and len(groups) == 8
    area = {m.name.meaning: m.value for m in groups["left thigh posterior compartment (reader)"].get_measurements()}
    truth = ph.compartment_truth[("left", "posterior_compartment", "csa_mm2")]
    assert abs(area["Area"] / truth - 1) < 0.03
    new_sr = pydicom.dcmread(next(r.path for r in _rows(node, db.outputs) if r.sop_uid in sr2))
    replaced = [i.ReferencedSOPInstanceUID for s in new_sr.PredecessorDocumentsSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert replaced == list(sr1)
