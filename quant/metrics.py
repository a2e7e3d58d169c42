"""Metrics per region and side: CSA (mm²), VOL (ml), FF (%), fRMA (mm²).

- CSA per slice = number of muscle voxels × pixel area; ``csa_mm2`` is its mean over the
  slices that contain muscle of that leg.
- VOL = number of muscle voxels × voxel volume / 1000 (ml).
- FF = mean voxel fat fraction over the muscle (%).
- fRMA per slice = Σ pixel area × (1 − FF) over the muscle (the fat-free, functional
  remaining muscle area); ``frma_mm2`` is its mean over the same slices as CSA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import ndimage as ndi

from .enums import Metric, RoiSource, Side, SideLabel
from .volume import bounding_box


@dataclass(frozen=True)
class Measurement:
    """One number of one region and side, with the algorithm that made it."""

    region: str          # "thigh", "calf", ... or "thigh/<muscle>"
    side: Side
    metric: str          # a :class:`~quant.enums.Metric` value
    value: float
    unit: str
    algorithm_version: str
    n_voxels: int = 0
    model: str = ""      # the :class:`~quant.enums.Model` value of the model that made it
    roi: str = ""        # a muscle or compartment below the region (a :class:`~quant.enums.Roi` value or a
                         # reader's label); "" for the whole region
    source: str = RoiSource.AUTOMATIC.value   # where the ROI came from (:class:`~quant.enums.RoiSource`)


@njit(cache=True)
def _slice_sums(mask_labels, ff, weights, n_labels, n_slices):
    """Per label and slice: muscle content (sum of voxel weights), count of voxels with
    finite FF, sum of FF over them, and the fat-free content sum of weight x (1 - FF)
    (voxels without FF count as fat-free).
    """
    count = np.zeros((n_labels, n_slices), np.float64)
    nff = np.zeros((n_labels, n_slices), np.int64)
    sff = np.zeros((n_labels, n_slices), np.float64)
    sfree = np.zeros((n_labels, n_slices), np.float64)
    nz, ny, nx = mask_labels.shape
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                lab = mask_labels[k, j, i]
                if lab <= 0:
                    continue
                w = weights[k, j, i]
                count[lab, k] += w
                v = ff[k, j, i]
                if v == v:  # not NaN
                    v = min(max(v, 0.0), 1.0)
                    nff[lab, k] += 1
                    sff[lab, k] += v
                    sfree[lab, k] += w * (1.0 - v)
                else:
                    sfree[lab, k] += w
    return count, nff, sff, sfree


def slice_sums(labels: np.ndarray, ff: np.ndarray, n_labels: int, weights: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-label, per-slice sums (see :func:`_slice_sums`); labels are 1..n_labels-1;
    ``weights`` is the muscle content of each voxel (1 everywhere when not given).
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    ff = np.ascontiguousarray(ff, dtype=np.float32)
    if labels.shape != ff.shape:
        raise ValueError(f"labels {labels.shape} and FF {ff.shape} differ in shape")
    w = np.ones(labels.shape, np.float32) if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
    return _slice_sums(labels, ff, w, n_labels, labels.shape[0])


def slice_sums_reference(labels: np.ndarray, ff: np.ndarray, n_labels: int, weights: np.ndarray | None = None,
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plain numpy reference of :func:`slice_sums`."""
    nz = labels.shape[0]
    w_all = np.ones(labels.shape) if weights is None else np.asarray(weights, float)
    count = np.zeros((n_labels, nz))
    nff = np.zeros((n_labels, nz), np.int64)
    sff = np.zeros((n_labels, nz))
    sfree = np.zeros((n_labels, nz))
    for lab in range(1, n_labels):
        for k in range(nz):
            m = labels[k] == lab
            v = ff[k][m].astype(float)
            w = w_all[k][m]
            fin = np.isfinite(v)
            count[lab, k] = w.sum()
            nff[lab, k] = fin.sum()
            vc = np.clip(v[fin], 0, 1)
            sff[lab, k] = vc.sum()
            sfree[lab, k] = (w[fin] * (1 - vc)).sum() + w[~fin].sum()
    return count, nff, sff, sfree


def partial_volume_weights(labels: np.ndarray, ff: np.ndarray, signal: np.ndarray, *, fat_ff: float,
                           window: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Muscle content of the voxels at the edge of each muscle label (partial volume).

    Inside the muscle (the mask eroded by one voxel in-plane) a voxel is all muscle. In
    the band of one voxel on either side of the mask's edge, a voxel mixes muscle with
    fat (subcutaneous fat, septa: fat fraction ``fat_ff``) or with dark tissue (fascia,
    cortex): its muscle content is estimated from its fat fraction between the local
    muscle's and ``fat_ff``, times its signal relative to the local muscle's. Both local
    references are means over the core muscle in a ``window`` x ``window`` neighbourhood
    (so a smooth bias field cancels). Weights are left unclipped within [-0.25, 1.25], so
    that noise averages out instead of biasing the area.

    Returns
    -------
    labels_ext, weights, muscle_ff
        Labels extended over the outer band, the muscle content of every labelled voxel,
        and the fat fraction of the muscle in it (the local core FF in the band).
    """
    ffz = np.nan_to_num(ff, nan=0.0).astype(np.float64)
    mask = labels > 0
    labels_ext = np.zeros(labels.shape, np.int32)
    w = np.zeros(labels.shape, np.float32)
    muscle_ff = ffz.astype(np.float32)   # the voxels' own FF away from the muscle
    if not mask.any():
        return labels_ext, w, muscle_ff
    # Only the slices with muscle and a margin around it in-plane: nothing is weighted
    # further than one voxel from the mask. The margin (over half the window) leaves the
    # local means as on the whole image: their running sums start on zeros there as well.
    b = bounding_box(mask, margin=window + 1)
    labels_ext[b], w[b], muscle_ff[b] = _partial_volume_weights(labels[b], ffz[b], np.asarray(signal)[b],
                                                                  fat_ff, window)
    return labels_ext, w, muscle_ff


def _partial_volume_weights(labels: np.ndarray, ffz: np.ndarray, signal: np.ndarray, fat_ff: float,
                            window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`partial_volume_weights` in a box around the mask (``ffz``: the FF, 0 for NaN)."""
    from scipy import ndimage as ndi

    st = np.zeros((3, 3, 3), bool)
    st[1] = ndi.generate_binary_structure(2, 1)
    mask = labels > 0
    core = ndi.binary_erosion(mask, structure=st) & mask
    outer = ndi.binary_dilation(mask, structure=st) & ~mask
    size = (1, window, window)
    n_core = ndi.uniform_filter(core.astype(np.float64), size)
    with np.errstate(invalid="ignore", divide="ignore"):
        ff_loc = ndi.uniform_filter(ffz * core, size) / n_core
        s_loc = ndi.uniform_filter(np.asarray(signal, np.float64) * core, size) / n_core
    band = (mask & ~core) | outer
    ok = band & (n_core > 0) & np.isfinite(ff_loc) & (s_loc > 0)
    w = np.zeros(labels.shape, np.float64)
    w[core] = 1.0
    denom = np.maximum(fat_ff - ff_loc, 0.05)
    w_ff = (fat_ff - ffz) / denom
    w_s = np.asarray(signal, np.float64) / np.where(s_loc > 0, s_loc, 1.0)
    w[ok] = np.clip(np.clip(w_ff[ok], -0.25, 1.25) * np.clip(w_s[ok], 0.0, 1.25), -0.25, 1.25)
    # labels of the outer band: the label of the nearest mask voxel in-plane
    idx = ndi.distance_transform_edt(~mask, sampling=(1e6, 1, 1), return_distances=False, return_indices=True)
    labels_ext = np.where(outer, labels[tuple(idx)], labels)
    labels_ext = np.where(ok | mask, labels_ext, 0)
    w[~(ok | core)] = np.where(mask[~(ok | core)], 1.0, 0.0)   # band voxels without a reference stay binary
    muscle_ff = np.where(core, ffz, np.where(ok, ff_loc, ffz)).astype(np.float32)
    return labels_ext.astype(np.int32), w.astype(np.float32), muscle_ff


def muscle_metrics(labels: np.ndarray, ff: np.ndarray, groups: dict[int, tuple[str, Side]], *,
                   pixel_area_mm2: float, slice_thickness_mm: float, algorithm_version: str,
                   model: str = "dixon-magnitude", weights: np.ndarray | None = None,
                   roi_of: Mapping[int, str] | None = None, source: str = RoiSource.AUTOMATIC.value
                   ) -> tuple[list[Measurement], dict[int, np.ndarray]]:
    """CSA, VOL, FF and fRMA for each labelled muscle group.

    Parameters
    ----------
    labels : ndarray of int, (slices, rows, columns)
        0 outside muscle, a group number inside.
    ff : ndarray of float, same shape
        Fat fraction 0..1 of the muscle in each voxel (NaN where unknown).
    groups : mapping group number -> (region, side)
    pixel_area_mm2, slice_thickness_mm : float
        In-plane pixel area and slice spacing.
    weights : ndarray of float, optional
        Muscle content of each labelled voxel (partial volume, see
        :func:`partial_volume_weights`); 1 when not given.
    roi_of : mapping group number -> ROI name, optional
        Groups that are ROIs below the region (see :func:`roi_groups`); their measurements
        carry the name as ``roi`` and ``source``.
    source : str
        :class:`~quant.enums.RoiSource` value of those ROIs.

    Returns
    -------
    measurements, csa_per_slice
        The measurements, and the CSA (mm²) of every slice per group.
    """
    n_labels = max(groups) + 1 if groups else 1
    count, nff, sff, sfree = slice_sums(labels, ff, n_labels, weights)
    out: list[Measurement] = []
    per_slice: dict[int, np.ndarray] = {}
    for g, (region, side) in sorted(groups.items()):
        n = int(round(count[g].sum()))
        if n <= 0:
            continue
        present = count[g] > 0
        csa = count[g] * pixel_area_mm2
        frma = sfree[g] * pixel_area_mm2
        per_slice[g] = csa
        ff_mean = float(sff[g].sum() / max(nff[g].sum(), 1)) * 100.0
        values = {
            Metric.CSA_MM2: float(csa[present].mean()),
            Metric.VOL_ML: float(count[g].sum()) * pixel_area_mm2 * slice_thickness_mm / 1000.0,
            Metric.FF_PERCENT: ff_mean,
            Metric.FRMA_MM2: float(frma[present].mean()),
        }
        roi = (roi_of or {}).get(g, "")
        for metric, value in values.items():
            out.append(Measurement(region, side, metric.value, value, metric.unit, algorithm_version, n, model,
                                   roi=roi, source=source if roi else RoiSource.AUTOMATIC.value))
    return out, per_slice


#: ROIs covering less than this share of the muscle are a partial set (a few muscles): they
#: reach over partial-volume edge voxels only, never over muscle that no ROI holds.
FULL_COVER = 0.9


def roi_groups(muscle_labels: np.ndarray, roi_labels: np.ndarray, side_labels: np.ndarray,
               names: Mapping[int, str], region: str, *, reach_vox: float = 2.0,
               muscle_core: np.ndarray | None = None,
               ) -> tuple[np.ndarray, dict[int, tuple[str, Side]], dict[int, str]]:
    """Group labels for measuring ROIs with :func:`muscle_metrics`: one group per ROI and side.

    Muscle voxels (``muscle_labels`` > 0, including the partial-volume edge voxels) take
    the ROI they lie in; a muscle voxel outside every ROI but within ``reach_vox`` voxels
    (in-plane) of one takes the nearest, so an ROI drawn to the muscle's edge keeps the
    edge's partial volume.

    Parameters
    ----------
    muscle_labels : ndarray of int
        Muscle (and edge) voxels > 0.
    roi_labels : ndarray of int, same shape
        0 outside every ROI, else a key of ``names``.
    side_labels : ndarray of int, same shape
        :class:`~quant.enums.SideLabel` values.
    names : mapping ROI label -> ROI name
    region : str
        Region of the measurements (``"thigh"``...).
    reach_vox : float
        How far (voxels, in-plane) an ROI reaches over unassigned muscle voxels.
    muscle_core : ndarray of bool, optional
        The muscle proper (the segmentation's muscle, without the partial-volume edge). When
        the ROIs cover less than :data:`FULL_COVER` of it (a partial set: the reader drew a
        few muscles), they reach over edge voxels only, not over neighbouring muscle.

    Returns
    -------
    labels, groups, roi_of
        The group label map, group -> (region, side), group -> ROI name.
    """
    rois = np.asarray(roi_labels).astype(np.int64)
    muscle = np.asarray(muscle_labels) > 0
    if reach_vox > 0 and rois.any():
        dist, idx = ndi.distance_transform_edt(rois == 0, sampling=(1e6, 1.0, 1.0), return_indices=True)
        near = rois[tuple(idx)]
        reach = (rois == 0) & muscle & (dist <= reach_vox)
        if muscle_core is not None and muscle_core.any():
            cover = float(((rois > 0) & muscle_core).sum()) / float(muscle_core.sum())
            if cover < FULL_COVER:
                reach &= ~muscle_core
        rois = np.where(reach, near, rois)
    sides = np.asarray(side_labels).astype(np.int64)
    groups: dict[int, tuple[str, Side]] = {}
    roi_of: dict[int, str] = {}
    labels = np.zeros(rois.shape, np.int32)
    for lab, name in sorted(names.items()):
        for code in (SideLabel.RIGHT, SideLabel.LEFT, SideLabel.NONE):
            sel = muscle & (rois == lab) & (sides == code)
            if not sel.any():
                continue
            g = len(groups) + 1
            labels[sel] = g
            groups[g] = (region, SideLabel(code).side)
            roi_of[g] = str(name)
    return labels, groups, roi_of
