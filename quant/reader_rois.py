"""A reader's ROIs sent as a DICOM Segmentation (SEG): the muscles or compartments that a
reader outlined in a viewer (3D Slicer, OHIF, ITK-SNAP through dcmqi), read onto the grid of
the series they reference as a :class:`~quant.analysis.RoiSet` (source READER).

Pure: takes the SEG dataset and the assembled referenced series (:func:`quant.volume.assemble_volume`).
The SEG is read with pydicom, frame by frame, not with highdicom's ``Segmentation.from_dataset``:
:mod:`quant` does not depend on highdicom, and every mismatch gets its own reason here.

Reading rules
-------------
- Binary, fractional (a voxel is in the segment at half the Maximum Fractional Value or more)
  and label-map SEGs are read, frame by frame, from the Per-frame Functional Groups: the
  segment number (Segment Identification), the source image (Derivation Image > Source Image:
  Referenced SOP Instance UID and, for an Enhanced MR source, Referenced Frame Number) and the
  frame's Plane Position. A frame goes to the slice it references; without a source reference
  it goes to the slice at its position. Either way its position, orientation and pixel
  spacing must match that slice (0.1 mm, 0.001, 0.1 %).
- The label of a segment in the :class:`~quant.analysis.RoiSet` is its segment number. Its name
  is the canonical ROI name (``vastus_lateralis``; the :class:`~quant.enums.Roi` value for a
  compartment) when the Segmented Property Type is a code of :data:`KNOWN_PROPERTY_TYPES`
  (the vocabulary of :mod:`quant.muscles`); otherwise (a generic code such as SCT 102292000
  "Skeletal muscle structure of lower limb", or any other) the Segment Label as given
  (stripped), else the Tracking ID, else the code meaning.
- Laterality (an anatomic region or property type modifier Right / Left, or a label that
  starts with "right" / "left") is reported in the description and kept in
  :attr:`~quant.analysis.RoiSet.laterality` (used for a hand or head-neck, :mod:`quant.roi_only`),
  but not applied to a leg's label map: the node measures every ROI per side with its own
  side map (left and right legs by patient coordinates), so a segment drawn over both legs,
  or one per leg, is measured the same way.
- Overlapping segments are accepted; where segments overlap, the later segment (higher
  segment number) wins. Segment 0 of a label-map SEG is its background.

Refusals (:class:`~quant.errors.RoiSetError`, whose message the node quarantines the SEG
with): a SEG that references no series or another series than the volume; frames that
reference an instance or frame that is not in the volume, or whose geometry does not match
the slice; frames of another size than the volume's rows and columns; a segment without any
pixel set; a segment coded as a compartment of another region than ``region``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from .analysis import RoiOrigin, RoiSet
from .enums import COMPARTMENTS, Region, Roi, RoiSource
from .errors import RoiSetError
from .muscles import KNOWN_CODES, PROPERTY_TYPES, UNCODED_NAMES
from .volume import Volume

#: Segmented Property Type codes (coding scheme designator, code value) -> ROI name: the
#: vocabulary of :mod:`quant.muscles` (SNOMED CT codes of muscles and muscle groups, each
#: checked against the source cited there), e.g. SCT 1403006 -> ``vastus_lateralis``,
#: SCT 53451005 "Triceps surae muscle structure" -> ``triceps_surae`` (:class:`~quant.enums.Roi`).
#:
#: No SNOMED CT code for the thigh's or calf's anterior, medial, posterior, lateral or deep
#: posterior compartment could be confirmed from a reliable source, so none is listed: such
#: segments are named by their label (see :data:`GENERIC_PROPERTY_TYPES`).
KNOWN_PROPERTY_TYPES: dict[tuple[str, str], str] = dict(KNOWN_CODES)

#: Generic property types (the muscle is then named by the segment label, as given):
#:
#: - SCT 102292000 "Skeletal muscle structure of lower limb" (DICOM CID 4031 "Muscle of lower limb");
#: - SCT 127954009 "Skeletal muscle" (pydicom's codedict, as :mod:`reports.codes` uses it).
GENERIC_PROPERTY_TYPES: dict[tuple[str, str], str] = {
    ("SCT", "102292000"): "Skeletal muscle structure of lower limb",
    ("SCT", "127954009"): "Skeletal muscle",
}

#: Laterality codes (DICOM CID 244, pydicom's codedict): SCT 24028007 Right, SCT 7771000 Left,
#: SCT 51440002 Right and left.
_LATERALITY = {("SCT", "24028007"): "right", ("SCT", "7771000"): "left", ("SCT", "51440002"): "bilateral"}

_ROIS = {r.value: r for r in Roi}

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

_POSITION_TOL_MM = 0.1
_ORIENTATION_TOL = 1e-3
_SPACING_REL_TOL = 1e-3


def _items(ds: Dataset | None, keyword: str) -> list[Dataset]:
    if ds is None:
        return []
    seq = ds.get(keyword)
    return list(seq) if seq else []


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    items = _items(ds, keyword)
    return items[0] if items else None


def _source_images(frame_groups: Dataset) -> list[Dataset]:
    """Source image items of one functional group (Derivation Image > Source Image)."""
    return [src for der in _items(frame_groups, "DerivationImageSequence")
            for src in _items(der, "SourceImageSequence")]


def referenced_series(seg: Dataset, series_of_instance: Mapping[str, str] | None = None) -> str:
    """The Series Instance UID of the images a SEG was drawn on.

    Parameters
    ----------
    seg : pydicom.Dataset
        The SEG instance.
    series_of_instance : mapping of str to str, optional
        SOP Instance UID -> Series Instance UID of the instances the node holds: used when the
        SEG has no Referenced Series Sequence, through its source image references.

    Returns
    -------
    str
        From the Referenced Series Sequence (one series, or the one series that the
        Common Instance Reference module lists); without it, the series of the source images
        (:func:`referenced_instances`) looked up in ``series_of_instance``.

    Raises
    ------
    RoiSetError
        The SEG names no series, or several.
    """
    uids = [str(item.get("SeriesInstanceUID", "")) for item in _items(seg, "ReferencedSeriesSequence")]
    uids += [str(item.get("SeriesInstanceUID", ""))
             for study in _items(seg, "StudiesContainingOtherReferencedInstancesSequence")
             for item in _items(study, "ReferencedSeriesSequence")]
    if not any(uids) and series_of_instance:
        uids = [series_of_instance[uid] for uid in sorted(referenced_instances(seg)) if uid in series_of_instance]
    found = list(dict.fromkeys(u for u in uids if u))
    if not found:
        raise RoiSetError("the SEG references no series the node holds (no Referenced Series Sequence"
                          + (", and none of its source images is known)" if series_of_instance is not None else ")"))
    if len(found) > 1:
        raise RoiSetError(f"the SEG references {len(found)} series ({', '.join(found)}), not one")
    return found[0]


def referenced_instances(seg: Dataset) -> set[str]:
    """SOP Instance UIDs of the images a SEG references.

    Parameters
    ----------
    seg : pydicom.Dataset
        The SEG instance.

    Returns
    -------
    set of str
        From the Referenced Series Sequence and the frames' source image references (empty
        if the SEG has none): the node looks these up when the series is not named.
    """
    out = {str(inst.get("ReferencedSOPInstanceUID", "")) for series in _items(seg, "ReferencedSeriesSequence")
           for inst in _items(series, "ReferencedInstanceSequence")}
    shared = _first(seg, "SharedFunctionalGroupsSequence")
    for groups in [shared, *_items(seg, "PerFrameFunctionalGroupsSequence")]:
        out |= {str(src.get("ReferencedSOPInstanceUID", "")) for src in _source_images(groups)} if groups else set()
    out.discard("")
    return out


def _code(item: Dataset | None) -> tuple[str, str, str] | None:
    if item is None:
        return None
    return (str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", "")),
            str(item.get("CodeMeaning", "")))


def _laterality(segment: Dataset, label: str) -> str:
    """Laterality a segment states: "right", "left", "bilateral" or "" (not stated)."""
    mods = [m for region in _items(segment, "AnatomicRegionSequence")
            for m in _items(region, "AnatomicRegionModifierSequence")]
    mods += _items(segment, "SegmentedPropertyTypeModifierSequence")
    for ptype in _items(segment, "SegmentedPropertyTypeCodeSequence"):
        mods += _items(ptype, "SegmentedPropertyTypeModifierSequence")
    for m in mods:
        code = _code(m)
        if code and code[:2] in _LATERALITY:
            return _LATERALITY[code[:2]]
    words = label.lower().split()
    return words[0] if words and words[0] in ("right", "left") else ""


def _roi_name(number: int, segment: Dataset, region: Region | None) -> tuple[str, str, str]:
    """(ROI name, property type text, laterality) of one segment."""
    label = str(segment.get("SegmentLabel", "") or "").strip()
    tracking = str(segment.get("TrackingID", "") or "").strip()
    code = _code(_first(segment, "SegmentedPropertyTypeCodeSequence"))
    ptype = f"{code[2]} ({code[0]} {code[1]})" if code else "no property type"
    laterality = _laterality(segment, label)
    known = KNOWN_PROPERTY_TYPES.get((code[0].strip(), code[1].strip())) if code else None
    if known is not None:
        roi = _ROIS.get(known)
        allowed = COMPARTMENTS.get(region) if region is not None else None
        if roi is not None and allowed is not None and roi not in allowed:
            raise RoiSetError(f"segment {number} ({label or ptype}) is coded as {roi.value}, which is not "
                              f"a compartment of the {region.value if region else ''}")
        return known, ptype, laterality
    name = _own_label(label) or _canonical(label) or tracking or (code[2].strip() if code else "")
    if not name:
        raise RoiSetError(f"segment {number} has no known property type, no label and no tracking ID: "
                          "its muscle cannot be named")
    return name, ptype, laterality


_REGION_WORDS = r"thigh|calf|lower leg|leg|hand|head and neck|head_neck|head-neck"
_OWN_LABEL = re.compile(r"^(?:(?:right|left)\s+)?(?:(?:" + _REGION_WORDS + r")\s+)?(.+?)\s*"
                        r"\((?:" + "|".join(s.value for s in RoiSource) + r")\)$", re.IGNORECASE)


def _own_label(label: str) -> str:
    """The ROI name in a label of the node's own SEG ("right thigh anterior compartment
    (carried)" -> ``anterior_compartment``), so that a reader's correction of a SEG the node
    sent names its ROIs as before; "" for any other label (kept as given).
    """
    m = _OWN_LABEL.match(label.strip())
    return _canonical(m.group(1)) if m else ""


def _canonical(label: str) -> str:
    """A label that spells a known ROI (``Roi`` value, any case, spaces or underscores) as
    that ROI's name, so that "Anterior compartment" and "anterior_compartment" are one ROI;
    any other label as given (stripped).
    """
    words = label.strip()
    key = "_".join(words.lower().replace("-", " ").split())
    return key if key in _KNOWN_NAMES else words


_KNOWN_NAMES = frozenset({r.value for r in Roi} | set(PROPERTY_TYPES) | set(KNOWN_CODES.values())
                         | set(UNCODED_NAMES))


def _frame_numbers(volume: Volume) -> dict[tuple[str, int | None], int]:
    out: dict[tuple[str, int | None], int] = {}
    frames = volume.frame_numbers or (None,) * len(volume.sop_instance_uids)
    for k, (uid, frame) in enumerate(zip(volume.sop_instance_uids, frames, strict=True)):
        out[(uid, frame)] = k
    return out


def _slice_of_reference(i: int, sources: Iterable[Dataset], slots: dict[tuple[str, int | None], int],
                        volume: Volume) -> int | None:
    """The volume slice a frame's source image references, None if it references none."""
    refs = []
    for src in sources:
        uid = str(src.get("ReferencedSOPInstanceUID", ""))
        if not uid:
            continue
        frames = src.get("ReferencedFrameNumber")
        frame_list: list[int | None]
        if frames is None or frames == "":
            frame_list = [None]
        elif isinstance(frames, (int, float, str)):
            frame_list = [int(frames)]
        else:
            frame_list = [int(f) for f in frames]
        refs += [(uid, f) for f in frame_list]
    if not refs:
        return None
    ks = set()
    for uid, frame in refs:
        if (uid, frame) in slots:
            ks.add(slots[(uid, frame)])
            continue
        matches = [k for (u, f), k in slots.items() if u == uid]
        single = [k for (u, f), k in slots.items() if u == uid and f is None]
        if len(single) == 1 and frame in (None, 1):  # a single-frame source, frame 1 or no frame number
            ks.add(single[0])
        elif frame is None and len(matches) == 1:
            ks.add(matches[0])
        elif frame is None and matches:
            raise RoiSetError(f"frame {i + 1} references multi-frame instance {uid} without a frame number")
        else:
            where = f" frame {frame}" if frame is not None else ""
            raise RoiSetError(f"frame {i + 1} references instance {uid}{where}, which is not a slice of "
                              f"series {volume.series_instance_uid}")
    if len(ks) > 1:
        raise RoiSetError(f"frame {i + 1} references {len(ks)} different slices of the series")
    return ks.pop()


def _floats(value: Any, n: int, what: str, i: int) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as exc:
        raise RoiSetError(f"frame {i + 1}: {what} is not numeric ({value!r})") from exc
    if out.shape != (n,):
        raise RoiSetError(f"frame {i + 1}: {what} has {out.size} values, expected {n}")
    return out


def _frame_geometry(i: int, per: Dataset | None, shared: Dataset | None
                    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    def item(keyword: str) -> Dataset | None:
        return _first(per, keyword) or _first(shared, keyword)
    pos = item("PlanePositionSequence")
    ori = item("PlaneOrientationSequence")
    pix = item("PixelMeasuresSequence")
    position = (_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", i)
                if pos is not None and "ImagePositionPatient" in pos else None)
    orientation = (_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", i)
                   if ori is not None and "ImageOrientationPatient" in ori else None)
    spacing = (_floats(pix.PixelSpacing, 2, "PixelSpacing", i)
               if pix is not None and "PixelSpacing" in pix else None)
    return position, orientation, spacing


def _check_geometry(i: int, k: int, volume: Volume, position: np.ndarray | None,
                    orientation: np.ndarray | None, spacing: np.ndarray | None) -> None:
    if orientation is not None and not np.allclose(orientation, volume.orientation, atol=_ORIENTATION_TOL):
        raise RoiSetError(f"frame {i + 1}: orientation {np.round(orientation, 4).tolist()} does not match the "
                          f"series ({list(volume.orientation)})")
    if spacing is not None and not np.allclose(spacing, volume.spacing_mm[1:], rtol=_SPACING_REL_TOL):
        raise RoiSetError(f"frame {i + 1}: pixel spacing {spacing.tolist()} mm does not match the series "
                          f"({list(volume.spacing_mm[1:])} mm)")
    if position is not None:
        expected = volume.index_to_patient(k, 0, 0)
        off = float(np.linalg.norm(position - expected))
        if off > _POSITION_TOL_MM:
            raise RoiSetError(f"frame {i + 1}: position {np.round(position, 2).tolist()} is {off:.2f} mm from "
                              f"slice {k + 1} of the series it references (tolerance {_POSITION_TOL_MM} mm)")


def _slice_at(i: int, position: np.ndarray | None, volume: Volume) -> int:
    """The slice a frame without source reference lies on, by its position."""
    if position is None:
        raise RoiSetError(f"frame {i + 1} has neither a source image reference nor a plane position")
    nz = volume.shape[-3]
    corners = volume.index_to_patient(np.arange(nz), 0, 0)
    dist = np.linalg.norm(corners - position, axis=-1)
    k = int(np.argmin(dist))
    if dist[k] > _POSITION_TOL_MM:
        raise RoiSetError(f"frame {i + 1}: position {np.round(position, 2).tolist()} matches no slice of the "
                          f"series (nearest {dist[k]:.2f} mm away, tolerance {_POSITION_TOL_MM} mm)")
    return k


def _pixels(seg: Dataset) -> np.ndarray:
    try:
        arr = np.asarray(seg.pixel_array)
    except Exception as exc:  # pydicom raises many types for bad pixel data
        raise RoiSetError(f"the SEG's pixel data cannot be decoded: {exc}") from exc
    return arr[None] if arr.ndim == 2 else arr


def rois_from_seg(seg: Dataset, volume: Volume, region: Region | None = None) -> tuple[RoiSet, dict[str, str]]:
    """A reader's SEG as an ROI set on the grid of the series it references.

    Parameters
    ----------
    seg : pydicom.Dataset
        The SEG instance (Segmentation Storage or Label Map Segmentation Storage).
    volume : quant.volume.Volume
        The series the SEG references, assembled by :func:`quant.volume.assemble_volume`
        (the Dixon water series for the node's own measurements).
    region : quant.enums.Region, optional
        The region measured; given, a segment coded as a compartment of another region is refused.

    Returns
    -------
    rois : quant.analysis.RoiSet
        ``labels``: int32 map on ``volume``'s grid (0 outside every segment, else the segment
        number; overlaps go to the higher segment number); ``names``: segment number -> ROI
        name (the canonical name of :mod:`quant.muscles` for a known property type, or for a
        label that spells a known ROI, e.g. "Anterior compartment", "Vastus lateralis"; else
        the segment label as given; the label of a SEG the node made, "right thigh anterior
        compartment (carried)", names its ROI; segments of one name become one label);
        ``source`` READER, ``origin`` this SEG.
    descriptions : dict of str to str
        Segment number (as a string) -> what the segment says: label, property type (code
        meaning, scheme and value), laterality and voxel count.

    Raises
    ------
    RoiSetError
        The SEG references no or another series, a frame references an instance or frame
        not in the volume or lies off its slice, frames differ in size from the volume, a
        segment is empty or cannot be named.
    """
    sop_class = str(seg.get("SOPClassUID", ""))
    if sop_class not in (SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE) and seg.get("Modality") != "SEG":
        raise RoiSetError(f"not a DICOM Segmentation (SOP Class UID {sop_class or '?'})")
    series = referenced_series(seg)
    if series != volume.series_instance_uid:
        raise RoiSetError(f"the SEG references series {series}, not the series measured ({volume.series_instance_uid})")
    nz, ny, nx = volume.shape[-3:]
    rows, cols = int(seg.get("Rows", 0)), int(seg.get("Columns", 0))
    if (rows, cols) != (ny, nx):
        raise RoiSetError(f"the SEG's frames are {rows}x{cols}, the series' images {ny}x{nx}")
    # segment 0 of a label-map SEG is its background (pixel value 0), not an ROI
    segments = {int(s.SegmentNumber): s for s in _items(seg, "SegmentSequence") if int(s.SegmentNumber) > 0}
    if not segments:
        raise RoiSetError("the SEG has no segment (empty Segment Sequence)")
    seg_type = str(seg.get("SegmentationType", "BINARY")).upper()
    pixels = _pixels(seg)
    per_frame = _items(seg, "PerFrameFunctionalGroupsSequence")
    shared = _first(seg, "SharedFunctionalGroupsSequence")
    n_frames = pixels.shape[0]
    if per_frame and len(per_frame) != n_frames:
        raise RoiSetError(f"the SEG has {n_frames} frames but {len(per_frame)} per-frame functional groups")
    slots = _frame_numbers(volume)
    labels = np.zeros((nz, ny, nx), dtype=np.int32)
    # frames of each segment painted in segment-number order: the later segment wins
    painted: list[tuple[int, int, np.ndarray]] = []
    for i in range(n_frames):
        per = per_frame[i] if per_frame else None
        position, orientation, spacing = _frame_geometry(i, per, shared)
        sources = _source_images(per) if per is not None else []
        k = _slice_of_reference(i, sources, slots, volume)
        if k is None:
            k = _slice_at(i, position, volume)
        _check_geometry(i, k, volume, position, orientation, spacing)
        frame = pixels[i]
        if seg_type == "LABELMAP":
            for number in np.unique(frame[frame > 0]):
                painted.append((int(number), k, frame == number))
            continue
        ident = _first(per, "SegmentIdentificationSequence") or _first(shared, "SegmentIdentificationSequence")
        if ident is None or "ReferencedSegmentNumber" not in ident:
            raise RoiSetError(f"frame {i + 1} names no segment (Segment Identification Sequence)")
        number = int(ident.ReferencedSegmentNumber)
        if seg_type == "FRACTIONAL":
            mask = frame >= 0.5 * float(seg.get("MaximumFractionalValue", 255) or 255)
        else:
            mask = frame > 0
        painted.append((number, k, mask))
    counts: dict[int, int] = dict.fromkeys(segments, 0)
    for number, k, mask in sorted(painted, key=lambda t: t[0]):
        if number not in segments:
            raise RoiSetError(f"frames reference segment {number}, which the Segment Sequence does not describe")
        labels[k][mask] = number
        counts[number] += int(mask.sum())
    empty = [n for n, c in counts.items() if c == 0]
    if empty:
        raise RoiSetError("empty segment" + ("s " if len(empty) > 1 else " ")
                          + ", ".join(f"{n} ({str(segments[n].get('SegmentLabel', '')).strip() or '?'})" for n in empty)
                          + ": no pixel set")
    names: dict[int, str] = {}
    sides: dict[int, str] = {}
    descriptions: dict[str, str] = {}
    first_of: dict[str, int] = {}
    for number in sorted(segments):
        name, ptype, laterality = _roi_name(number, segments[number], region)
        label = str(segments[number].get("SegmentLabel", "") or "").strip()
        descriptions[str(number)] = (f"label {label!r}; property type {ptype}; laterality "
                                     f"{laterality or 'not stated'}; {counts[number]} voxels")
        if name in first_of:   # one ROI drawn as several segments (e.g. one per side): one label
            labels[labels == number] = first_of[name]
            if sides.get(first_of[name]) != laterality:   # both sides: the side comes from the anatomy
                sides.pop(first_of[name], None)
            continue
        first_of[name] = number
        names[number] = name
        if laterality in ("right", "left"):
            sides[number] = laterality
    origin = RoiOrigin(str(seg.get("SOPInstanceUID", "")), str(seg.get("SeriesInstanceUID", "")),
                       str(seg.get("StudyInstanceUID", "")), str(seg.get("StudyDate", "") or ""))
    return RoiSet(labels=labels, names=names, source=RoiSource.READER, origin=origin, laterality=sides), descriptions
