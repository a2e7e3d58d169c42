"""Label maps carried between grids by DICOM geometry."""

import numpy as np
import pytest

from quant.errors import GeometryError
from quant.resample import resample_labels
from quant.volume import Volume


def vol(shape, spacing, origin, for_uid="1.2.3"):
    return Volume(np.zeros(shape, np.float32), spacing, origin, (1, 0, 0, 0, 1, 0), for_uid, "1.2", ("1",) * shape[0])


def test_coarser_target_grid_keeps_positions():
    src = vol((20, 40, 40), (2.0, 1.0, 1.0), (-20.0, -20.0, 0.0))
    labels = np.zeros(src.shape, np.uint8)
    labels[:, 10:30, 5:15] = 1          # x in [-15, -5), y in [-10, 10)
    labels[:, 10:30, 25:35] = 2         # x in [5, 15)
    tgt = vol((5, 20, 20), (8.0, 2.0, 2.0), (-19.5, -19.5, 3.0))
    out = resample_labels(labels, src, tgt)
    assert out.shape == (5, 20, 20)
    k, r, c = np.nonzero(out == 2)
    x = tgt.index_to_patient(k, r, c)[..., 0]
    assert x.min() >= 4.5 - 1e-6 and x.max() <= 14.5 + 1e-6   # voxel extents of label 2 in the source
    area1 = (out[2] == 1).sum() * 4.0
    assert area1 == pytest.approx(200.0, rel=0.15)


def test_same_grid_is_a_copy_and_other_frame_is_refused():
    src = vol((3, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = np.arange(3 * 64, dtype=np.uint8).reshape(3, 8, 8)
    np.testing.assert_array_equal(resample_labels(labels, src, src), labels)
    with pytest.raises(GeometryError, match="frames of reference"):
        resample_labels(labels, src, vol((3, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), for_uid="9.9"))
