"""Regions measured in a reader's ROIs only: the hand (with the forearm) and the head and neck.

The automatic segmentation of :mod:`quant.segment` knows legs (one or two long bones in a
fascia ellipse per leg); a section through the palm or the neck is not that, and its
muscles are small and packed. So for these regions the node measures nothing until a
reader has outlined the muscles (a DICOM SEG, :mod:`quant.reader_rois`, or ``rois=``):

- **Recognition** from Body Part Examined, series and study descriptions and protocol
  names (:func:`quant.segment.level_from_text`: e.g. HAND, FOREARM, Hand, Unterarm, main,
  avant-bras; HEAD, NECK, HEADNECK, Kopf, Hals, Nacken, tête, cou). Not from anatomy: a
  small section with several bones could as well be a child's calf, so a hand or neck
  without header words is analysed as a leg.
- **No ROIs**: :class:`~quant.errors.NeedsRoisError` ("waiting for ROIs"), with the reasons
  of any reader SEG that could not be used.
- **The muscle mask is the ROI voxels themselves** (every ROI, the union of them): the
  region's "muscle" measurements (``roi`` empty) are those of all ROIs together, each ROI's
  its own, with the same partial-volume edges and core fat fraction as a leg's
  (:func:`quant.roi_stage.measure_rois`). Subcutaneous fat is the fat-dominant tissue
  connected to the skin, as for a leg (it gives the fat reference of the partial-volume
  weights and the fat T2 calibration of the MESE fit); no bone is segmented.
- **Side**: a hand is one side: the series' Laterality (or Image Laterality) R / L, else a
  side word in the descriptions (right, rechts, droite; left, links, gauche), else the
  laterality the reader's segments state (when they agree), else the patient x of the ROIs'
  centre (+x of DICOM LPS is the patient's left; a hand scanned at the isocentre may fall on
  either side: the note says so). In the head and neck each ROI is of the side its segment
  states, else each voxel of the side of the body's midline (per slice, the centre of the
  body's extent in patient x) it lies on.
"""

from __future__ import annotations

import re

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from .analysis import RoiSet
from .enums import Region, SideLabel, Tissue
from .errors import NeedsRoisError
from .segment import Segmentation, fill_holes_per_slice, level_from_text, otsu_threshold
from .volume import Volume

#: Regions measured in a reader's ROIs only.
ROI_ONLY_REGIONS: tuple[Region, ...] = (Region.HAND, Region.HEAD_NECK)

_REGION_WORDS = {Region.HAND: "hand", Region.HEAD_NECK: "head-neck"}
_RIGHT_WORDS = re.compile(r"(?<![a-z])(right|rechts?|droite?)(?![a-z])", re.I)
_LEFT_WORDS = re.compile(r"(?<![a-z])(left|links|gauche)(?![a-z])", re.I)
_SIDE_LABELS = {"right": SideLabel.RIGHT, "left": SideLabel.LEFT}


def roi_only_region(body_part: str) -> Region | None:
    """Hand or head-neck when the header words say so (:func:`quant.segment.level_from_text`), else None."""
    region = level_from_text(body_part)
    return region if region in ROI_ONLY_REGIONS else None


def header_side(header: Dataset | None, text: str = "") -> str:
    """"right", "left" or "" from Laterality / Image Laterality (R, L), else from side words in ``text``."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(header.get(keyword, "") or "").strip().upper() if header is not None else ""
        if value in ("R", "L"):
            return "right" if value == "R" else "left"
    right, left = bool(_RIGHT_WORDS.search(text)), bool(_LEFT_WORDS.search(text))
    if right != left:
        return "right" if right else "left"
    return ""


def _body(signal: np.ndarray) -> np.ndarray:
    """Body mask: total signal above Otsu's threshold (never below a quarter of the median
    tissue signal), opened, holes filled per slice.
    """
    signal = np.nan_to_num(np.asarray(signal, np.float32))
    thr = otsu_threshold(signal.ravel()[:: max(1, signal.size // 2_000_000)])
    thr = max(thr, 0.25 * float(np.median(signal[signal > thr]))) if (signal > thr).any() else thr
    return fill_holes_per_slice(ndi.binary_opening(signal > thr, structure=np.ones((1, 3, 3), bool)))


def _subcutaneous_fat(body: np.ndarray, ff: np.ndarray, sat_ff: float) -> np.ndarray:
    """Fat-dominant voxels connected to the body's rim, per slice."""
    fatlike = np.nan_to_num(ff, nan=0.0) > sat_ff
    out = np.zeros(body.shape, bool)
    for k in range(body.shape[0]):
        m = body[k]
        if not m.any():
            continue
        rim = m & ~ndi.binary_erosion(m)
        lab, _ = ndi.label(fatlike[k] & m)
        touching = np.unique(lab[rim & (lab > 0)])
        out[k] = np.isin(lab, touching[touching > 0])
    return out


def roi_segmentation(anatomy: Volume, rois: RoiSet | None, region: Region, *, ff: np.ndarray,
                     signal: np.ndarray, header: Dataset | None = None, body_part: str = "",
                     refusals: tuple[tuple[str, str], ...] = (), sat_ff: float = 0.8) -> Segmentation:
    """The segmentation of a hand or head-neck study: the ROIs are the muscle.

    Parameters
    ----------
    anatomy : Volume
        The volume segmented (Dixon or MEGRE water); the ROIs are on its grid.
    rois : RoiSet or None
        The reader's ROIs (``rois=`` or the newest usable reader SEG).
    region : Region
        :attr:`Region.HAND` or :attr:`Region.HEAD_NECK`.
    ff, signal : ndarray
        Fat fraction (0..1, NaN without signal) and total signal on the same grid: the body
        outline and its subcutaneous fat.
    header : pydicom.Dataset, optional
        A dataset of the series segmented (Laterality, Image Laterality).
    body_part : str
        Body Part Examined, descriptions and protocol name.
    refusals : tuple of (str, str)
        Reader SEGs that could not be used, passed on with :class:`NeedsRoisError`.

    Returns
    -------
    Segmentation
        Tissue MUSCLE on the ROI voxels, SUBCUTANEOUS_FAT on fat connected to the skin;
        the side of every voxel (module notes); ``region_reason`` and a note
        say where the region and the side came from.

    Raises
    ------
    NeedsRoisError
        No ROI set, or one without any voxel.
    """
    what = _REGION_WORDS.get(region, region.value)
    if rois is None or not np.any(rois.labels):
        msg = f"{what} exam: measured in a reader's ROIs only; waiting for ROIs"
        if refusals:
            msg += f" ({len(refusals)} reader SEG(s) not usable: " + "; ".join(r for _, r in refusals) + ")"
        raise NeedsRoisError(msg, refusals)
    labels = np.asarray(rois.labels)
    in_roi = labels > 0
    body = _body(signal) | in_roi
    tissue = np.zeros(labels.shape, np.uint8)
    tissue[_subcutaneous_fat(body, ff, sat_ff) & ~in_roi] = Tissue.SUBCUTANEOUS_FAT
    tissue[in_roi] = Tissue.MUSCLE
    kk, rr, cc = np.indices(labels.shape, dtype=np.float32)
    x_mm = anatomy.index_to_patient(kk, rr, cc)[..., 0]
    side = np.zeros(labels.shape, np.uint8)
    notes = []
    if region is Region.HAND:
        stated = {rois.laterality.get(lab, "") for lab in rois.names}
        word = header_side(header, body_part)
        if word:
            how = "from the series' laterality or descriptions"
        elif len(stated) == 1 and stated <= {"right", "left"}:
            word, how = stated.pop(), "from the laterality of the reader's segments"
        else:
            cx = float(x_mm[in_roi].mean())
            word = "left" if cx > 0 else "right"
            how = f"from the patient x of the ROIs' centre ({cx:.0f} mm; no laterality in the headers)"
        side[:] = _SIDE_LABELS[word]   # the ROIs' partial-volume edges may reach past the body outline
        notes.append(f"{what}: {word} side {how}")
    else:
        for k in range(labels.shape[0]):
            on = body[k]
            if not on.any():
                continue
            xs = x_mm[k][on]
            mid = 0.5 * (float(xs.min()) + float(xs.max()))
            side[k] = np.where(x_mm[k] > mid, SideLabel.LEFT, SideLabel.RIGHT)
        for lab, word in rois.laterality.items():
            if word in _SIDE_LABELS:
                side[labels == lab] = _SIDE_LABELS[word]
        notes.append(f"{what}: each ROI of the side its segment states, else of the body's midline")
    reason = (f"from Body Part Examined/description ({' '.join(body_part.split())[:60]!r}); "
              f"measured in the reader's ROIs only ({len(rois.names)} ROIs)")
    return Segmentation(tissue=tissue, side=side, region=region, region_reason=reason, notes=tuple(notes))
