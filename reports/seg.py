"""DICOM Segmentation (SEG) of a :class:`quant.pipeline.StudyAnalysis`.

One binary SEG instance on the grid of the series segmented (the analysis' anatomy
volume), in the same study, with one segment per (tissue, side) present among muscle,
subcutaneous fat and bone (cortex and marrow) of the right and left leg, then one per ROI and
side (property type: the ROI's SNOMED CT code where one was verified, see
:func:`reports.codes.roi_property_type`, else the generic "Skeletal muscle structure of lower
limb" with the label naming the ROI).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from quant import __version__
from quant.enums import RoiSource, Side, Tissue
from quant.pipeline import StudyAnalysis
from quant.volume import Volume

from . import codes
from .uids import derive_uid, subject_key

#: Tissues written as segments, in segment-number order (within a tissue: right, left).
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SEGMENT_TISSUES: tuple[Tissue, ...] = (Tissue.MUSCLE, Tissue.SUBCUTANEOUS_FAT, Tissue.BONE)
SEGMENT_SIDES: tuple[Side, ...] = (Side.RIGHT, Side.LEFT)

_TISSUE_WORDS = {Tissue.MUSCLE: "muscle", Tissue.SUBCUTANEOUS_FAT: "subcutaneous fat", Tissue.BONE: "bone"}
_TISSUE_TYPES = {Tissue.MUSCLE: codes.SKELETAL_MUSCLE, Tissue.SUBCUTANEOUS_FAT: codes.SUBCUTANEOUS_FAT,
                 Tissue.BONE: codes.BONE}
_TISSUE_RGB = {  # recommended display colours
    (Tissue.MUSCLE, Side.RIGHT): (200, 60, 60), (Tissue.MUSCLE, Side.LEFT): (220, 110, 80),
    (Tissue.SUBCUTANEOUS_FAT, Side.RIGHT): (230, 200, 90), (Tissue.SUBCUTANEOUS_FAT, Side.LEFT): (240, 220, 140),
    (Tissue.BONE, Side.RIGHT): (230, 230, 230), (Tissue.BONE, Side.LEFT): (200, 200, 210),
}

DEFAULT_SOFTWARE_VERSION = f"musclenode {__version__}"


def _check_analysis(analysis: StudyAnalysis) -> None:
    if not isinstance(analysis, StudyAnalysis):
        raise TypeError(f"analysis must be a quant.pipeline.StudyAnalysis, got {type(analysis).__name__}")
    seg, ref = analysis.segmentation, analysis.anatomy
    if seg.tissue.shape != ref.array.shape[-3:] or seg.side.shape != seg.tissue.shape:
        raise ValueError(f"analysis segmentation {seg.tissue.shape} does not fit its anatomy volume "
                         f"{ref.array.shape[-3:]}")
    if not ref.sop_instance_uids:
        raise ValueError("analysis.anatomy has no SOP Instance UIDs")


def segment_label(analysis: StudyAnalysis, tissue: Tissue, side: Side) -> str:
    """The label of one segment.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
    tissue : quant.enums.Tissue
    side : quant.enums.Side

    Returns
    -------
    str
        E.g. ``"right thigh muscle"``, ``"left lower leg subcutaneous fat"``.
    """
    return f"{Side(side).value} {codes.REGION_WORDS[analysis.segmentation.region.value]} {_TISSUE_WORDS[tissue]}"


class Masks:
    """The (tissue, side) and ROI masks of one analysis, each made once when first asked for.

    A SEG, its SR and their checks read the same masks several times, and each is a
    comparison over the whole volume: a build makes one ``Masks`` and passes it on. The
    arrays are shared between callers: they must not be changed.
    """

    def __init__(self, analysis: StudyAnalysis) -> None:
        self.analysis = analysis
        self._made: dict[tuple, np.ndarray] = {}

    def tissue(self, tissue: Tissue, side: Side) -> np.ndarray:
        """``analysis.segmentation.mask(tissue, side)``."""
        key = ("tissue", tissue, side)
        if key not in self._made:
            self._made[key] = self.analysis.segmentation.mask(tissue, side)
        return self._made[key]

    def roi(self, label: int, side: Side) -> np.ndarray:
        """The muscle voxels of ROI ``label`` on ``side`` (see :func:`roi_mask`)."""
        key = ("roi", label, side)
        if key not in self._made:
            if self.analysis.rois is None:
                self._made[key] = np.zeros(self.analysis.segmentation.tissue.shape, bool)
            else:
                self._made[key] = (self.analysis.rois.labels == label) & self.tissue(Tissue.MUSCLE, side)
        return self._made[key]


def segment_numbers(analysis: StudyAnalysis, masks: Masks | None = None) -> dict[tuple[Tissue, Side], int]:
    """Segment number of each (tissue, side) that :func:`build_seg` writes.

    Numbers are 1, 2, ... over :data:`SEGMENT_TISSUES` x :data:`SEGMENT_SIDES` in that
    order, skipping combinations without any voxel, so muscle comes first.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
    masks : Masks, optional
        The masks of ``analysis`` made so far (a build's).

    Returns
    -------
    dict
        ``{(Tissue, Side): segment number}``.
    """
    _check_analysis(analysis)
    masks = masks or Masks(analysis)
    out: dict[tuple[Tissue, Side], int] = {}
    for tissue in SEGMENT_TISSUES:
        for side in SEGMENT_SIDES:
            if masks.tissue(tissue, side).any():
                out[(tissue, side)] = len(out) + 1
    return out


#: SEG algorithm type of the ROIs of each source.
_ROI_ALGORITHM_TYPES = {"automatic": "AUTOMATIC", "atlas": "AUTOMATIC", "carried": "SEMIAUTOMATIC", "reader": "MANUAL"}
_ROI_RGB = ((70, 130, 230), (60, 180, 120), (150, 90, 200), (230, 150, 40), (40, 190, 200), (200, 80, 150))


def roi_segment_numbers(analysis: StudyAnalysis, masks: Masks | None = None) -> dict[tuple[int, Side], int]:
    """Segment number of each (ROI label, side) of ``analysis.rois`` that :func:`build_seg` writes.

    ROI segments follow the tissue segments (:func:`segment_numbers`), by ROI label, right
    before left, skipping those without a muscle voxel (``masks``: those of ``analysis`` made so far).

    Returns
    -------
    dict
        ``{(ROI label, Side): segment number}``; empty without ROIs.
    """
    out: dict[tuple[int, Side], int] = {}
    if analysis.rois is None:
        return out
    masks = masks or Masks(analysis)
    first = len(segment_numbers(analysis, masks)) + 1
    for label in sorted(analysis.rois.names):
        for side in SEGMENT_SIDES:
            if masks.roi(label, side).any():
                out[(label, side)] = first + len(out)
    return out


def roi_mask(analysis: StudyAnalysis, label: int, side: Side) -> np.ndarray:
    """The muscle voxels of one ROI on one side (what its segment holds).

    Returns
    -------
    ndarray of bool
        On the grid of ``analysis.anatomy``; all False without ROIs.
    """
    return Masks(analysis).roi(label, side)


def roi_label(analysis: StudyAnalysis, label: int, side: Side) -> str:
    """The segment label and tracking identifier of one ROI on one side.

    Returns
    -------
    str
        E.g. ``"right thigh anterior compartment (automatic)"``.
    """
    assert analysis.rois is not None
    return (f"{Side(side).value} {codes.REGION_WORDS[analysis.segmentation.region.value]} "
            f"{codes.roi_words(analysis.rois.names[label])} ({analysis.rois.source.value})")


def sorted_source_images(analysis: StudyAnalysis, source_images: Sequence[Dataset]) -> list[Dataset]:
    """The datasets of the analysis' anatomy series in its slice order.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
    source_images : sequence of pydicom.Dataset
        Exactly the instances of the anatomy series (the series segmented), in any order.

    Raises
    ------
    ValueError
        Instances are missing, extra, repeated, or from another series.
    """
    ref = analysis.anatomy
    if isinstance(source_images, Dataset) or not source_images:
        raise ValueError("source_images must be a non-empty sequence of the anatomy series' datasets")
    by_uid: dict[str, Dataset] = {}
    for i, ds in enumerate(source_images):
        if not isinstance(ds, Dataset):
            raise ValueError(f"source_images[{i}] is not a pydicom Dataset ({type(ds).__name__})")
        uid = str(ds.get("SOPInstanceUID", ""))
        if not uid:
            raise ValueError(f"source_images[{i}] has no SOPInstanceUID")
        if uid in by_uid:
            raise ValueError(f"source_images has SOP Instance UID {uid} twice")
        series = str(ds.get("SeriesInstanceUID", ""))
        if series != ref.series_instance_uid:
            raise ValueError(f"source_images[{i}] ({uid}) is from series {series or '?'}, not the "
                             f"anatomy series {ref.series_instance_uid}")
        by_uid[uid] = ds
    wanted = list(dict.fromkeys(ref.sop_instance_uids))  # a multi-frame instance appears once
    missing = [u for u in wanted if u not in by_uid]
    extra = [u for u in by_uid if u not in set(wanted)]
    if missing or extra:
        raise ValueError("source_images do not match the analysis' anatomy series: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})")
    return [by_uid[u] for u in wanted]


def _roi_digest(analysis: StudyAnalysis) -> tuple[str, ...]:
    """What identifies the ROI set (labels, names, source) in the derived UIDs: other ROIs,
    another SEG (and so another SR); none, the same UIDs as without ROI support.
    """
    if analysis.rois is None:
        return ()
    h = hashlib.sha1(np.ascontiguousarray(analysis.rois.labels, dtype=np.int32).tobytes())
    h.update(repr(sorted(analysis.rois.names.items())).encode())
    h.update(analysis.rois.source.value.encode())
    return ("rois", h.hexdigest())


def _roi_tracking_uid(source: Dataset, analysis: StudyAnalysis, label: int, side: Side) -> str:
    assert analysis.rois is not None
    return roi_tracking_uid(subject_key(source), analysis.segmentation.region.value, side,
                            analysis.rois.names[label], analysis.rois.source.lineage)


def roi_tracking_uid(subject: str, region: str, side: Side | str, roi: str, source: str) -> str:
    """Tracking UID of one ROI of a subject: the same at every visit for the same ROI and
    lineage (``RoiSource.lineage``: a reader's ROIs and the same ROIs carried to other visits
    share one; automatic compartments and a reader's ROIs never do).

    Returns
    -------
    str
        A UID derived from the subject key, region, side, ROI name and lineage.
    """
    return derive_uid("musclenode-tracking", subject, str(region), Side(side).value, "roi", roi, source)


def _affine(ref: Volume) -> np.ndarray:
    """4x4 affine from (slice, row, column) indices to patient coordinates (LPS, mm)."""
    dz, dy, dx = ref.spacing_mm
    aff = np.eye(4)
    aff[:3, 0] = ref.normal * dz
    aff[:3, 1] = ref.column_cosine * dy
    aff[:3, 2] = ref.row_cosine * dx
    aff[:3, 3] = ref.origin_mm
    return aff


def build_seg(analysis: StudyAnalysis, source_images: Sequence[Dataset], *, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None, series_number: int = 901, instance_number: int = 1,
              manufacturer: str = "musclenode", software_version: str = DEFAULT_SOFTWARE_VERSION,
              manufacturer_model_name: str = "musclenode", device_serial_number: str = "0",
              series_description: str = "Muscle segmentation (musclenode)") -> hd.seg.Segmentation:
    """Build the binary DICOM SEG of an analysis.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
        The pipeline output; its masks are on the grid of ``analysis.anatomy``.
    source_images : sequence of pydicom.Dataset
        The datasets of the anatomy series (the series segmented), in any order; sorted here to
        ``analysis.anatomy.sop_instance_uids``. Pixel data need not be loaded.
    series_instance_uid, sop_instance_uid : str, optional
        Default: derived with :func:`reports.uids.derive_uid` from the Study Instance UID,
        ``"seg"``, the algorithm version and the sorted source SOP Instance UIDs, so the
        same inputs always give the same UIDs.
    series_number, instance_number : int
        Positive integers.
    manufacturer, software_version, manufacturer_model_name, device_serial_number : str
        General Equipment of the SEG.
    series_description : str
        Series Description of the SEG.

    Returns
    -------
    highdicom.seg.Segmentation
        In the study of the source images; segments numbered as :func:`segment_numbers`,
        labelled like ``"right thigh muscle"``, with anatomic region Thigh / Lower leg /
        Lower limb and laterality, algorithm AUTOMATIC "musclenode"
        ``analysis.algorithm_version``.

    Raises
    ------
    ValueError
        Malformed analysis or source images, no segment at all, or bad numbers.
    """
    _check_analysis(analysis)
    for name, v in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    sources = sorted_source_images(analysis, source_images)
    ref, segm = analysis.anatomy, analysis.segmentation
    masks = Masks(analysis)
    numbers = segment_numbers(analysis, masks)
    if not numbers:
        raise ValueError("analysis has no muscle, subcutaneous fat or bone voxel of either leg: nothing to segment")

    study_uid = str(sources[0].get("StudyInstanceUID", ""))
    if not study_uid:
        raise ValueError("source images have no StudyInstanceUID")
    uid_parts = (study_uid, "seg", str(analysis.algorithm_version), *sorted(ref.sop_instance_uids),
                 *_roi_digest(analysis))
    sop_instance_uid = sop_instance_uid or derive_uid(*uid_parts, "instance")
    series_instance_uid = series_instance_uid or derive_uid(*uid_parts, "series")

    algorithm = hd.AlgorithmIdentificationSequence(
        name="musclenode", version=str(analysis.algorithm_version), family=codes.ALGORITHM_FAMILY)
    region = codes.region_concept(segm.region)
    descriptions = []
    roi_numbers = roi_segment_numbers(analysis, masks)
    stack: np.ndarray = np.zeros(segm.tissue.shape + (len(numbers) + len(roi_numbers),), dtype=np.uint8)
    for (tissue, side), number in numbers.items():
        stack[..., number - 1] = masks.tissue(tissue, side)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment_label(analysis, tissue, side),
            segmented_property_category=codes.TISSUE,
            segmented_property_type=_TISSUE_TYPES[tissue],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[copy.deepcopy(region)],  # own copy: it gets a modifier below
            display_color=hd.color.CIELabColor.from_rgb(*_TISSUE_RGB[(tissue, side)]),
        )
        # Laterality as a modifier of the anatomic region (General Anatomy macro).
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [copy.deepcopy(codes.laterality(side))]
        descriptions.append(desc)
    for (label, side), number in roi_numbers.items():
        assert analysis.rois is not None
        stack[..., number - 1] = masks.roi(label, side)
        kind = _ROI_ALGORITHM_TYPES[analysis.rois.source.value]
        words = roi_label(analysis, label, side)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=words,
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.roi_property_type(analysis.rois.names[label], segm.region),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[kind],
            algorithm_identification=None if kind == "MANUAL" else algorithm,
            tracking_id=words,
            tracking_uid=_roi_tracking_uid(sources[0], analysis, label, side),
            anatomic_regions=[copy.deepcopy(region)],
            display_color=hd.color.CIELabColor.from_rgb(*_ROI_RGB[(label - 1) % len(_ROI_RGB)]),
        )
        desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [copy.deepcopy(codes.laterality(side))]
        origin = analysis.rois.origin
        if origin is not None:   # the reader's SEG this segment derives from, in words
            how = "carried by registration from" if analysis.rois.source is RoiSource.CARRIED else "from"
            desc.SegmentDescription = f"{how} reader SEG {origin.sop_instance_uid}"[:64]
        descriptions.append(desc)

    multi_frame = any(f is not None for f in ref.frame_numbers)
    pixel_array: hd.Volume | np.ndarray
    if multi_frame:
        # One enhanced multi-frame instance: let highdicom match frames by geometry.
        pixel_array = hd.Volume(stack, _affine(ref), coordinate_system="PATIENT",
                                frame_of_reference_uid=ref.frame_of_reference_uid,
                                channels={"SegmentNumber": list(range(1, stack.shape[-1] + 1))})
    else:
        rows, cols = stack.shape[1:3]
        for ds in sources:
            if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
                raise ValueError(f"source image {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, "
                                 f"the masks are {rows}x{cols}")
        pixel_array = stack
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid,
        instance_number=int(instance_number),
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_version,
        device_serial_number=device_serial_number,
        content_label="MUSCLENODE",
        content_description="Automatic segmentation of leg muscle, subcutaneous fat and bone",
        series_description=series_description,
    )
    _reference_reader_seg(seg, analysis)
    return seg


def _reference_reader_seg(seg: Dataset, analysis: StudyAnalysis) -> None:
    """Name the reader's SEG that the ROIs derive from in the Common Instance Reference
    module (Studies Containing Other Referenced Instances: it lies in the study of the visit
    it was drawn on, or in this study's Referenced Series when it is this visit's own).
    """
    rois = analysis.rois
    if rois is None or rois.origin is None or rois.source not in (RoiSource.CARRIED, RoiSource.READER):
        return
    o = rois.origin
    instance = Dataset()
    instance.ReferencedSOPClassUID = SEGMENTATION_STORAGE
    instance.ReferencedSOPInstanceUID = o.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = o.series_instance_uid
    series.ReferencedInstanceSequence = [instance]
    if o.study_instance_uid == str(seg.StudyInstanceUID):
        seg.ReferencedSeriesSequence.append(series)
        return
    study = Dataset()
    study.StudyInstanceUID = o.study_instance_uid
    study.ReferencedSeriesSequence = [series]
    if "StudiesContainingOtherReferencedInstancesSequence" not in seg:
        seg.StudiesContainingOtherReferencedInstancesSequence = []
    seg.StudiesContainingOtherReferencedInstancesSequence.append(study)

