"""What the pipeline found in one study: :class:`StudyAnalysis`, the value type that
:mod:`quant.pipeline` and :mod:`quant.mese_study` return and :mod:`reports` builds from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import ALGORITHM_VERSION
from .enums import RoiSource, SeriesKind
from .errors import QuantError
from .metrics import Measurement
from .segment import Segmentation
from .series import SeriesInfo
from .volume import Volume

if TYPE_CHECKING:
    from .atlas import AtlasResult
    from .registration import CarriedRois
    from .t2stage import T2Result

DIXON_KINDS = (SeriesKind.WATER, SeriesKind.FAT, SeriesKind.IN_PHASE, SeriesKind.OPPOSED_PHASE)


@dataclass(frozen=True, eq=False)
class RoiSet:
    """Muscles or compartments to measure below the region: a label map on the grid of the
    volume segmented (:attr:`StudyAnalysis.anatomy`), the name of each label (a
    :class:`~quant.enums.Roi` value or a reader's segment label) and where they came from.
    """

    labels: np.ndarray                # int, 0 outside every ROI
    names: Mapping[int, str]          # label -> ROI name
    source: RoiSource = RoiSource.READER
    origin: RoiOrigin | None = None   # the reader's SEG the set comes from (reader, carried)
    laterality: Mapping[int, str] = field(default_factory=dict)   # label -> "right"/"left" where stated


@dataclass(frozen=True)
class RoiOrigin:
    """The reader's SEG an ROI set was drawn in: its instance, series and the visit (study
    and date) it was drawn on. Carried sets keep the origin of the set they were carried from.
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    study_date: str = ""


@dataclass(frozen=True, eq=False)
class RoiReference:
    """A reader's ROI set with the anatomy of the visit it was drawn on: what carrying it to
    another visit needs (:func:`quant.registration.carry_rois`).

    ``anatomy`` is the 3-D volume segmented at that visit (Dixon or MEGRE water), ``rois``
    the set on its grid (``origin`` set), ``side`` its :class:`~quant.enums.SideLabel` map
    and ``region`` the region it was measured as (a set is carried only to the same region).
    """

    anatomy: Volume
    rois: RoiSet
    side: np.ndarray
    region: str


class NoDixonError(QuantError):
    """The study has no usable Dixon water and fat series."""


@dataclass(frozen=True, eq=False)
class StudyAnalysis:
    """Everything the pipeline found in one study."""

    series: tuple[SeriesInfo, ...]
    anatomy: Volume                   # the volume segmented (Dixon water, MEGRE water or MESE first
                                      # echo): masks and maps are on its grid
    fat_fraction: np.ndarray          # 0..1, NaN where no signal
    segmentation: Segmentation
    measurements: tuple[Measurement, ...]
    csa_per_slice: dict               # (region, side) -> CSA (mm²) of each slice
    algorithm_version: str = ALGORITHM_VERSION
    notes: tuple[str, ...] = ()
    t2: T2Result | None = None      # water T2 of the multi-echo spin-echo series, if any
    flags: tuple[str, ...] = ()       # e.g. "fat-water-swap-corrected-whole-series"
    rois: RoiSet | None = None        # the ROIs measured besides the whole region, if any
    roi_refusals: tuple[tuple[str, str], ...] = ()   # (SOP Instance UID, reason) of reader SEGs not used
    carried: CarriedRois | None = None   # registration quality when ``rois`` were carried from another visit
    atlas: AtlasResult | None = None     # fusion and its confidence when ``rois`` came from other subjects' sets

    @property
    def dixon_series(self) -> dict[SeriesKind, SeriesInfo]:
        """The Dixon series used, by kind (empty for a MEGRE- or MESE-only study)."""
        return {s.kind: s for s in self.series if s.kind in DIXON_KINDS}
