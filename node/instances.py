"""Checks and keys of incoming instances, shared by the SCP and the offline pipeline."""

from __future__ import annotations

from pathlib import Path

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


def read_instance(path: Path) -> Dataset:
    """Read and check one file; :class:`InstanceRejected` says why it cannot be used."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InstanceRejected(f"not a readable DICOM file: {exc}") from exc
    check_instance(ds)
    return ds
