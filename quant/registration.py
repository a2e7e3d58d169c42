"""Carrying a reader's ROI set from one visit of a subject to another by image registration.

The ROIs (an integer label map) were drawn on the ``moving`` visit's image (Dixon water or
in-phase); they are carried onto the ``fixed`` visit's grid by a transform found with
SimpleITK in three stages:

1. rigid (:class:`SimpleITK.Euler3DTransform`), started from the centres of mass of the
   leg masks (so several centimetres of table shift need no search) and from the best of
   a coarse search over the angle about the slice axis (a leg is nearly elliptical: a
   descent alone recovered 3-6 of 10 degrees);
2. affine, started from the rigid result (muscle that got thinner, a leg that lies
   differently in the coil);
3. a coarse B-spline deformation (:data:`BSPLINE_MESH` control-point intervals) whose
   metric sees only the outlines that do not change (skin, subcutaneous fat, fascia,
   bone, the muscle's rim), so fatty infiltration inside the muscle cannot pull the ROIs.

All stages are in-plane (:data:`IN_PLANE_ONLY`) and run on in-plane pyramids. The metric
is normalised correlation inside the leg's mask (:data:`METRIC`: why not mutual
information is written there).

Where side label maps are given and both visits have both legs, each leg is registered on
its own: the fixed image is cropped to the leg with a margin and a metric mask keeps the
other leg out, so one leg's motion (legs closer or further apart) does not pull the
other. A leg's ROIs are carried by that leg's transform only, onto that leg's side.

Labels are carried by linear interpolation of each label's indicator and an arg-max
(:data:`LABEL_INTERPOLATION`). When the fixed visit's automatic muscle mask is given,
carried labels are restricted to it (ROIs belong on muscle) and muscle left unlabelled
within :data:`FILL_MM` of a carried label takes the nearest label.

Quality: ``dice_muscle`` is the Dice of the union of the carried labels (before the
restriction) with the fixed visit's muscle mask; ``mismatch`` is ``1 - NCC`` of the fixed
image and the registered moving image in the fixed legs, leaving out the muscle interior
(:data:`MISMATCH_RIM_MM`). A carried set needs review when ``dice_muscle < REVIEW_DICE`` or
``mismatch > REVIEW_MISMATCH``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .enums import Side, SideLabel
from .resample import to_sitk
from .volume import Volume

#: Threads SimpleITK may use (the node runs on 2 cores).
THREADS = 2

#: The metric: "correlation" (normalised cross-correlation inside the leg's mask) or "mattes"
#: (Mattes mutual information, MI_BINS bins). Measured on the phantom (2.5 mm, 8 slices):
#: Mattes MI drifts at full resolution (an affine started at the identity shrank the leg to
#: 0.75-0.97) and turned one leg's compartments by a sector in the repositioning cases (CSA
#: errors of 40-85 %); correlation keeps the identity (scale 1.000). The per-leg crop keeps
#: the coil bias nearly linear within a leg, where correlation is valid.
METRIC = "correlation"
MI_BINS = 32

#: Fraction of the voxels in the metric mask sampled per iteration (random, fixed seed).
SAMPLING_FRACTION = 0.25
SAMPLING_SEED = 17

#: Rigid stage: pyramid shrink factors and smoothing sigmas (in-plane voxels of the shrunk
#: grid), iterations and largest step (mm) of a regular-step gradient descent with
#: parameter scales from physical shift.
RIGID_SHRINK = (2, 1)
RIGID_SMOOTH = (1.0, 0.0)
RIGID_ITERATIONS = 60
RIGID_STEP_MM = 4.0

#: Angles (degrees about the slice axis) tried before the rigid descent, at shrink
#: ROTATION_SEARCH_SHRINK without smoothing; the best by the metric starts the descent
#: (empty: no search). Smoothed coarse levels flatten the optimum away from the true angle.
ROTATION_SEARCH_DEG = tuple(float(a) for a in range(-20, 21, 2))
ROTATION_SEARCH_SHRINK = 2

#: Affine stage, started from the rigid transform.
AFFINE_SHRINK = (2, 1)
AFFINE_SMOOTH = (1.0, 0.0)
AFFINE_ITERATIONS = 50
AFFINE_STEP_MM = 2.0

#: B-spline stage: control-point mesh (intervals along x, y, z of the leg's crop), pyramid,
#: iterations and largest step (mm) of a regular-step gradient descent (coefficients are
#: displacements in mm: no scale estimation). It ends at half resolution: the mesh is
#: coarse (about 4 cm between control points), and the full-resolution level tripled the time
#: (12 s of 15 s at 20 x 160 x 256) without a better CSA.
BSPLINE_MESH = (4, 4, 1)
BSPLINE_SHRINK = (4, 2)
BSPLINE_SMOOTH = (1.0, 0.0)
BSPLINE_ITERATIONS = 20
BSPLINE_STEP_MM = 1.0

#: The B-spline stage's metric leaves out the fixed visit's muscle deeper than this (mm)
#: when its muscle mask is given (with the whole leg, a compartment 30 % fattier shrank
#: its carried ROI by 8 %).
BSPLINE_INTERIOR_MM = 5.0

#: Register in-plane only (rotation about the slice axis, in-plane translation, scaling and
#: shear, in-plane B-spline displacement): a stack of 8-20 thick (5-6 mm) axial slices
#: hardly constrains through-plane motion, and set free the optimiser traded the slices at
#: the ends of the stack for a better score (a 3-D affine drifted to scales of 0.8).
IN_PLANE_ONLY = True

#: Margin (mm) around a leg's mask for its crop and metric mask (skin outline inside it).
LEG_MARGIN_MM = 12.0

#: The mismatch leaves out the fixed visit's muscle deeper than this (mm) when its muscle
#: mask is given: fat infiltration is real change, not a registration error.
MISMATCH_RIM_MM = 5.0

#: Muscle voxels of the fixed visit left unlabelled within this distance (mm, in-plane) of
#: a carried label take the nearest label on the same side (0 turns this off): the rim a
#: registration residual of a voxel or two leaves at the outline (without it carried CSA
#: was 1-4 % low).
FILL_MM = 3.0

#: How labels are resampled: "onehot" (linear per label, arg-max; a label needs more than
#: half a voxel) or "nearest".
LABEL_INTERPOLATION = "onehot"

#: Review thresholds: a carried ROI set whose union overlaps the fixed visit's automatic
#: muscle mask with a Dice below REVIEW_DICE (on either leg), or whose residual mismatch
#: exceeds REVIEW_MISMATCH, needs a reader's review. Measured on the phantom: correct
#: carries (up to 3 cm, 10 degrees, legs 15 mm closer, muscle 10 % thinner, a compartment
#: 50 % fattier) Dice 0.93-0.97 and mismatch 0.07-0.18; a thigh carried onto a calf Dice
#: 0.82-0.86 and mismatch 0.27-0.32. The Dice is for a set that covers the region's muscle
#: (compartments: at least FULL_COVER_CARRY of it once carried); for a partial set (a few
#: muscles) the figure is the share of the carried ROIs on the visit's muscle instead.
REVIEW_DICE = 0.90
REVIEW_MISMATCH = 0.25
FULL_COVER_CARRY = 0.8


@dataclass(frozen=True, eq=False)
class CarriedRois:
    """An ROI set carried onto another visit, with its registration quality.

    Attributes
    ----------
    labels : ndarray
        The carried label map on the fixed visit's grid (same dtype as the input labels).
    dice_muscle : float or None
        Dice of the union of the carried labels (before restriction to muscle) with the
        fixed visit's muscle mask; None when no muscle mask was given.
    dice_by_side : dict
        The same Dice per :class:`~quant.enums.Side` (legs registered separately).
    mismatch : float
        Residual image mismatch: ``1 - NCC`` of the fixed image and the registered moving
        image in the fixed legs (body), leaving out muscle deeper than :data:`MISMATCH_RIM_MM`
        when a muscle mask is given (0 = identical up to a linear intensity change).
    seconds : float
        Wall time of the registration and carrying.
    stage_seconds : dict
        Seconds of each stage ("rigid", "affine", "bspline", "labels"), summed over legs.
    needs_review : bool
        ``dice_muscle < REVIEW_DICE`` or ``mismatch > REVIEW_MISMATCH``.
    """

    labels: np.ndarray
    dice_muscle: float | None
    mismatch: float
    seconds: float
    needs_review: bool
    dice_by_side: dict[Side, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / total if total else 1.0


def _precision(carried: np.ndarray, muscle: np.ndarray) -> float:
    """Share of the carried ROI voxels that lie on the muscle (1.0 without carried voxels)."""
    n = int(carried.sum())
    return float((carried & muscle).sum()) / n if n else 1.0


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _mask_image(ref: Volume, mask: np.ndarray) -> sitk.Image:
    return to_sitk(ref, mask.astype(np.uint8))


def _dilate_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float], mm: float) -> np.ndarray:
    """In-plane dilation by about ``mm`` (slices stay slices)."""
    r = max(1, int(round(mm / min(spacing_mm[1], spacing_mm[2]))))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = ((yy * spacing_mm[1]) ** 2 + (xx * spacing_mm[2]) ** 2 <= mm * mm)[None]
    return ndi.binary_dilation(mask, structure=disk)


def _interior(muscle: np.ndarray, spacing_mm: tuple[float, float, float], mm: float) -> np.ndarray:
    """Muscle deeper than ``mm`` (in-plane) inside the muscle mask."""
    return ~_dilate_mm(~muscle.astype(bool), spacing_mm, mm)


def _crop(img: sitk.Image, mask: np.ndarray) -> sitk.Image:
    """The region of ``img`` inside the bounding box of ``mask`` (array order z, y, x)."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    size = [int(v) for v in (hi - lo)[::-1]]
    start = [int(v) for v in lo[::-1]]
    return sitk.RegionOfInterest(img, size, start)


def _method(fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if METRIC == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=MI_BINS)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING_FRACTION, SAMPLING_SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    return reg


def _level(img: sitk.Image, shrink: int, sigma: float, mask: bool = False) -> sitk.Image:
    """One pyramid level: smoothed (``sigma`` in voxels of the shrunk grid) and shrunk, in-plane
    only, since slices are few and thick.
    """
    if mask:
        return sitk.Shrink(img, [shrink, shrink, 1]) if shrink > 1 else img
    if sigma > 0:
        sp = img.GetSpacing()
        var = [(sigma * shrink * sp[0]) ** 2, (sigma * shrink * sp[1]) ** 2, 0.0]
        img = sitk.DiscreteGaussian(img, var, 32, 0.01, True)
    return sitk.Shrink(img, [shrink, shrink, 1]) if shrink > 1 else img


def _weights(transform: sitk.Transform) -> list[float] | None:
    """Optimizer weights that freeze the through-plane parameters (see :data:`IN_PLANE_ONLY`)."""
    if not IN_PLANE_ONLY:
        return None
    n = transform.GetNumberOfParameters()
    if isinstance(transform, sitk.Euler3DTransform):      # rx, ry, rz, tx, ty, tz
        return [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    if isinstance(transform, sitk.AffineTransform):       # 3 x 3 matrix row by row, then tx, ty, tz
        return [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    if isinstance(transform, sitk.BSplineTransform):      # x coefficients, y coefficients, z coefficients
        return [1.0] * (2 * n // 3) + [0.0] * (n // 3)
    return None


def _run(setup: Callable[[sitk.ImageRegistrationMethod], None], transform: sitk.Transform,
         shrink: tuple[int, ...], smooth: tuple[float, ...], fixed: sitk.Image, moving: sitk.Image,
         fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
         moving_initial: sitk.Transform | None = None) -> None:
    """Optimise ``transform`` in place, level by level on in-plane pyramids."""
    for f, s in zip(shrink, smooth, strict=True):
        reg = _method(_level(fixed_mask, f, 0, True) if fixed_mask is not None else None,
                      _level(moving_mask, f, 0, True) if moving_mask is not None else None)
        setup(reg)
        if moving_initial is not None:
            reg.SetMovingInitialTransform(moving_initial)
        reg.SetInitialTransform(transform, inPlace=True)
        weights = _weights(transform)
        if weights is not None:
            reg.SetOptimizerWeights(weights)
        reg.Execute(_level(fixed, f, s), _level(moving, f, s))


def _gradient_descent(step_mm: float, iterations: int,
                      estimate_scales: bool = True) -> Callable[[sitk.ImageRegistrationMethod], None]:
    """Regular-step gradient descent; parameter scales from physical shift (rigid, affine), or
    none for B-spline coefficients, which are displacements in mm already (estimating the scales
    of its hundreds of parameters costs more than the optimisation).
    """
    def setup(reg: sitk.ImageRegistrationMethod) -> None:
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step_mm, minStep=0.01,
                                                     numberOfIterations=iterations, relaxationFactor=0.6,
                                                     gradientMagnitudeTolerance=1e-6)
        if estimate_scales:
            reg.SetOptimizerScalesFromPhysicalShift()
    return setup


def _search_rotation(rigid: sitk.Euler3DTransform, fixed: sitk.Image, moving: sitk.Image,
                     fixed_mask: sitk.Image | None) -> None:
    """Set the in-plane angle of ``rigid`` to the best of a search over :data:`ROTATION_SEARCH_DEG`
    (a leg is nearly elliptical: gradient descent alone recovers only part of 10 degrees).
    """
    if not ROTATION_SEARCH_DEG:
        return
    f, m = _level(fixed, ROTATION_SEARCH_SHRINK, 0.0), _level(moving, ROTATION_SEARCH_SHRINK, 0.0)
    mask = _level(fixed_mask, ROTATION_SEARCH_SHRINK, 0, True) if fixed_mask is not None else None
    reg = _method(mask, None)
    params = list(rigid.GetParameters())
    best, best_angle = np.inf, params[2]
    for deg in ROTATION_SEARCH_DEG:
        trial = sitk.Euler3DTransform(rigid)
        trial.SetParameters(params[:2] + [params[2] + float(np.deg2rad(deg))] + params[3:])
        reg.SetInitialTransform(trial)
        value = reg.MetricEvaluate(f, m)
        if value < best:
            best, best_angle = value, params[2] + float(np.deg2rad(deg))
    rigid.SetParameters(params[:2] + [best_angle] + params[3:])


def _register(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None,
              moving_mask: sitk.Image | None, bspline: bool, times: dict[str, float],
              moving_leg: sitk.Image | None = None, bspline_mask: sitk.Image | None = None) -> sitk.Transform:
    """Rigid, affine and (optionally) B-spline registration: the transform from fixed to moving points."""
    t0 = time.perf_counter()
    if fixed_mask is not None and moving_leg is not None:
        init = sitk.CenteredTransformInitializer(sitk.Cast(fixed_mask, sitk.sitkFloat32),
                                                 sitk.Cast(moving_leg, sitk.sitkFloat32),
                                                 sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
    else:
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid = sitk.Euler3DTransform(init)
    _search_rotation(rigid, fixed, moving, fixed_mask)
    _run(_gradient_descent(RIGID_STEP_MM, RIGID_ITERATIONS), rigid, RIGID_SHRINK, RIGID_SMOOTH,
         fixed, moving, fixed_mask, moving_mask)
    t1 = time.perf_counter()
    times["rigid"] = times.get("rigid", 0.0) + t1 - t0

    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    _run(_gradient_descent(AFFINE_STEP_MM, AFFINE_ITERATIONS), affine, AFFINE_SHRINK, AFFINE_SMOOTH,
         fixed, moving, fixed_mask, moving_mask)
    t2 = time.perf_counter()
    times["affine"] = times.get("affine", 0.0) + t2 - t1
    if not bspline:
        return affine

    mesh = sitk.BSplineTransformInitializer(fixed, list(BSPLINE_MESH), order=3)
    _run(_gradient_descent(BSPLINE_STEP_MM, BSPLINE_ITERATIONS, False), mesh, BSPLINE_SHRINK, BSPLINE_SMOOTH,
         fixed, moving, bspline_mask if bspline_mask is not None else fixed_mask, moving_mask,
         moving_initial=affine)
    times["bspline"] = times.get("bspline", 0.0) + time.perf_counter() - t2
    return sitk.CompositeTransform([affine, mesh])


def _carry_labels(labels: np.ndarray, moving_vol: Volume, ref: sitk.Image, transform: sitk.Transform,
                  values: list[int]) -> np.ndarray:
    """Labels ``values`` of a map on the moving grid, carried onto the grid of ``ref``."""
    if LABEL_INTERPOLATION == "nearest":
        img = to_sitk(moving_vol, labels.astype(np.int32))
        out = sitk.Resample(img, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        arr = sitk.GetArrayFromImage(out)
        return np.where(np.isin(arr, values), arr, 0)
    best = np.full(sitk.GetArrayViewFromImage(ref).shape, 0.5, np.float32)  # a label needs > 1/2
    out_arr = np.zeros(best.shape, np.int32)
    for v in values:
        img = to_sitk(moving_vol, (labels == v).astype(np.float32))
        p = sitk.GetArrayFromImage(sitk.Resample(img, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        win = p > best
        out_arr[win] = v
        best[win] = p[win]
    return out_arr


def _fill(labels: np.ndarray, muscle: np.ndarray, spacing_mm: tuple[float, float, float],
          side: np.ndarray | None) -> np.ndarray:
    """Muscle voxels without a label, within :data:`FILL_MM` in-plane of a label on the same
    side, take the nearest label (the rim a registration residual leaves at the outline).
    """
    if FILL_MM <= 0:
        return labels
    out = labels.copy()
    for k in range(labels.shape[0]):
        gap = muscle[k] & (labels[k] == 0)
        if not gap.any() or not labels[k].any():
            continue
        dist, (iy, ix) = ndi.distance_transform_edt(labels[k] == 0, sampling=spacing_mm[1:], return_indices=True)
        near = labels[k][iy, ix]
        take = gap & (dist <= FILL_MM)
        if side is not None:
            take &= side[k][iy, ix] == side[k]
        out[k][take] = near[take]
    return out


def _paste(big: np.ndarray, ref_full: sitk.Image, part: sitk.Image, arr: np.ndarray) -> None:
    """Write ``arr`` (on the grid of ``part``, a region of ``ref_full``) into ``big``."""
    start = ref_full.TransformPhysicalPointToIndex(part.GetOrigin())
    z0, y0, x0 = start[2], start[1], start[0]
    nz, ny, nx = arr.shape
    big[z0:z0 + nz, y0:y0 + ny, x0:x0 + nx] = arr


def carry_rois(moving: Volume, moving_rois: np.ndarray, fixed: Volume, *,
               moving_body: np.ndarray | None = None, fixed_body: np.ndarray | None = None,
               moving_side: np.ndarray | None = None, fixed_side: np.ndarray | None = None,
               fixed_muscle: np.ndarray | None = None, bspline: bool = True) -> CarriedRois:
    """Carry an ROI label map from one visit onto another by registration.

    Parameters
    ----------
    moving : Volume
        3-D image (Dixon water or in-phase) of the visit the ROIs were drawn on.
    moving_rois : ndarray
        Integer label map on ``moving``'s grid, 0 = no ROI.
    fixed : Volume
        3-D image of the same kind of the visit to carry the ROIs to.
    moving_body, fixed_body : ndarray, optional
        Body masks of each visit; they bound the metric and the mismatch.
    moving_side, fixed_side : ndarray, optional
        Side label maps (:class:`~quant.enums.SideLabel`) of each visit; when both show
        both legs, each leg is registered on its own.
    fixed_muscle : ndarray, optional
        The fixed visit's automatic muscle mask: carried labels are restricted to it, and
        the Dice quality figure is computed against it.
    bspline : bool
        Add the B-spline stage after rigid and affine.

    Returns
    -------
    CarriedRois
        Labels on ``fixed``'s grid with the quality figures.

    Raises
    ------
    ValueError
        An image is not 3-D, or the ROI map does not fit the moving image.

    Notes
    -----
    The transform is in-plane (:data:`IN_PLANE_ONLY`): slice k of the fixed visit receives
    the ROIs of the moving visit at the same patient z. The two visits' frames of reference
    need not match; their grids may differ.
    """
    t_start = time.perf_counter()
    if moving.array.ndim != 3 or fixed.array.ndim != 3:
        raise ValueError("carry_rois needs 3-D images")
    if moving_rois.shape != moving.array.shape:
        raise ValueError(f"ROI map shape {moving_rois.shape} does not fit the moving image {moving.array.shape}")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(THREADS)
    fixed_img = to_sitk(fixed, fixed.array.astype(np.float32))
    moving_img = to_sitk(moving, moving.array.astype(np.float32))
    times: dict[str, float] = {}
    out = np.zeros(fixed.array.shape, np.int32)
    warped = np.zeros(fixed.array.shape, np.float32)
    covered = np.zeros(fixed.array.shape, bool)   # voxels where the mismatch is computed

    legs: list[tuple[int, np.ndarray | None, np.ndarray | None]] = []
    if moving_side is not None and fixed_side is not None:
        codes = [c for c in (SideLabel.RIGHT, SideLabel.LEFT)
                 if (moving_side == c).any() and (fixed_side == c).any()]
        if len(codes) == 2:
            legs = [(int(c), moving_side == c, fixed_side == c) for c in codes]
    if not legs:
        legs = [(0, moving_body, fixed_body)]

    for code, m_mask, f_mask in legs:
        if f_mask is not None and m_mask is not None:
            f_region = _dilate_mm(f_mask, fixed.spacing_mm, LEG_MARGIN_MM)
            m_region = _dilate_mm(m_mask, moving.spacing_mm, LEG_MARGIN_MM)
            if code:   # keep the other leg out of the metric
                other_f = (fixed_side != code) & (fixed_side != 0) if fixed_side is not None else None
                other_m = (moving_side != code) & (moving_side != 0) if moving_side is not None else None
                if other_f is not None:
                    f_region &= ~other_f
                if other_m is not None:
                    m_region &= ~other_m
            f_crop = _crop(fixed_img, f_region)
            f_mask_img = _crop(_mask_image(fixed, f_region), f_region)
            b_mask_img = None
            if fixed_muscle is not None and BSPLINE_INTERIOR_MM > 0:
                outline = f_region & ~_interior(fixed_muscle, fixed.spacing_mm, BSPLINE_INTERIOR_MM)
                b_mask_img = _crop(_mask_image(fixed, outline), f_region)
            m_leg_img = _mask_image(moving, m_region)
            m_mask_img = None   # a moving mask let the metric drop hard voxels: the affine drifted
        else:
            f_region = np.ones(fixed.array.shape, bool)
            f_crop, f_mask_img, m_mask_img, m_leg_img, b_mask_img = fixed_img, None, None, None, None
        transform = _register(f_crop, moving_img, f_mask_img, m_mask_img, bspline, times, m_leg_img, b_mask_img)

        t0 = time.perf_counter()
        rois = moving_rois if m_mask is None or not code else np.where(m_mask, moving_rois, 0)
        values = sorted(int(v) for v in np.unique(rois) if v != 0)
        part = _carry_labels(rois, moving, f_crop, transform, values)
        w = sitk.GetArrayFromImage(sitk.Resample(moving_img, f_crop, transform, sitk.sitkLinear, 0.0,
                                                 sitk.sitkFloat32))
        part_region = sitk.GetArrayFromImage(_crop(_mask_image(fixed, f_region), f_region)).astype(bool) \
            if f_mask is not None and m_mask is not None else np.ones(part.shape, bool)
        if code and fixed_side is not None:
            mine = np.zeros(fixed.array.shape, np.uint8)
            mine[fixed_side == code] = 1
            part_side = sitk.GetArrayFromImage(_crop(_mask_image(fixed, mine.astype(bool)), f_region)) \
                if f_mask is not None else mine
            part = np.where(part_side.astype(bool), part, 0)
        big_part = np.zeros(fixed.array.shape, np.int32)
        big_w = np.zeros(fixed.array.shape, np.float32)
        big_reg = np.zeros(fixed.array.shape, bool)
        _paste(big_part, fixed_img, f_crop, part)
        _paste(big_w, fixed_img, f_crop, w)
        _paste(big_reg, fixed_img, f_crop, part_region)
        out = np.where(big_part > 0, big_part, out)
        warped = np.where(big_reg, big_w, warped)
        covered |= big_reg
        times["labels"] = times.get("labels", 0.0) + time.perf_counter() - t0

    body = fixed_body if fixed_body is not None else None
    where = covered & body if body is not None else covered
    if fixed_side is not None and len(legs) == 2:
        where &= fixed_side > 0
    if fixed_muscle is not None:   # the outlines, not the muscle inside, whose FF may change
        where &= ~_interior(fixed_muscle, fixed.spacing_mm, MISMATCH_RIM_MM)
    mismatch = 1.0 - _ncc(fixed.array[where], warped[where]) if where.any() else 1.0

    dice: float | None = None
    by_side: dict[Side, float] = {}
    labels = out
    if fixed_muscle is not None:
        muscle = fixed_muscle.astype(bool)
        carried = out > 0
        # A set that covers the muscle (compartments): Dice with it. A partial set (a few
        # muscles): the share of the carried ROIs that lies on muscle, and no gap filling,
        # which would grow the ROIs into the neighbouring muscle.
        full = muscle.any() and float((carried & muscle).sum()) / float(muscle.sum()) >= FULL_COVER_CARRY
        quality = _dice if full else _precision
        dice = quality(carried, muscle)
        if fixed_side is not None:
            for code in (SideLabel.RIGHT, SideLabel.LEFT):
                s = fixed_side == code
                if s.any():
                    by_side[code.side] = quality(carried & s, muscle & s)
        labels = np.where(muscle, out, 0)
        if full:
            labels = _fill(labels, muscle, fixed.spacing_mm, fixed_side)
    worst = min([dice] + list(by_side.values())) if dice is not None else None
    review = bool((worst is not None and worst < REVIEW_DICE) or mismatch > REVIEW_MISMATCH)
    return CarriedRois(labels=labels.astype(moving_rois.dtype), dice_muscle=dice, mismatch=float(mismatch),
                       seconds=time.perf_counter() - t_start, needs_review=review, dice_by_side=by_side,
                       stage_seconds=times)
