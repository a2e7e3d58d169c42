"""Checks and keys of incoming instances, shared by the SCP and the offline pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SegmentationStorage,
)

from reports.uids import subject_key  # noqa: F401  (re-exported: the node's one subject key)

from .errors import InstanceRejected

MR_IMAGE = MRImageStorage
ENHANCED_MR_IMAGE = EnhancedMRImageStorage
SEGMENTATION = SegmentationStorage
SR_CLASSES = {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage}
#: SOP classes the node keeps in its store (images it quantifies; SEG and SR for later use)
KEPT_SOP_CLASSES = {MR_IMAGE, ENHANCED_MR_IMAGE, SEGMENTATION, *SR_CLASSES}

_UNCOMPRESSED = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}


def sop_class_name(uid: str) -> str:
    """The name of SOP class ``uid`` (e.g. "MR Image Storage"), or the UID itself if unknown."""
    try:
        return UID(uid).name
    except Exception:  # unknown UIDs have no name
        return uid


def check_instance(ds: Dataset, transfer_syntax: str | None = None) -> None:
    """Raise :class:`InstanceRejected` with a clear reason if ``ds`` cannot be used.

    Checks the identifying UIDs and, for uncompressed images, that the pixel data is
    complete (a truncated transfer or file).
    """
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = ds.get(keyword)
        except Exception as exc:
            raise InstanceRejected(f"{keyword} cannot be read: {exc}") from exc
        if not value:
            raise InstanceRejected(f"{keyword} is missing")
    try:
        pixel = ds.get("PixelData")
    except Exception as exc:  # truncated streams fail while parsing the element
        raise InstanceRejected(f"the data set is truncated or corrupt: {exc}") from exc
    if pixel is None or "Rows" not in ds:
        return
    ts = str(transfer_syntax or getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts and ts not in _UNCOMPRESSED:
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("BitsAllocated", 16)) + 7) // 8
    if len(pixel) < expected:
        raise InstanceRejected(f"pixel data is truncated: {len(pixel)} bytes of {expected} expected "
                               f"({ds.Rows}x{ds.Columns}x{frames} frames)")


#: Top-level attributes that series recognition (:func:`quant.series.classify_series`) and a
#: protocol's ``match`` read; recorded per instance as a small JSON object keyed by keyword
#: (``instances.header``).
#: Echo times are recorded apart (``instances.echo_times``), since they differ per instance.
HEADER_KEYWORDS = ("SOPClassUID", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                   "StudyDescription", "BodyPartExamined", "ImageType", "FrameType", "ComplexImageComponent",
                   "ScanningSequence", "EchoPulseSequence")
_MAX_TEXT = 256   # header values are cut to this length (the header is for recognition, not display)


def _int(value: Any) -> int:
    """``value`` (IS, US or a multi-value's first item) as an int >= 0; 0 when absent or unreadable."""
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        if value in (None, ""):
            return 0
        return max(int(float(value)), 0)
    except (TypeError, ValueError, OverflowError, IndexError):
        return 0


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)``, or None when the element cannot be read (a hostile or corrupt value)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _first_item(ds: Dataset, *keywords: str) -> Dataset | None:
    """The first item of nested sequences ``keywords`` (e.g. a shared functional group), or None."""
    item: Any = ds
    for kw in keywords:
        seq = _get(item, kw)
        if not seq:
            return None
        item = seq[0]
    return item


def instance_echo_times(ds: Dataset) -> tuple[float, ...]:
    """The distinct echo times (ms, to 3 decimals) of an instance: Echo Time, or for Enhanced MR
    the Effective Echo Times of its per-frame and shared MR Echo functional groups.
    """
    tes: set[float] = set()
    try:
        if ds.get("EchoTime") not in (None, ""):
            tes.add(round(float(ds.EchoTime), 3))
        groups = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
        groups += list(ds.get("SharedFunctionalGroupsSequence", []) or [])
        for group in groups:
            echo = group.get("MREchoSequence")
            if echo and echo[0].get("EffectiveEchoTime") not in (None, ""):
                tes.add(round(float(echo[0].EffectiveEchoTime), 3))
    except Exception:  # a corrupt value: the instance is still stored; its series then declares less
        pass
    return tuple(sorted(tes))


def instance_facts(ds: Dataset) -> dict[str, Any]:
    """The columns of ``instances`` that describe an instance's header, for store time.

    Read from the header only (pixel data is never decoded), they are what
    :mod:`node.protocols` uses to recognise each series (``header``, ``echo_times``) and to
    tell when it is complete:

    - ``images_in_acquisition``: Images in Acquisition (0020,1002);
    - ``echo_train_length``: Echo Train Length (0018,0091), top level or in the shared MR
      Timing and Related Parameters functional group (Enhanced MR);
    - ``temporal_positions``: Number of Temporal Positions (0020,0105);
    - ``echo_number``, ``temporal_position``: Echo Numbers (0018,0086), Temporal Position
      Identifier (0020,0100) of this instance;
    - ``slice_key``: Image Position (Patient) to 0.01 mm (or Slice Location), naming the slice;
    - ``n_frames``: Number of Frames (1 for a single-frame image).

    Never raises: a value that cannot be read is recorded as 0 or "" (the series then
    declares no count and completes by quiet time only).
    """
    header: dict[str, Any] = {}
    for kw in HEADER_KEYWORDS:
        value = _get(ds, kw)
        if value is None or value == "":
            continue
        if isinstance(value, (str, int, float)):
            header[kw] = value[:_MAX_TEXT] if isinstance(value, str) else value
        else:   # a multi-value (Image Type, Scanning Sequence)
            try:
                header[kw] = [str(v)[:_MAX_TEXT] for v in value][:16]
            except TypeError:
                continue
    try:
        header_json = json.dumps(header, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        header_json = ""
    etl = _int(_get(ds, "EchoTrainLength"))
    if not etl:
        timing = _first_item(ds, "SharedFunctionalGroupsSequence", "MRTimingAndRelatedParametersSequence")
        etl = _int(_get(timing, "EchoTrainLength")) if timing is not None else 0
    slice_key = ""
    try:
        ipp = ds.get("ImagePositionPatient")
        if ipp is not None and len(ipp) == 3:
            slice_key = "\\".join(f"{float(v):.2f}" for v in ipp)
        elif ds.get("SliceLocation") not in (None, ""):
            slice_key = f"{float(ds.SliceLocation):.2f}"
    except Exception:
        slice_key = ""
    return dict(
        header=header_json,
        echo_times=";".join(f"{t:g}" for t in instance_echo_times(ds))[:200],
        images_in_acquisition=_int(_get(ds, "ImagesInAcquisition")),
        echo_train_length=etl,
        temporal_positions=_int(_get(ds, "NumberOfTemporalPositions")),
        echo_number=_int(_get(ds, "EchoNumbers")),
        temporal_position=_int(_get(ds, "TemporalPositionIdentifier")),
        slice_key=slice_key[:64],
        n_frames=_int(_get(ds, "NumberOfFrames")) or 1,
    )


def read_instance(path: Path) -> Dataset:
    """Read and check one file; :class:`InstanceRejected` says why it cannot be used."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InstanceRejected(f"not a readable DICOM file: {exc}") from exc
    check_instance(ds)
    return ds
