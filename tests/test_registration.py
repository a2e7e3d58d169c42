"""Carrying a reader's ROI set to another visit by registration (issue 10, section 2):
the phantom's compartments of visit 1 carried to a repositioned visit 2 with thinner,
partly fattier muscle land on the right compartments; another anatomy is flagged."""

from __future__ import annotations

import numpy as np
import pytest

from quant.enums import COMPARTMENTS, Side, Tissue
from quant.registration import REVIEW_DICE, CarriedRois, carry_rois
from quant.synthetic.phantom import LegPhantom, make_leg_phantom
from quant.volume import Volume

SMALL = dict(shape=(8, 96, 160), pixel_mm=2.5, slice_mm=6.0, supersample=3, bias_field=0.3, fascia_mm=1.0)


def _volume(p: LegPhantom) -> Volume:
    return Volume(array=p.water.astype(np.float32), spacing_mm=p.spacing_mm, origin_mm=p.origin_mm,
                  orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), frame_of_reference_uid="1.2.3",
                  series_instance_uid="1.2.3.4", sop_instance_uids=())


def _csa(mask: np.ndarray, p: LegPhantom) -> float:
    per = mask.sum(axis=(1, 2))
    return float(per[per > 0].mean() * p.spacing_mm[1] * p.spacing_mm[2]) if per.any() else 0.0


def _carry(v1: LegPhantom, v2: LegPhantom, **kw) -> CarriedRois:
    assert v1.compartment is not None
    return carry_rois(_volume(v1), v1.compartment, _volume(v2), moving_body=v1.side > 0, fixed_body=v2.side > 0,
                      moving_side=v1.side, fixed_side=v2.side, fixed_muscle=v2.tissue == Tissue.MUSCLE, **kw)


def _check_compartments(r: CarriedRois, v2: LegPhantom, csa_rel: float = 0.05, dice_min: float = 0.85) -> None:
    assert v2.compartment is not None
    for code in (1, 2):
        for k, roi in enumerate(COMPARTMENTS[v2.region]):
            truth = (v2.side == code) & (v2.compartment == k + 1)
            got = (v2.side == code) & (r.labels == k + 1)
            assert _csa(got, v2) == pytest.approx(_csa(truth, v2), rel=csa_rel), (code, roi)
            dice = 2 * (truth & got).sum() / (truth.sum() + got.sum())
            assert dice > dice_min, (code, roi, dice)


@pytest.fixture(scope="module")
def visit1() -> LegPhantom:
    return make_leg_phantom("thigh", seed=1, compartments=True, **SMALL)


@pytest.mark.parametrize("kw", [
    # a small repositioning: 8 mm / -5 mm in-plane, 5 degrees; muscle 7 % thinner, medial compartment fattier
    dict(shift_mm=(8.0, -5.0, 0.0), rotation_deg=5.0, muscle_scale=0.93, compartment_ff={"medial_compartment": 0.3}),
    # a large one: 3 cm and 10 degrees, legs 15 mm closer; muscle 10 % thinner, posterior compartment fattier
    dict(shift_mm=(24.0, -18.0, 0.0), rotation_deg=10.0, leg_gap_mm=15.0, muscle_scale=0.9,
         compartment_ff={"posterior_compartment": 0.5}),
], ids=["small-repositioning", "large-repositioning"])
def test_carried_compartments_stay_on_their_muscle(visit1, kw):
    v2 = make_leg_phantom("thigh", seed=2, compartments=True, **SMALL, **kw)
    r = _carry(visit1, v2)
    _check_compartments(r, v2)
    assert r.labels.shape == v2.water.shape and r.labels.dtype == visit1.compartment.dtype
    assert r.dice_muscle is not None and r.dice_muscle > REVIEW_DICE
    assert set(r.dice_by_side) == {Side.RIGHT, Side.LEFT} and min(r.dice_by_side.values()) > REVIEW_DICE
    assert not r.needs_review
    assert set(r.stage_seconds) == {"rigid", "affine", "bspline", "labels"}
    # carried labels lie on the fixed visit's muscle only
    assert not np.any((r.labels > 0) & (v2.tissue != Tissue.MUSCLE))


def test_calf_compartments_follow_a_shifted_visit():
    v1 = make_leg_phantom("calf", seed=1, compartments=True, **SMALL)
    v2 = make_leg_phantom("calf", seed=2, compartments=True, shift_mm=(-10.0, 6.0, 0.0), rotation_deg=-6.0,
                          muscle_scale=0.92, compartment_ff={"triceps_surae": 0.3}, **SMALL)
    r = _carry(v1, v2)
    _check_compartments(r, v2)
    assert not r.needs_review


def test_same_visit_is_carried_unchanged(visit1):
    r = _carry(visit1, visit1, bspline=False)
    assert r.dice_muscle == pytest.approx(1.0, abs=0.02)
    assert np.mean(r.labels[visit1.compartment > 0] == visit1.compartment[visit1.compartment > 0]) > 0.99
    assert r.mismatch < 0.01 and not r.needs_review


def test_whole_image_registration_without_side_maps(visit1):
    v2 = make_leg_phantom("thigh", seed=2, compartments=True, shift_mm=(6.0, 4.0, 0.0), rotation_deg=3.0, **SMALL)
    r = carry_rois(_volume(visit1), visit1.compartment, _volume(v2), fixed_muscle=v2.tissue == Tissue.MUSCLE,
                   bspline=False)
    _check_compartments(r, v2)
    assert r.dice_by_side == {} and not r.needs_review


def test_another_anatomy_needs_review(visit1):
    calf = make_leg_phantom("calf", seed=2, compartments=True, **SMALL)
    r = _carry(visit1, calf)
    assert r.needs_review
    assert r.dice_muscle is not None and r.dice_muscle < REVIEW_DICE


def test_without_a_muscle_mask_only_the_mismatch_decides(visit1):
    v2 = make_leg_phantom("thigh", seed=2, compartments=True, shift_mm=(8.0, -5.0, 0.0), **SMALL)
    r = carry_rois(_volume(visit1), visit1.compartment, _volume(v2), moving_side=visit1.side, fixed_side=v2.side,
                   bspline=False)
    assert r.dice_muscle is None and r.dice_by_side == {} and not r.needs_review
    carried, drawn = (r.labels > 0).sum(), (visit1.compartment > 0).sum()
    assert 0.9 * drawn < carried < 1.1 * drawn


def test_bad_input_is_refused(visit1):
    with pytest.raises(ValueError, match="does not fit"):
        carry_rois(_volume(visit1), visit1.compartment[:4], _volume(visit1))
    four_d = _volume(visit1).with_array(np.stack([visit1.water, visit1.water]))
    with pytest.raises(ValueError, match="3-D"):
        carry_rois(four_d, visit1.compartment, _volume(visit1))
