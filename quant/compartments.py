"""Automatic compartments of the thigh and calf, from what the node already has.

No trained muscle model can be shipped with the node, so the compartments are found from
anatomy that every Dixon exam shows:

- **bone landmarks**: per leg and slice, the femur (thigh), or the tibia (the larger bone)
  and the fibula (the smaller; calf);
- **the muscle mask** of :func:`quant.segment.segment_legs`;
- **fascial septa and fat planes**: the intermuscular fat the segmentation leaves out of the
  muscle, and the fat fraction between compartments.

Per leg and slice, one marker per compartment is placed in the muscle along an anatomical
direction from the landmarks (patient coordinates, so left and right legs mirror: +x of
DICOM LPS is the patient's left, +y posterior):

- thigh: anterior (quadriceps and sartorius) in front of and lateral to the femur; medial
  (adductors and gracilis) towards the other leg and slightly posterior; posterior
  (hamstrings) behind the femur;
- calf: anterior in front of the line between tibia and fibula; lateral (peronei) outside the
  fibula; deep posterior just behind the tibia and fibula; superficial posterior (triceps
  surae) at the back of the leg.

The markers then grow over the muscle and the septa by a marker-controlled watershed
(SimpleITK ``MorphologicalWatershedFromMarkers``) on the fat fraction above
steps of :data:`FF_STEP` (flat within muscle; a ridge on the septa), so that the
boundaries between compartments follow the septa where the images show them and fall
midway (geodesically) between the markers where they do not. Only muscle voxels are labelled.

The result is an automatic ROI set (:class:`quant.analysis.RoiSet` with source
``automatic``): never a reader's ROIs, and never compared with them.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .analysis import RoiSet
from .enums import COMPARTMENTS, Region, Roi, RoiSource, SideLabel, Tissue
from .segment import Segmentation
from .volume import Volume, bounding_box

#: Radius (voxels) of the disc of muscle that seeds each compartment.
MARKER_RADIUS_VOX = 2.0
#: Where along the ray from the landmark to the fascia the marker sits (0: landmark, 1: fascia).
MARKER_DEPTH = 0.55
#: Steps of the fat fraction the watershed floods by (muscle is flat within a step; septa are fat).
FF_STEP = 0.02
#: Fewest muscle voxels of a leg in a slice for compartments to be placed there.
MIN_SLICE_VOXELS = 50


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(v[0], v[1]))
    return v / n if n > 0 else v


def _ray_grid(xy: np.ndarray) -> tuple[float, float, float, float, float, float, float]:
    """What :func:`_ray_point` needs of a slice's pixel positions (``xy``: patient x, y of every
    pixel), once per slice: the ray's step, the pixel size along patient x and y, the first
    pixel's position and the directions of columns and rows along x and y.
    """
    step = 0.5 * float(np.min(np.abs(np.diff(xy[..., 0], axis=1)))) or 0.5
    dx = float(np.abs(xy[0, 1, 0] - xy[0, 0, 0])) or 1.0
    dy = float(np.abs(xy[1, 0, 1] - xy[0, 0, 1])) or 1.0
    sx = 1.0 if xy[0, -1, 0] >= xy[0, 0, 0] else -1.0
    sy = 1.0 if xy[-1, 0, 1] >= xy[0, 0, 1] else -1.0
    return step, dx, dy, float(xy[0, 0, 0]), float(xy[0, 0, 1]), sx, sy


def _ray_point(start: np.ndarray, direction: np.ndarray, inside: np.ndarray, grid: tuple[float, ...],
               depth: float) -> np.ndarray:
    """The point ``depth`` of the way from ``start`` along ``direction`` to where the ray
    leaves ``inside`` (patient mm; ``grid`` of :func:`_ray_grid`).

    The ray is walked in steps of half a pixel until it leaves the image or is well past
    the last point inside; every step at once (the steps summed one by one, as a walk would).
    """
    step, dx, dy, x0, y0, sx, sy = grid
    limit = 4.0 * max(inside.shape) * max(dx, dy)
    t = np.concatenate([[0.0], np.cumsum(np.full(int(limit / step) + 2, step))])
    t = t[t < limit]
    p0 = start[0] + t * direction[0]
    p1 = start[1] + t * direction[1]
    c = np.rint((p0 - x0) / (dx * sx))
    r = np.rint((p1 - y0) / (dy * sy))
    ok = (r >= 0) & (r < inside.shape[0]) & (c >= 0) & (c < inside.shape[1])
    n = int(np.argmin(ok)) if not ok.all() else ok.size   # the walk stops where it leaves the image
    hit = inside[r[:n].astype(np.intp), c[:n].astype(np.intp)]
    last = np.maximum.accumulate(np.where(hit, t[:n], 0.0)) if n else t[:0]
    past = ~hit & (t[:n] > last + 6.0 * max(dx, dy))     # ... or well past the leg's edge
    if past.any():
        n = int(np.argmax(past))
    end = float(last[n - 1]) if n else 0.0
    return start + depth * end * direction


def _markers(targets: list[np.ndarray], muscle: np.ndarray, xy: np.ndarray, pixel_mm: float) -> np.ndarray:
    """A label image with a small disc of muscle around each target (label = index + 1)."""
    out = np.zeros(muscle.shape, np.uint8)
    ys, xs = np.nonzero(muscle)
    if ys.size == 0:
        return out
    pts = xy[ys, xs]
    for lab, target in enumerate(targets, start=1):
        d = np.hypot(pts[:, 0] - target[0], pts[:, 1] - target[1])
        near = d <= max(d.min(), 0.0) + MARKER_RADIUS_VOX * pixel_mm
        free = out[ys[near], xs[near]] == 0
        out[ys[near][free], xs[near][free]] = lab
    return out


def _targets(region: Region, leg: np.ndarray, bones: list[np.ndarray], xy: np.ndarray, lateral: float,
             inner: np.ndarray, grid: tuple[float, ...]) -> list[np.ndarray] | None:
    """Marker positions (patient x, y) of each compartment of one leg in one slice, in the
    order of :data:`quant.enums.COMPARTMENTS`; None where the landmarks are missing.
    """
    ys, xs = np.nonzero(leg)
    centre = xy[ys, xs].mean(axis=0)
    anterior = np.array([0.0, -1.0])
    out = np.array([lateral, 0.0])
    if region is Region.THIGH:
        femur = bones[0] if bones else centre
        dirs = [_unit(anterior + 0.35 * out), _unit(-out + 0.45 * -anterior), _unit(-anterior + 0.25 * out)]
        return [_ray_point(femur, d, inner, grid, MARKER_DEPTH) for d in dirs]
    if len(bones) < 2:
        return None
    tibia, fibula = bones[0], bones[1]
    mid = 0.5 * (tibia + fibula)
    axis = _unit(fibula - tibia)                       # across the interosseous membrane
    normal = np.array([-axis[1], axis[0]])
    if normal @ anterior < 0:
        normal = -normal                               # the membrane's anterior normal
    gap = float(np.hypot(*(fibula - tibia)))
    return [
        _ray_point(mid, normal, inner, grid, 0.45),                          # anterior
        _ray_point(fibula, _unit(out + 0.2 * anterior), inner, grid, 0.5),  # lateral, around the fibula
        _ray_point(centre, -anterior, inner, grid, 0.6),                     # triceps surae
        mid - normal * 0.35 * gap,                                         # deep posterior
    ]


def _flood_box(region: np.ndarray, markers: np.ndarray) -> tuple[slice, slice]:
    """Where the watershed of one leg's slice needs to run: the box around ``region`` with a
    margin of one pixel, when every 8-connected piece of ``region`` holds a marker; else the
    whole slice.

    The flooding (lowest level first) labels all of a piece that holds a marker before it
    reaches the wall of level 2 around the region, so the box gives those pixels the labels
    the whole slice gives; a piece without a marker is reached over the wall, whose extent
    the box would change.
    """
    whole = (slice(0, region.shape[0]), slice(0, region.shape[1]))
    pieces, n = ndi.label(region, structure=np.ones((3, 3), bool))
    if n == 0 or np.setdiff1d(np.arange(1, n + 1), pieces[markers > 0]).size:
        return whole
    box = bounding_box(region, margin=1)
    return box[0], box[1]


def automatic_compartments(seg: Segmentation, ff: np.ndarray, anatomy: Volume) -> RoiSet | None:
    """Compartments of the thigh or calf muscle of each leg (see the module docstring).

    Parameters
    ----------
    seg : Segmentation
        Tissue and side maps of the study (on the grid of ``anatomy``).
    ff : ndarray of float
        Fat fraction 0..1 (NaN without signal), same grid.
    anatomy : Volume
        The volume segmented: its geometry gives patient directions.

    Returns
    -------
    RoiSet or None
        Labels 1..n for :data:`quant.enums.COMPARTMENTS` of the region (source
        ``automatic``); None for a region without compartments here (``leg``, hand, ...).
    """
    if seg.region not in COMPARTMENTS:
        return None
    rois: tuple[Roi, ...] = COMPARTMENTS[seg.region]
    tissue, side = seg.tissue, seg.side
    nz, ny, nx = tissue.shape
    labels = np.zeros(tissue.shape, np.uint8)
    # the fat fraction in steps of FF_STEP: flat in muscle, so that flooding from the markers
    # is geodesic there (ITK floods a level first in, first out) rather than driven by the
    # noise of the FF, and a ridge on the septa, partial-volume septa voxels included
    elevation_all = np.floor(np.clip(np.nan_to_num(np.asarray(ff, dtype=np.float32), nan=1.0), 0.0, 1.0)
                             / FF_STEP) * FF_STEP
    pixel_mm = float(np.sqrt(anatomy.pixel_area_mm2))
    rr, cc = np.arange(ny)[:, None], np.arange(nx)   # broadcast by index_to_patient
    for k in range(nz):
        xy = anatomy.index_to_patient(k, rr, cc)[..., :2]
        grid = _ray_grid(xy)
        for code in (SideLabel.RIGHT, SideLabel.LEFT, SideLabel.NONE):
            leg = (side[k] == code) & (tissue[k] > 0)
            muscle = leg & (tissue[k] == Tissue.MUSCLE)
            if muscle.sum() < MIN_SLICE_VOXELS:
                continue
            inner = leg & np.isin(tissue[k], (Tissue.MUSCLE, Tissue.INTERMUSCULAR_FAT, Tissue.BONE))
            bone_lab, n_bones = ndi.label(leg & (tissue[k] == Tissue.BONE))
            sizes = ndi.sum(np.ones_like(bone_lab), bone_lab, index=np.arange(1, n_bones + 1))
            order = np.argsort(sizes)[::-1]
            bones = [xy[bone_lab == i + 1].mean(axis=0) for i in order if sizes[i] >= 4]
            centre = xy[leg].mean(axis=0)
            # lateral: away from the body's midline (the other leg); one leg alone: from patient x
            lateral = {SideLabel.RIGHT: -1.0, SideLabel.LEFT: 1.0}.get(SideLabel(code), float(np.sign(centre[0]) or 1))
            targets = _targets(seg.region, leg, bones, xy, lateral, inner, grid)
            if targets is None:
                continue
            markers = _markers(targets, muscle, xy, pixel_mm)
            if len(np.unique(markers)) - 1 < len(rois):
                continue
            region = muscle | (inner & (tissue[k] == Tissue.INTERMUSCULAR_FAT))
            box = _flood_box(region, markers)
            elevation = np.where(region[box], elevation_all[k][box], 2.0).astype(np.float32)
            grown = sitk.MorphologicalWatershedFromMarkers(
                sitk.GetImageFromArray(elevation), sitk.GetImageFromArray(np.ascontiguousarray(markers[box])),
                markWatershedLine=False, fullyConnected=True)
            lab = sitk.GetArrayFromImage(grown)
            labels[k][box][muscle[box]] = lab[muscle[box]]
    if not labels.any():
        return None
    return RoiSet(labels=labels, names={i + 1: r.value for i, r in enumerate(rois)}, source=RoiSource.AUTOMATIC)
