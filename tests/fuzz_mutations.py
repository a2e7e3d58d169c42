"""Hostile variants of small valid instances, for the fuzz tests (``test_fuzz.py``) and the
tests over real associations (``test_hostile.py``).

Two kinds of mutation, each a hypothesis strategy and a seeded plain-``random`` twin:

- byte mutations of a Part 10 file: flips, insertions, deletions, truncation, and
  rewritten element headers (a VR, a value length set to 0, odd, or 0xFFFFFFFF);
- structured mutations of a data set, re-encoded: the attributes that size the pixels
  (huge Rows x Columns x Number of Frames, Bits Allocated, a Pixel Data of the wrong
  length), geometry that is missing, contradictory, NaN, infinite or negative, bad
  numbers in DS and IS fields, wrong transfer syntaxes, broken functional groups.
"""

from __future__ import annotations

import copy
import io
import itertools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from dicom_builders import enhanced_mr_instance, mr_series, slice_positions
from hypothesis import strategies as st
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
VRS = [b"AE", b"CS", b"DS", b"FD", b"IS", b"LO", b"OB", b"OW", b"SQ", b"SS", b"UI", b"UL", b"UN", b"US",
       b"UT", b"XX", b"\x00\x00"]
LENGTHS = [0, 1, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


def encode(ds: Dataset, transfer_syntax: str | None = None) -> bytes:
    """``ds`` as a Part 10 byte string, with pydicom's value checks off (hostile values kept)."""
    ds = copy.copy(ds)
    ds.file_meta = copy.deepcopy(ds.file_meta)
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:   # hostile text first, then deflate
        plain = encode(ds, ExplicitVRLittleEndian)
        meta_end = len(with_transfer_syntax(plain, ExplicitVRLittleEndian)) - len(_body(plain))
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(plain[meta_end:]) + packer.flush()
        return with_transfer_syntax(plain[:meta_end], DeflatedExplicitVRLittleEndian) + body
    buf = io.BytesIO()
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(buf, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = old
    data = buf.getvalue()
    for placeholder, raw in _RAW.items():
        if placeholder in data:
            data = data.replace(placeholder, raw)
    return data


@dataclass(frozen=True)
class Seed:
    """A small valid series: its data sets and their Part 10 bytes, with element offsets."""

    name: str
    datasets: tuple[Dataset, ...]
    files: tuple[bytes, ...]
    headers: tuple[tuple[tuple[int, bool], ...], ...]   # per file: (value offset, long VR header)


def _headers(data: bytes) -> tuple[tuple[int, bool], ...]:
    """Where each top-level element of the data set starts (explicit VR LE files only)."""
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    out = []
    try:
        for elem in data_element_generator(fp, False, True):
            vr = data[elem.value_tell - 8: elem.value_tell - 6] if elem.value_tell >= 8 else b""
            out.append((elem.value_tell, vr in _LONG_VRS))
    except Exception:   # the generator may stop early on odd input; the offsets found are enough
        pass
    return tuple(out)


def _seed(name: str, datasets: list[Dataset], ts: str | None = None) -> Seed:
    files = tuple(encode(ds, ts) for ds in datasets)
    return Seed(name, tuple(datasets), files, tuple(_headers(f) for f in files))


def make_seeds() -> list[Seed]:
    """Classic MR (explicit and implicit VR, deflated), multi-echo, and Enhanced MR multi-frame."""
    classic = mr_series(3, series_description="WATER")
    multi = mr_series(3, echo_times=[10.0, 20.0, 30.0], series_description="mese")
    positions = slice_positions(3)
    pixels = np.arange(3 * 6 * 4, dtype=np.uint16).reshape(3, 6, 4)
    enhanced = [enhanced_mr_instance(positions=positions, pixels=pixels + 100 * e, echo_time=te,
                                     series_uid="1.2.826.0.1.3680043.8.498.77", instance_number=e + 1)
                for e, te in enumerate((10.0, 20.0, 30.0))]
    return [_seed("classic", classic), _seed("implicit", classic, ImplicitVRLittleEndian),
            _seed("deflated", classic, DeflatedExplicitVRLittleEndian), _seed("multi-echo", multi),
            _seed("enhanced", enhanced)]


# ---- byte mutations ---------------------------------------------------------------------------

def mutate_bytes(data: bytes, headers: tuple[tuple[int, bool], ...], ops: list[tuple]) -> bytes:
    """Apply byte operations ``ops`` (each ``(name, position, value)``) to ``data``."""
    buf = bytearray(data)
    for name, pos, value in ops:
        if not buf:
            break
        pos %= len(buf)
        if name == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif name == "set":
            buf[pos] = value % 256
        elif name == "insert":
            buf[pos:pos] = bytes([value % 256]) * (1 + value % 7)
        elif name == "delete":
            del buf[pos:pos + 1 + value % 16]
        elif name == "truncate":
            del buf[max(pos, 1):]
        elif name in ("length", "vr") and headers:
            tell, long_vr = headers[pos % len(headers)]
            if name == "length":
                size = 4 if long_vr else 2
                field = tell - size
                number = LENGTHS[value % len(LENGTHS)] & (0xFFFFFFFF if long_vr else 0xFFFF)
                if field > 0 and tell <= len(buf):
                    buf[field:tell] = number.to_bytes(size, "little")
            else:
                at = tell - (8 if long_vr else 4)
                if at > 0 and at + 2 <= len(buf):
                    buf[at:at + 2] = VRS[value % len(VRS)]
    return bytes(buf)


BYTE_OPS = ["flip", "set", "insert", "delete", "truncate", "length", "length", "vr"]


def byte_ops() -> st.SearchStrategy[list[tuple]]:
    return st.lists(st.tuples(st.sampled_from(BYTE_OPS), st.integers(0, 1 << 16), st.integers(0, 255)),
                    min_size=1, max_size=4)


# ---- structured mutations ---------------------------------------------------------------------

_placeholders = itertools.count(1)
#: raw text written in place of a placeholder number after encoding: {placeholder: hostile}
_RAW: dict[bytes, bytes] = {}


def _raw_text(vr: str, text: str) -> str:
    """A valid number standing for the hostile ``text`` of a DS or IS value until the data set
    is encoded (pydicom will not hold "abc" or "nan" as a DS); :func:`encode` swaps it back.
    """
    raw = text.encode()
    raw += b" " * (len(raw) % 2)
    digits = f"{next(_placeholders):04d}".encode()
    placeholder = (b"9" + digits + b"8" * len(raw))[: len(raw)]
    if len(placeholder) < 5:          # too short to be unique: pad both to 6 bytes
        raw, placeholder = raw.ljust(6), (b"9" + digits + b"8")[:6]
    _RAW[placeholder] = raw
    return placeholder.decode()


def _set(keyword: str, vr: str, value) -> Callable[[Dataset], None]:
    if vr in ("DS", "IS"):
        text = "\\".join(value) if isinstance(value, list) else str(value)
        holder = _raw_text(vr, text)

        def apply(ds: Dataset) -> None:
            ds.add(DataElement(keyword, vr, holder))
    else:
        def apply(ds: Dataset) -> None:
            ds.add(DataElement(keyword, vr, value))
    apply.__name__ = f"{keyword}={str(value)[:20]}"
    return apply


def _delete(keyword: str) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)
    apply.__name__ = f"-{keyword}"
    return apply


def _pixels(fn: Callable[[bytes], bytes], name: str) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        if "PixelData" in ds:   # an earlier mutation may have removed it
            ds.PixelData = fn(bytes(ds.PixelData))
    apply.__name__ = name
    return apply


def _ts(uid: str) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid
    apply.__name__ = f"TS={uid}"
    return apply


def _per_frame(fn: Callable[[Dataset], None], name: str) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        if "PerFrameFunctionalGroupsSequence" in ds:
            fn(ds)
    apply.__name__ = name
    return apply


def _no_shared(ds: Dataset) -> None:
    del ds.SharedFunctionalGroupsSequence


def _short_per_frame(ds: Dataset) -> None:
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(list(ds.PerFrameFunctionalGroupsSequence)[:1])


def _empty_positions(ds: Dataset) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.PlanePositionSequence = DicomSequence([])


def _nan_positions(ds: Dataset) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.PlanePositionSequence[0].add(DataElement("ImagePositionPatient", "DS", _NAN_POSITION))


def _nan_echo(ds: Dataset) -> None:
    for item in ds.PerFrameFunctionalGroupsSequence:
        if "MREchoSequence" in item:
            item.MREchoSequence[0].add(DataElement("EffectiveEchoTime", "FD", float("nan")))


def _bad_slope(ds: Dataset) -> None:
    seq = ds.SharedFunctionalGroupsSequence[0].get("PixelValueTransformationSequence")
    if seq:
        seq[0].add(DataElement("RescaleSlope", "DS", _ABC_SLOPE))


_NAN_POSITION = _raw_text("DS", "nan\\0\\0")
_ABC_SLOPE = _raw_text("DS", "abc")
NAN3, INF3 = ["nan", "0", "0"], ["inf", "-inf", "0"]
STRUCTURED: list[Callable[[Dataset], None]] = [
    # the attributes that size the pixel data
    _set("Rows", "US", 65535), _set("Columns", "US", 65535), _set("Rows", "US", 0), _set("Columns", "US", 0),
    _set("NumberOfFrames", "IS", "1000"), _set("NumberOfFrames", "IS", "0"), _set("NumberOfFrames", "IS", "-3"),
    _set("NumberOfFrames", "IS", "abc"), _set("NumberOfFrames", "IS", "2"),
    _set("NumberOfFrames", "IS", "99999999999999999999"),
    _set("BitsAllocated", "US", 0), _set("BitsAllocated", "US", 1), _set("BitsAllocated", "US", 8),
    _set("BitsAllocated", "US", 12), _set("BitsAllocated", "US", 32), _set("BitsAllocated", "US", 255),
    _set("BitsStored", "US", 0), _set("HighBit", "US", 40), _set("SamplesPerPixel", "US", 0),
    _set("SamplesPerPixel", "US", 3), _set("SamplesPerPixel", "US", 200), _set("PixelRepresentation", "US", 7),
    _set("PhotometricInterpretation", "CS", "YBR_FULL"), _set("PhotometricInterpretation", "CS", ""),
    _set("PlanarConfiguration", "US", 9),
    _pixels(lambda p: p[: len(p) // 2], "pixels/2"), _pixels(lambda p: p * 2, "pixels*2"),
    _pixels(lambda p: b"", "no pixels"), _pixels(lambda p: p[:1], "1 pixel byte"),
    _pixels(lambda p: p + b"\0" * 4096, "pixels+4k"), _delete("PixelData"), _delete("Rows"),
    # geometry: missing, contradictory, NaN, infinite, negative
    _set("PixelSpacing", "DS", ["nan", "1"]), _set("PixelSpacing", "DS", ["-1", "-1"]),
    _set("PixelSpacing", "DS", ["0", "0"]), _set("PixelSpacing", "DS", ["inf", "1"]),
    _set("PixelSpacing", "DS", ["1"]), _set("PixelSpacing", "DS", ["1e308", "1e308"]),
    _set("PixelSpacing", "DS", ["abc", "1"]), _delete("PixelSpacing"),
    _set("ImagePositionPatient", "DS", NAN3), _set("ImagePositionPatient", "DS", INF3),
    _set("ImagePositionPatient", "DS", ["0", "0"]), _set("ImagePositionPatient", "DS", ["1e308"] * 3),
    _set("ImagePositionPatient", "DS", ["-100", "-120", "30"]), _delete("ImagePositionPatient"),
    _set("ImageOrientationPatient", "DS", ["0"] * 6), _set("ImageOrientationPatient", "DS", ["nan"] * 6),
    _set("ImageOrientationPatient", "DS", ["1", "0", "0", "1", "0", "0"]),
    _set("ImageOrientationPatient", "DS", ["0", "1", "0", "0", "0", "1"]),
    _set("ImageOrientationPatient", "DS", ["2", "0", "0", "0", "3", "0"]),
    _set("ImageOrientationPatient", "DS", ["1", "0", "0", "0", "1"]), _delete("ImageOrientationPatient"),
    _set("SliceThickness", "DS", "nan"), _set("SliceThickness", "DS", "-5"),
    _set("SpacingBetweenSlices", "DS", "-3"), _set("SpacingBetweenSlices", "DS", "inf"),
    _delete("FrameOfReferenceUID"), _set("FrameOfReferenceUID", "UI", "x" * 200),
    # numbers in DS / IS fields
    _set("EchoTime", "DS", "nan"), _set("EchoTime", "DS", "inf"), _set("EchoTime", "DS", "-1"),
    _set("EchoTime", "DS", "abc"), _set("EchoTime", "DS", "1e308"), _delete("EchoTime"),
    _set("RescaleSlope", "DS", "nan"), _set("RescaleSlope", "DS", "inf"), _set("RescaleSlope", "DS", "abc"),
    _set("RescaleSlope", "DS", "0"), _set("RescaleIntercept", "DS", "nan"), _set("RescaleIntercept", "DS", "1e308"),
    _set("SeriesNumber", "IS", "abc"), _set("SeriesNumber", "IS", "1.5"), _set("InstanceNumber", "IS", "x"),
    # identity and text
    _delete("SOPInstanceUID"), _set("SOPInstanceUID", "UI", ""), _set("SOPInstanceUID", "UI", "not/a/uid"),
    _set("SOPInstanceUID", "UI", "1." * 100), _delete("StudyInstanceUID"), _delete("SeriesInstanceUID"),
    _set("SeriesInstanceUID", "UI", "../../etc"), _set("SOPClassUID", "UI", "1.2.3"),
    _set("SOPClassUID", "UI", "1.2.840.10008.5.1.4.1.1.66.4"),
    _set("SeriesDescription", "LO", "A\x1b[31m\n" * 2000), _set("ImageType", "CS", ["X"] * 500),
    _set("ImageType", "CS", ["DERIVED", "PRIMARY", "WATER"]), _set("ScanningSequence", "CS", ["GR"]),
    _set("SpecificCharacterSet", "CS", "ISO 2022 IR 999"), _set("PatientName", "PN", "\xff" * 300),
    # transfer syntax that does not match the encoding
    _ts(JPEGBaseline8Bit), _ts(JPEGLSLossless), _ts(RLELossless), _ts("1.2.3.4"), _ts(ImplicitVRLittleEndian),
    # Enhanced MR functional groups
    _per_frame(_no_shared, "-SharedFunctionalGroups"), _per_frame(_short_per_frame, "1 per-frame item"),
    _per_frame(_empty_positions, "empty PlanePosition"), _per_frame(_nan_positions, "NaN PlanePosition"),
    _per_frame(_nan_echo, "NaN EffectiveEchoTime"), _per_frame(_bad_slope, "bad RescaleSlope"),
    _per_frame(_delete("PerFrameFunctionalGroupsSequence"), "-PerFrameFunctionalGroups"),
]


def structured(seed: Seed, index: int, mutations: list[int]) -> list[bytes]:
    """The files of ``seed`` with instance ``index`` changed by the ``mutations`` (indices in
    :data:`STRUCTURED`), re-encoded; the other instances as they were.
    """
    ds = copy.deepcopy(seed.datasets[index])
    for m in mutations:
        STRUCTURED[m % len(STRUCTURED)](ds)
    ts = str(ds.file_meta.TransferSyntaxUID)
    encoding = seed.files[index]
    try:
        data = encode(ds, ts if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                       DeflatedExplicitVRLittleEndian) else ExplicitVRLittleEndian)
        if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            data = with_transfer_syntax(data, ts)   # claimed, not true
    except Exception:   # pydicom cannot write this combination: send the seed's own bytes mutated
        data = encoding[: len(encoding) // 2]
    files = list(seed.files)
    files[index] = data
    return files


def _split(data: bytes) -> tuple[FileMetaDataset, bytes]:
    fp = DicomBytesIO(data)
    read_preamble(fp, False)
    meta = FileMetaDataset(read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag.group != 2))
    return meta, data[fp.tell():]


def _body(data: bytes) -> bytes:
    return _split(data)[1]


def with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Part 10 ``data`` with its file meta rewritten to claim transfer syntax ``uid`` (the data
    set itself unchanged).
    """
    meta, body = _split(data)
    meta.TransferSyntaxUID = uid
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return bytes(out.getvalue()) + body


def structured_cases() -> st.SearchStrategy[tuple[int, int, list[int], list[tuple]]]:
    """(seed index, instance index, structured mutations, byte ops applied afterwards)."""
    return st.tuples(st.integers(0, 4), st.integers(0, 2),
                     st.lists(st.integers(0, len(STRUCTURED) - 1), min_size=1, max_size=3),
                     st.lists(st.tuples(st.sampled_from(BYTE_OPS), st.integers(0, 1 << 16), st.integers(0, 255)),
                              max_size=1))


def random_mutant(seeds: list[Seed], rng: random.Random) -> tuple[str, bytes]:
    """One mutated instance drawn with ``rng`` (for tests over the network): (what, bytes)."""
    seed = rng.choice(seeds)
    index = rng.randrange(len(seed.files))
    if rng.random() < 0.5:
        ops = [(rng.choice(BYTE_OPS), rng.randrange(1 << 16), rng.randrange(256)) for _ in range(rng.randint(1, 3))]
        return f"{seed.name}[{index}] bytes {ops}", mutate_bytes(seed.files[index], seed.headers[index], ops)
    picks = [rng.randrange(len(STRUCTURED)) for _ in range(rng.randint(1, 2))]
    names = [STRUCTURED[p].__name__ for p in picks]
    return f"{seed.name}[{index}] {names}", structured(seed, index, picks)[index]
