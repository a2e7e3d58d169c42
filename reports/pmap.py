"""DICOM Parametric Maps of a :class:`quant.pipeline.StudyAnalysis`.

One Parametric Map instance per map, each in the study and on the grid of its source series,
referencing the source images:

* the fat fraction (%) of the volume segmented (``analysis.fat_fraction`` on
  ``analysis.anatomy``: Dixon water series, or the PDFF of a multi-echo gradient echo when the
  study had no Dixon series); not sent when the anatomy is the MESE series itself (its fat
  fraction is the T2 fit's, sent as the T2 fat fraction map);
* with a multi-echo spin-echo series, on its first echo: the water T2 (ms), the relative B1
  (1, EPG model only) and the fat fraction of the T2 fit (%).

Pixel data are 32-bit floats equal to the real-world values (Real World Value Mapping slope 1,
intercept 0, UCUM unit). Voxels without a value (outside the body, below the noise, not
fitted) hold IEEE 754 NaN, which PS3.5 Section 8 allows in Float Pixel Data (see CP-2352);
the mapping's LUT explanation says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from quant.enums import SeriesKind, Tissue
from quant.pipeline import StudyAnalysis
from quant.volume import Volume

from .seg import DEFAULT_SOFTWARE_VERSION, _affine
from .uids import derive_uid

log = logging.getLogger(__name__)

PERCENT = Code("%", "UCUM", "Percent")
MILLISECOND = Code("ms", "UCUM", "millisecond")
NO_UNITS = Code("1", "UCUM", "no units")

#: Where a voxel has no value: what the LUT explanation of every map says.
NO_VALUE_NOTE = "NaN: no value"


@dataclass(frozen=True)
class MapKind:
    """What one parametric map is: its key, label, words, unit, window and series number."""

    key: str                       # "ff", "t2w", "b1", "ff_t2"
    label: str                     # Content Label and LUT Label (CS, at most 16 characters)
    words: str                     # what the values are
    unit: Code
    window: tuple[float, float]    # (lower, upper) of the default display window
    series_number: int


FF = MapKind("ff", "FF", "fat fraction (%)", PERCENT, (0.0, 100.0), 903)
T2W = MapKind("t2w", "T2W", "water T2 (ms)", MILLISECOND, (20.0, 60.0), 904)
B1 = MapKind("b1", "B1", "relative B1 (transmit field / nominal)", NO_UNITS, (0.5, 1.5), 905)
FF_T2 = MapKind("ff_t2", "FF_T2", "fat fraction of the T2 fit (%)", PERCENT, (0.0, 100.0), 906)
MAP_KINDS: tuple[MapKind, ...] = (FF, T2W, B1, FF_T2)


@dataclass(frozen=True, eq=False)
class _Planned:
    kind: MapKind
    values: np.ndarray             # float32 (slice, row, column), NaN where no value
    volume: Volume                 # the grid (3-D: first echo of a multi-echo series)
    words: str                     # the model, for the content description
    uid_parts: tuple[str, ...]     # what identifies the map besides the study and sources


def _ff_map(analysis: StudyAnalysis) -> np.ndarray:
    """``analysis.fat_fraction`` in percent, NaN outside the body and where not finite."""
    ff = np.asarray(analysis.fat_fraction, dtype=np.float64) * 100.0
    body = analysis.segmentation.tissue != Tissue.BACKGROUND
    return np.where(body & np.isfinite(ff), ff, np.nan).astype(np.float32)


def planned_maps(analysis: StudyAnalysis) -> tuple[list[_Planned], list[tuple[str, str]]]:
    """The maps an analysis gives, and (map key, reason) of those it does not."""
    planned: list[_Planned] = []
    skipped: list[tuple[str, str]] = []
    t2 = analysis.t2
    kinds = {s.series_instance_uid: s.kind for s in analysis.series}
    anatomy_kind = kinds.get(analysis.anatomy.series_instance_uid, SeriesKind.UNKNOWN)
    if anatomy_kind is SeriesKind.MESE or (t2 is not None
                                           and t2.volume.series_instance_uid == analysis.anatomy.series_instance_uid):
        skipped.append((FF.key, "no Dixon or multi-echo gradient echo: the fat fraction is the T2 fit's (FF_T2)"))
    elif analysis.fat_fraction.shape != analysis.anatomy.array.shape[-3:]:
        skipped.append((FF.key, f"fat fraction {analysis.fat_fraction.shape} does not fit its anatomy volume"))
    else:
        model = "MEGRE PDFF" if anatomy_kind is SeriesKind.MEGRE_MAGNITUDE else "Dixon"
        planned.append(_Planned(FF, _ff_map(analysis), analysis.anatomy, model, (model,)))
    if t2 is None:
        for kind in (T2W, B1, FF_T2):
            skipped.append((kind.key, "no multi-echo spin-echo series measured"))
        return planned, skipped
    fit, grid = t2.fit, t2.volume
    model = f"{fit.model}, fat T2 {t2.fat_t2_ms:.1f} ms"
    parts = (fit.model, fit.dictionary_key, f"{t2.fat_t2_ms:.6g}")
    success = np.asarray(fit.success, bool)
    values = {
        T2W: np.where(success, fit.t2w_ms, np.nan),
        B1: np.where(success, fit.b1, np.nan),
        FF_T2: np.where(np.asarray(fit.fitted, bool), np.asarray(fit.ff, np.float64) * 100.0, np.nan),
    }
    for kind, arr in values.items():
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape != grid.array.shape[-3:]:
            skipped.append((kind.key, f"fit map {arr.shape} does not fit the MESE volume {grid.array.shape}"))
        elif not np.isfinite(arr).any():
            skipped.append((kind.key, f"no value in any voxel (model {fit.model})"))
        else:
            planned.append(_Planned(kind, arr, grid, model, parts))
    return planned, skipped


def _sources(volume: Volume, datasets: Sequence[Dataset]) -> list[Dataset]:
    """The instances of ``volume`` (its first echo) among ``datasets``, in slice order."""
    by_uid = {str(d.get("SOPInstanceUID", "")): d for d in datasets
              if str(d.get("SeriesInstanceUID", "")) == volume.series_instance_uid}
    wanted = list(dict.fromkeys(volume.sop_instance_uids))
    missing = [u for u in wanted if u not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} source instances of series {volume.series_instance_uid} are missing "
                         f"(e.g. {missing[0]})")
    return [by_uid[u] for u in wanted]


def build_parametric_map(planned: _Planned, analysis: StudyAnalysis, datasets: Sequence[Dataset], *,
                         software_version: str = DEFAULT_SOFTWARE_VERSION) -> hd.pm.ParametricMap:
    """Build one parametric map (see :func:`build_parametric_maps`)."""
    kind, volume, values = planned.kind, planned.volume, planned.values
    sources = _sources(volume, datasets)
    study_uid = str(sources[0].get("StudyInstanceUID", ""))
    if not study_uid:
        raise ValueError("source images have no StudyInstanceUID")
    uid_parts = (study_uid, "pmap", kind.key, str(analysis.algorithm_version), *planned.uid_parts,
                 *sorted(set(volume.sop_instance_uids)))
    finite = values[np.isfinite(values)]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=kind.label,
        lut_explanation=f"{kind.words}; {NO_VALUE_NOTE}"[:64],
        unit=kind.unit,
        value_range=(float(finite.min()), float(finite.max())),
        slope=1.0, intercept=0.0)
    lower, upper = kind.window
    voi = hd.VOILUTTransformation(window_center=(lower + upper) / 2, window_width=upper - lower,
                                  window_explanation=f"{lower:g} to {upper:g} {kind.unit.value}"[:64])
    pixel_array: hd.Volume | np.ndarray
    if any(f is not None for f in volume.frame_numbers):
        pixel_array = hd.Volume(np.ascontiguousarray(values), _affine(volume), coordinate_system="PATIENT",
                                frame_of_reference_uid=volume.frame_of_reference_uid)
    else:
        pixel_array = np.ascontiguousarray(values)
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=pixel_array,
        series_instance_uid=derive_uid(*uid_parts, "series"),
        series_number=kind.series_number,
        sop_instance_uid=derive_uid(*uid_parts, "instance"),
        instance_number=1,
        manufacturer="musclenode",
        manufacturer_model_name="musclenode",
        software_versions=software_version,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[voi],
        content_label=kind.label,
        content_description=f"{kind.words}, {planned.words}; NaN where no value"[:64],
        series_description=f"{kind.words} map (musclenode)"[:64],
    )
    # General Series: Laterality is Type 2C for a paired body part (legs): the source's, else empty.
    pm.Laterality = str(sources[0].get("Laterality", "") or "")
    return pm


def build_parametric_maps(analysis: StudyAnalysis, datasets: Sequence[Dataset], *,
                          skipped: list[tuple[str, str]] | None = None,
                          software_version: str = DEFAULT_SOFTWARE_VERSION) -> list[Dataset]:
    """The parametric maps of an analysis, one DICOM Parametric Map instance each.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
        The pipeline output.
    datasets : sequence of pydicom.Dataset
        The study's images (any order; at least the instances of the anatomy series and of
        the MESE series' first echo). Pixel data need not be loaded.
    skipped : list, optional
        Gets ``(map key, reason)`` of each map not made (also logged).
    software_version : str
        Software Versions of the maps.

    Returns
    -------
    list of highdicom.pm.ParametricMap
        In :data:`MAP_KINDS` order, series numbers 903 (FF), 904 (T2W), 905 (B1), 906 (FF_T2);
        float32 values equal to the real-world values, NaN where there is none. UIDs are
        derived from the study, the map, the algorithm version, the T2 model and the source
        SOP Instance UIDs (:func:`reports.uids.derive_uid`): the same inputs give the same UIDs.
    """
    planned, not_made = planned_maps(analysis)
    out: list[Dataset] = []
    for p in planned:
        try:
            out.append(build_parametric_map(p, analysis, datasets, software_version=software_version))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:   # one bad map never fails the study
            not_made.append((p.kind.key, f"{type(exc).__name__}: {exc}"))
    for key, reason in not_made:
        log.info("parametric map %s not made: %s", key, reason)
    if skipped is not None:
        skipped.extend(not_made)
    return out
