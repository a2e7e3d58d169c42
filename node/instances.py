"""Checks and keys of incoming instances, shared by the SCP and the offline pipeline."""

from __future__ import annotations

import functools
import io
import json
import math
import re
import struct
import zlib
from collections.abc import Container
from pathlib import Path
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SegmentationStorage,
)
from pydicom.valuerep import IS, DSfloat

from reports.uids import subject_key  # noqa: F401  (re-exported: the node's one subject key)

from .errors import InstanceRejected
from .text import printable

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


#: The most bytes of decoded pixels one instance may declare (Rows x Columns x Samples per
#: Pixel x Bits Allocated x Number of Frames): 1 GiB, e.g. 2,000 frames of 512 x 512 at 16 bits.
#: An instance that declares more is refused before anything is decoded.
MAX_PIXEL_BYTES = 1 << 30
#: A deflated data set may inflate to at most this many times its compressed size (but always
#: to :data:`MIN_INFLATE_LIMIT` bytes): MR images deflate by 2 to 10, a deflate bomb by 1,000.
MAX_INFLATE_RATIO = 32
MIN_INFLATE_LIMIT = 32 << 20
#: Limits of the attributes that size the pixel data (DICOM's own ranges, or what MR uses).
_PIXEL_LIMITS = {"Rows": (1, 65535), "Columns": (1, 65535), "NumberOfFrames": (1, 1_000_000),
                 "SamplesPerPixel": (1, 4), "BitsAllocated": (1, 64)}
_DEFAULTS = {"NumberOfFrames": 1, "SamplesPerPixel": 1, "BitsAllocated": 16}


def _pixel_count(ds: Dataset, keyword: str) -> int:
    """One attribute that sizes the pixel data, as an int within its limits, or InstanceRejected."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            if keyword not in _DEFAULTS:
                raise InstanceRejected(f"{keyword} is missing from an image with Pixel Data")
            return _DEFAULTS[keyword]
        number = int(value)
    except InstanceRejected:
        raise
    except Exception as exc:  # a corrupt value: ValueError, TypeError, OverflowError...
        raise InstanceRejected(f"{keyword} cannot be read as a number: {printable(exc, 100)}") from exc
    low, high = _PIXEL_LIMITS[keyword]
    if not low <= number <= high:
        raise InstanceRejected(f"{keyword} is {number}, outside {low}..{high}")
    return number


def declared_pixel_bytes(ds: Dataset) -> int:
    """The bytes of pixels ``ds`` declares (Rows x Columns x Number of Frames x Samples per
    Pixel x Bits Allocated / 8, rounded up); :class:`InstanceRejected` if one of them is
    missing, unreadable or out of range, or if the total is more than :data:`MAX_PIXEL_BYTES`.
    """
    counts = {k: _pixel_count(ds, k) for k in _PIXEL_LIMITS}
    bits = counts["Rows"] * counts["Columns"] * counts["NumberOfFrames"] * counts["SamplesPerPixel"] \
        * counts["BitsAllocated"]
    size = (bits + 7) // 8
    if size > MAX_PIXEL_BYTES:
        raise InstanceRejected(
            f"the image declares {size:,} bytes of pixels ({counts['Rows']}x{counts['Columns']}x"
            f"{counts['NumberOfFrames']} frames x {counts['SamplesPerPixel']} samples x "
            f"{counts['BitsAllocated']} bits), more than the node decodes ({MAX_PIXEL_BYTES:,})")
    return size


def _decode_elements(ds: Dataset) -> None:
    """Decode every public element of ``ds`` (sequences included) now, so that a value pydicom
    cannot convert (a wrong VR, a bad length) is refused here and not met later by the analysis.
    Private elements are left as they are: the node never reads them.
    """
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        try:
            elem = ds[tag]
            value = elem.value
        except Exception as exc:  # pydicom raises many types for a value it cannot convert
            raise InstanceRejected(f"element {tag} cannot be read: {type(exc).__name__}: "
                                   f"{printable(exc, 120)}") from exc
        if elem.VR == "SQ":
            for item in value or ():
                if isinstance(item, Dataset):
                    _decode_elements(item)


def check_instance(ds: Dataset, transfer_syntax: str | None = None, *, decode_all: bool = True) -> None:
    """Raise :class:`InstanceRejected` with a clear reason if ``ds`` cannot be used.

    Decodes every public element (unless ``decode_all`` is False: the SCP leaves that to the
    job that reads the instance, which quarantines it then); checks the identifying UIDs;
    for images, that the attributes sizing the pixel data are readable and within range and
    that the declared size is at most :data:`MAX_PIXEL_BYTES` (a memory bomb is refused
    before it is decoded); for uncompressed images, that the length of Pixel Data is the
    declared one (a truncated transfer, or a mismatch).
    """
    if decode_all:
        _decode_elements(ds)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = ds.get(keyword)
            text = str(value or "")
        except Exception as exc:
            raise InstanceRejected(f"{keyword} cannot be read: {printable(exc, 100)}") from exc
        if not text.strip():
            raise InstanceRejected(f"{keyword} is missing")
    try:
        pixel = ds.get("PixelData")
    except Exception as exc:  # truncated streams fail while parsing the element
        raise InstanceRejected(f"the data set is truncated or corrupt: {printable(exc, 100)}") from exc
    if pixel is None:
        return
    expected = declared_pixel_bytes(ds)
    ts = str(transfer_syntax or getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts and ts not in _UNCOMPRESSED:
        return
    if not isinstance(pixel, bytes):
        raise InstanceRejected("Pixel Data of an uncompressed image is not a byte string")
    if len(pixel) < expected:
        raise InstanceRejected(f"pixel data is truncated: {len(pixel)} bytes of {expected} expected "
                               f"({ds.Rows}x{ds.Columns}x{ds.get('NumberOfFrames', 1)} frames)")
    if len(pixel) > expected + 1:   # one byte of padding to an even length
        raise InstanceRejected(f"pixel data has {len(pixel)} bytes where Rows, Columns, Number of Frames, "
                               f"Samples per Pixel and Bits Allocated declare {expected}")


def _stop_after_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def inflate(data: bytes, limit: int | None = None) -> bytes:
    """``data`` (raw deflate, as Deflated Explicit VR Little Endian stores a data set) inflated,
    at most ``limit`` bytes (default: :data:`MAX_INFLATE_RATIO` times ``len(data)``, at least
    :data:`MIN_INFLATE_LIMIT`); :class:`InstanceRejected` when it would inflate to more (a
    deflate bomb) or is not complete deflate data. Memory stays within ``limit`` plus one chunk.
    """
    if limit is None:
        limit = max(MIN_INFLATE_LIMIT, MAX_INFLATE_RATIO * len(data))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while pending and not inflater.eof:
            out += inflater.decompress(pending, 1 << 20)
            pending = inflater.unconsumed_tail
            if len(out) > limit:
                raise InstanceRejected(f"the deflated data set inflates to more than {limit:,} bytes "
                                       f"from {len(data):,} (a deflate bomb): refused")
        if not inflater.eof:
            out += inflater.flush()
    except zlib.error as exc:
        raise InstanceRejected(f"the deflated data set cannot be inflated: {exc}") from exc
    if not inflater.eof:
        raise InstanceRejected("the deflated data set is incomplete (the deflate stream does not end)")
    if len(out) > limit:
        raise InstanceRejected(f"the deflated data set inflates to more than {limit:,} bytes: refused")
    return bytes(out)



#: Explicit VRs whose length field is 4 bytes (after 2 reserved bytes), PS3.5 Table 7.1-1.
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_VRS = _LONG_VRS | {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL",
                    "SS", "ST", "TM", "UI", "UL", "US"}
_TAG_LENGTH = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_LENGTH = struct.Struct("<I")
#: An explicit VR's two bytes: (the VR, whether its length field is 4 bytes).
_VR_OF = {vr.encode(): (vr, vr in _LONG_VRS) for vr in _VRS}
_UNDEFINED = 0xFFFFFFFF
#: Transfer syntaxes read by the fast reader: Little Endian, the data set not deflated.
_LITTLE_ENDIAN = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
                  JPEG2000Lossless, RLELossless}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _NotSimple(Exception):
    """The fast reader does not handle this stream; pydicom reads it."""


def _end_of_undefined(data: bytes, pos: int, implicit: bool, depth: int = 0) -> tuple[int, int]:
    """The end of the value of an element of undefined length starting at ``pos``: (the offset
    of its Sequence Delimitation Item, the offset after it). Items of defined length are
    skipped by their length; items of undefined length are read element by element.
    """
    if depth > 16:
        raise _NotSimple("sequences nested too deep")
    end = len(data)
    while pos + 8 <= end:
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return pos, pos + 8
        if tag != _ITEM:
            raise _NotSimple("an undefined length without items")
        pos += 8
        if length != _UNDEFINED:
            pos += length
            continue
        while True:   # an item of undefined length: its elements, to its Item Delimitation Item
            if pos + 8 > end:
                raise _NotSimple("an item runs past the end")
            group, element, length = _TAG_LENGTH.unpack_from(data, pos)
            if group << 16 | element == _ITEM_END:
                pos += 8
                break
            pos, _, length, value_at = _element_header(data, pos, implicit)
            pos = _end_of_undefined(data, value_at, implicit, depth + 1)[1] if length == _UNDEFINED \
                else value_at + length
    raise _NotSimple("an undefined length runs past the end")


def _element_header(data: bytes, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None for implicit, length, offset of the value) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise _NotSimple("an element header runs past the end")
    if implicit:
        group, element, length = _TAG_LENGTH.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8
    group, element, vr_bytes, short = _EXPLICIT.unpack_from(data, pos)
    try:
        vr = vr_bytes.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _NotSimple("a VR that is not text") from exc
    if vr not in _VRS:
        raise _NotSimple(f"VR {vr!r}")
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _NotSimple("an element header runs past the end")
        return group << 16 | element, vr, struct.unpack_from("<I", data, pos + 8)[0], pos + 12
    return group << 16 | element, vr, short, pos + 8


def _scan(data: bytes, pos: int, end: int, implicit: bool, group_below: int | None = None,
          wanted: Container[int] | None = None) -> tuple[dict[int, RawDataElement], int]:
    """The elements of ``data[pos:end]`` (those of ``wanted`` only, when given) as pydicom's raw
    (undecoded) elements, and where the reading stopped (the first element of group
    ``group_below`` or more, when given).

    :func:`_element_header` written out in the loop: this walk over every top-level element is
    most of what the SCP spends reading an instance.
    """
    out: dict[int, RawDataElement] = {}
    n = len(data)
    stop_at = group_below << 16 if group_below is not None else 1 << 32
    explicit_header, implicit_header, long_length, vr_of = (_EXPLICIT.unpack_from, _TAG_LENGTH.unpack_from,
                                                             _LENGTH.unpack_from, _VR_OF.get)
    while pos < end:
        if pos + 8 > n:
            raise _NotSimple("an element header runs past the end")
        vr: str | None
        if implicit:
            group, element, length = implicit_header(data, pos)
            vr, value_at = None, pos + 8
        else:
            group, element, vr_bytes, length = explicit_header(data, pos)
            info = vr_of(vr_bytes)
            if info is None:
                raise _NotSimple(f"VR {vr_bytes!r}")
            vr, is_long = info
            if is_long:
                if pos + 12 > n:
                    raise _NotSimple("an element header runs past the end")
                length, value_at = long_length(data, pos + 8)[0], pos + 12
            else:
                value_at = pos + 8
        tag = group << 16 | element
        if tag >= stop_at:
            return out, pos
        if length == _UNDEFINED:
            value_end, pos = _end_of_undefined(data, value_at, implicit)
            is_sequence = vr == "SQ" or (vr is None and dictionary_VR_or_none(tag) == "SQ")
            length = value_end - value_at if is_sequence else _UNDEFINED
        else:
            value_end = pos = value_at + length
            if pos > end:
                raise _NotSimple("a value runs past the end")
        if group == 0xFFFE:
            raise _NotSimple("an item tag at the top level")
        if wanted is not None and tag not in wanted:
            continue
        out[tag] = RawDataElement(BaseTag(tag), vr, length, data[value_at:value_end], value_at,
                                           implicit, True)
    return out, pos


def dictionary_VR_or_none(tag: int) -> str | None:
    """The VR of ``tag`` in pydicom's dictionary, or None (a private or unknown tag)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _fast_read(data: bytes) -> ReceivedHeader:
    """The :class:`ReceivedHeader` of a Part 10 file in a Little Endian transfer syntax (not
    deflated), its elements found by their lengths alone; :class:`_NotSimple` for anything
    else (pydicom then reads it).
    """
    if len(data) < 144 or data[128:132] != b"DICM":
        raise _NotSimple("no preamble")
    meta, pos = _scan(data, 132, len(data), False, group_below=0x0003)
    ts_raw = meta.get(0x00020010)
    ts = (ts_raw.value or b"").decode("ascii", "replace").strip("\0 ") if ts_raw is not None else ""
    if ts not in _LITTLE_ENDIAN:
        raise _NotSimple(f"transfer syntax {ts!r}")
    implicit = ts == ImplicitVRLittleEndian
    if not implicit and pos + 6 <= len(data) and data[pos + 4:pos + 6].decode("latin-1") not in _VRS:
        raise _NotSimple("an explicit VR transfer syntax that is not")   # pydicom guesses: let it
    elements, _ = _scan(data, pos, len(data), implicit, wanted=_SCANNED)
    charset = elements.get(0x00080005)
    # the transfer syntax as pydicom gives it (trailing padding removed); "" where that differs
    # from ``ts`` (check_instance then reads the file meta as pydicom does)
    as_pydicom = ts if ts_raw is not None and (ts_raw.value or b"").decode("latin-1").rstrip("\0 ") == ts else ""
    return ReceivedHeader(elements, (charset.VR, charset.value) if charset is not None else None, meta, as_pydicom)


#: Every attribute the SCP reads of an instance before it answers (:func:`check_instance`
#: without ``decode_all``, :func:`received_fields`, :func:`subject_key`).
RECEIVE_KEYWORDS = frozenset((
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate",
    "ClinicalTrialTimePointID", "ClinicalTrialSubjectID", "ClinicalTrialSponsorName", "PatientID",
    "IssuerOfPatientID", "Modality", "SeriesNumber", "SeriesDescription", "StudyDescription", "BodyPartExamined",
    "ImageType", "FrameType", "ComplexImageComponent", "ScanningSequence", "EchoPulseSequence", "EchoTime",
    "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "EchoTrainLength", "ImagesInAcquisition",
    "NumberOfTemporalPositions", "EchoNumbers", "TemporalPositionIdentifier", "ImagePositionPatient",
    "SliceLocation", "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PixelData"))
_RECEIVE_TAGS = {int(tag_for_keyword(kw)): kw for kw in RECEIVE_KEYWORDS}  # type: ignore[arg-type]
_SCANNED = frozenset(_RECEIVE_TAGS) | {0x00080005}   # and Specific Character Set, to convert the text
_RECEIVE_VRS = {tag: dictionary_VR(tag) for tag in _RECEIVE_TAGS}
_PYDICOM = object()   # "convert this value with pydicom"
_IS = re.compile(r" *[+-]?[0-9]{1,11} *")
_DS = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")
_ASCII_STRINGS = {"AE", "AS", "CS", "DA", "DT", "TM"}


def _plain_value(vr: str, value: bytes | None) -> Any:
    """The value pydicom would convert ``value`` of VR ``vr`` to, for the plain cases of the
    VRs the SCP reads most (UI, the ASCII string VRs, IS, DS, US), or :data:`_PYDICOM` for
    anything else (empty, not ASCII, not a plain number, a text VR whose character set
    matters): pydicom converts those.
    """
    if not value or not value.isascii():
        return _PYDICOM
    if vr == "UI":
        text = value.decode("ascii").rstrip("\0 ")
        return UID(text) if text and "\\" not in text else _PYDICOM
    if vr in _ASCII_STRINGS:
        items = value.decode("ascii").rstrip(" \0").split("\\")
        return items[0] if len(items) == 1 else _PYDICOM if not all(items) else MultiValue(str, items)
    if vr == "IS":
        items = value.decode("ascii").rstrip(" \0").split("\\")
        if not all(_IS.fullmatch(i) for i in items):
            return _PYDICOM
        return IS(items[0]) if len(items) == 1 else MultiValue(IS, items)
    if vr == "DS":
        items = value.decode("ascii").rstrip(" \0").split("\\")
        if not all(_DS.fullmatch(i) for i in items):
            return _PYDICOM
        return DSfloat(items[0]) if len(items) == 1 else MultiValue(DSfloat, items)
    if vr == "US" and len(value) == 2:
        return value[0] | value[1] << 8
    return _PYDICOM


def _encoding(charset: tuple[str | None, bytes | None] | None) -> Any:
    """The encodings pydicom gives a raw Specific Character Set (its VR and bytes; None: the
    default), kept per raw value; what pydicom raises for one it cannot read.
    """
    if charset is None:
        return default_encoding
    encoding = _ENCODINGS.get(charset)
    if encoding is None:
        vr, value = charset
        encoding = convert_encodings(convert_raw_data_element(
            RawDataElement(BaseTag(0x00080005), vr, len(value or b""), value, 0, vr is None, True)).value)
        if len(_ENCODINGS) < _CACHED_VALUES:
            _ENCODINGS[charset] = encoding
    return encoding


#: Converted values of received elements by (tag, VR, bytes, raw character set), for values of
#: at most _CACHED_BYTES bytes of immutable types; emptied when it holds _CACHED_VALUES.
_CONVERTED: dict[tuple[int, str, bytes | None, tuple[str | None, bytes | None] | None], Any] = {}
_ENCODINGS: dict[tuple[str | None, bytes | None], Any] = {}
_CACHED_BYTES, _CACHED_VALUES = 256, 4096
_IMMUTABLE = (str, int, float, bytes)   # str covers UID and PersonName's absence; int IS, float DSfloat
_BYTES_VRS = {"OB", "OW"}


class ReceivedHeader:
    """What the SCP reads of a received instance: the attributes of :data:`RECEIVE_KEYWORDS`
    converted by pydicom from their raw elements (the same values a pydicom data set gives),
    and nothing else decoded. Reads with ``get(keyword)`` or as attributes, like a data set;
    asking for an attribute not in the list is a programming error (KeyError).
    """

    def __init__(self, elements: dict[int, RawDataElement], charset: tuple[str | None, bytes | None] | None,
                 meta: dict[int, RawDataElement], transfer_syntax: str):
        self._meta = meta
        self.transfer_syntax = transfer_syntax
        self._values: dict[str, Any] = {}
        encoding = _encoding(charset)   # a Specific Character Set pydicom cannot read fails here, as in pydicom
        for tag, kw in _RECEIVE_TAGS.items():
            raw = elements.get(tag)
            if raw is None:
                continue
            vr, value = raw.VR or _RECEIVE_VRS[tag], raw.value
            if value and vr in _BYTES_VRS:   # pydicom gives Little Endian OB and OW values as they are
                self._values[kw] = value
                continue
            # a series repeats most of its header: a value is converted once for the same
            # element bytes (and character set); mutable values (multi-values) each time
            key = (tag, vr, value, charset) if value is None or len(value) <= _CACHED_BYTES else None
            converted = _CONVERTED.get(key, _PYDICOM) if key is not None else _PYDICOM
            if converted is _PYDICOM:
                converted = _plain_value(vr, value)
                if converted is _PYDICOM:
                    converted = convert_raw_data_element(raw, encoding=encoding).value
                if key is not None and isinstance(converted, _IMMUTABLE):
                    if len(_CONVERTED) >= _CACHED_VALUES:
                        _CONVERTED.clear()
                    _CONVERTED[key] = converted
            self._values[kw] = converted

    @functools.cached_property
    def file_meta(self) -> FileMetaDataset:
        """The file meta information as pydicom's data set (made when first asked for)."""
        return FileMetaDataset({BaseTag(t): e for t, e in self._meta.items()})

    def get(self, keyword: str, default: Any = None) -> Any:
        """The value of ``keyword``, or ``default`` when the instance does not have it."""
        if keyword not in RECEIVE_KEYWORDS:
            raise KeyError(f"{keyword} is not read when an instance is received (RECEIVE_KEYWORDS)")
        return self._values.get(keyword, default)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in RECEIVE_KEYWORDS:
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


def _read_simple(data: bytes) -> ReceivedHeader | None:
    """:func:`_fast_read`, or None where it leaves the stream to pydicom (one it does not read,
    or a value pydicom cannot convert: pydicom's own reading then says why).
    """
    try:
        return _fast_read(data)
    except Exception:   # _NotSimple, or what pydicom raises converting a corrupt value
        return None


def parse_instance(data: bytes, *, decode_all: bool = True) -> Dataset:
    """Parse one DICOM Part 10 byte string (preamble, file meta, data set) and check it
    (:func:`check_instance`).

    With ``decode_all`` False (the SCP, before it answers) a Little Endian stream that is not
    deflated is read by the node's own reader (:func:`_fast_read`): it returns a
    :class:`ReceivedHeader` with only the attributes the SCP reads. Anything else is read by
    pydicom: a deflated data set is inflated by :func:`inflate`, bounded, never by pydicom.
    Whatever is wrong with the bytes, the only exception is :class:`InstanceRejected`, with the reason.
    """
    if not decode_all and (header := _read_simple(data)) is not None:
        check_instance(header, header.transfer_syntax or None, decode_all=False)  # type: ignore[arg-type]
        return header  # type: ignore[return-value]
    ds = read_with_pydicom(data)
    check_instance(ds, decode_all=decode_all)
    return ds


def read_with_pydicom(data: bytes) -> Dataset:
    """One Part 10 byte string read by pydicom (its elements converted when read), a deflated
    data set inflated by :func:`inflate`; :class:`InstanceRejected` if it cannot be read.
    """
    try:
        fp = io.BytesIO(data)
        read_preamble(fp, False)
        meta = read_dataset(fp, False, True, stop_when=_stop_after_meta)
        ts = str(meta.get("TransferSyntaxUID", "") or "").strip("\x00 ")
        if ts == DeflatedExplicitVRLittleEndian:
            start = fp.tell()
            ds = read_dataset(io.BytesIO(inflate(data[start:])), False, True)
            ds.file_meta = FileMetaDataset(meta)
            ds.set_original_encoding(False, True, ds._character_set)
        else:
            ds = pydicom.dcmread(io.BytesIO(data))
    except InstanceRejected:
        raise
    except Exception as exc:  # pydicom raises many types on a corrupt stream
        raise InstanceRejected(f"not a readable DICOM file: {type(exc).__name__}: {printable(exc, 120)}") from exc
    return ds


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
    """The distinct finite echo times (ms, to 3 decimals) of an instance: Echo Time, or for
    Enhanced MR the Effective Echo Times of its per-frame and shared MR Echo functional groups.
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
    return tuple(sorted(te for te in tes if math.isfinite(te)))   # NaN would sort by the order of the set


#: The facts of an instance none of whose values could be read (what :func:`instance_facts` gives then).
NO_FACTS: dict[str, Any] = dict(header="{}", echo_times="", images_in_acquisition=0, echo_train_length=0,
                                temporal_positions=0, echo_number=0, temporal_position=0, slice_key="", n_frames=1)


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
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InstanceRejected(f"not a readable DICOM file: {exc}") from exc
    return parse_instance(data)


def instance_ids(ds: Dataset) -> dict[str, str]:
    """The SOP Instance, SOP Class, Study and Series Instance UIDs of a parsed data set."""
    return dict(sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID))


def received_fields(ds: Dataset) -> dict[str, Any]:
    """What the node records of a received instance, from its parsed data set: its UIDs, the
    subject key, study date, Clinical Trial Time Point ID and :func:`instance_facts`
    (the SCP records them at store time; :meth:`node.store.Store.recover_rows` again from the file).
    """
    return dict(instance_ids(ds), subject_key=subject_key(ds), study_date=str(ds.get("StudyDate", "") or ""),
                time_point=str(ds.get("ClinicalTrialTimePointID", "") or "")[:64], facts=instance_facts(ds))

