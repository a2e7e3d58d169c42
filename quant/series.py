"""Series recognition: which series of an exam are Dixon water, fat, in-phase,
opposed-phase, and which are multi-echo spin echo, as Siemens, GE and Philips write them.

Recognition is a table of conventions (:data:`DIXON_CONVENTIONS`), not one function per
vendor: each row says which value of Image Type (0008,0008) or which token of the Series
Description (0008,103E) marks a kind. Image Type is trusted before the description.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypedDict

from pydicom.dataset import Dataset
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from .enums import SeriesKind
from .errors import SeriesError

MR_IMAGE_SOP_CLASSES = {MRImageStorage: "MR Image Storage", EnhancedMRImageStorage: "Enhanced MR Image Storage"}


@dataclass(frozen=True)
class Convention:
    """One way a vendor marks a Dixon image kind."""

    vendor: str
    kind: SeriesKind
    image_type: frozenset[str]  # any of these values in Image Type marks the kind
    description: re.Pattern     # or the series description matches this


def _desc(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.IGNORECASE)


# Image Type values are compared upper-case; description patterns are searched.
DIXON_CONVENTIONS: tuple[Convention, ...] = (
    # Siemens (VIBE/TSE Dixon): ImageType DERIVED\PRIMARY\DIXON\WATER; descriptions *_W, *_F, *_in, *_opp
    Convention("Siemens", SeriesKind.WATER, frozenset({"WATER"}), _desc(r"(^|[_\s])W$")),
    Convention("Siemens", SeriesKind.FAT, frozenset({"FAT"}), _desc(r"(^|[_\s])F$")),
    Convention("Siemens", SeriesKind.IN_PHASE, frozenset({"IN_PHASE"}), _desc(r"(^|[_\s])in$")),
    Convention("Siemens", SeriesKind.OPPOSED_PHASE, frozenset({"OPP_PHASE", "OUT_PHASE"}),
               _desc(r"(^|[_\s])opp$")),
    # Philips mDIXON: ImageType ORIGINAL\PRIMARY\W\W\... ; descriptions mDIXON_W, "sWIP mDIXON IP"
    Convention("Philips", SeriesKind.WATER, frozenset({"W"}), _desc(r"dixon.*[_\s]W\b")),
    Convention("Philips", SeriesKind.FAT, frozenset({"F"}), _desc(r"dixon.*[_\s]F\b")),
    Convention("Philips", SeriesKind.IN_PHASE, frozenset({"IP"}), _desc(r"dixon.*[_\s]IP\b")),
    Convention("Philips", SeriesKind.OPPOSED_PHASE, frozenset({"OP"}), _desc(r"dixon.*[_\s]OP\b")),
    # GE IDEAL / LAVA-Flex: descriptions "WATER: Ax LAVA-Flex", "FAT: ...", "InPhase: ...", "OutPhase: ..."
    # (the kind, then a colon; some sites keep the bare kind: "Water", "inphase"). The colon
    # is required so that protocol names such as "FAT SAT Ax T2" or "Fat Fraction: IDEAL IQ"
    # are not taken for a fat image.
    Convention("GE", SeriesKind.WATER, frozenset({"WATER"}), _desc(r"^\s*water\s*(:|$)")),
    Convention("GE", SeriesKind.FAT, frozenset({"FAT"}), _desc(r"^\s*fat\s*(:|$)")),
    Convention("GE", SeriesKind.IN_PHASE, frozenset({"IN PHASE", "IN_PHASE"}),
               _desc(r"^\s*in[\s_-]*phase\s*(:|$)")),
    Convention("GE", SeriesKind.OPPOSED_PHASE, frozenset({"OUT PHASE", "OUT_PHASE"}),
               _desc(r"^\s*(out|opp)[\s_-]*phase\s*(:|$)")),
)

_MESE_DESCRIPTION = _desc(r"(mese|multi.?echo.*se|se.?mc|t2.?map|me.?se|cpmg|mse)")
MIN_MESE_ECHOES = 3


@dataclass(frozen=True)
class SeriesInfo:
    """What a series was recognised as, and why (or why it is skipped)."""

    series_instance_uid: str
    kind: SeriesKind
    reason: str
    description: str = ""
    series_number: int | None = None
    n_instances: int = 0
    echo_times_ms: tuple[float, ...] = ()

    @property
    def usable(self) -> bool:
        """True if the series was recognised (its kind is not UNKNOWN)."""
        return self.kind is not SeriesKind.UNKNOWN


def _strings(value: object) -> list[str]:
    """A CS value (one string, or several) as a list of strings; [] for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        return value.split("\\")
    if isinstance(value, Sequence) and not isinstance(value, bytes):   # MultiValue, list
        return [str(v) for v in value]
    return [str(value)]


def _image_type(ds: Dataset) -> list[str]:
    return [v.strip().upper() for v in _strings(ds.get("ImageType") or ds.get("FrameType"))]


def _echo_time(value: object, keyword: str) -> float | None:
    """An echo time in ms, or None when absent; SeriesError when it is not a finite number."""
    if value is None or value == "":
        return None
    try:
        te = float(value)  # type: ignore[arg-type]  # a DS or FD value; anything else is refused below
    except (TypeError, ValueError, OverflowError) as exc:
        raise SeriesError(f"{keyword} is not a number: {str(value)[:40]!r}") from exc
    if not math.isfinite(te):
        raise SeriesError(f"{keyword} is not finite: {te}")
    return te


def _items(value: object) -> list[Dataset]:
    """The items of a sequence value; [] when the value is not a sequence of items."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):   # a pydicom Sequence
        return [item for item in value if isinstance(item, Dataset)]
    return []


def _echo_times(datasets: Iterable[Dataset]) -> tuple[float, ...]:
    tes: set[float] = set()
    for ds in datasets:
        te = _echo_time(ds.get("EchoTime"), "EchoTime")
        if te is not None:
            tes.add(round(te, 3))
        # Enhanced MR: MR Echo is per-frame, or shared when every frame of the instance
        # has the same echo time (one instance per echo).
        groups = _items(ds.get("PerFrameFunctionalGroupsSequence")) + _items(ds.get("SharedFunctionalGroupsSequence"))
        for group in groups:
            echo = _items(group.get("MREchoSequence"))
            te = _echo_time(echo[0].get("EffectiveEchoTime"), "EffectiveEchoTime") if echo else None
            if te is not None:
                tes.add(round(te, 3))
    return tuple(sorted(tes))


_PHASE_TYPES = {"P", "PHASE", "P_FFE", "PHASE MAP"}     # Siemens P, GE PHASE, Philips P_FFE
_MAGNITUDE_TYPES = {"M", "MAGNITUDE", "M_FFE", "MAG"}    # Siemens M, GE MAGNITUDE, Philips M_FFE


def _complex_component(ds: Dataset) -> str | None:
    """``"MAGNITUDE"`` or ``"PHASE"`` from Complex Image Component (Enhanced MR) or Image
    Type values; None when neither says.
    """
    component = str(ds.get("ComplexImageComponent", "") or "").upper()
    if component in ("MAGNITUDE", "PHASE"):
        return component
    types = set(_image_type(ds))
    if types & _PHASE_TYPES:
        return "PHASE"
    if types & _MAGNITUDE_TYPES:
        return "MAGNITUDE"
    return None


def _is_spin_echo(ds: Dataset) -> bool | None:
    """True for spin echo, False for gradient echo / EPI, None when the header does not say
    (no Scanning Sequence nor Echo Pulse Sequence, research mode "RM", GRASE "BOTH").
    """
    scanning = {s.strip().upper() for s in _strings(ds.get("ScanningSequence"))} - {""}
    echo_pulse = str(ds.get("EchoPulseSequence", "") or "").strip().upper()  # Enhanced MR
    if "SE" in scanning or echo_pulse == "SPIN":
        return True
    if scanning & {"GR", "EP"} or echo_pulse == "GRADIENT":
        return False
    return None


class _Common(TypedDict, total=False):
    """The :class:`SeriesInfo` fields every outcome of :func:`classify_series` shares."""

    series_instance_uid: str
    description: str
    series_number: int | None
    n_instances: int
    echo_times_ms: tuple[float, ...]


def classify_series(datasets: Sequence[Dataset]) -> SeriesInfo:
    """Recognise one series from the headers of its instances.

    Returns a :class:`SeriesInfo` whose ``kind`` is :attr:`SeriesKind.UNKNOWN`, with the
    reason in words, when the series is not one musclenode quantifies (an echo time that is
    not a finite number included). :class:`SeriesError` if ``datasets`` is empty.
    """
    if not datasets:
        raise SeriesError("series has no instances")
    ds0 = datasets[0]
    uid = str(ds0.get("SeriesInstanceUID", ""))
    desc = str(ds0.get("SeriesDescription", "")).strip()
    number = ds0.get("SeriesNumber")
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError, OverflowError):   # a corrupt Series Number is only a label
        series_number = None
    base = _Common(series_instance_uid=uid, description=desc, series_number=series_number,
                   n_instances=len(datasets))
    sop_class = str(ds0.get("SOPClassUID", ""))
    if sop_class not in MR_IMAGE_SOP_CLASSES:
        return SeriesInfo(kind=SeriesKind.UNKNOWN, reason=f"not an MR image series (SOP Class {sop_class}, "
                          f"Modality {ds0.get('Modality', '?')})", **base)
    try:
        tes = _echo_times(datasets)
    except SeriesError as exc:
        return SeriesInfo(kind=SeriesKind.UNKNOWN, reason=f"not quantified: {exc}", **base)
    base["echo_times_ms"] = tes
    if len(tes) >= MIN_MESE_ECHOES:
        # The description only decides when the header does not state the sequence type:
        # "T2star ME SENSE" of a gradient echo must not read as multi-echo spin echo.
        spin = _is_spin_echo(ds0)
        if spin or (spin is None and _MESE_DESCRIPTION.search(desc)):
            how = "spin echo" if spin else f"series description {desc!r}"
            return SeriesInfo(kind=SeriesKind.MESE, reason=f"{len(tes)} echo times, {how}", **base)
        seq = "\\".join(_strings(ds0.get("ScanningSequence") or ds0.get("EchoPulseSequence"))) or "absent"
        component = _complex_component(ds0)
        if component is not None:
            kind = SeriesKind.MEGRE_PHASE if component == "PHASE" else SeriesKind.MEGRE_MAGNITUDE
            return SeriesInfo(kind=kind, reason=f"{len(tes)} echo times, gradient echo (sequence {seq}), "
                              f"{component.lower()} images: multi-echo gradient echo (MEGRE)", **base)
        return SeriesInfo(kind=SeriesKind.UNKNOWN, reason=f"{len(tes)} echo times but not spin echo "
                          f"(sequence {seq}; a multi-echo gradient echo whose images are neither "
                          "magnitude nor phase by Image Type)", **base)
    image_type = set(_image_type(ds0))
    for conv in DIXON_CONVENTIONS:
        if image_type & conv.image_type:
            return SeriesInfo(kind=conv.kind, reason=f"Image Type {'/'.join(sorted(image_type & conv.image_type))}"
                              f" ({conv.vendor} convention)", **base)
    for conv in DIXON_CONVENTIONS:
        if conv.description.search(desc):
            return SeriesInfo(kind=conv.kind, reason=f"series description {desc!r} ({conv.vendor} convention)",
                              **base)
    return SeriesInfo(kind=SeriesKind.UNKNOWN, reason="neither a Dixon image (Image Type "
                      f"{'/'.join(_image_type(ds0)) or 'absent'}, description {desc!r}) "
                      "nor a multi-echo spin echo", **base)
