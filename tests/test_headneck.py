"""Head and neck (issue 10): recognised from the headers, measured in a reader's ROIs only
(quant.roi_only), against the truth of the neck phantom (quant.synthetic.headneck_phantom);
the node's SEG and SR of a neck study; the reader's ROIs carried to a repositioned visit."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from validators import dciodvfy_errors

from node.processing import build_outputs
from quant.analysis import RoiSet
from quant.enums import Region, RoiSource, SeriesKind, Side, SideLabel
from quant.errors import NeedsRoisError
from quant.muscles import PROPERTY_TYPES
from quant.pipeline import analyse_study, group_by_series
from quant.registration import carry_rois
from quant.roi_only import _body
from quant.series import classify_series
from quant.synthetic.headneck_phantom import HEADNECK_ROIS, headneck_exam_datasets, make_headneck_phantom
from quant.volume import Volume, assemble_volume
from reports import codes

ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
SKELETAL_MUSCLE = CodedConcept("127954009", "SCT", "Skeletal muscle")
LATERALITY = {Side.RIGHT: CodedConcept("24028007", "SCT", "Right"), Side.LEFT: CodedConcept("7771000", "SCT", "Left")}
#: muscles of the phantom with a confirmed code (quant.muscles); the paraspinal muscles go generic, by label
CODED = {name: CodedConcept(PROPERTY_TYPES[name].value, "SCT", PROPERTY_TYPES[name].meaning)
         for name in ("sternocleidomastoid", "trapezius")}


def _water(dss) -> tuple[list[Dataset], Volume]:
    for d in group_by_series(dss).values():
        if classify_series(d).kind is SeriesKind.WATER:
            vol = assemble_volume(d)
            by_uid = {ds.SOPInstanceUID: ds for ds in d}
            return [by_uid[u] for u in vol.sop_instance_uids], vol
    raise AssertionError("no water series")


def _reader_seg(ph, sources) -> Dataset:
    """A reader's SEG: one segment per muscle and side (drawn on the phantom's majority-muscle
    voxels), the sternocleidomastoid and trapezius coded, the paraspinal muscles generic with a
    label; anatomic region Head and Neck with the side as its modifier."""
    masks, descs = [], []
    for name in HEADNECK_ROIS:
        for side in (Side.RIGHT, Side.LEFT):
            code = SideLabel.RIGHT if side is Side.RIGHT else SideLabel.LEFT
            masks.append((ph.compartment == HEADNECK_ROIS.index(name) + 1) & (ph.side == code))
            desc = hd.seg.SegmentDescription(
                segment_number=len(masks), segment_label=name,
                segmented_property_category=ANATOMICAL_STRUCTURE,
                segmented_property_type=CODED.get(name, SKELETAL_MUSCLE),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL, tracking_uid=hd.UID(),
                tracking_id=f"{side.value} {name}",
                anatomic_regions=[CodedConcept("774007", "SCT", "Head and Neck")])   # its own: gets a modifier
            desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [LATERALITY[side]]
            descs.append(desc)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(masks, axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
        series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Reader viewer", manufacturer_model_name="viewer", software_versions="1",
        device_serial_number="1")


def _check(a, ph, csa_rel: float, ff_pp: float) -> dict[tuple[str, str, str], float]:
    """Every ROI and side against the phantom's truth; returns the errors (relative for CSA, pp for FF)."""
    errors = {}
    rows = [m for m in a.measurements if m.roi and m.metric in ("csa_mm2", "ff_percent")]
    assert {(m.side, m.roi) for m in rows} == {(s, n) for s in (Side.RIGHT, Side.LEFT) for n in HEADNECK_ROIS}
    for m in rows:
        truth = ph.compartment_truth[(m.side.value, m.roi, m.metric)]
        err = m.value - truth if m.metric == "ff_percent" else m.value / truth - 1
        errors[(m.side.value, m.roi, m.metric)] = err
        assert abs(err) < (ff_pp if m.metric == "ff_percent" else csa_rel), (m.side, m.roi, m.metric, m.value, truth)
    return errors


@pytest.fixture(scope="module")
def neck():
    ph = make_headneck_phantom(seed=3, muscle_ff={"right:paraspinal": 0.2, "left:trapezius": 0.15})
    dss = headneck_exam_datasets(ph, uid_seed="neck")
    sources, _ = _water(dss)
    return ph, dss, sources, _reader_seg(ph, sources)


@pytest.mark.parametrize("body_part,description", [
    ("NECK", None), ("HEADNECK", None), ("", "MRT Hals nativ"), ("", "IRM cou"),
])
def test_neck_without_rois_waits_for_them(body_part, description):
    ph = make_headneck_phantom(seed=4, shape=(2, 136, 144), supersample=1)
    dss = headneck_exam_datasets(ph, body_part=body_part, description=description, uid_seed=body_part + "x")
    with pytest.raises(NeedsRoisError, match="head-neck exam: measured in a reader's ROIs only; waiting for ROIs"):
        analyse_study(dss)


def test_neck_rois_against_truth(neck):
    """Each muscle and side from the reader's SEG (one segment per side, merged by name, the
    side from the neck's midline): CSA within 5 %, FF within 1.5 pp of truth (measured: CSA
    −0.15 … −0.01 %, FF −0.06 … +0.05 pp; the right paraspinal muscles at 20 %, the left
    trapezius at 15 % FF; each side's muscle, all its ROIs: CSA −0.06 … −0.03 %, FF −0.07 … +0.32 pp)."""
    ph, dss, _, seg = neck
    a = analyse_study(dss, reader_segs=[seg])
    assert a.segmentation.region is Region.HEAD_NECK
    assert {m.source for m in a.measurements if m.roi} == {"reader"}
    _check(a, ph, 0.05, 1.5)
    ff = {(m.side, m.roi): m.value for m in a.measurements if m.metric == "ff_percent" and m.roi}
    assert ff[(Side.RIGHT, "paraspinal")] - ff[(Side.LEFT, "paraspinal")] > 8
    assert ff[(Side.LEFT, "trapezius")] - ff[(Side.RIGHT, "trapezius")] > 5
    whole = {(m.side, m.metric): m.value for m in a.measurements if not m.roi}
    for side in (Side.RIGHT, Side.LEFT):   # the neck's "muscle" is all its ROIs of a side together
        assert whole[(side, "csa_mm2")] == pytest.approx(ph.truth[(side, "csa_mm2")], rel=0.05)
        assert abs(whole[(side, "ff_percent")] - ph.truth[(side, "ff_percent")]) < 1.5


def test_neck_seg_and_sr_are_valid(neck, tmp_path):
    ph, dss, _, seg = neck
    out = build_outputs([*dss, seg])
    labels = [s.SegmentLabel for s in out.seg.SegmentSequence]
    assert "right head and neck sternocleidomastoid (reader)" in labels, labels
    assert "left head and neck paraspinal (reader)" in labels, labels
    for item in out.seg.SegmentSequence:
        assert item.AnatomicRegionSequence[0].CodeValue == codes.HEAD_AND_NECK.value == "774007"
    scm = out.seg.SegmentSequence[labels.index("left head and neck sternocleidomastoid (reader)")]
    assert scm.SegmentedPropertyTypeCodeSequence[0].CodeValue == "22823000"
    paths = tmp_path / "seg-neck.dcm", tmp_path / "sr-neck.dcm"
    out.seg.save_as(paths[0], enforce_file_format=True)
    out.sr.save_as(paths[1], enforce_file_format=True)
    assert dciodvfy_errors(paths[0]) == [] and dciodvfy_errors(paths[1]) == []


def test_neck_rois_carried_to_a_repositioned_visit():
    """A reader's neck ROIs carried to a visit shifted by 4 / -3 mm and turned by 5 degrees:
    CSA within 5 %, FF within 1.5 pp (measured: CSA −0.26 … −0.06 %, FF +0.04 … +0.22 pp;
    outline mismatch 0.04)."""
    p1 = make_headneck_phantom(seed=11)
    p2 = make_headneck_phantom(seed=12, shift_mm=(4.0, -3.0, 0.0), rotation_deg=5.0)
    d1 = headneck_exam_datasets(p1, uid_seed="v1", study_date="20260101")
    d2 = headneck_exam_datasets(p2, uid_seed="v2", study_date="20260701")
    (_, v1), (_, v2) = _water(d1), _water(d2)
    carried = carry_rois(v1, p1.compartment.astype(np.int32), v2, moving_body=_body(p1.in_phase),
                         fixed_body=_body(p2.in_phase))
    assert carried.mismatch < 0.1
    a = analyse_study(d2, rois=RoiSet(carried.labels, dict(enumerate(HEADNECK_ROIS, 1)), RoiSource.CARRIED))
    _check(a, p2, 0.05, 1.5)
