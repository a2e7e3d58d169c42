"""Automatic leg segmentation against phantom truth: Dice, CSA, FF, side and level."""

import numpy as np
import pytest
from conftest import REALISTIC, small_phantom

from quant.enums import Region, Side, SideLabel, Tissue
from quant.fatfraction import fat_fraction
from quant.metrics import muscle_metrics
from quant.segment import level_from_text, segment_legs
from quant.volume import Volume


def _volume(ph, orientation=None, array=None):
    return Volume(array if array is not None else ph.water, ph.spacing_mm, ph.origin_mm,
                  orientation or ph.orientation, "1.2.3", "1.2.3.4",
                  tuple(str(i) for i in range(ph.water.shape[0])))


def _run(ph, **kw):
    vol = _volume(ph)
    ff = fat_fraction(ph.water, ph.fat)
    seg = segment_legs(vol, ph.fat, ff, in_phase=ph.in_phase, **kw)
    labels, groups = seg.muscle_groups()
    ms, _ = muscle_metrics(labels, ff, groups, pixel_area_mm2=vol.pixel_area_mm2,
                           slice_thickness_mm=vol.spacing_mm[0], algorithm_version="t")
    return seg, {(m.side, m.metric): m.value for m in ms}


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("region,ff,gap", [
    (Region.THIGH, 0.06, 30.0), (Region.CALF, 0.06, 30.0), (Region.THIGH, 0.30, 30.0),
    (Region.THIGH, 0.08, -2.0),  # legs touching
])
def test_accuracy_against_truth(region, ff, gap):
    ph = small_phantom(region, muscle_ff=ff, snr=40, seed=5, leg_gap_mm=gap)
    seg, got = _run(ph)
    assert seg.region is region
    for side, code in ((Side.RIGHT, SideLabel.RIGHT), (Side.LEFT, SideLabel.LEFT)):
        truth_mask = (ph.tissue == Tissue.MUSCLE) & (ph.side == code)
        assert dice(seg.mask(Tissue.MUSCLE, side), truth_mask) > 0.97
        t = ph.truth
        assert got[(side, "csa_mm2")] == pytest.approx(t[(side, "csa_mm2")], rel=0.03)
        assert got[(side, "vol_ml")] == pytest.approx(t[(side, "vol_ml")], rel=0.03)
        assert abs(got[(side, "ff_percent")] - t[(side, "ff_percent")]) < 1.0
        assert got[(side, "frma_mm2")] == pytest.approx(t[(side, "frma_mm2")], rel=0.03)
    # bone and subcutaneous fat found where they are
    assert dice(seg.tissue == Tissue.BONE, ph.tissue == Tissue.BONE) > 0.9
    assert dice(seg.tissue == Tissue.SUBCUTANEOUS_FAT, ph.tissue == Tissue.SUBCUTANEOUS_FAT) > 0.95


def test_sides_come_from_patient_coordinates_not_columns():
    """Mirror the columns and say so in the orientation: the sides must not change."""
    ph = small_phantom(right_ff_offset=0.10, seed=6)
    nx = ph.water.shape[2]
    flipped_origin = (ph.origin_mm[0] + (nx - 1) * ph.spacing_mm[2], ph.origin_mm[1], ph.origin_mm[2])
    vol = Volume(ph.water[:, :, ::-1].copy(), ph.spacing_mm, flipped_origin, (-1.0, 0, 0, 0, 1.0, 0),
                 "1.2.3", "1.2.3.4", tuple(str(i) for i in range(ph.water.shape[0])))
    fat = ph.fat[:, :, ::-1].copy()
    ff = fat_fraction(vol.array, fat)
    seg = segment_legs(vol, fat, ff)
    labels, groups = seg.muscle_groups()
    ms, _ = muscle_metrics(labels, ff, groups, pixel_area_mm2=vol.pixel_area_mm2,
                           slice_thickness_mm=vol.spacing_mm[0], algorithm_version="t")
    got = {(m.side, m.metric): m.value for m in ms}
    # the right leg has the higher FF in the truth, and still after mirroring the image
    assert got[(Side.RIGHT, "ff_percent")] - got[(Side.LEFT, "ff_percent")] == pytest.approx(10.0, abs=1.0)
    # the right leg is on the patient's right (-x in LPS)
    k, r, c = np.nonzero(seg.mask(Tissue.MUSCLE, Side.RIGHT))
    assert vol.index_to_patient(k, r, c)[..., 0].mean() < 0


def test_level_from_headers_wins_over_anatomy():
    ph = small_phantom(Region.CALF, seed=7)
    seg, _ = _run(ph, body_part="THIGH")
    assert seg.region is Region.THIGH and "Body Part" in seg.region_reason
    seg, _ = _run(ph, body_part="")
    assert seg.region is Region.CALF and "anatomy" in seg.region_reason


@pytest.mark.parametrize("text,region", [
    ("THIGH", Region.THIGH), ("t1_vibe_dixon_oberschenkel", Region.THIGH), ("LOWER LEG", Region.CALF),
    ("Wade bds", Region.CALF), ("LEG", None), ("", None),
])
def test_level_words(text, region):
    assert level_from_text(text) is region


def test_fatty_muscle_keeps_its_area():
    """CSA must not shrink as FF rises (up to 60 % in the septum-free muscle)."""
    lo = small_phantom(muscle_ff=0.05, seed=8)
    hi = small_phantom(muscle_ff=0.45, seed=8)
    _, g_lo = _run(lo)
    _, g_hi = _run(hi)
    assert g_hi[(Side.RIGHT, "csa_mm2")] == pytest.approx(g_lo[(Side.RIGHT, "csa_mm2")], rel=0.02)


def _pipeline(ph):
    from quant.pipeline import analyse_study
    from quant.synthetic.phantom import phantom_datasets
    a = analyse_study(phantom_datasets(ph))
    return a, {(m.side, m.metric): m.value for m in a.measurements}


@pytest.mark.parametrize("region,extra", [
    (Region.THIGH, {}), (Region.CALF, {}),
    (Region.THIGH, dict(infiltration=0.5)),     # patches up to 56 % FF in one muscle group
    (Region.CALF, dict(infiltration=0.5)),
    (Region.THIGH, dict(leg_gap_mm=-4.0)),      # legs touching
])
def test_realistic_anatomy(region, extra):
    """Partial volume, bias field, dark fascia, septa (and infiltration, touching legs):
    Dice >= 0.95, CSA/VOL/fRMA within 3 %, FF within 1 pp of the partial-volume truth."""
    ph = small_phantom(region, snr=40, seed=9, **REALISTIC, **extra)
    a, got = _pipeline(ph)
    assert a.segmentation.region is region
    for side, code in ((Side.RIGHT, SideLabel.RIGHT), (Side.LEFT, SideLabel.LEFT)):
        assert dice(a.segmentation.mask(Tissue.MUSCLE, side), (ph.tissue == Tissue.MUSCLE) & (ph.side == code)) >= 0.95
        for metric in ("csa_mm2", "vol_ml", "frma_mm2"):
            assert got[(side, metric)] == pytest.approx(ph.truth[(side, metric)], rel=0.03), metric
        assert abs(got[(side, "ff_percent")] - ph.truth[(side, "ff_percent")]) < 1.0


def test_csa_does_not_shrink_as_fat_rises():
    """The same anatomy at 5 % and 50 % muscle FF: CSA within 2 %."""
    _, lo = _pipeline(small_phantom(muscle_ff=0.05, seed=10, **REALISTIC))
    _, hi = _pipeline(small_phantom(muscle_ff=0.50, seed=10, **REALISTIC))
    for side in (Side.RIGHT, Side.LEFT):
        assert hi[(side, "csa_mm2")] == pytest.approx(lo[(side, "csa_mm2")], rel=0.02)
        assert hi[(side, "ff_percent")] - lo[(side, "ff_percent")] == pytest.approx(45.0, abs=1.5)


def test_per_slice_largest_component_as_slice_by_slice():
    """The largest in-plane component of every slice at once: what a 2-D labelling per slice picks."""
    from scipy import ndimage as ndi

    from quant.segment import _largest_per_slice
    rng = np.random.default_rng(4)
    mask = ndi.gaussian_filter(rng.random((12, 40, 40)), (0, 1.0, 1.0)) > 0.52
    mask[3] = False
    mask[5, :, :] = False
    mask[5, 2:4, 2:4] = mask[5, 10:12, 10:12] = True   # two equal components: the first in raster order
    got = _largest_per_slice(mask)
    for k in range(mask.shape[0]):
        lab, n = ndi.label(mask[k])
        want = mask[k] if n <= 1 else lab == 1 + int(np.argmax(ndi.sum_labels(mask[k], lab, np.arange(1, n + 1))))
        assert np.array_equal(got[k], want)
