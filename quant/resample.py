"""Moving label maps and images between the grids of two series of one frame of
reference (e.g. the Dixon segmentation onto the multi-echo spin-echo grid), by their
DICOM geometry, with SimpleITK.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import GeometryError
from .volume import Volume


def to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image with the geometry of ``volume`` (3-D array, (slice, row, column))."""
    arr = volume.array if array is None else array
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D array, got shape {arr.shape}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    dz, dy, dx = volume.spacing_mm
    img.SetSpacing((float(dx), float(dy), float(dz)))
    img.SetOrigin(tuple(float(v) for v in volume.origin_mm))
    direction = np.column_stack([volume.row_cosine, volume.column_cosine, volume.normal])
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img


def resample_labels(labels: np.ndarray, source: Volume, target: Volume) -> np.ndarray:
    """Nearest-neighbour resampling of a label map on ``source``'s grid onto ``target``'s grid.

    Raises
    ------
    GeometryError
        The two series are in different frames of reference.
    """
    if source.frame_of_reference_uid != target.frame_of_reference_uid:
        raise GeometryError("cannot carry a mask between frames of reference "
                            f"{source.frame_of_reference_uid} and {target.frame_of_reference_uid} "
                            "without registration")
    if source.same_grid(target) and labels.shape == target.array.shape[-3:]:
        return labels.copy()
    ref = to_sitk(target, np.zeros(target.array.shape[-3:], np.uint8))
    moving = to_sitk(source, labels)
    out = sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(labels.dtype)
