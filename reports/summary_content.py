"""What the one-page study summary shows (:mod:`reports.summary`), as data: the table's rows as
printed (every number from :func:`reports.precision.formatted`, as the SR writes it), the trend
lines over the subject's visits, and the key slice.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from quant.enums import Side
from quant.pipeline import StudyAnalysis

from . import codes
from .longitudinal import Comparison, PriorValue
from .outline import study_key_slice
from .precision import formatted
from .seg import roi_label

#: Metrics of the table, in order (``ff_t2_percent`` stands in for ``ff_percent`` where a
#: group has no Dixon fat fraction: a MESE-only study).
TABLE_METRICS: tuple[str, ...] = ("csa_mm2", "ff_percent", "frma_mm2", "vol_ml", "t2w_ms")
#: Metrics with a trend plot, in order (water T2 only where measured).
TREND_METRICS: tuple[str, ...] = ("frma_mm2", "ff_percent", "csa_mm2", "t2w_ms")
#: Comparison values of each row, in column order (:class:`reports.longitudinal.Comparison` properties).
ROW_KINDS: tuple[str, ...] = ("change_since_baseline", "relative_change_since_baseline",
                              "annualised_change_since_baseline", "change_since_previous",
                              "relative_change_since_previous")
METRIC_LABELS: Mapping[str, str] = {"csa_mm2": "CSA mm²", "ff_percent": "FF %", "frma_mm2": "fRMA mm²",
                                    "vol_ml": "VOL mL", "t2w_ms": "T2w ms", "ff_t2_percent": "FF(T2) %"}
#: Short words of each model (``Measurement.model``) for the table.
MODEL_WORDS: Mapping[str, str] = {"dixon-rician-ml": "Dixon ML", "dixon-magnitude": "Dixon",
                                  "megre-pdff-6peak": "MEGRE", "epg-bicomponent": "EPG",
                                  "biexp-fixed-fat": "bi-exp"}
#: Area and volume: no model made them (as in the SR, no method under them).
_MODEL_FREE = frozenset({"csa_mm2", "vol_ml"})
_SWAP_WORDS = {"fat-water-swap-corrected-whole-series": "swap corrected",
               "fat-water-swap-corrected-regional": "swap corrected",
               "fat-water-swap-ambiguous": "swap check ambiguous"}
#: The letter of each side on the page.
SIDE_LETTER: Mapping[Side, str] = {Side.RIGHT: "R", Side.LEFT: "L", Side.NONE: "-"}


@dataclass(frozen=True)
class SummaryRow:
    """One row of the page's table, as printed: every number a string from
    :func:`reports.precision.formatted` (changes with a sign, "" where there is none).

    ``group`` is the SR measurement group's tracking identifier ("right thigh muscle",
    "right thigh anterior compartment (automatic)"), ``roi`` "" for the whole region.
    """

    group: str
    region: str
    roi: str
    side: str
    metric: str
    value: str
    change_since_baseline: str = ""
    relative_change_since_baseline: str = ""
    annualised_change_since_baseline: str = ""
    change_since_previous: str = ""
    relative_change_since_previous: str = ""
    model: str = ""
    flags: str = ""

    def cells(self) -> tuple[str, ...]:
        """The row's cells in column order (:data:`COLUMNS`)."""
        where = "whole " + codes.REGION_WORDS.get(self.region, self.region) if not self.roi \
            else codes.roi_words(self.roi)
        return (where, SIDE_LETTER[Side(self.side)], METRIC_LABELS.get(self.metric, self.metric), self.value,
                *(getattr(self, k) for k in ROW_KINDS), self.model, self.flags)


#: Columns of the table: header, alignment and width share.
COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("Region / ROI", "left", 2.3), ("Side", "center", 0.6), ("Metric", "left", 1.2), ("Value", "right", 0.9),
    ("Δ", "right", 0.85), ("Δ %", "right", 0.8), ("Δ/yr", "right", 1.0),
    ("Δ", "right", 0.85), ("Δ %", "right", 0.8), ("Model", "left", 1.05), ("Flags", "left", 1.55),
)
#: Headers over several columns: (first column, last column, words).
COLUMN_SPANS: tuple[tuple[int, int, str], ...] = ((4, 6, "since baseline"), (7, 8, "since previous"))


@dataclass(frozen=True)
class TrendLine:
    """The values of one metric of one region or ROI and side over the subject's visits."""

    group: str
    roi: str
    side: Side
    metric: str
    points: tuple[tuple[datetime.date, float], ...]   # by date, this visit's included



def _groups(analysis: StudyAnalysis) -> list[tuple[str, str, str, Side]]:
    """(tracking identifier words, ROI name or "", ROI source, side) of each measured group,
    whole region first (right, left), then each ROI by label, right before left.
    """
    region = analysis.segmentation.region.value
    measured = {(m.roi, Side(m.side)) for m in analysis.measurements if m.region == region}
    out = [(f"{side.value} {codes.REGION_WORDS[region]} muscle", "", "", side)
           for side in (Side.RIGHT, Side.LEFT, Side.NONE) if ("", side) in measured]
    if analysis.rois is not None:
        for label in sorted(analysis.rois.names):
            name = analysis.rois.names[label]
            for side in (Side.RIGHT, Side.LEFT):
                if (name, side) in measured:
                    out.append((roi_label(analysis, label, side), name, analysis.rois.source.value, side))
    return out


def _flags(analysis: StudyAnalysis, metric: str, model: str, roi: str, source: str, side: Side,
           version_excluded: Collection[tuple]) -> str:
    out = []
    if model.startswith("dixon") and metric not in _MODEL_FREE:
        out += sorted({_SWAP_WORDS[f] for f in analysis.flags if f in _SWAP_WORDS})
    if roi and source == "carried" and analysis.carried is not None and analysis.carried.needs_review:
        out.append("review registration")
    if (analysis.segmentation.region.value, side, roi) in version_excluded:
        out.append("other version: not compared")
    return "; ".join(out)


def summary_rows(analysis: StudyAnalysis, comparisons: Mapping[tuple, Comparison] | None = None, *,
                 version_excluded: Collection[tuple] = ()) -> list[SummaryRow]:
    """The rows of the page's table.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
    comparisons : mapping, optional
        ``(region, side, metric, roi) -> Comparison`` as :func:`node.processing.comparisons_for`
        gives them (``roi`` "" for the whole region); ``current_value`` may be None.
    version_excluded : collection of (region, side, roi)
        Groups whose earlier values were of another algorithm version (not compared).

    Returns
    -------
    list of SummaryRow
        One per group (:func:`_groups` order) and metric of :data:`TABLE_METRICS` measured,
        every number formatted with :func:`reports.precision.formatted` at its metric's
        (or comparison kind's) precision, changes with a sign.
    """
    comparisons = comparisons or {}
    region = analysis.segmentation.region.value
    by_key = {(m.roi, Side(m.side), m.metric): m for m in analysis.measurements
              if m.region == region and math.isfinite(float(m.value))}
    rows = []
    for group, roi, _, side in _groups(analysis):
        metrics = [k for k in TABLE_METRICS if (roi, side, k) in by_key]
        if "ff_percent" not in metrics and (roi, side, "ff_t2_percent") in by_key:
            metrics.insert(min(1, len(metrics)), "ff_t2_percent")
        for metric in metrics:
            m = by_key[(roi, side, metric)]
            value = float(m.value)
            changes = dict.fromkeys(ROW_KINDS, "")
            comp = comparisons.get((region, side, metric, roi))
            if comp is not None:
                comp = comp.with_current(value) if comp.current_value is None else comp
                for kind in ROW_KINDS:
                    v = getattr(comp, kind)
                    if v is not None:
                        changes[kind] = formatted(float(v), metric, kind, sign=True)
            rows.append(SummaryRow(
                group=group, region=region, roi=roi, side=side.value, metric=metric,
                value=formatted(value, metric), **changes,
                model="" if metric in _MODEL_FREE else MODEL_WORDS.get(m.model, m.model),
                flags=_flags(analysis, metric, m.model, roi, m.source, side, version_excluded)))
    return rows


def trend_lines(analysis: StudyAnalysis, history: Mapping[tuple, Sequence[PriorValue]],
                study_date: datetime.date | None) -> list[TrendLine]:
    """One line per group and metric of :data:`TREND_METRICS` (``ff_t2_percent`` where a
    group has no Dixon FF): the earlier visits' values in ``history`` (keyed like the
    comparisons, ``(region, side, metric, roi)``; only those before ``study_date``) and this
    visit's value. Without a ``study_date`` only this visit's value.
    """
    region = analysis.segmentation.region.value
    by_key = {(m.roi, Side(m.side), m.metric): m for m in analysis.measurements
              if m.region == region and math.isfinite(float(m.value))}
    out = []
    for group, roi, _, side in _groups(analysis):
        for metric in TREND_METRICS:
            if metric == "ff_percent" and (roi, side, metric) not in by_key:
                metric = "ff_t2_percent"
            m = by_key.get((roi, side, metric))
            if m is None:
                continue
            points: dict[datetime.date, float] = {}
            if study_date is not None:
                for p in sorted(history.get((region, side, metric, roi), ()),
                                key=lambda p: (p.study_date, p.study_instance_uid)):
                    if p.study_date < study_date:
                        points[p.study_date] = float(p.value)   # two studies on a day: the later UID
                points[study_date] = float(m.value)
            out.append(TrendLine(group, roi, side, metric,
                                 tuple(sorted(points.items())) or ((datetime.date.min, float(m.value)),)))
    return out


def key_slice(analysis: StudyAnalysis) -> int:
    """The slice (index on the anatomy grid) the page shows: the study's key slice, the one
    the SR's planar groups outline (:func:`reports.outline.study_key_slice`).
    """
    return study_key_slice(analysis)
