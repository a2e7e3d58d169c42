"""ROIs on a study with a multi-echo spin echo (MESE) series only: a reader's SEG drawn on
the MESE series (its frames reference the first echo's instances), a reader's set of an
earlier visit carried by registration onto the first-echo volume, and the automatic
compartments on the MESE fit, each measured per compartment and leg like a leg: CSA, VOL
(contiguous slices), water T2 and the other T2 metrics. Phantom: 6 slices of 96 x 160 at
2.5 mm, 10 mm thick and contiguous, partial volume and a 1 mm fascia, SNR 100, compartment
water T2 anterior 30 / medial 34 / posterior 38 ms on the left and 4 ms longer on the right."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest
from test_reader_rois import _thigh_seg
from validators import dciodvfy_errors

from node.processing import build_outputs
from quant.analysis import RoiReference
from quant.enums import COMPARTMENTS, Region, Side
from quant.pipeline import analyse_study
from quant.reader_rois import rois_from_seg
from quant.synthetic.mese_exam import mese_only_datasets
from quant.synthetic.phantom import make_leg_phantom
from quant.volume import assemble_volume

T2_LEFT, RIGHT_OFFSET = 32.0, 4.0
COMPARTMENT_T2W_MS = {"anterior_compartment": 30.0, "medial_compartment": 34.0, "posterior_compartment": 38.0}
GEOMETRY = dict(shape=(6, 96, 160), pixel_mm=2.5, supersample=3, fascia_mm=1.0, slice_mm=10.0)
PER_ROI = {"csa_mm2", "vol_ml", "t2w_ms", "t2w_mean_ms", "t2w_iqr_ms", "b1", "ff_t2_percent"}


def visit(seed: int, **kw):
    ph = make_leg_phantom(Region.THIGH, seed=seed, compartment_t2w_ms=COMPARTMENT_T2W_MS, **GEOMETRY, **kw)
    dss = mese_only_datasets(ph, t2w_muscle_ms=T2_LEFT, right_t2_offset_ms=RIGHT_OFFSET, snr=100.0, seed=seed,
                             study_date=f"202601{seed:02d}")
    return ph, dss


def check_compartments(analysis, ph, source: str) -> dict[tuple[str, str], tuple[float, float]]:
    """Every compartment and leg: the per-leg metric set, water T2 within 1 ms and CSA and
    VOL within 5 % of truth; returns (T2 error ms, CSA error %) by (side, ROI)."""
    got = {(m.side.value, m.roi, m.metric): m for m in analysis.measurements if m.roi}
    errors = {}
    for side in (Side.RIGHT, Side.LEFT):
        for roi in COMPARTMENTS[Region.THIGH]:
            key = (side.value, roi.value)
            assert {metric for s, r, metric in got if (s, r) == key} == PER_ROI, key
            assert {got[(*key, metric)].source for metric in PER_ROI} == {source}
            t2_truth = ph.compartment_truth[(*key, "t2w_ms")] + (RIGHT_OFFSET if side is Side.RIGHT else 0.0)
            t2_err = got[(*key, "t2w_ms")].value - t2_truth
            csa_err = got[(*key, "csa_mm2")].value / ph.compartment_truth[(*key, "csa_mm2")] - 1
            assert abs(t2_err) < 1.0, key
            assert abs(csa_err) < 0.05, key
            assert got[(*key, "vol_ml")].value == pytest.approx(ph.compartment_truth[(*key, "vol_ml")], rel=0.05)
            errors[key] = (round(t2_err, 2), round(100 * csa_err, 2))
    assert not {metric for *_, metric in got} & {"ff_percent", "frma_mm2"}
    return errors


@pytest.fixture(scope="module")
def reader_visit():
    """Visit 1 with a reader's SEG of the three compartments on the MESE series, through
    :func:`node.processing.build_outputs` (its own SEG and SR)."""
    ph, dss = visit(4)
    mese = assemble_volume(dss)
    by_uid = {d.SOPInstanceUID: d for d in dss}
    sources = [by_uid[u] for u in mese.sop_instance_uids]     # the first echo's instances, by slice
    reader = _thigh_seg(ph, sources)
    return ph, dss, mese, reader, build_outputs([*dss, reader])


def test_reader_seg_on_mese_series_measured_per_compartment(reader_visit, tmp_path):
    """Measured: water T2 error −0.05 to +0.22 ms, CSA error −0.14 to +0.40 % (right / left:
    anterior +0.01 / +0.18 ms, +0.40 / +0.30 %; medial −0.05 / +0.22 ms, −0.14 / +0.03 %;
    posterior +0.00 / +0.22 ms, +0.34 / +0.35 %). The node's SEG and SR: dciodvfy 0 errors."""
    ph, dss, mese, reader, out = reader_visit
    assert mese.array.ndim == 4
    on_echoes, _ = rois_from_seg(reader, mese, Region.THIGH)          # the 4-D series
    on_first, _ = rois_from_seg(reader, out.analysis.anatomy, Region.THIGH)   # its first echo
    assert (on_echoes.labels == ph.compartment).all() and (on_first.labels == ph.compartment).all()
    a = out.analysis
    assert a.anatomy.array.ndim == 3 and a.rois is not None and a.roi_refusals == ()
    assert any(n.startswith("ROIs from the reader's SEG") for n in a.notes)
    errors = check_compartments(a, ph, "reader")
    print("reader SEG on MESE (T2 error ms, CSA error %):", errors)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    out.seg.save_as(seg_path, enforce_file_format=True)
    out.sr.save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    labels = {str(s.SegmentLabel) for s in pydicom.dcmread(seg_path).SegmentSequence}
    assert {f"{side} thigh {roi.value.replace('_', ' ')} (reader)" for side in ("right", "left")
            for roi in COMPARTMENTS[Region.THIGH]} <= labels
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert {g.tracking_identifier for g in groups} >= {"right thigh muscle", "left thigh medial compartment (reader)"}
    assert len(groups) == 8


def test_carried_set_and_automatic_compartments_on_mese_only_visit(reader_visit):
    """Visit 2 repositioned (5 / −4 mm, 4°), MESE only: visit 1's reader set carried onto the
    first-echo volume, then the automatic compartments instead. Measured: carried T2 error
    +0.00 to +0.26 ms, CSA −0.71 to +0.68 %; automatic T2 +0.00 to +0.25 ms, CSA +0.06 to +0.74 %."""
    _, _, _, _, first = reader_visit
    a1 = first.analysis
    assert a1.rois is not None
    ref = RoiReference(anatomy=a1.anatomy, rois=a1.rois, side=a1.segmentation.side, region=a1.segmentation.region.value)
    ph, dss = visit(5, shift_mm=(5.0, -4.0, 0.0), rotation_deg=4.0)
    carried = analyse_study(dss, carry_from=[ref])
    assert carried.carried is not None and "roi-registration-review" not in carried.flags
    print("carried (T2 error ms, CSA error %):", check_compartments(carried, ph, "carried"))
    auto = analyse_study(dss, compartments=True)
    print("automatic (T2 error ms, CSA error %):", check_compartments(auto, ph, "automatic"))
