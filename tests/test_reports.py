"""DICOM SEG and TID 1500 SR output (reports package), checked with dciodvfy, dcmqi and
highdicom read-back on a small synthetic two-leg Dixon study."""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from validators import at_precision, dciodvfy_errors, dcmqi_seg_readback, tid1500_readback

from quant.enums import Region, Side, Tissue
from quant.pipeline import analyse_study, group_by_series
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets
from reports import codes
from reports.longitudinal import Comparison, PriorValue, compare
from reports.seg import build_seg, segment_label, segment_numbers
from reports.sr import build_sr, tracking_uid
from reports.uids import derive_uid

SHAPE = (8, 96, 160)
SUBJECT = "patient:MUSCLENODE-DEMO:MN-0001"  # reports.uids.subject_key of the phantom
TODAY = datetime.date(2026, 1, 1)


class Study:
    """One analysed visit: datasets, analysis, water series (shuffled), SEG."""

    def __init__(self, study_date: str, seed: int, muscle_scale: float = 1.0):
        self.datasets = phantom_datasets(make_leg_phantom(shape=SHAPE, seed=seed, muscle_scale=muscle_scale),
                                         study_date=study_date)
        self.analysis = analyse_study(self.datasets)
        water = [d for d in self.datasets if d.SeriesInstanceUID == self.analysis.anatomy.series_instance_uid]
        random.Random(seed).shuffle(water)  # build_seg must sort them itself
        self.water = water
        self.seg = build_seg(self.analysis, self.water)

    def value(self, side: Side, metric: str) -> float:
        (m,) = [m for m in self.analysis.measurements if m.side is side and m.metric == metric]
        return m.value


@pytest.fixture(scope="module")
def visit() -> Study:
    return Study("20260101", seed=0)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reports")


@pytest.fixture(scope="module")
def seg_path(visit, out) -> Path:
    path = out / "seg.dcm"
    visit.seg.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def comparisons(visit) -> dict:
    """Hand-made priors: right CSA 100 -> 95 since baseline (-5 %), 98 -> 95 since the
    previous visit; left volume with a baseline only (one prior)."""
    cur = visit.value(Side.RIGHT, "csa_mm2")
    right = compare(cur, TODAY, [
        PriorValue("1.2.3.2", datetime.date(2025, 7, 1), cur * 100 / 98),
        PriorValue("1.2.3.1", datetime.date(2025, 1, 1), cur * 100 / 95),
        PriorValue("1.2.3.9", datetime.date(2026, 6, 1), 1.0),  # future: ignored
    ])
    left = Comparison(baseline=PriorValue("1.2.3.1", datetime.date(2025, 1, 1), 300.0),
                      previous=PriorValue("1.2.3.1", datetime.date(2025, 1, 1), 300.0),
                      current_date=TODAY)  # current value taken from the analysis
    return {("thigh", Side.RIGHT, "csa_mm2"): right, ("thigh", Side.LEFT, "vol_ml"): left}


@pytest.fixture(scope="module")
def sr(visit, comparisons):
    return build_sr(visit.analysis, visit.seg, visit.water, comparisons, subject_key=SUBJECT)


@pytest.fixture(scope="module")
def sr_path(sr, out) -> Path:
    path = out / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


# --- SEG -----------------------------------------------------------------------------------

def test_segment_numbers_muscle_first(visit):
    numbers = segment_numbers(visit.analysis)
    assert numbers == {
        (Tissue.MUSCLE, Side.RIGHT): 1, (Tissue.MUSCLE, Side.LEFT): 2,
        (Tissue.SUBCUTANEOUS_FAT, Side.RIGHT): 3, (Tissue.SUBCUTANEOUS_FAT, Side.LEFT): 4,
        (Tissue.BONE, Side.RIGHT): 5, (Tissue.BONE, Side.LEFT): 6,
    }


def test_seg_dciodvfy_has_no_errors(seg_path):
    assert dciodvfy_errors(seg_path) == []


def test_seg_dcmqi_readback_voxel_counts(visit, seg_path, out):
    files = dcmqi_seg_readback(seg_path, out / "dcmqi-seg")
    images = [f for f in files if f.suffix == ".nrrd"]
    meta = json.loads((out / "dcmqi-seg" / "meta.json").read_text())
    attrs = [a for group in meta["segmentAttributes"] for a in group]
    assert len(images) == len(attrs) == 6
    sitk = pytest.importorskip("SimpleITK")
    seg = visit.analysis.segmentation
    numbers = segment_numbers(visit.analysis)
    label_of = {n: segment_label(visit.analysis, t, s) for (t, s), n in numbers.items()}
    mask_of = {n: seg.mask(t, s) for (t, s), n in numbers.items()}
    for path, (group_index, attr) in zip(sorted(images, key=lambda p: int(p.stem)), enumerate(attrs, 1), strict=True):
        assert int(path.stem) == group_index
        number = attr["labelID"]
        assert attr["SegmentLabel"] == label_of[number]
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
        assert int((arr == number).sum()) == int(mask_of[number].sum()) > 0
        dz, dy, dx = visit.analysis.anatomy.spacing_mm
        assert np.allclose(img.GetSpacing(), (dx, dy, dz), atol=1e-3)
    muscle = attrs[0]
    assert muscle["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "127954009"
    assert muscle["AnatomicRegionSequence"]["CodeValue"] == "68367000"          # Thigh
    assert muscle["AnatomicRegionModifierSequence"]["CodeValue"] == "24028007"  # Right
    assert muscle["SegmentAlgorithmType"] == "AUTOMATIC" and muscle["SegmentAlgorithmName"] == "musclenode"


def test_seg_highdicom_roundtrip(visit, seg_path):
    seg = hd.seg.segread(seg_path)
    a = visit.analysis
    assert seg.StudyInstanceUID == visit.water[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == a.anatomy.frame_of_reference_uid
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert labels == {1: "right thigh muscle", 2: "left thigh muscle", 3: "right thigh subcutaneous fat",
                      4: "left thigh subcutaneous fat", 5: "right thigh bone", 6: "left thigh bone"}
    desc = seg.get_segment_description(1)
    assert desc.algorithm_identification[0].AlgorithmVersion == a.algorithm_version
    assert desc.algorithm_identification[0].AlgorithmName == "musclenode"
    pixels = seg.get_pixels_by_source_instance(list(a.anatomy.sop_instance_uids), segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape == a.segmentation.tissue.shape + (2,)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), a.segmentation.mask(Tissue.MUSCLE, Side.RIGHT))
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), a.segmentation.mask(Tissue.MUSCLE, Side.LEFT))


def test_seg_uids_are_deterministic(visit):
    again = build_seg(visit.analysis, list(reversed(visit.water)))
    assert again.SOPInstanceUID == visit.seg.SOPInstanceUID
    assert again.SeriesInstanceUID == visit.seg.SeriesInstanceUID
    assert visit.seg.SOPInstanceUID != visit.seg.SeriesInstanceUID
    assert visit.seg.SOPInstanceUID.startswith("2.25.")
    given = build_seg(visit.analysis, visit.water, sop_instance_uid="1.2.3.4", series_instance_uid="1.2.3.5",
                      series_number=7)
    assert (given.SOPInstanceUID, given.SeriesInstanceUID, given.SeriesNumber) == ("1.2.3.4", "1.2.3.5", 7)


def test_seg_rejects_wrong_sources(visit):
    with pytest.raises(ValueError, match="missing"):
        build_seg(visit.analysis, visit.water[1:])
    fat = [d for d in visit.datasets if d.SeriesDescription.endswith("_F")]
    with pytest.raises(ValueError, match="anatomy series"):
        build_seg(visit.analysis, fat)
    with pytest.raises(ValueError, match="twice"):
        build_seg(visit.analysis, visit.water + visit.water[:1])
    with pytest.raises(ValueError, match="series_number"):
        build_seg(visit.analysis, visit.water, series_number=0)


def test_seg_of_enhanced_multiframe_source(out):
    """A study whose series are single multi-frame instances (frames in reverse slice
    order): the masks must land on the right source frames."""
    dss = phantom_datasets(make_leg_phantom(shape=(6, 96, 160), seed=3), study_date="20260101")
    multi = []
    for suid, group in group_by_series(dss).items():
        group = group[::-1]
        m = hd.legacy.LegacyConvertedEnhancedMRImage(
            group, series_instance_uid=suid, series_number=int(group[0].SeriesNumber),
            sop_instance_uid=derive_uid(suid, "multi-frame"), instance_number=1)
        m.SOPClassUID = m.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # as Enhanced MR
        m.SeriesDescription, m.ImageType = group[0].SeriesDescription, list(group[0].ImageType)
        multi.append(m)
    a = analyse_study(multi)
    assert a.anatomy.frame_numbers == (6, 5, 4, 3, 2, 1)
    water = [d for d in multi if d.SeriesInstanceUID == a.anatomy.series_instance_uid]
    seg = build_seg(a, water)
    path = out / "seg-multiframe.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    back = hd.seg.segread(path)
    pixels = back.get_pixels_by_source_frame(water[0].SOPInstanceUID, list(range(1, 7)), segment_numbers=[1],
                                             assert_missing_frames_are_empty=True)
    right = a.segmentation.mask(Tissue.MUSCLE, Side.RIGHT)
    for k, frame in enumerate(a.anatomy.frame_numbers):
        np.testing.assert_array_equal(pixels[frame - 1, ..., 0].astype(bool), right[k])


# --- SR ------------------------------------------------------------------------------------

def _groups(path):
    report = hd.sr.srread(path).content
    groups = report.get_volumetric_roi_measurement_groups()
    return {g.tracking_identifier: g for g in groups}


def _values(group) -> dict[tuple[str, str], tuple[float, str]]:
    return {(m.name.value, m.name.scheme_designator): (m.value, m.unit.value) for m in group.get_measurements()}


def test_sr_dciodvfy_has_no_errors(sr_path):
    assert dciodvfy_errors(sr_path) == []


def test_sr_without_comparisons_has_no_errors(visit, out):
    sr = build_sr(visit.analysis, visit.seg, visit.water, subject_key=SUBJECT)
    path = out / "sr-plain.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    for group in _groups(path).values():
        assert len(group.get_measurements()) == 4


def test_sr_root_and_header(visit, sr_path):
    ds = pydicom.dcmread(sr_path)
    assert ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    root = ds.ConceptNameCodeSequence[0]
    assert (root.CodeValue, root.CodingSchemeDesignator) == ("126000", "DCM")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.StudyInstanceUID == visit.water[0].StudyInstanceUID
    assert ds.PatientID == visit.water[0].PatientID
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == ["99MUSCLENODE"]
    procedure = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert (procedure[0].ConceptCodeSequence[0].CodeValue,   # MRI of thigh (SCT), not "unspecified body region"
            procedure[0].ConceptCodeSequence[0].CodingSchemeDesignator) == ("241640003", "SCT")
    evidence = {r.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert evidence == {visit.seg.SOPInstanceUID, *visit.analysis.anatomy.sop_instance_uids}


def test_sr_tid1500reader(visit, sr_path, out):
    doc = tid1500_readback(sr_path, out / "sr.json")
    groups = {g["TrackingIdentifier"]: g for g in doc["Measurements"]}
    assert set(groups) == {"right thigh muscle", "left thigh muscle",   # volumetric (TID 1411), planar (TID 1410)
                           "right thigh muscle, key slice", "left thigh muscle, key slice"}
    for side, number in ((Side.RIGHT, 1), (Side.LEFT, 2)):
        g = groups[f"{side.value} thigh muscle"]
        assert g["ReferencedSegment"] == number
        assert g["segmentationSOPInstanceUID"] == visit.seg.SOPInstanceUID
        assert g["Finding"]["CodeValue"] == "127954009"
        assert g["FindingSite"]["CodeValue"] == "68367000"
        assert g["Laterality"]["CodeValue"] == {Side.RIGHT: "24028007", Side.LEFT: "7771000"}[side]
        assert g["TrackingUniqueIdentifier"] == tracking_uid(SUBJECT, "thigh", side)
        items = {(i["quantity"]["CodingSchemeDesignator"], i["quantity"]["CodeValue"]): i
                 for i in g["measurementItems"]}
        expected = {("SCT", "42798000"): ("csa_mm2", "mm2"), ("SCT", "118565006"): ("vol_ml", "mL"),
                    ("DCM", "129100"): ("ff_percent", "%"), ("99MUSCLENODE", "FRMA"): ("frma_mm2", "mm2")}
        for key, (metric, unit) in expected.items():
            item = items[key]
            assert item["units"]["CodeValue"] == unit and item["units"]["CodingSchemeDesignator"] == "UCUM"
            assert float(item["value"]) == at_precision(visit.value(side, metric), metric)
        assert items[("SCT", "42798000")]["derivationModifier"]["CodeValue"] == "373098007"  # Mean
        # the algorithm is named once, by the group (a value names its own only where it differs)
        assert g["measurementAlgorithmIdentification"]["AlgorithmVersion"] == visit.analysis.algorithm_version
        assert "measurementAlgorithmIdentification" not in items[("SCT", "42798000")]


def test_sr_references_seg_segments(visit, sr_path):
    groups = _groups(sr_path)
    assert set(groups) == {"right thigh muscle", "left thigh muscle"}
    for side, number in ((Side.RIGHT, 1), (Side.LEFT, 2)):
        g = groups[f"{side.value} thigh muscle"]
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == visit.seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == visit.seg.SOPClassUID
        assert ref.referenced_segment_numbers == [number]
        assert ref.referenced_frame_numbers is None  # the whole segment, not frames
        assert ref.source_series_for_segmentation.value == visit.analysis.anatomy.series_instance_uid
        assert g.finding_type.value == "127954009"
        (site,) = g.finding_sites
        assert site.value.value == "68367000" and site.laterality.meaning == side.value.capitalize()


def test_sr_comparison_values(visit, sr_path):
    groups = _groups(sr_path)
    right = _values(groups["right thigh muscle"])
    cur = visit.value(Side.RIGHT, "csa_mm2")
    P = codes.PRIVATE_SCHEME
    assert right[("42798000", "SCT")] == (at_precision(cur, "csa_mm2"), "mm2")
    assert right[("CSA-BL", P)] == (at_precision(cur * 100 / 95, "csa_mm2"), "mm2")
    assert right[("CSA-BL-CHG", P)] == (at_precision(cur - cur * 100 / 95, "csa_mm2"), "mm2")
    assert right[("CSA-BL-REL", P)] == (pytest.approx(-5.0, abs=1e-9), "%")
    assert right[("BL-INTERVAL", P)] == (365, "d")      # once per group, not under each metric
    assert right[("CSA-PV", P)] == (at_precision(cur * 100 / 98, "csa_mm2"), "mm2")
    assert right[("CSA-PV-REL", P)] == (pytest.approx(-2.0, abs=1e-9), "%")
    assert right[("PV-INTERVAL", P)] == (184, "d")
    assert not any(k[0].endswith("-DAYS") for k in right)
    assert not any(k[0].startswith(("VOL-", "FF-", "FRMA-")) for k in right)
    left = _values(groups["left thigh muscle"])
    vol = visit.value(Side.LEFT, "vol_ml")
    assert left[("VOL-BL", P)] == (300.0, "mL")
    assert left[("VOL-BL-CHG", P)] == (at_precision(vol - 300.0, "vol_ml"), "mL")
    relative = at_precision((vol - 300) / 300 * 100, "vol_ml", "relative_change_since_baseline")
    assert left[("VOL-BL-REL", P)][0] == relative
    assert left[("PV-INTERVAL", P)] == (365, "d")
    assert not any(k[0].startswith("CSA-") for k in left)
    # each comparison item carries its generic kind as Derivation, the metric as its name
    m = {x.name.value: x for x in groups["right thigh muscle"].get_measurements()}
    assert m["CSA-BL-CHG"].derivation.value == codes.CHANGE_SINCE_BASELINE.value
    assert m["CSA-BL-CHG"].name.meaning == "Change in area since baseline"


def test_sr_tracking_uids_stable_across_visits(visit, out):
    later = Study("20270101", seed=1, muscle_scale=0.9)
    assert later.water[0].StudyInstanceUID != visit.water[0].StudyInstanceUID
    sr2 = build_sr(later.analysis, later.seg, later.water, subject_key=SUBJECT)
    path = out / "sr-later.dcm"
    sr2.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    first = {k: g.tracking_uid for k, g in _groups(out / "sr.dcm").items()}
    second = {k: g.tracking_uid for k, g in _groups(path).items()}
    assert first == second
    assert first["right thigh muscle"] != first["left thigh muscle"]
    assert tracking_uid("another subject", "thigh", Side.RIGHT) != first["right thigh muscle"]
    # other inputs, other instance
    assert sr2.SOPInstanceUID != pydicom.dcmread(out / "sr.dcm").SOPInstanceUID
    with pytest.raises(ValueError, match="study"):
        build_sr(visit.analysis, later.seg, visit.water, subject_key=SUBJECT)


def test_sr_uids_deterministic(visit, sr, comparisons):
    again = build_sr(visit.analysis, visit.seg, list(reversed(visit.water)), comparisons, subject_key=SUBJECT)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)
    plain = build_sr(visit.analysis, visit.seg, visit.water, subject_key=SUBJECT)
    assert plain.SOPInstanceUID != sr.SOPInstanceUID  # different content, different instance
    default_key = build_sr(visit.analysis, visit.seg, visit.water)  # reports.uids.subject_key
    assert _groups_uids(default_key) == _groups_uids(plain) == sorted(
        tracking_uid(SUBJECT, "thigh", s) for s in (Side.RIGHT, Side.LEFT))


def _groups_uids(sr):
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
    return sorted(g.tracking_uid for g in report.get_volumetric_roi_measurement_groups())


def test_sr_rejects_inconsistent_inputs(visit):
    a, seg, water = visit.analysis, visit.seg, visit.water
    with pytest.raises(ValueError, match="unknown metric"):
        build_sr(a, seg, water, {("thigh", Side.RIGHT, "t2_ms"): Comparison(None, None, TODAY)}, subject_key="s")
    with pytest.raises(ValueError, match="no measurement"):
        build_sr(a, seg, water, {("calf", Side.RIGHT, "csa_mm2"): Comparison(None, None, TODAY)}, subject_key="s")
    wrong = Comparison(None, None, TODAY, current_value=visit.value(Side.RIGHT, "csa_mm2") + 1)
    with pytest.raises(ValueError, match="current value"):
        build_sr(a, seg, water, {("thigh", Side.RIGHT, "csa_mm2"): wrong}, subject_key="s")
    with pytest.raises(ValueError, match="Segmentation Storage"):
        build_sr(a, water[0], water, subject_key="s")
    with pytest.raises(ValueError, match="subject_key"):
        build_sr(a, seg, water, subject_key="")


def test_calf_study(out):
    """Calf: "lower leg" labels, Lower leg anatomy; comparison keys may use the enums."""
    dss = phantom_datasets(make_leg_phantom("calf", shape=SHAPE, seed=5), study_date="20260101")
    a = analyse_study(dss)
    assert a.segmentation.region is Region.CALF
    water = [d for d in dss if d.SeriesInstanceUID == a.anatomy.series_instance_uid]
    seg = build_seg(a, water)
    assert seg.SegmentSequence[0].SegmentLabel == "right lower leg muscle"
    assert seg.SegmentSequence[0].AnatomicRegionSequence[0].CodeValue == "30021000"
    ff = [m.value for m in a.measurements if m.side is Side.LEFT and m.metric == "ff_percent"][0]
    prior = [PriorValue("1.2.3.1", datetime.date(2025, 1, 1), ff - 1.0)]
    sr = build_sr(a, seg, water, {(Region.CALF, "left", "ff_percent"): compare(ff, TODAY, prior)},
                  subject_key="calf-subject")
    paths = out / "seg-calf.dcm", out / "sr-calf.dcm"
    seg.save_as(paths[0], enforce_file_format=True)
    sr.save_as(paths[1], enforce_file_format=True)
    assert dciodvfy_errors(paths[0]) == [] and dciodvfy_errors(paths[1]) == []
    groups = _groups(paths[1])
    assert set(groups) == {"right lower leg muscle", "left lower leg muscle"}
    assert groups["left lower leg muscle"].finding_sites[0].value.value == "30021000"
    left = _values(groups["left lower leg muscle"])
    assert left[("FF-BL-CHG", codes.PRIVATE_SCHEME)] == (pytest.approx(1.0, abs=1e-9), "%")
    assert codes.region_concept("leg") == codes.LOWER_LIMB


# --- longitudinal ---------------------------------------------------------------------------

def test_compare_picks_baseline_and_previous():
    priors = [PriorValue("1.3", datetime.date(2025, 6, 1), 97.0),
              PriorValue("1.1", datetime.date(2024, 1, 1), 100.0),
              PriorValue("1.2", datetime.date(2024, 12, 31), 98.0),
              PriorValue("1.4", datetime.date(2026, 1, 1), 50.0),   # same day: ignored
              PriorValue("1.5", datetime.date(2026, 3, 1), 10.0)]   # future: ignored
    c = compare(95.0, TODAY, priors)
    assert c.baseline.study_instance_uid == "1.1" and c.previous.study_instance_uid == "1.3"
    assert c.change_since_baseline == pytest.approx(-5.0)
    assert c.relative_change_since_baseline == pytest.approx(-5.0)
    assert c.days_since_baseline == 731
    assert c.change_since_previous == pytest.approx(-2.0)
    assert c.relative_change_since_previous == pytest.approx(-2 / 97 * 100)
    assert c.days_since_previous == 214
    assert compare(95.0, TODAY, list(reversed(priors))) == c


def test_compare_without_or_with_zero_priors():
    none = compare(95.0, TODAY, [PriorValue("1.9", datetime.date(2027, 1, 1), 1.0)])
    assert none.baseline is None and none.previous is None
    assert none.change_since_baseline is None and none.days_since_previous is None
    zero = compare(5.0, TODAY, [PriorValue("1.1", datetime.date(2025, 1, 1), 0.0)])
    assert zero.baseline == zero.previous
    assert zero.change_since_baseline == 5.0 and zero.days_since_baseline == 365
    assert zero.relative_change_since_baseline is None and zero.relative_change_since_previous is None
    pending = Comparison(baseline=PriorValue("1.1", datetime.date(2025, 1, 1), 100.0), previous=None,
                         current_date=TODAY)
    assert pending.change_since_baseline is None and pending.days_since_baseline == 365
    assert pending.with_current(95.0).relative_change_since_baseline == pytest.approx(-5.0)


def test_longitudinal_validation():
    with pytest.raises(ValueError, match="study_date"):
        PriorValue("1.1", "20250101", 1.0)
    with pytest.raises(ValueError, match="finite"):
        PriorValue("1.1", datetime.date(2025, 1, 1), float("nan"))
    with pytest.raises(ValueError, match="priors\\[0\\]"):
        compare(1.0, TODAY, [(datetime.date(2025, 1, 1), 1.0)])
    with pytest.raises(ValueError, match="not before"):
        Comparison(PriorValue("1.1", TODAY, 1.0), None, TODAY)


# --- UIDs and codes ---------------------------------------------------------------------------

def test_derive_uid():
    u = derive_uid("1.2.3", "seg", "v1")
    assert u == derive_uid("1.2.3", "seg", "v1")
    assert u != derive_uid("1.2.3", "seg", "v2")
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert u.startswith("2.25.") and len(u) <= 64 and pydicom.uid.UID(u).is_valid
    with pytest.raises(ValueError):
        derive_uid()
    with pytest.raises(ValueError, match="part 1"):
        derive_uid("1.2", 3)


def test_comparison_concepts_are_distinct_and_valid():
    seen = set()
    for metric in codes.METRIC_CONCEPTS:
        for kind in codes.COMPARISON_KINDS:
            concept, unit = codes.comparison_concept(metric, kind)
            assert concept.scheme_designator == codes.PRIVATE_SCHEME
            assert len(concept.value) <= 16 and len(concept.meaning) <= 64
            assert unit.scheme_designator == "UCUM"
            seen.add(concept.value)
    assert len(seen) == len(codes.METRIC_CONCEPTS) * len(codes.COMPARISON_KINDS)
    assert codes.comparison_concept("frma_mm2", "baseline_value")[0].meaning == "fRMA at baseline"
    assert codes.METRIC_CONCEPTS["vol_ml"][1].value == "mL"
    with pytest.raises(ValueError, match="metric"):
        codes.comparison_concept("t2", "baseline_value")


def test_sr_without_a_key_uses_the_node_subject_key(visit):
    """One subject key: build_sr called without one derives the same tracking UIDs as the node."""
    from node.instances import subject_key as node_key
    from reports.uids import subject_key

    key = subject_key(visit.water[0])
    assert key == node_key(visit.water[0]) and key.startswith("patient:")
    implicit = build_sr(visit.analysis, visit.seg, visit.water)
    explicit = build_sr(visit.analysis, visit.seg, visit.water, subject_key=key)
    assert _groups_uids(implicit) == _groups_uids(explicit)
    assert _groups_uids(implicit) != _groups_uids(build_sr(visit.analysis, visit.seg, visit.water, subject_key="x"))


def test_roi_segments_and_groups_carry_the_muscle_codes(tmp_path):
    """ROIs of the node's SEG and SR: a muscle with a verified code (quant.muscles) gets it as
    the segment's property type and as the SR group's finding site; a compartment keeps the
    generic code (SEG) and the region (SR). dciodvfy without errors; highdicom reads both back."""
    from quant.analysis import RoiSet
    from quant.enums import RoiSource

    ph = make_leg_phantom(Region.THIGH, shape=(6, 96, 160), compartments=True, seed=5)
    dss = phantom_datasets(ph)
    names = {1: "vastus_lateralis", 2: "medial_compartment", 3: "posterior_compartment"}
    analysis = analyse_study(dss, rois=RoiSet(ph.compartment, names, RoiSource.READER))
    water = [d for d in dss if d.SeriesInstanceUID == analysis.anatomy.series_instance_uid]
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    build_seg(analysis, water).save_as(seg_path, enforce_file_format=True)
    seg = hd.seg.segread(seg_path)
    build_sr(analysis, seg, water, subject_key=SUBJECT).save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []

    ptypes = {d.SegmentLabel: d.SegmentedPropertyTypeCodeSequence[0] for d in hd.seg.segread(seg_path).SegmentSequence}
    vl = ptypes["right thigh vastus lateralis (reader)"]
    assert (vl.CodingSchemeDesignator, vl.CodeValue, vl.CodeMeaning) == ("SCT", "1403006", "Vastus lateralis muscle")
    assert ptypes["left thigh vastus lateralis (reader)"].CodeValue == "1403006"
    assert ptypes["right thigh medial compartment (reader)"].CodeValue == "102292000"
    assert ptypes["right thigh muscle"].CodeValue == codes.SKELETAL_MUSCLE.value

    groups = {g.tracking_identifier: g for g in hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()}
    (site,) = groups["right thigh vastus lateralis (reader)"].finding_sites
    assert site.value.CodeValue == "1403006" and site.laterality.CodeValue == codes.RIGHT.value
    (site,) = groups["left thigh posterior compartment (reader)"].finding_sites
    assert site.value.CodeValue == codes.THIGH.value and site.laterality.CodeValue == codes.LEFT.value
