"""Volume assembly: DICOM MR slices (classic single-frame or Enhanced MR multi-frame)
into a regular 3-D (or echo x 3-D) array that keeps its geometry.

Geometry convention (DICOM patient coordinates, LPS, millimetres):
the centre of voxel ``(k, r, c)`` of a :class:`Volume` is at
``origin_mm + c * dx * row_cosine + r * dy * column_cosine + k * dz * normal``
where ``spacing_mm == (dz, dy, dx)``, ``row_cosine`` is ImageOrientationPatient[0:3]
(the direction of increasing column index), ``column_cosine`` is
ImageOrientationPatient[3:6] and ``normal = row_cosine x column_cosine``; slices are
sorted by increasing position along ``normal``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from .errors import GeometryError, SeriesError

_ORIENTATION_TOL = 1e-3
_SPACING_REL_TOL = 0.05
#: No coordinate, spacing or echo time of an MR series is a kilometre (or 1,000 s) or more: larger
#: values are corrupt and would overflow the geometry.
_MAX_ABS = 1e6


@dataclass(frozen=True, eq=False)
class Volume:
    """Pixels together with their geometry.

    ``array`` has shape ``(slices, rows, columns)``, or ``(echoes, slices, rows,
    columns)`` for a multi-echo series, in which case ``echo_times_ms`` lists the echo
    times in array order.
    """

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    frame_of_reference_uid: str
    series_instance_uid: str
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...] = ()
    echo_times_ms: tuple[float, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``array``."""
        return self.array.shape

    @property
    def row_cosine(self) -> np.ndarray:
        """Direction (LPS) of increasing column index: ImageOrientationPatient[0:3]."""
        return np.asarray(self.orientation[:3], dtype=float)

    @property
    def column_cosine(self) -> np.ndarray:
        """Direction (LPS) of increasing row index: ImageOrientationPatient[3:6]."""
        return np.asarray(self.orientation[3:], dtype=float)

    @property
    def normal(self) -> np.ndarray:
        """Direction (LPS) of increasing slice index: ``row_cosine x column_cosine``."""
        return np.cross(self.row_cosine, self.column_cosine)

    @property
    def voxel_volume_mm3(self) -> float:
        """The volume of one voxel in mm³."""
        return float(np.prod(self.spacing_mm))

    @property
    def pixel_area_mm2(self) -> float:
        """The in-plane area of one voxel in mm²."""
        return float(self.spacing_mm[1] * self.spacing_mm[2])

    def index_to_patient(self, k: npt.ArrayLike, r: npt.ArrayLike, c: npt.ArrayLike) -> np.ndarray:
        """Patient coordinates (mm, LPS) of voxel centres; arguments broadcast."""
        dz, dy, dx = self.spacing_mm
        k, r, c = (np.asarray(v, dtype=float)[..., None] for v in (k, r, c))
        return (np.asarray(self.origin_mm) + c * dx * self.row_cosine
                + r * dy * self.column_cosine + k * dz * self.normal)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around another 3-D array (a map or a mask)."""
        if array.shape[-3:] != self.array.shape[-3:]:
            raise ValueError(f"array shape {array.shape} does not fit volume {self.array.shape}")
        return Volume(array=array, spacing_mm=self.spacing_mm, origin_mm=self.origin_mm,
                      orientation=self.orientation,
                      frame_of_reference_uid=self.frame_of_reference_uid,
                      series_instance_uid=self.series_instance_uid,
                      sop_instance_uids=self.sop_instance_uids,
                      frame_numbers=self.frame_numbers)

    def same_grid(self, other: Volume, tol_mm: float = 0.01) -> bool:
        """True if ``other`` has the same voxel grid (shape, spacing, origin, orientation) within ``tol_mm``."""
        return (self.array.shape[-3:] == other.array.shape[-3:]
                and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm)
                and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm)
                and np.allclose(self.orientation, other.orientation, atol=_ORIENTATION_TOL))


@dataclass(frozen=True)
class Frame:
    """One 2-D image of a series: a single-frame instance or one frame of a multi-frame."""

    dataset: Dataset = field(repr=False)
    frame_index: int | None  # 0-based frame index in a multi-frame instance, None if single-frame
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    echo_time_ms: float | None
    slope: float
    intercept: float

    @property
    def sop_instance_uid(self) -> str:
        """The SOP Instance UID of the instance the frame belongs to."""
        return str(self.dataset.SOPInstanceUID)


def _require(ds: Dataset, keyword: str, where: str = "") -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        uid = ds.get("SOPInstanceUID", "?")
        raise SeriesError(f"{keyword} is missing{where} (SOP Instance UID {uid})")
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _floats(value: Any, n: int, keyword: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)):
        value = [value] if n == 1 else str(value).split("\\") if isinstance(value, str) else [value]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SeriesError(f"{keyword} is not numeric: {_shown(value)}") from exc
    if len(out) != n:
        raise SeriesError(f"{keyword} has {len(out)} values, expected {n}")
    if not all(math.isfinite(v) and abs(v) < _MAX_ABS for v in out):
        raise SeriesError(f"{keyword} is not a finite number below {_MAX_ABS:g}: {_shown(value)}")
    return out


def _number(value: Any, keyword: str) -> float:
    """One DS/FD value as a finite float; SeriesError naming ``keyword`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SeriesError(f"{keyword} is not a number: {_shown(value)}") from exc
    if not (math.isfinite(number) and abs(number) < _MAX_ABS):
        raise SeriesError(f"{keyword} is {number:g}, not a finite number below {_MAX_ABS:g}")
    return number


def _positive(value: Any, keyword: str) -> float:
    number = _number(value, keyword)
    if number <= 0:
        raise SeriesError(f"{keyword} is {number:g}, not a positive number")
    return number


def _orientation(value: Any) -> tuple[float, ...]:
    """ImageOrientationPatient as six floats: two orthogonal unit vectors, or GeometryError."""
    out = _floats(value, 6, "ImageOrientationPatient")
    row, col = np.asarray(out[:3]), np.asarray(out[3:])
    if (abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01
            or abs(float(np.dot(row, col))) > 0.01):
        raise GeometryError(f"ImageOrientationPatient {out} is not two orthogonal unit vectors")
    return out


def _pixel_spacing(value: Any) -> tuple[float, float]:
    dy, dx = _pair(value, "PixelSpacing")
    if dy <= 0 or dx <= 0:
        raise SeriesError(f"PixelSpacing {dy:g}\\{dx:g} is not positive")
    return dy, dx


def _rescale(value: Any, keyword: str, default: float) -> float:
    if value is None or value == "":
        return default
    number = _number(value, keyword)
    if not np.isfinite(np.float32(number)):
        raise SeriesError(f"{keyword} {number:g} overflows 32-bit floats")
    return number


def _echo_ms(value: Any, keyword: str) -> float | None:
    if value is None or value == "":
        return None
    te = _number(value, keyword)
    if te < 0:
        raise SeriesError(f"{keyword} is {te:g} ms, a negative echo time")
    return te


def _xyz(value: Any, keyword: str) -> tuple[float, float, float]:
    x, y, z = _floats(value, 3, keyword)
    return x, y, z


def _pair(value: Any, keyword: str) -> tuple[float, float]:
    a, b = _floats(value, 2, keyword)
    return a, b


def _six(values: Iterable[float]) -> tuple[float, float, float, float, float, float]:
    a, b, c, d, e, f = (float(v) for v in values)
    return a, b, c, d, e, f


def _first_item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None:
        return None
    seq = seq_owner.get(keyword)
    if not isinstance(seq, Sequence) or isinstance(seq, (str, bytes)) or not seq:
        return None
    return seq[0] if isinstance(seq[0], Dataset) else None


def frames_of(ds: Dataset) -> list[Frame]:
    """Every 2-D frame of one instance with its geometry and echo time."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds)
    position = _xyz(_require(ds, "ImagePositionPatient"), "ImagePositionPatient")
    orientation = _orientation(_require(ds, "ImageOrientationPatient"))
    spacing = _pixel_spacing(_require(ds, "PixelSpacing"))
    return [Frame(ds, None, position, orientation, spacing, _echo_ms(ds.get("EchoTime"), "EchoTime"),
                  _rescale(ds.get("RescaleSlope") or None, "RescaleSlope", 1.0),
                  _rescale(ds.get("RescaleIntercept"), "RescaleIntercept", 0.0))]


def _enhanced_frames(ds: Dataset) -> list[Frame]:
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    items = ds.PerFrameFunctionalGroupsSequence
    uid = ds.get("SOPInstanceUID", "?")
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) \
            or not all(isinstance(item, Dataset) for item in items):
        raise SeriesError(f"PerFrameFunctionalGroupsSequence is not a sequence of items (SOP Instance UID {uid})")
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SeriesError(f"NumberOfFrames is not a number (SOP Instance UID {uid})") from exc
    if len(items) != n_frames:
        raise SeriesError(f"PerFrameFunctionalGroupsSequence has {len(items)} items for {n_frames} frames "
                          f"(SOP Instance UID {uid})")
    frames = []
    for i, per in enumerate(items):
        def item(keyword: str, per: Dataset = per) -> Dataset | None:
            return _first_item(per, keyword) or _first_item(shared, keyword)
        pos_item = item("PlanePositionSequence")
        ori_item = item("PlaneOrientationSequence")
        pix_item = item("PixelMeasuresSequence")
        where = f" in frame {i + 1}"
        if pos_item is None:
            raise SeriesError(f"PlanePositionSequence is missing{where} "
                              f"(SOP Instance UID {ds.get('SOPInstanceUID', '?')})")
        if ori_item is None or pix_item is None:
            raise SeriesError(f"PlaneOrientationSequence or PixelMeasuresSequence is missing{where} "
                              f"(SOP Instance UID {ds.get('SOPInstanceUID', '?')})")
        echo_item = item("MREchoSequence")
        te = echo_item.get("EffectiveEchoTime") if echo_item is not None else None
        pvt = item("PixelValueTransformationSequence")
        frames.append(Frame(
            ds, i,
            _xyz(_require(pos_item, "ImagePositionPatient", where), "ImagePositionPatient"),
            _orientation(_require(ori_item, "ImageOrientationPatient", where)),
            _pixel_spacing(_require(pix_item, "PixelSpacing", where)),
            _echo_ms(te, "EffectiveEchoTime"),
            _rescale(pvt.get("RescaleSlope"), "RescaleSlope", 1.0) if pvt is not None else 1.0,
            _rescale(pvt.get("RescaleIntercept"), "RescaleIntercept", 0.0) if pvt is not None else 0.0))
    return frames


def _pixels(frames: Sequence[Frame]) -> np.ndarray:
    cache: dict[int, np.ndarray] = {}
    out = []
    for f in frames:
        key = id(f.dataset)
        if key not in cache:
            try:
                native = _native_pixels(f.dataset)
                cache[key] = native if native is not None else f.dataset.pixel_array
            except Exception as exc:  # pydicom raises many types for bad pixel data
                raise SeriesError(f"pixel data cannot be decoded (SOP Instance UID "
                                  f"{f.sop_instance_uid}): {exc}") from exc
        arr = cache[key]
        img = arr[f.frame_index] if f.frame_index is not None and arr.ndim == 3 else arr
        if f.frame_index is not None and arr.ndim == 3 and f.frame_index >= arr.shape[0]:
            raise SeriesError(f"pixel data has {arr.shape[0]} frames, frame {f.frame_index + 1} is missing "
                              f"(SOP Instance UID {f.sop_instance_uid})")
        if img.shape != (int(f.dataset.Rows), int(f.dataset.Columns)):
            raise SeriesError(f"pixel data decodes to shape {img.shape}, not Rows x Columns "
                              f"(one sample per pixel; SOP Instance UID {f.sop_instance_uid})")
        out.append(img.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept))
    return np.stack(out)


#: Transfer syntaxes whose pixel data (inflated, for the deflated one) are stored as they are.
_NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99")


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian single-sample image straight from its
    bytes, as pydicom's ``pixel_array`` gives them (bits above Bits Stored masked, signed
    values sign-extended); pydicom's decoder costs about 0.6 ms an image. None for anything
    else (compressed, big-endian, colour, odd sizes, short pixel data), which goes to pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    try:
        bits, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        one_sample = int(ds.get("SamplesPerPixel", 1)) == 1
        raw = ds["PixelData"].value
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
        return None
    if not (one_sample and bits in (8, 16, 32) and 0 < stored <= bits and rows > 0 and cols > 0 and frames > 0
            and isinstance(raw, bytes)):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    count = rows * cols * frames
    if len(raw) < count * dtype.itemsize:
        return None
    arr = np.frombuffer(raw, dtype, count=count).reshape((frames, rows, cols) if frames > 1 else (rows, cols))
    if stored < bits:
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & dtype.type((1 << stored) - 1)
    return arr


def _matrix(f: Frame) -> tuple[int, int]:
    """(Rows, Columns) of a frame's image; SeriesError where either is missing or not a size."""
    try:
        shape = (int(f.dataset.Rows), int(f.dataset.Columns))
    except (AttributeError, TypeError, ValueError):
        raise SeriesError(f"the image has no valid Rows and Columns (SOP Instance UID {f.sop_instance_uid})") \
            from None
    if min(shape) < 1:
        raise SeriesError(f"the image has {shape[0]} Rows and {shape[1]} Columns "
                          f"(SOP Instance UID {f.sop_instance_uid})")
    return shape


def _stack(frames: Sequence[Frame]) -> tuple[list[Frame], tuple[float, float, float], np.ndarray]:
    """Sort frames of one echo along the slice normal and check they form a regular grid."""
    ori0 = np.asarray(frames[0].orientation)
    for f in frames:
        if not np.allclose(f.orientation, ori0, atol=_ORIENTATION_TOL):
            raise GeometryError("slices have different ImageOrientationPatient "
                                f"({frames[0].orientation} and {f.orientation})")
        if not np.allclose(f.pixel_spacing, frames[0].pixel_spacing, rtol=1e-4):
            raise GeometryError("slices have different PixelSpacing")
        if _matrix(f) != _matrix(frames[0]):
            raise GeometryError("slices have different Rows/Columns")
    normal = np.cross(ori0[:3], ori0[3:])
    proj = np.array([np.dot(f.position, normal) for f in frames])
    order = np.argsort(proj, kind="stable")
    frames = [frames[i] for i in order]
    proj = proj[order]
    if len(frames) > 1:
        gaps = np.diff(proj)
        if np.any(gaps < 1e-3):
            raise GeometryError("two slices share one position (a multi-echo or repeated series "
                                "without distinct EchoTime?)")
        dz = float(np.median(gaps))
        if np.any(np.abs(gaps - dz) > _SPACING_REL_TOL * dz):
            raise GeometryError(f"slice spacing is irregular (gaps {np.round(gaps, 2).tolist()} mm)")
    else:
        ds = frames[0].dataset
        keyword = "SpacingBetweenSlices" if ds.get("SpacingBetweenSlices") not in (None, "") else "SliceThickness"
        dz = _positive(ds.get(keyword), keyword) if ds.get(keyword) not in (None, "") else 1.0
    dy, dx = frames[0].pixel_spacing
    return frames, (dz, float(dy), float(dx)), np.asarray(frames[0].position)


def assemble_volume(datasets: Sequence[Dataset]) -> Volume:
    """Assemble one series (all its instances) into a :class:`Volume`.

    Frames with several distinct echo times become a 4-D ``(echo, slice, row, column)``
    array, whether the echoes come as separate single-frame instances, as one
    Enhanced MR instance per echo, or as frames of one instance.

    Raises
    ------
    SeriesError
        An attribute needed for geometry is missing, or the slices do not form a
        regular volume (then :class:`GeometryError`).
    """
    if not datasets:
        raise SeriesError("series has no instances")
    frames = [f for ds in datasets for f in frames_of(ds)]
    if not frames:
        raise SeriesError("series has no frames (an empty PerFrameFunctionalGroupsSequence)")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise SeriesError(f"instances of {len(series_uids)} series were given as one")
    echo_times = sorted({round(f.echo_time_ms, 3) for f in frames if f.echo_time_ms is not None})
    if len(echo_times) > 1:
        missing = [f for f in frames if f.echo_time_ms is None]
        if missing:
            raise SeriesError(f"EchoTime is missing from {len(missing)} of {len(frames)} frames of a "
                              f"multi-echo series (SOP Instance UID {missing[0].sop_instance_uid})")
        groups = [[f for f in frames if f.echo_time_ms is not None and round(f.echo_time_ms, 3) == te]
                  for te in echo_times]
        if len({len(g) for g in groups}) != 1:
            raise GeometryError("echoes have different numbers of slices: "
                                + ", ".join(f"TE {te} ms: {len(g)}" for te, g in zip(echo_times, groups, strict=True)))
        stacked = [_stack(g) for g in groups]
        first, spacing, origin = stacked[0]
        positions = np.array([f.position for f in first])
        for te, (other, _, _) in zip(echo_times[1:], stacked[1:], strict=True):
            if not (np.allclose([f.position for f in other], positions, atol=0.01)
                    and np.allclose(other[0].orientation, first[0].orientation, atol=_ORIENTATION_TOL)
                    and np.allclose(other[0].pixel_spacing, first[0].pixel_spacing, rtol=1e-4)
                    and (other[0].dataset.Rows, other[0].dataset.Columns)
                    == (first[0].dataset.Rows, first[0].dataset.Columns)):
                raise GeometryError(f"echoes do not cover the same slices (TE {te} ms differs from "
                                    f"TE {echo_times[0]} ms in ImagePositionPatient, "
                                    "ImageOrientationPatient, PixelSpacing or Rows/Columns)")
        array = np.stack([_pixels(fr) for fr, _, _ in stacked])
    else:
        first, spacing, origin = _stack(frames)
        array = _pixels(first)
        echo_times = []
    ds0 = first[0].dataset
    for_uid = str(ds0.get("FrameOfReferenceUID", ""))
    if not for_uid:
        raise SeriesError(f"FrameOfReferenceUID is missing (SOP Instance UID {ds0.get('SOPInstanceUID', '?')})")
    return Volume(
        array=array,
        spacing_mm=spacing,
        origin_mm=_xyz(origin, "origin"),
        orientation=_six(first[0].orientation),
        frame_of_reference_uid=for_uid,
        series_instance_uid=series_uids.pop(),
        sop_instance_uids=tuple(f.sop_instance_uid for f in first),
        frame_numbers=tuple(None if f.frame_index is None else f.frame_index + 1 for f in first),
        echo_times_ms=tuple(float(t) for t in echo_times),
    )


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the smallest box holding every voxel of ``mask`` (the whole array if it
    is empty), ``margin`` voxels wider along the last two (in-plane) axes, clipped to the array.
    """
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        pad = margin if axis >= mask.ndim - 2 else 0
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)
