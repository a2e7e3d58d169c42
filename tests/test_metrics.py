"""Per-region metrics: the numba reduction against its numpy reference and against
hand-computed values."""

import numpy as np
import pytest

from quant.enums import Side
from quant.metrics import (
    _partial_volume_weights,
    muscle_metrics,
    partial_volume_weights,
    slice_sums,
    slice_sums_reference,
)


def test_slice_sums_match_reference():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (5, 20, 30))
    ff = rng.uniform(-0.1, 1.1, labels.shape).astype(np.float32)
    ff[rng.random(labels.shape) < 0.05] = np.nan
    for a, b in zip(slice_sums(labels, ff, 4), slice_sums_reference(labels, ff, 4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_known_values():
    labels = np.zeros((3, 10, 10), int)
    labels[0, :4, :5] = 1    # 20 voxels
    labels[1, :2, :5] = 1    # 10 voxels
    labels[:, 8:, 8:] = 2    # 4 per slice
    ff = np.full(labels.shape, 0.2, np.float32)
    ff[labels == 2] = 0.5
    ms, per_slice = muscle_metrics(labels, ff, {1: ("thigh", Side.RIGHT), 2: ("thigh", Side.LEFT)},
                                   pixel_area_mm2=2.0, slice_thickness_mm=5.0, algorithm_version="t")
    v = {(m.side, m.metric): m.value for m in ms}
    assert v[(Side.RIGHT, "csa_mm2")] == pytest.approx((40 + 20) / 2)   # mean over slices with muscle
    assert v[(Side.RIGHT, "vol_ml")] == pytest.approx(30 * 2 * 5 / 1000)
    assert v[(Side.RIGHT, "ff_percent")] == pytest.approx(20.0)
    assert v[(Side.RIGHT, "frma_mm2")] == pytest.approx(30 * 0.8)
    assert v[(Side.LEFT, "csa_mm2")] == pytest.approx(8.0)
    assert v[(Side.LEFT, "frma_mm2")] == pytest.approx(4.0)
    np.testing.assert_allclose(per_slice[1], [40, 20, 0])
    assert {m.unit for m in ms if m.metric == "vol_ml"} == {"ml"}


def test_partial_volume_weights_in_a_box_as_on_the_whole_volume():
    """The weights are computed in a box around the muscle: bit for bit what the whole volume gives."""
    from scipy import ndimage as ndi
    rng = np.random.default_rng(3)
    for _ in range(10):
        labels = np.zeros((6, 70, 80), np.int32)
        blobs = ndi.gaussian_filter(rng.random((3, 30, 35)), (0, 1.5, 1.5)) > 0.5
        o = rng.integers(0, [4, 41, 46])
        labels[o[0]:o[0] + 3, o[1]:o[1] + 30, o[2]:o[2] + 35] = blobs * rng.integers(1, 3, blobs.shape)
        ff = rng.random(labels.shape).astype(np.float32)
        ff[rng.random(labels.shape) < 0.05] = np.nan
        signal = (100 * rng.random(labels.shape)).astype(np.float32)
        got = partial_volume_weights(labels, ff, signal, fat_ff=0.9)
        whole = _partial_volume_weights(labels, np.nan_to_num(ff, nan=0.0).astype(np.float64), signal, 0.9, 7)
        for a, b in zip(got, whole, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
