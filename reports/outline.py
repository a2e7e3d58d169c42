"""The key slice of a study and the outline of a mask on it, for planar ROIs (TID 1410)
that a viewer draws on one source image, and for the pictures of the summary page.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import contourpy
import numpy as np

from quant.enums import Tissue
from quant.pipeline import StudyAnalysis

if TYPE_CHECKING:
    from .seg import Masks


def key_slice(muscle: np.ndarray, required: Iterable[np.ndarray] = (), *, within: float = 0.05) -> int:
    """The key slice: among the slices where every mask of ``required`` has a voxel (all
    slices where none has them all), those whose muscle area is within ``within`` (a
    fraction) of the largest, and of those the one nearest the middle of the stack (the end
    slice of a tapering thigh is often the largest, and the least typical).

    Parameters
    ----------
    muscle : ndarray of bool, (slices, rows, columns)
    required : masks of the same shape (e.g. each ROI on each side)
    """
    muscle = np.asarray(muscle, dtype=bool)
    if muscle.ndim != 3 or muscle.shape[0] == 0:
        raise ValueError(f"muscle must be a non-empty 3-D mask, got shape {muscle.shape}")
    area = muscle.sum(axis=(1, 2)).astype(np.int64)
    present = np.ones(muscle.shape[0], dtype=bool)
    for mask in required:
        present &= np.asarray(mask, dtype=bool).any(axis=(1, 2))
    if present.any():
        area = np.where(present, area, -1)
    near = np.flatnonzero(area >= (1.0 - within) * area.max())
    return int(near[np.argmin(np.abs(near - (len(area) - 1) / 2))])


def study_key_slice(analysis: StudyAnalysis, masks: Masks | None = None) -> int:
    """The key slice of a study (:func:`key_slice` of its muscle, with every ROI on each side
    required): the slice the SR's planar groups and the summary page show (``masks``: those of
    ``analysis`` made so far, see :class:`reports.seg.Masks`).
    """
    from .seg import Masks, roi_segment_numbers
    masks = masks or Masks(analysis)
    required = [masks.roi(label, side) for label, side in roi_segment_numbers(analysis, masks)]
    return key_slice(analysis.segmentation.tissue == Tissue.MUSCLE, required)


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def outline(mask: np.ndarray) -> np.ndarray | None:
    """The outer boundary of the largest connected part of a 2-D mask, as a closed polyline.

    The line runs half-way between the mask's edge pixels and their outside neighbours
    (the 0.5 iso-line of the mask). Points are ``(column, row)`` in DICOM image
    coordinates (SCOORD: the top-left corner of the top-left pixel is (0, 0), so a pixel's
    centre is at index + 0.5); the last point repeats the first. Holes and smaller parts
    are left out: a viewer draws one closed line per ROI.

    Returns
    -------
    ndarray of float32, (n, 2), or None
        None where the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.float64), 1)   # every line closes inside the padding
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    closed = [np.asarray(line, dtype=np.float64) for line in lines if len(line) >= 4]
    if not closed:
        return None
    best = max(closed, key=lambda line: abs(_signed_area(line)))
    points = best - 1.0 + 0.5   # undo the padding; pixel centres at index + 0.5
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points.astype(np.float32)
