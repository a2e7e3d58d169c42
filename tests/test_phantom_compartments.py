"""Phantom compartments (issue 10, section 6): label map, per-compartment truth, FF and T2
per compartment, repositioning between visits; the default phantom is unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from quant.enums import COMPARTMENTS, Region, Side, SideLabel, Tissue
from quant.synthetic.exam import mese_truth_maps
from quant.synthetic.phantom import make_leg_phantom

SHAPE = (6, 160, 256)
METRICS = ("csa_mm2", "vol_ml", "ff_percent", "frma_mm2")


def _digest(p) -> str:
    h = hashlib.sha256()
    for a in (p.water, p.fat, p.in_phase, p.opposed_phase):
        h.update(np.clip(np.rint(a), 0, 65535).astype(np.uint16).tobytes())
    h.update(p.tissue.tobytes())
    h.update(p.side.tobytes())
    return h.hexdigest()[:16]


# images (as sent: uint16), labels and truth of the phantom before compartments were added
_BEFORE = [
    (dict(), "d6b41d6f40e430ad", {("right", "csa_mm2"): 8851.05, ("left", "ff_percent"): 6.120105}),
    (dict(region="calf"), "8e3bd7f0bb297d2d", {("right", "csa_mm2"): 4646.475, ("left", "frma_mm2"): 4409.713484}),
    (dict(shape=(6, 96, 160), supersample=3, infiltration=0.2, fascia_mm=1.5, bias_field=0.3, region="calf"),
     "57fb6b73b4898815", {("right", "vol_ml"): 139.333755, ("left", "ff_percent"): 9.096052}),
    (dict(shape=(6, 96, 160), pixel_mm=2.0, supersample=2, leg_gap_mm=0.0, muscle_scale=0.9, right_ff_offset=0.05),
     "0382ff387c9a4c7a", {("right", "ff_percent"): 11.05315, ("left", "csa_mm2"): 7848.0}),
]


@pytest.mark.parametrize("kwargs,digest,truth", _BEFORE)
def test_default_phantom_unchanged(kwargs, digest, truth):
    p = make_leg_phantom(**kwargs)
    assert _digest(p) == digest
    for (side, metric), value in truth.items():
        assert p.truth[(Side(side), metric)] == pytest.approx(value, rel=1e-6)
    assert p.compartment is None and p.compartment_truth == {} and p.t2w_ms_map is None


@pytest.fixture(scope="module", params=["thigh", "calf"])
def comp_phantom(request):
    return make_leg_phantom(request.param, shape=SHAPE, supersample=2, compartments=True)


_EXPECTED_FRACTION = {  # share of the leg's muscle area, per compartment
    "anterior_compartment:thigh": (0.43, 0.52), "medial_compartment:thigh": (0.19, 0.27),
    "posterior_compartment:thigh": (0.25, 0.33),
    "anterior_compartment:calf": (0.20, 0.31), "lateral_compartment:calf": (0.13, 0.22),
    "triceps_surae:calf": (0.40, 0.50), "deep_posterior_compartment:calf": (0.10, 0.19),
}


def test_compartment_label_fractions(comp_phantom):
    p = comp_phantom
    rois = COMPARTMENTS[p.region]
    assert p.compartment.dtype == np.uint8 and p.compartment.shape == p.tissue.shape
    assert set(np.unique(p.compartment)) == set(range(len(rois) + 1))
    assert np.array_equal(p.compartment > 0, p.tissue == Tissue.MUSCLE)
    for code in (SideLabel.RIGHT, SideLabel.LEFT):
        labels = p.compartment[(p.side == code) & (p.compartment > 0)]
        leg_csa = p.truth[(code.side, "csa_mm2")]
        for k, roi in enumerate(rois):
            lo, hi = _EXPECTED_FRACTION[f"{roi.value}:{p.region.value}"]
            assert lo < np.mean(labels == k + 1) < hi, roi
            assert lo < p.compartment_truth[(code.side.value, roi.value, "csa_mm2")] / leg_csa < hi, roi


def test_compartments_anatomically_placed(comp_phantom):
    p = comp_phantom
    dz, dy, dx = p.spacing_mm
    for code, lateral in ((SideLabel.RIGHT, -1.0), (SideLabel.LEFT, +1.0)):
        def centroid(mask):
            _, r, c = np.nonzero(mask)
            return p.origin_mm[0] + c.mean() * dx, p.origin_mm[1] + r.mean() * dy
        leg = (p.side == code) & (p.compartment > 0)
        cx, cy = centroid(leg)
        cen = {roi.value: centroid(leg & (p.compartment == k + 1)) for k, roi in enumerate(COMPARTMENTS[p.region])}
        assert cen["anterior_compartment"][1] < cy - 10          # anterior: -y
        if p.region is Region.THIGH:
            assert cen["posterior_compartment"][1] > cy + 10
            assert (cen["medial_compartment"][0] - cx) * lateral < -10   # towards the other leg
        else:
            assert cen["triceps_surae"][1] > cy + 10
            assert cen["triceps_surae"][1] > cen["deep_posterior_compartment"][1] + 10
            assert cen["deep_posterior_compartment"][1] > cen["anterior_compartment"][1] + 10
            assert (cen["lateral_compartment"][0] - cx) * lateral > 15


def test_septa_are_fat_on_the_fat_image(comp_phantom):
    p = comp_phantom
    septum = p.tissue == Tissue.INTERMUSCULAR_FAT
    assert septum.sum() > 200
    assert p.fat[septum].mean() > 5 * p.fat[p.muscle_fraction > 0.99].mean()


def test_compartment_truth_sums_to_leg_truth(comp_phantom):
    p = comp_phantom
    rois = COMPARTMENTS[p.region]
    for side in (Side.RIGHT, Side.LEFT):
        ct = {m: [p.compartment_truth[(side.value, r.value, m)] for r in rois] for m in METRICS}
        assert sum(ct["csa_mm2"]) == pytest.approx(p.truth[(side, "csa_mm2")], rel=5e-3)
        assert sum(ct["vol_ml"]) == pytest.approx(p.truth[(side, "vol_ml")], rel=5e-3)
        assert sum(ct["frma_mm2"]) == pytest.approx(p.truth[(side, "frma_mm2")], rel=5e-3)
        ff = sum(v * f for v, f in zip(ct["vol_ml"], ct["ff_percent"], strict=True)) / sum(ct["vol_ml"])
        assert ff == pytest.approx(p.truth[(side, "ff_percent")], abs=0.05)


def test_compartment_ff_raises_that_compartment():
    base = make_leg_phantom("calf", shape=SHAPE, compartments=True)
    more = make_leg_phantom("calf", shape=SHAPE, compartment_ff={"lateral_compartment": 0.10})
    for side in ("right", "left"):
        for roi in COMPARTMENTS[Region.CALF]:
            key = (side, roi.value, "ff_percent")
            extra = 10.0 if roi.value == "lateral_compartment" else 0.0
            assert more.compartment_truth[key] - base.compartment_truth[key] == pytest.approx(extra, abs=0.05)
    lateral = (base.compartment == 2) & (base.muscle_fraction > 0.99)
    gain = more.fat[lateral].mean() - base.fat[lateral].mean()       # on the image, not only in the truth
    assert 80 < gain < 120
    with pytest.raises(ValueError):
        make_leg_phantom("thigh", shape=SHAPE, compartment_ff={"triceps_surae": 0.1})
    with pytest.raises(ValueError):
        make_leg_phantom("thigh", shape=SHAPE, compartment_t2w_ms={"right:anterior_compartment": 40.0})


def test_compartment_ff_per_side():
    base = make_leg_phantom("thigh", shape=SHAPE, compartments=True)
    more = make_leg_phantom("thigh", shape=SHAPE, compartment_ff={"medial_compartment": 0.05,
                                                                   "right:medial_compartment": 0.10})
    for side, extra in (("right", 15.0), ("left", 5.0)):
        key = (side, "medial_compartment", "ff_percent")
        assert more.compartment_truth[key] - base.compartment_truth[key] == pytest.approx(extra, abs=0.05)
        key = (side, "anterior_compartment", "ff_percent")
        assert more.compartment_truth[key] == pytest.approx(base.compartment_truth[key], abs=1e-9)


def test_compartment_t2w_map_and_mese_truth():
    p = make_leg_phantom("thigh", shape=SHAPE, compartment_t2w_ms={"posterior_compartment": 45.0})
    post = p.compartment == 3
    assert np.all(p.t2w_ms_map[post] == 45.0)
    assert np.all(np.isnan(p.t2w_ms_map[~post]))
    assert p.compartment_truth[("left", "posterior_compartment", "t2w_ms")] == 45.0
    assert ("left", "anterior_compartment", "t2w_ms") not in p.compartment_truth
    t2w, *_ = mese_truth_maps(p, t2w_muscle_ms=32.0, right_t2_offset_ms=3.0)
    assert np.all(t2w[post & (p.side == SideLabel.LEFT)] == 45.0)
    assert np.all(t2w[post & (p.side == SideLabel.RIGHT)] == 48.0)
    assert np.all(t2w[(p.compartment == 1) & (p.side == SideLabel.LEFT)] == 32.0)


def _centroids(p):
    """Muscle-label centroid (x, y mm) of each compartment and side."""
    dz, dy, dx = p.spacing_mm
    out = {}
    for code in (SideLabel.RIGHT, SideLabel.LEFT):
        for k in range(len(COMPARTMENTS[p.region])):
            _, r, c = np.nonzero((p.compartment == k + 1) & (p.side == code))
            out[(code, k)] = np.array([p.origin_mm[0] + c.mean() * dx, p.origin_mm[1] + r.mean() * dy])
    return out


@pytest.mark.parametrize("region", ["thigh", "calf"])
def test_shift_and_rotation_move_the_anatomy(region):
    shift, rot = (7.0, -5.0, 0.0), 6.0
    base = make_leg_phantom(region, shape=SHAPE, supersample=2, compartments=True)
    moved = make_leg_phantom(region, shape=SHAPE, supersample=2, compartments=True, shift_mm=shift, rotation_deg=rot)
    assert moved.origin_mm == base.origin_mm and moved.spacing_mm == base.spacing_mm
    th = np.deg2rad(rot)
    rmat = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    c0, c1 = _centroids(base), _centroids(moved)
    for key, c in c0.items():
        expected = rmat @ c + np.array(shift[:2])
        assert np.linalg.norm(c1[key] - expected) < base.spacing_mm[1], key
    for key, value in base.compartment_truth.items():
        if key[2] == "csa_mm2":
            assert moved.compartment_truth[key] == pytest.approx(value, rel=0.01), key


def test_z_shift_moves_the_anatomy_along_the_slices():
    base = make_leg_phantom("calf", shape=SHAPE, compartments=True)
    moved = make_leg_phantom("calf", shape=SHAPE, compartments=True, shift_mm=(0.0, 0.0, base.spacing_mm[0]))
    assert np.array_equal(moved.tissue[1:], base.tissue[:-1])
    assert np.array_equal(moved.compartment[1:], base.compartment[:-1])


def test_leg_gap_moves_the_legs_apart():
    near = make_leg_phantom("thigh", shape=SHAPE, compartments=True, leg_gap_mm=10.0)
    far = make_leg_phantom("thigh", shape=SHAPE, compartments=True, leg_gap_mm=30.0)
    c0, c1 = _centroids(near), _centroids(far)
    for (code, k), c in c0.items():
        sgn = -1 if code == SideLabel.RIGHT else 1
        assert np.allclose(c1[(code, k)] - c, [sgn * 10.0, 0.0], atol=near.spacing_mm[1])


def test_muscle_scale_reduces_csa_truth():
    base = make_leg_phantom("thigh", shape=SHAPE, supersample=2, compartments=True)
    small = make_leg_phantom("thigh", shape=SHAPE, supersample=2, compartments=True, muscle_scale=0.93)
    for side in (Side.RIGHT, Side.LEFT):
        ratio = small.truth[(side, "csa_mm2")] / base.truth[(side, "csa_mm2")]
        assert 0.91 < ratio < 0.94
        for roi in COMPARTMENTS[Region.THIGH]:
            key = (side.value, roi.value, "csa_mm2")
            assert 0.89 < small.compartment_truth[key] / base.compartment_truth[key] < 0.96
