"""Automatic segmentation of the legs in Dixon images: body, subcutaneous fat (SAT),
bone with marrow, and the muscle of each leg; tells thigh from calf.

Method, per leg and slice:

1. Body: total signal above an Otsu threshold, holes filled; the legs are the large
   3-D connected components (two touching legs are split at the patient-x valley).
2. SAT: fat-dominant voxels (FF > ``sat_ff``) connected to the skin (the body's rim).
3. Inside the fascia: body minus SAT; bone is the dark cortex with what it encloses
   (fat-bright marrow); what remains is muscle, except pure-fat septa (FF >
   ``septum_ff``), so fatty infiltration inside muscle stays muscle.

Side comes from patient coordinates (+x of DICOM LPS is the patient's left), never from
image columns. The level comes from the Body Part Examined / descriptions, else from
anatomy: one long bone per leg in the thigh, two in the calf.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .enums import Region, Side, SideLabel, Tissue
from .errors import SegmentationError
from .volume import Volume, bounding_box

_THIGH_WORDS = re.compile(r"(?<![a-z])(thigh|thighs|upper[ _]?leg|femur|femoral|oberschenkel|cuisse)", re.I)
_CALF_WORDS = re.compile(r"(?<![a-z])(calf|calves|lower[ _]?leg|tibia|unterschenkel|wade|mollet|jambe)", re.I)
#: Hand and forearm (Body Part Examined HAND, FOREARM, WRIST, FINGER, THUMB; German Hand,
#: Mittelhand, Unterarm; French main, avant-bras, poignet). "main" and "hand" must stand as
#: words on both sides ("domain", "handling" are not hands); the others may start a word
#: ("Handgelenk" would match "hand" only with a right boundary, so it is listed).
_HAND_WORDS = re.compile(r"(?<![a-z])(hands?|mittelhand|handgelenk|palm|thenar|hypothenar|fingers?|thumb|wrist|"
                         r"forearm|fore[ _-]arm|unterarm|mains?|avant[ _-]?bras|poignet|doigts?|pouce)(?![a-z])",
                         re.I)
#: Head and neck (Body Part Examined HEAD, NECK, HEADNECK, FACE, JAW; German Kopf, Hals,
#: Nacken, Zunge; French tête, cou, langue).
_HEAD_NECK_WORDS = re.compile(r"(?<![a-z])(head|heads|neck|headneck|head[ _&/-]*(and[ _]*)?neck|face|jaw|tongue|"
                              r"kopf|hals|nacken|zunge|t[eê]te|cou|langue)(?![a-z])", re.I)


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Tissue and side label maps on the grid of the anatomy volume."""

    tissue: np.ndarray        # uint8, values of :class:`Tissue`
    side: np.ndarray          # uint8, values of :class:`SideLabel`
    region: Region
    region_reason: str
    notes: tuple[str, ...] = ()

    def mask(self, tissue: Tissue, side: Side) -> np.ndarray:
        """Boolean map of the voxels of ``tissue`` on ``side``."""
        code = {Side.RIGHT: SideLabel.RIGHT, Side.LEFT: SideLabel.LEFT, Side.NONE: SideLabel.NONE}[side]
        return (self.tissue == tissue) & (self.side == code)

    @property
    def sides(self) -> tuple[Side, ...]:
        """The sides that have muscle, in the order right, left, none."""
        present = set(np.unique(self.side[self.tissue == Tissue.MUSCLE]).tolist())
        return tuple(s for s, c in ((Side.RIGHT, 1), (Side.LEFT, 2), (Side.NONE, 0)) if c in present)

    def muscle_groups(self) -> tuple[np.ndarray, dict[int, tuple[str, Side]]]:
        """Label map 1..n of the muscle of each side, and what each label is."""
        labels = np.zeros(self.tissue.shape, np.int32)
        groups: dict[int, tuple[str, Side]] = {}
        for n, side in enumerate(self.sides, start=1):
            labels[self.mask(Tissue.MUSCLE, side)] = n
            groups[n] = (self.region.value, side)
        return labels, groups


def otsu_threshold(values: np.ndarray, bins: int = 256, upper_percentile: float = 100.0) -> float:
    """Otsu's threshold of a sample (non-finite values ignored; 0 for an empty sample).
    With ``upper_percentile`` < 100 the histogram ends there, so that a few very bright
    voxels do not squeeze the rest into a few bins.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    hi = float(np.percentile(values, upper_percentile)) if upper_percentile < 100 else float(values.max())
    hist, edges = np.histogram(values, bins=bins, range=(float(values.min()), hi + 1e-9))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


#: ndimage's 2-D cross (its default neighbourhood in a slice) as a 3-D structuring element
#: with nothing above or below: one 3-D call labels or erodes every slice at once as a call
#: per slice did, without the Python loop over slices and legs.
INPLANE_3D = np.zeros((3, 3, 3), bool)
INPLANE_3D[1] = ndi.generate_binary_structure(2, 1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` of each slice (the last two axes): the in-plane 4-connected
    components of the background that do not touch the slice's edge are filled. Found with
    one labelling of the volume rather than a propagation per slice (same result, several
    times faster).
    """
    mask = np.asarray(mask, dtype=bool)
    cross = np.zeros((3,) * mask.ndim, dtype=bool)   # label wants 3 along every axis
    cross[(1,) * (mask.ndim - 2)] = ndi.generate_binary_structure(2, 1)
    lab, n = ndi.label(~mask, structure=cross)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (lab[..., 0, :], lab[..., -1, :], lab[..., :, 0], lab[..., :, -1]):
        outside[edge] = True
    outside[0] = False   # label 0: the mask itself
    return ~outside[lab]




def _slice_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-plane connected components of every slice: the label map (0 outside), the size and
    the slice of each label (index 0: label 1). Labels run in raster order, so within a slice
    they are ordered as a 2-D labelling of that slice would number them.
    """
    lab, n = ndi.label(mask, structure=INPLANE_3D)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    where = np.array([s[0].start for s in ndi.find_objects(lab)], dtype=np.intp).reshape(n)
    return lab, sizes, where


def _largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """The largest in-plane component of each slice (the first in raster order of equal ones)."""
    lab, sizes, where = _slice_components(mask)
    if sizes.size == 0:
        return mask
    # per slice the label of the largest size; ties go to the smaller label, as argmax does
    order = np.lexsort((np.arange(sizes.size), -sizes, where))
    first = order[np.r_[True, where[order][1:] != where[order][:-1]]]
    keep = np.zeros(sizes.size + 1, bool)
    keep[first + 1] = True
    return keep[lab]


def _legs(body: np.ndarray, x_mm: np.ndarray) -> list[np.ndarray]:
    """Split the body mask into legs (3-D components), largest first by patient x."""
    lab, n = ndi.label(body)
    if n == 0:
        raise SegmentationError("no body found above the noise (empty or very low signal images)")
    sizes = ndi.sum_labels(body, lab, index=np.arange(1, n + 1))
    keep = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= 0.2 * sizes.max()][:2]
    legs = [lab == k for k in keep]
    if len(legs) == 1:
        # Touching legs: one component spanning both sides; split at the valley of body
        # voxels along patient x if there is one in the middle third.
        leg = legs[0]
        xs = x_mm[leg]
        lo, hi = np.percentile(xs, [2, 98])
        if hi - lo > 0:
            hist, edges = np.histogram(xs, bins=64, range=(lo, hi))
            mid = slice(len(hist) // 3, 2 * len(hist) // 3)
            v = int(np.argmin(hist[mid])) + mid.start
            if hist[v] < 0.5 * min(hist[: mid.start].max(), hist[mid.stop:].max()):
                cut = (edges[v] + edges[v + 1]) / 2
                legs = [leg & (x_mm < cut), leg & (x_mm >= cut)]
    return legs


def _leg_tissues(leg: np.ndarray, fatlike: np.ndarray, dark: np.ndarray, ffz: np.ndarray, tissue: np.ndarray,
                 min_bone_px: int, septum_ff: float) -> np.ndarray:
    """Write SAT, bone, septa and muscle of one leg into ``tissue`` (steps 2 and 3 of the
    module docstring, every slice at once); the number of long bones of each slice that has one.
    """
    rim = leg & ~ndi.binary_erosion(leg, structure=INPLANE_3D)
    lab, _ = ndi.label(fatlike & leg, structure=INPLANE_3D)
    touching = np.unique(lab[rim & (lab > 0)])
    sat = np.isin(lab, touching[touching > 0])
    inner = _largest_per_slice(leg & ~sat)
    inner = fill_holes_per_slice(inner)
    cortex = dark & inner
    bone = fill_holes_per_slice(cortex) & inner
    blab, sizes, where = _slice_components(bone)
    big = sizes >= min_bone_px
    if sizes.size:
        bone = np.r_[False, big][blab]
    septa = inner & ~bone & (ffz > septum_ff)
    muscle = inner & ~bone & ~septa
    tissue[sat] = Tissue.SUBCUTANEOUS_FAT
    tissue[bone] = Tissue.BONE
    tissue[septa] = Tissue.INTERMUSCULAR_FAT
    tissue[muscle] = Tissue.MUSCLE
    # every bone kept is big: count them in the slices that have any
    return np.bincount(where[big], minlength=leg.shape[0])[np.unique(where[big])]


def level_from_text(text: str) -> Region | None:
    """The region that Body Part Examined, series/study descriptions and protocol names say.

    Parameters
    ----------
    text : str
        The header words (English, German or French; Body Part Examined defined terms).

    Returns
    -------
    Region or None
        Thigh or calf when the leg words name one of them (a leg word wins over hand or
        head-neck words: "femoral neck" stays a thigh); else hand (with forearm) or head-neck
        when exactly one of them is named; None when nothing, or thigh and calf, or hand and
        head-neck are named.
    """
    thigh, calf = bool(_THIGH_WORDS.search(text)), bool(_CALF_WORDS.search(text))
    if thigh != calf:
        return Region.THIGH if thigh else Region.CALF
    if thigh:
        return None
    hand, head_neck = bool(_HAND_WORDS.search(text)), bool(_HEAD_NECK_WORDS.search(text))
    if hand != head_neck:
        return Region.HAND if hand else Region.HEAD_NECK
    return None


def segment_legs(anatomy: Volume, fat: np.ndarray, ff: np.ndarray, *, in_phase: np.ndarray | None = None,
                 body_part: str = "", sat_ff: float = 0.8, septum_ff: float = 0.8) -> Segmentation:
    """Segment body, SAT, bone and muscle of each leg.

    Parameters
    ----------
    anatomy : Volume
        Water image (Dixon or MEGRE water, or the first echo of a MESE): its geometry is used for
        sides and areas.
    fat, ff : ndarray
        Dixon fat image and fat fraction (0..1, NaN without signal) on the same grid.
    in_phase : ndarray, optional
        In-phase image; used for the body outline when given.
    body_part : str
        Body Part Examined and descriptions, to tell thigh from calf.
    """
    water = anatomy.array
    if water.ndim != 3:
        raise SegmentationError(f"expected a 3-D water volume, got shape {water.shape}")
    signal = in_phase if in_phase is not None else water + fat
    signal = np.nan_to_num(signal.astype(np.float32))
    thr = otsu_threshold(signal.ravel()[:: max(1, signal.size // 2_000_000)])
    # Otsu on a histogram dominated by air can sit in the noise floor: never go below a
    # quarter of the median tissue signal.
    thr = max(thr, 0.25 * float(np.median(signal[signal > thr])))
    raw = signal > thr
    # Everything below works in the box around the body, and each leg in its own box: the
    # morphology is in-plane, and a margin of background keeps the boxes' edges as the
    # image's (opening: 2 voxels; erosion, filling and labelling: 1).
    box = bounding_box(raw, margin=2)
    body = ndi.binary_opening(raw[box], structure=np.ones((1, 3, 3), bool))
    body = fill_holes_per_slice(body)
    kk, rr, cc = (np.arange(b.start, b.stop) for b in box)
    x_mm = anatomy.index_to_patient(kk[:, None, None], rr[:, None], cc)[..., 0]
    legs = _legs(body, x_mm)

    ffz = np.nan_to_num(ff[box], nan=0.0)
    fatlike = ffz > sat_ff
    dark = ~raw[box]
    tissue = np.zeros(water.shape, np.uint8)
    side = np.zeros(water.shape, np.uint8)
    tissue_box, side_box = tissue[box], side[box]
    min_bone_px = max(4, int(round(20.0 / anatomy.pixel_area_mm2)))  # 20 mm²
    bones_per_leg: list[float] = []
    centroid_x = [float(x_mm[leg].mean()) for leg in legs]
    both = len(legs) == 2
    notes: list[str] = []
    for leg, cx in zip(legs, centroid_x, strict=True):
        if both:
            label = SideLabel.LEFT if cx > float(np.mean(centroid_x)) else SideLabel.RIGHT
        else:
            label = SideLabel.LEFT if cx > 0 else SideLabel.RIGHT
            notes.append(f"one leg found; side {label.side.value} from its patient x ({cx:.0f} mm)")
        lb = bounding_box(leg, margin=1)
        counts = _leg_tissues(leg[lb], fatlike[lb], dark[lb], ffz[lb], tissue_box[lb], min_bone_px, septum_ff)
        side_box[lb][leg[lb]] = label
        if counts.size:
            bones_per_leg.append(float(np.median(counts)))
    if not (tissue == Tissue.MUSCLE).any():
        raise SegmentationError("no muscle found inside the legs")

    region = level_from_text(body_part)
    if region not in (Region.THIGH, Region.CALF):   # hand and head-neck: see quant.roi_only
        region = None
    if region is not None:
        reason = f"from Body Part Examined/description ({' '.join(body_part.split())[:60]!r})"
    else:
        nb = round(float(np.median(bones_per_leg))) if bones_per_leg else 0
        if nb == 1:
            region, reason = Region.THIGH, "from anatomy: one long bone per leg"
        elif nb == 2:
            region, reason = Region.CALF, "from anatomy: two long bones per leg"
        else:
            region, reason = Region.LEG, f"level unknown: {nb} bones per leg and no body part in the headers"
    return Segmentation(tissue=tissue, side=side, region=region, region_reason=reason, notes=tuple(notes))
