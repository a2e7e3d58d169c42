"""A reader's ROIs sent as a DICOM SEG (quant.reader_rois): read onto the grid of the Dixon
water series they reference, named by property type code or label, and refused with a
reason when they do not fit."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pytest
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from quant.enums import COMPARTMENTS, Region, Roi, SeriesKind
from quant.errors import RoiSetError
from quant.muscles import KNOWN_CODES, PROPERTY_TYPES, READ_ONLY_CODES, property_type, roi_of_code
from quant.pipeline import analyse_study, group_by_series
from quant.reader_rois import referenced_instances, referenced_series, rois_from_seg
from quant.series import classify_series
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets
from quant.volume import Volume, assemble_volume

GENERIC = CodedConcept("102292000", "SCT", "Skeletal muscle structure of lower limb")
TRICEPS_SURAE = CodedConcept("53451005", "SCT", "Triceps surae muscle structure")
VASTUS_LATERALIS = CodedConcept("1403006", "SCT", "Vastus lateralis muscle")
# read-only codes of quant.muscles (Uberon's bridge to SNOMED CT): named, never written
ADDUCTOR_MAGNUS = CodedConcept("181688002", "SCT", "Adductor magnus")
SOLEUS = CodedConcept("181702007", "SCT", "Soleus muscle")
RIGHT = CodedConcept("24028007", "SCT", "Right")


def _water(datasets) -> tuple[list[Dataset], Volume]:
    for dss in group_by_series(datasets).values():
        if classify_series(dss).kind is SeriesKind.WATER:
            vol = assemble_volume(dss)
            by_uid = {ds.SOPInstanceUID: ds for ds in dss}
            return [by_uid[u] for u in vol.sop_instance_uids], vol
    raise AssertionError("no water series")


@pytest.fixture(scope="module")
def thigh():
    ph = make_leg_phantom(Region.THIGH, shape=(6, 96, 160), compartments=True, seed=5)
    dss = phantom_datasets(ph)
    sources, vol = _water(dss)
    return ph, dss, sources, vol


@pytest.fixture(scope="module")
def calf():
    ph = make_leg_phantom(Region.CALF, shape=(4, 96, 160), compartments=True, seed=6)
    dss = phantom_datasets(ph, uid_seed="calf")
    sources, vol = _water(dss)
    return ph, dss, sources, vol


def _description(number: int, label: str, ptype: CodedConcept, laterality: CodedConcept | None = None):
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=label,
        segmented_property_category=CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=ptype, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=hd.UID(), tracking_id=label.replace(" ", "_"),
        anatomic_regions=[CodedConcept(codes.SCT.Thigh.value, "SCT", "Thigh")])
    if laterality is not None:
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [copy.deepcopy(laterality)]
    return desc


def _seg(sources, masks: np.ndarray, descriptions, seg_type=hd.seg.SegmentationTypeValues.BINARY) -> Dataset:
    """A reader's SEG: ``masks`` (slices, rows, columns, segments) on the source images' grid."""
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=seg_type,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Reader viewer",
        manufacturer_model_name="viewer", software_versions="1", device_serial_number="1",
        max_fractional_value=255 if seg_type == hd.seg.SegmentationTypeValues.FRACTIONAL else None)


def _thigh_seg(ph, sources, **kw) -> Dataset:
    """One segment per thigh compartment, generic property type, labelled as a reader would."""
    rois = COMPARTMENTS[Region.THIGH]
    masks = np.stack([ph.compartment == i + 1 for i in range(len(rois))], axis=-1).astype(np.uint8)
    descs = [_description(i + 1, r.value.replace("_", " "), GENERIC) for i, r in enumerate(rois)]
    return _seg(sources, masks, descs, **kw)


def test_reader_seg_gives_back_the_compartments(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    assert referenced_series(seg) == vol.series_instance_uid
    assert referenced_instances(seg) <= set(vol.sop_instance_uids)
    rois, desc = rois_from_seg(seg, vol, Region.THIGH)
    np.testing.assert_array_equal(rois.labels, ph.compartment)
    # a generic code: the label names the ROI (one that spells a known compartment as its name)
    assert dict(rois.names) == {1: "anterior_compartment", 2: "medial_compartment", 3: "posterior_compartment"}
    assert rois.source.value == "reader"
    assert "Skeletal muscle structure of lower limb (SCT 102292000)" in desc["1"]
    assert "laterality not stated" in desc["1"]


def test_fractional_seg_and_a_known_code_with_laterality(calf):
    """Calf: a fractional SEG whose triceps surae segment carries SCT 53451005 (named
    triceps_surae) and a right-leg modifier (reported, not applied), the others generic."""
    ph, _, sources, vol = calf
    rois = COMPARTMENTS[Region.CALF]
    masks = np.stack([(ph.compartment == i + 1) * 1.0 for i in range(len(rois))], axis=-1).astype(np.float32)
    masks[..., 0][ph.compartment == 0] = 0.3   # a faint fraction outside: below half, not in the ROI
    descs = [_description(i + 1, r.value.replace("_", " "), TRICEPS_SURAE if r is Roi.TRICEPS_SURAE else GENERIC,
                          RIGHT if r is Roi.TRICEPS_SURAE else None) for i, r in enumerate(rois)]
    seg = _seg(sources, masks, descs, seg_type=hd.seg.SegmentationTypeValues.FRACTIONAL)
    out, desc = rois_from_seg(seg, vol, Region.CALF)
    np.testing.assert_array_equal(out.labels, ph.compartment)
    assert out.names[3] == Roi.TRICEPS_SURAE.value and out.names[1] == "anterior_compartment"
    assert "laterality right" in desc["3"]
    with pytest.raises(RoiSetError, match="not a compartment of the thigh"):
        rois_from_seg(seg, vol, Region.THIGH)


def test_coded_muscles_get_their_canonical_names(thigh, calf):
    """Segments coded with the vocabulary of quant.muscles are named by it (lower snake case),
    whatever their label; a generic code keeps the label as given (one that spells a known ROI
    becomes its name)."""
    ph, _, sources, vol = thigh
    masks = np.stack([ph.compartment == i for i in (1, 2, 3)], axis=-1).astype(np.uint8)
    descs = [_description(1, "VL", VASTUS_LATERALIS, RIGHT), _description(2, "AM", ADDUCTOR_MAGNUS),
             _description(3, "Posterior part", GENERIC)]
    rois, desc = rois_from_seg(_seg(sources, masks, descs), vol, Region.THIGH)
    assert dict(rois.names) == {1: "vastus_lateralis", 2: "adductor_magnus", 3: "Posterior part"}
    np.testing.assert_array_equal(rois.labels, ph.compartment)
    assert "Vastus lateralis muscle (SCT 1403006)" in desc["1"] and "laterality right" in desc["1"]
    ph, _, sources, vol = calf
    sol = ph.compartment == COMPARTMENTS[Region.CALF].index(Roi.TRICEPS_SURAE) + 1
    rois, _ = rois_from_seg(_seg(sources, sol[..., None].astype(np.uint8), [_description(1, "Sol", SOLEUS)]),
                            vol, Region.CALF)
    assert dict(rois.names) == {1: "soleus"}


def _verhoeff_ok(digits: str) -> bool:
    """SNOMED CT identifiers end with a Verhoeff check digit."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = d[c][p[i % 8][int(ch)]]
    return c == 0


def test_muscle_vocabulary_is_well_formed():
    """Every code is a SNOMED CT concept id (partition 00, valid check digit), every name lower
    snake case; written codes are read back to the same name; compartments have no code."""
    for (scheme, value), name in KNOWN_CODES.items():
        assert scheme == "SCT" and value.isdigit() and value[-3:-1] == "00" and _verhoeff_ok(value), value
        assert name == name.lower() and " " not in name and roi_of_code(scheme, value) == name
    for name, code in PROPERTY_TYPES.items():
        assert KNOWN_CODES[(code.scheme, code.value)] == name and code.meaning
        assert (code.scheme, code.value) not in READ_ONLY_CODES
    assert property_type("Vastus lateralis") == PROPERTY_TYPES["vastus_lateralis"]
    assert property_type(Roi.TRICEPS_SURAE.value) is not None
    assert all(property_type(r.value) is None for r in Roi if r is not Roi.TRICEPS_SURAE)
    assert roi_of_code("SCT", "102292000") is None   # generic: the label names the ROI


def test_frames_matched_by_position_without_source_references(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    for per in seg.PerFrameFunctionalGroupsSequence:
        del per.DerivationImageSequence
    rois, _ = rois_from_seg(seg, vol)
    np.testing.assert_array_equal(rois.labels, ph.compartment)


def test_reader_rois_are_measured(thigh):
    ph, dss, sources, vol = thigh
    analysis = analyse_study(dss, rois=rois_from_seg(_thigh_seg(ph, sources), vol, Region.THIGH)[0])
    assert analysis.anatomy.series_instance_uid == vol.series_instance_uid
    rows = [m for m in analysis.measurements if m.roi]
    assert {m.roi for m in rows} == {"anterior_compartment", "medial_compartment", "posterior_compartment"}
    assert {m.source for m in rows} == {"reader"} and {m.side.value for m in rows} == {"right", "left"}
    csa = {(m.side.value, m.roi): m.value for m in rows if m.metric == "csa_mm2"}
    for (side, roi), value in csa.items():
        truth = ph.compartment_truth[(side, roi.replace(" ", "_"), "csa_mm2")]
        assert abs(value / truth - 1) < 0.05, (side, roi, value, truth)


def test_seg_of_another_series_is_refused(thigh, calf):
    ph, _, sources, _ = thigh
    with pytest.raises(RoiSetError, match="references series .* not the series measured"):
        rois_from_seg(_thigh_seg(ph, sources), calf[3])


def test_seg_without_series_reference(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    del seg.ReferencedSeriesSequence
    with pytest.raises(RoiSetError, match="references no series"):
        referenced_series(seg)
    known = dict.fromkeys(vol.sop_instance_uids, vol.series_instance_uid)
    assert referenced_series(seg, known) == vol.series_instance_uid
    with pytest.raises(RoiSetError, match="none of its source images is known"):
        referenced_series(seg, {})


def test_shifted_frame_is_refused(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    pos = seg.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
    pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 0.5, *pos.ImagePositionPatient[1:]]
    with pytest.raises(RoiSetError, match=r"frame 3: position .* is 0\.50 mm from slice"):
        rois_from_seg(seg, vol)


def test_frame_referencing_an_unknown_instance_is_refused(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    src = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    src.ReferencedSOPInstanceUID = "1.2.3.4"
    with pytest.raises(RoiSetError, match="frame 1 references instance 1.2.3.4, which is not a slice"):
        rois_from_seg(seg, vol)


def test_wrong_frame_size_is_refused(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    small = Volume(array=np.zeros((6, 96, 159), np.float32), spacing_mm=vol.spacing_mm, origin_mm=vol.origin_mm,
                   orientation=vol.orientation, frame_of_reference_uid=vol.frame_of_reference_uid,
                   series_instance_uid=vol.series_instance_uid, sop_instance_uids=vol.sop_instance_uids)
    with pytest.raises(RoiSetError, match="frames are 96x160, the series' images 96x159"):
        rois_from_seg(seg, small)


def test_empty_segment_is_refused(thigh):
    ph, _, sources, vol = thigh
    masks = np.stack([ph.compartment == 1, np.zeros_like(ph.compartment, bool)], axis=-1).astype(np.uint8)
    seg = _seg(sources, masks, [_description(1, "vastus lateralis", GENERIC), _description(2, "gracilis", GENERIC)])
    with pytest.raises(RoiSetError, match=r"empty segment 2 \(gracilis\): no pixel set"):
        rois_from_seg(seg, vol)


def test_overlapping_segments_later_wins(thigh):
    ph, _, sources, vol = thigh
    a = ph.compartment > 0
    b = ph.compartment == 2
    seg = _seg(sources, np.stack([a, b], axis=-1).astype(np.uint8),
               [_description(1, " all muscle ", GENERIC), _description(2, "adductors", GENERIC)])
    rois, _ = rois_from_seg(seg, vol)
    assert dict(rois.names) == {1: "all muscle", 2: "adductors"}
    np.testing.assert_array_equal(rois.labels, np.where(b, 2, np.where(a, 1, 0)))


def test_label_map_seg(thigh):
    """A label-map SEG (pixel value = segment number) reads the same."""
    ph, _, sources, vol = thigh
    rois = COMPARTMENTS[Region.THIGH]
    descs = [_description(i + 1, r.value.replace("_", " "), GENERIC) for i, r in enumerate(rois)]
    seg = _seg(sources, ph.compartment.astype(np.uint8), descs, seg_type=hd.seg.SegmentationTypeValues.LABELMAP)
    out, _ = rois_from_seg(seg, vol, Region.THIGH)
    np.testing.assert_array_equal(out.labels, ph.compartment)


def test_frames_of_an_enhanced_mr_source(thigh):
    """Frames that reference frames of one Enhanced MR instance go to the slice of that frame."""
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    order = list(reversed(range(len(vol.sop_instance_uids))))  # the multi-frame's frames in reverse slice order
    enhanced = Volume(array=vol.array, spacing_mm=vol.spacing_mm, origin_mm=vol.origin_mm,
                      orientation=vol.orientation, frame_of_reference_uid=vol.frame_of_reference_uid,
                      series_instance_uid=vol.series_instance_uid, sop_instance_uids=("1.2.3.9",) * len(order),
                      frame_numbers=tuple(order.index(k) + 1 for k in range(len(order))))
    slice_of = {u: k for k, u in enumerate(vol.sop_instance_uids)}
    for per in seg.PerFrameFunctionalGroupsSequence:  # (highdicom may share one item between frames)
        der = per.DerivationImageSequence[0]
        src = copy.deepcopy(der.SourceImageSequence[0])
        der.SourceImageSequence = [src]
        k = slice_of[src.ReferencedSOPInstanceUID]
        src.ReferencedSOPInstanceUID = "1.2.3.9"
        src.ReferencedFrameNumber = enhanced.frame_numbers[k]
    rois, _ = rois_from_seg(seg, enhanced)
    np.testing.assert_array_equal(rois.labels, ph.compartment)
    src.ReferencedFrameNumber = 99
    with pytest.raises(RoiSetError, match="references instance 1.2.3.9 frame 99, which is not a slice"):
        rois_from_seg(seg, enhanced)


def test_frame_off_every_slice_without_references_is_refused(thigh):
    ph, _, sources, vol = thigh
    seg = _thigh_seg(ph, sources)
    for per in seg.PerFrameFunctionalGroupsSequence:
        del per.DerivationImageSequence
    pos = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    pos.ImagePositionPatient = [*pos.ImagePositionPatient[:2], float(pos.ImagePositionPatient[2]) + 1.0]
    with pytest.raises(RoiSetError, match=r"frame 1: position .* matches no slice of the series"):
        rois_from_seg(seg, vol)
