"""Follow-up visits of a phantom subject for registration tests: muscle compartments as
angular sectors between the phantom's septa, and patient repositioning as a known rigid
motion applied to every image and label map of a :class:`~quant.synthetic.phantom.LegPhantom`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..enums import SideLabel, Tissue
from .phantom import LegPhantom

#: Angles (rad) of the phantom's septa around each leg centre, mirrored per side.
SEPTA_RAD = (0.6, 2.3, 4.1)


def sector_compartments(phantom: LegPhantom) -> np.ndarray:
    """Compartment label map: muscle voxels labelled 1..3 by the sector between two septa
    they lie in (1: 0.6-2.3 rad, the sector fatty infiltration goes to; 2: 2.3-4.1 rad;
    3: the rest), angles around each leg's centre (the centroid of its side mask per slice).
    """
    nz, ny, nx = phantom.tissue.shape
    dz, dy, dx = phantom.spacing_mm
    y = phantom.origin_mm[1] + np.arange(ny)[:, None] * dy
    x = phantom.origin_mm[0] + np.arange(nx)[None, :] * dx
    out = np.zeros(phantom.tissue.shape, np.uint8)
    for k in range(nz):
        for code, sgn in ((SideLabel.RIGHT, -1.0), (SideLabel.LEFT, 1.0)):
            leg = phantom.side[k] == code
            if not leg.any():
                continue
            rr, cc = np.nonzero(leg)
            cy, cx = y[rr, 0].mean(), x[0, cc].mean()
            ang = np.mod(np.arctan2(y - cy, (x - cx) * sgn), 2 * np.pi)
            lab = np.where((ang >= SEPTA_RAD[0]) & (ang < SEPTA_RAD[1]), 1,
                           np.where((ang >= SEPTA_RAD[1]) & (ang < SEPTA_RAD[2]), 2, 3))
            mus = leg & (phantom.tissue[k] == Tissue.MUSCLE)
            out[k][mus] = lab[mus]
    return out


@dataclass(frozen=True, eq=False)
class Visit:
    """Images and truth label maps of one (repositioned) visit on the phantom's grid."""

    water: np.ndarray
    in_phase: np.ndarray
    tissue: np.ndarray
    side: np.ndarray
    compartment: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]


def _image(a: np.ndarray, phantom: LegPhantom) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(a))
    dz, dy, dx = phantom.spacing_mm
    img.SetSpacing((dx, dy, dz))
    img.SetOrigin(tuple(float(v) for v in phantom.origin_mm))
    return img


def reposition(phantom: LegPhantom, compartment: np.ndarray, *, shift_mm: tuple[float, float, float] = (0, 0, 0),
               rotation_deg: float = 0.0) -> Visit:
    """The phantom moved by ``shift_mm`` (x, y, z, patient coordinates) after a rotation of
    ``rotation_deg`` about the slice axis through the centre of the field of view; images
    resampled linearly, label maps by nearest neighbour, on the same grid.
    """
    motion = sitk.Euler3DTransform()
    motion.SetCenter((0.0, 0.0, float(phantom.origin_mm[2] + (phantom.tissue.shape[0] - 1)
                                      * phantom.spacing_mm[0] / 2)))
    motion.SetRotation(0.0, 0.0, float(np.deg2rad(rotation_deg)))
    motion.SetTranslation(tuple(float(v) for v in shift_mm))
    inverse = motion.GetInverse()

    def move(a: np.ndarray, labels: bool) -> np.ndarray:
        img = _image(a.astype(np.float32) if not labels else a.astype(np.uint8), phantom)
        interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        return sitk.GetArrayFromImage(sitk.Resample(img, img, inverse, interp, 0))

    return Visit(water=move(phantom.water, False), in_phase=move(phantom.in_phase, False),
                 tissue=move(phantom.tissue, True), side=move(phantom.side, True),
                 compartment=move(compartment, True), spacing_mm=phantom.spacing_mm,
                 origin_mm=phantom.origin_mm)
