"""Multi-atlas compartments: other subjects' reader ROIs, registered to a new visit and fused.

When the node holds reader ROI sets of *other* subjects (an :class:`Atlas` each: the image
the reader drew on, the label map, the label names, the side map and the body mask), each
set is carried onto the new visit by :func:`quant.registration.carry_rois` (per leg, rigid →
affine → B-spline on the outlines, restricted to the visit's muscle) and the carried sets
are fused voxel by voxel (:data:`FUSIONS`):

- ``"vote"``: majority vote per ROI name. Each atlas votes for the ROI it carried to the
  voxel; an ROI's share is its votes over the number of atlases that *have* that ROI (an
  atlas without a name neither votes for nor against it, where SimpleITK's
  ``LabelVotingImageFilter`` would count it as a vote against). The largest share wins; a
  tie goes to the lower label (the compartment first in :data:`quant.enums.COMPARTMENTS`),
  and muscle no atlas labelled stays unlabelled.
- ``"staple"``: SimpleITK's ``MultiLabelSTAPLEImageFilter`` (simultaneous truth and
  performance level estimation) on the visit's muscle voxels: each atlas is weighted by
  the confusion matrix STAPLE estimates for it.

Atlases whose names differ are fused on the union of names (mapped by name: label values
need not match); the compartments of :data:`quant.enums.COMPARTMENTS` keep their usual
label order. An atlas of another region than the visit's, or whose carried set needs
review (:data:`quant.registration.REVIEW_DICE`, ``REVIEW_MISMATCH``), is left out (listed
in :attr:`AtlasResult.atlases` with the reason).

Optionally (``combine="watershed"``) the fusion only *seeds* the compartments: the voxels
where every atlas agrees, cut at the visit's septa (intermuscular fat) and reduced to the
largest piece per ROI and slice, are markers for the marker-controlled watershed on the fat
fraction that :mod:`quant.compartments` uses, so that the boundaries follow the visit's own
septa where the images show them, and the atlases say which compartment is which.

Confidence: per ROI the mean voter agreement (share of the atlases having the ROI that
voted for the fused label, averaged over the ROI's voxels), the STAPLE sensitivity and
specificity (``"staple"``: averaged over atlases), and per atlas the registration quality
of :class:`quant.registration.CarriedRois` (Dice with the visit's muscle, mismatch).

Measured on the phantom (``tests/test_atlas.py``: three atlas subjects with other leg sizes,
gaps, positions and septa): the thigh as the automatic compartments (Dice 0.98, CSA within
0.6 %); on a calf where the automatic compartments fail (Dice down to 0.68), vote and STAPLE
Dice 0.92-0.98 and the atlas-seeded watershed 0.93-0.97 (CSA within 3 %, deep posterior
+4 ... +6 %). Vote and STAPLE gave the same labels with three atlases of equal quality.

Node integration (not here): choose atlases from the database (reader ROI sets of other
subjects, the same region and a comparable series: Dixon water), build each with
:meth:`Atlas.from_rois`, call::

    result = atlas_compartments(atlases, analysis.anatomy, analysis.segmentation,
                                analysis.fat_fraction, combine="watershed")
    if result.rois is not None:
        analyse_study(datasets, rois=result.rois)   # source "atlas"

and report ``result.agreement`` (and ``result.atlases``, the per-atlas quality) with the
measurements. :func:`carry_atlases` and :func:`fuse_atlases` are the two halves (carry
once, fuse several ways). Registration costs seconds per atlas (1.6-3.6 s at 6 x 160 x 256
on 2 cores): a few atlases, not the whole database. This module does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .analysis import RoiSet
from .compartments import FF_STEP
from .enums import COMPARTMENTS, Region, RoiSource, SideLabel, Tissue
from .registration import carry_rois
from .segment import Segmentation
from .volume import Volume

#: The fusions :func:`atlas_compartments` offers.
FUSIONS = ("vote", "staple")

#: The combinations with the visit's own images: "none" (the fused labels) or "watershed"
#: (unanimous voxels seed the watershed of :mod:`quant.compartments`).
COMBINES = ("none", "watershed")

#: Watershed seeds: voxels within this distance (mm, in-plane) of the visit's intermuscular
#: fat are left out of the markers, so that a marker that crossed a septum falls apart there.
SEED_SEPTUM_MM = 2.0

#: Fewest voxels of an ROI's seed in a slice; smaller pieces are dropped.
MIN_SEED_VOXELS = 4


@dataclass(frozen=True, eq=False)
class Atlas:
    """A reader's ROI set of another subject, with what registration needs.

    Attributes
    ----------
    anatomy : Volume
        The 3-D image the ROIs were drawn on (Dixon water, as the visit's anatomy).
    labels : ndarray
        Integer label map on ``anatomy``'s grid, 0 outside every ROI.
    names : Mapping
        Label -> ROI name (a :class:`~quant.enums.Roi` value or the reader's label).
    side : ndarray or None
        Side label map (:class:`~quant.enums.SideLabel`) on the same grid; with both legs
        on both images, each leg is registered on its own.
    body : ndarray or None
        Body mask on the same grid (bounds the registration metric).
    region : Region or None
        The atlas's region; an atlas of another region than the visit's is not used.
    key : str
        Who the atlas is, for reports (e.g. the study's UID).
    """

    anatomy: Volume
    labels: np.ndarray
    names: Mapping[int, str]
    side: np.ndarray | None = None
    body: np.ndarray | None = None
    region: Region | None = None
    key: str = ""

    @classmethod
    def from_rois(cls, anatomy: Volume, rois: RoiSet, seg: Segmentation | None = None, key: str = "") -> Atlas:
        """An atlas from a study's reader ROI set and (optionally) its segmentation.

        Parameters
        ----------
        anatomy : Volume
            The study's anatomy (:attr:`quant.analysis.StudyAnalysis.anatomy`).
        rois : RoiSet
            The reader's ROIs on ``anatomy``'s grid.
        seg : Segmentation, optional
            The study's segmentation: side map, body mask and region.
        key : str
            Who the atlas is.
        """
        if seg is None:
            return cls(anatomy, rois.labels, dict(rois.names), key=key)
        return cls(anatomy, rois.labels, dict(rois.names), side=seg.side, body=seg.tissue > 0,
                   region=seg.region, key=key)


@dataclass(frozen=True)
class AtlasQuality:
    """How one atlas was carried onto the visit.

    Attributes
    ----------
    key : str
        :attr:`Atlas.key`.
    used : bool
        Whether the atlas took part in the fusion.
    reason : str
        Why not ("" when used): "region", "needs review", "no labels".
    dice_muscle : float or None
        Dice of its carried ROIs with the visit's muscle (``CarriedRois.dice_muscle``).
    mismatch : float or None
        Residual image mismatch after registration (``CarriedRois.mismatch``).
    seconds : float
        Registration and carrying time.
    """

    key: str
    used: bool
    reason: str = ""
    dice_muscle: float | None = None
    mismatch: float | None = None
    seconds: float = 0.0


@dataclass(frozen=True, eq=False)
class AtlasResult:
    """Fused atlas compartments of a visit with their confidence.

    Attributes
    ----------
    rois : RoiSet or None
        Labels on the visit's grid, restricted to its muscle (source ``atlas``); None when
        no atlas could be used.
    agreement : dict
        ROI name -> mean voter agreement over the ROI's voxels (0..1; 1: every atlas having
        the ROI carried it there).
    sensitivity, specificity : dict
        ROI name -> STAPLE's estimate, averaged over the atlases used (``"staple"`` only).
    atlases : tuple of AtlasQuality
        Every atlas given, in order, with its registration quality.
    fusion, combine : str
        How the labels were fused and combined.
    seconds : float
        Total wall time.
    """

    rois: RoiSet | None
    agreement: dict[str, float] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    specificity: dict[str, float] = field(default_factory=dict)
    atlases: tuple[AtlasQuality, ...] = ()
    fusion: str = "vote"
    combine: str = "none"
    seconds: float = 0.0


def _union_names(atlases: Sequence[Atlas], region: Region) -> list[str]:
    """The union of ROI names: the region's compartments in their order, then the rest sorted."""
    names = {str(n) for a in atlases for n in a.names.values()}
    order = [r.value for r in COMPARTMENTS.get(region, ()) if r.value in names]
    return order + sorted(names - set(order))


def _relabel(labels: np.ndarray, names: Mapping[int, str], ids: Mapping[str, int]) -> np.ndarray:
    """A label map with its values replaced by the global id of their name (0 elsewhere)."""
    out = np.zeros(labels.shape, np.uint16)
    for value, name in names.items():
        out[labels == value] = ids[str(name)]
    return out


def _vote(votes: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Per-name majority vote.

    Parameters
    ----------
    votes : (A, N) global ids each atlas carried to each voxel (0: none)
    has : (A, L + 1) whether atlas a has id l

    Returns
    -------
    ndarray
        Fused ids (N,): the id with the largest share of votes among the atlases having it.
    """
    counts = np.zeros((has.shape[1], votes.shape[1]), np.float64)
    for a in range(votes.shape[0]):
        np.add.at(counts, (votes[a], np.arange(votes.shape[1])), 1.0)
    counts[0] = 0.0                                   # "no ROI" is an abstention
    share = counts / np.maximum(has.sum(axis=0), 1)[:, None]
    return np.argmax(share, axis=0).astype(np.uint16)


def _agreement(votes: np.ndarray, has: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """Per voxel, the share of the atlases having the fused id that voted for it (0 for id 0)."""
    n = has[:, fused].sum(axis=0)
    return np.where(n > 0, (votes == fused).sum(axis=0) / np.maximum(n, 1), 0.0)


def _staple(votes: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray]:
    """MultiLabelSTAPLE on flattened voxels: fused ids and the per-atlas confusion matrices
    ``(A, L + 1, L)`` (``[a, i, j]``: probability that atlas a says i where the truth is j;
    row L is "undecided").
    """
    images = [sitk.GetImageFromArray(v.reshape(1, 1, -1)) for v in votes]
    staple = sitk.MultiLabelSTAPLEImageFilter()
    staple.SetLabelForUndecidedPixels(0)
    fused = sitk.GetArrayFromImage(staple.Execute(images)).reshape(-1).astype(np.uint16)
    n_labels = int(max(int(v.max()) for v in votes)) + 1
    cms = np.zeros((len(votes), n_ids + 1, n_ids))
    for a in range(len(votes)):
        cm = np.asarray(staple.GetConfusionMatrix(a)).reshape(n_labels + 1, n_labels)
        cms[a, :n_labels, :n_labels] = cm[:n_labels]
        cms[a, n_ids, :n_labels] = cm[n_labels]
    return fused, cms


def _seeded_watershed(fused: np.ndarray, unanimous: np.ndarray, seg: Segmentation, ff: np.ndarray,
                      spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """The compartments grown on the visit's fat fraction from the unanimous fused voxels."""
    tissue, side = seg.tissue, seg.side
    muscle = tissue == Tissue.MUSCLE
    septa = tissue == Tissue.INTERMUSCULAR_FAT
    elevation_all = np.floor(np.clip(np.nan_to_num(np.asarray(ff, dtype=np.float32), nan=1.0), 0.0, 1.0)
                             / FF_STEP) * FF_STEP
    r = max(1, int(round(SEED_SEPTUM_MM / min(spacing_mm[1], spacing_mm[2]))))
    out = np.where(muscle, fused, 0).astype(np.uint16)
    for k in range(fused.shape[0]):
        near_septum = ndi.binary_dilation(septa[k], iterations=r) if septa[k].any() else septa[k]
        seeds = np.where(unanimous[k] & muscle[k] & ~near_septum, fused[k], 0).astype(np.uint16)
        for code in (SideLabel.RIGHT, SideLabel.LEFT, SideLabel.NONE):
            leg = side[k] == code
            if not (leg & muscle[k]).any():
                continue
            markers = np.zeros(seeds.shape, np.uint16)
            for lab in np.unique(seeds[leg]):
                if lab == 0:
                    continue
                pieces, n = ndi.label(leg & (seeds == lab))
                sizes = np.bincount(pieces.ravel())[1:]
                if n and sizes.max() >= MIN_SEED_VOXELS:
                    markers[pieces == int(np.argmax(sizes)) + 1] = lab
            if len(np.unique(markers)) < 3:      # fewer than two compartments seeded: keep the fusion
                continue
            region = leg & (muscle[k] | septa[k])
            elevation = np.where(region, elevation_all[k], 2.0).astype(np.float32)
            grown = sitk.GetArrayFromImage(sitk.MorphologicalWatershedFromMarkers(
                sitk.GetImageFromArray(elevation), sitk.GetImageFromArray(markers),
                markWatershedLine=False, fullyConnected=True))
            mine = leg & muscle[k]
            out[k][mine] = grown[mine]
    return out


@dataclass(frozen=True, eq=False)
class CarriedAtlas:
    """One atlas carried onto the visit (:func:`carry_atlases`).

    Attributes
    ----------
    atlas : Atlas
        The atlas.
    labels : ndarray or None
        Its labels on the visit's grid, restricted to the visit's muscle; None when not
        carried (``quality.reason``).
    needs_review : bool
        The carried set needs review (``CarriedRois.needs_review``).
    quality : AtlasQuality
        How it was carried.
    """

    atlas: Atlas
    labels: np.ndarray | None
    needs_review: bool
    quality: AtlasQuality


def carry_atlases(atlases: Sequence[Atlas], anatomy: Volume, seg: Segmentation, *,
                  bspline: bool = True) -> tuple[CarriedAtlas, ...]:
    """Carry each atlas onto the visit (:func:`quant.registration.carry_rois`, per leg).

    Parameters
    ----------
    atlases : sequence of Atlas
        Reader ROI sets of other subjects.
    anatomy : Volume
        The visit's anatomy (Dixon water).
    seg : Segmentation
        The visit's tissue and side maps (on ``anatomy``'s grid).
    bspline : bool
        Register with the B-spline stage.

    Returns
    -------
    tuple of CarriedAtlas
        One per atlas, in order; an atlas of another region or without labels is not carried.
    """
    if seg.tissue.shape != anatomy.array.shape:
        raise ValueError("the segmentation must be on the anatomy's grid")
    muscle = seg.tissue == Tissue.MUSCLE
    out: list[CarriedAtlas] = []
    for atlas in atlases:
        if atlas.region is not None and atlas.region is not seg.region:
            out.append(CarriedAtlas(atlas, None, False, AtlasQuality(atlas.key, False, "region")))
            continue
        if not any((atlas.labels == v).any() for v in atlas.names):
            out.append(CarriedAtlas(atlas, None, False, AtlasQuality(atlas.key, False, "no labels")))
            continue
        c = carry_rois(atlas.anatomy, atlas.labels, anatomy, moving_body=atlas.body, fixed_body=seg.tissue > 0,
                       moving_side=atlas.side, fixed_side=seg.side, fixed_muscle=muscle, bspline=bspline)
        out.append(CarriedAtlas(atlas, c.labels, c.needs_review,
                                AtlasQuality(atlas.key, True, "", c.dice_muscle, c.mismatch, c.seconds)))
    return tuple(out)


def fuse_atlases(carried: Sequence[CarriedAtlas], anatomy: Volume, seg: Segmentation, ff: np.ndarray, *,
                 fusion: str = "vote", combine: str = "none", skip_review: bool = True) -> AtlasResult:
    """Fuse carried atlases into one ROI set of the visit (module docstring).

    Parameters
    ----------
    carried : sequence of CarriedAtlas
        From :func:`carry_atlases` (carry once, fuse in several ways).
    anatomy : Volume
        The visit's anatomy: the grid of the result.
    seg : Segmentation
        The visit's tissue and side maps: the ROIs are restricted to its muscle.
    ff : ndarray of float
        The visit's fat fraction 0..1 (NaN without signal), for ``combine="watershed"``.
    fusion : {"vote", "staple"}
        Label fusion.
    combine : {"none", "watershed"}
        "watershed": unanimous fused voxels seed a watershed on the visit's fat fraction.
    skip_review : bool
        Leave out atlases whose carried set needs review (unless every carried atlas does).

    Returns
    -------
    AtlasResult
        The fused ROI set (source ``atlas``) with its confidence.
    """
    t0 = time.perf_counter()
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r} (one of {', '.join(FUSIONS)})")
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r} (one of {', '.join(COMBINES)})")
    if np.shape(ff) != anatomy.array.shape or seg.tissue.shape != anatomy.array.shape:
        raise ValueError("the segmentation and fat fraction must be on the anatomy's grid")
    muscle = seg.tissue == Tissue.MUSCLE
    quality = [c.quality for c in carried]
    usable = [c for c in carried if c.labels is not None]
    if skip_review and any(not c.needs_review for c in usable):
        for i, c in enumerate(carried):
            if c.labels is not None and c.needs_review:
                q = c.quality
                quality[i] = AtlasQuality(q.key, False, "needs review", q.dice_muscle, q.mismatch, q.seconds)
        usable = [c for c in usable if not c.needs_review]
    seconds = sum(q.seconds for q in quality)
    if not usable:
        return AtlasResult(None, atlases=tuple(quality), fusion=fusion, combine=combine,
                           seconds=seconds + time.perf_counter() - t0)

    names = _union_names([c.atlas for c in usable], seg.region)
    ids = {n: k + 1 for k, n in enumerate(names)}
    has = np.zeros((len(usable), len(names) + 1), bool)
    for a, c in enumerate(usable):
        has[a, [ids[str(n)] for n in c.atlas.names.values()]] = True
    where = np.nonzero(muscle)
    votes = np.stack([_relabel(np.asarray(c.labels), c.atlas.names, ids)[where] for c in usable])

    sens: dict[str, float] = {}
    spec: dict[str, float] = {}
    if fusion == "staple":
        fused_v, cms = _staple(votes, len(names) + 1)
        prior = np.bincount(fused_v, minlength=len(names) + 1).astype(np.float64)
        for name, j in ids.items():
            others = np.arange(len(names) + 1) != j
            if prior[j] == 0 or prior[others].sum() == 0:     # not in the result, or nothing else
                continue
            users = has[:, j]
            sens[name] = float(cms[users, j, j].mean())
            false_pos = (cms[users][:, j, others] * prior[others]).sum(axis=1) / prior[others].sum()
            spec[name] = float((1.0 - false_pos).mean())
    else:
        fused_v = _vote(votes, has)
    fused = np.zeros(muscle.shape, np.uint16)
    fused[where] = fused_v
    if combine == "watershed":
        unanimous = np.zeros(muscle.shape, bool)
        unanimous[where] = _agreement(votes, has, fused_v) >= 1.0
        fused = _seeded_watershed(fused, unanimous, seg, ff, anatomy.spacing_mm)
    agree = _agreement(votes, has, fused[where])
    agreement = {name: float(agree[fused[where] == j].mean()) for name, j in ids.items() if (fused == j).any()}
    present = {j: n for n, j in ids.items() if (fused == j).any()}
    return AtlasResult(RoiSet(labels=fused, names=present, source=RoiSource.ATLAS), agreement=agreement,
                       sensitivity=sens, specificity=spec, atlases=tuple(quality), fusion=fusion,
                       combine=combine, seconds=seconds + time.perf_counter() - t0)


def atlas_compartments(atlases: Sequence[Atlas], anatomy: Volume, seg: Segmentation, ff: np.ndarray, *,
                       fusion: str = "vote", combine: str = "none", bspline: bool = True,
                       skip_review: bool = True) -> AtlasResult:
    """Compartments (or any reader ROIs) of a visit from other subjects' ROI sets:
    :func:`carry_atlases` then :func:`fuse_atlases`.

    Parameters
    ----------
    atlases : sequence of Atlas
        Reader ROI sets of other subjects (see :meth:`Atlas.from_rois`).
    anatomy : Volume
        The visit's anatomy (Dixon water): the grid of the result.
    seg : Segmentation
        The visit's tissue and side maps: the ROIs are restricted to its muscle.
    ff : ndarray of float
        The visit's fat fraction 0..1 (NaN without signal), for ``combine="watershed"``.
    fusion : {"vote", "staple"}
        Label fusion (module docstring).
    combine : {"none", "watershed"}
        "watershed": unanimous fused voxels seed a watershed on the visit's fat fraction.
    bspline : bool
        Register with the B-spline stage (:func:`quant.registration.carry_rois`).
    skip_review : bool
        Leave out atlases whose carried set needs review (unless every atlas does).

    Returns
    -------
    AtlasResult
        The fused ROI set (source ``atlas``) with its confidence; ``rois`` None when no
        atlas could be carried.

    Raises
    ------
    ValueError
        An unknown ``fusion`` or ``combine``, or maps that do not fit the anatomy's grid.
    """
    if fusion not in FUSIONS or combine not in COMBINES:
        raise ValueError(f"unknown fusion {fusion!r} or combine {combine!r}")
    if np.shape(ff) != anatomy.array.shape:
        raise ValueError("the fat fraction must be on the anatomy's grid")
    return fuse_atlases(carry_atlases(atlases, anatomy, seg, bspline=bspline), anatomy, seg, ff, fusion=fusion,
                        combine=combine, skip_review=skip_review)
