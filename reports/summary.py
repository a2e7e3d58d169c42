"""The one-page summary of a study: a Secondary Capture image any PACS shows, and the same
page as an Encapsulated PDF.

The page (landscape, A4 ratio, :data:`PAGE_PX`) holds

* the key slice (largest muscle area, see :func:`key_slice`) with the ROIs, or each leg's muscle, outlined in colour
  and named in a legend, and the fat-fraction map of that slice with its colour bar (%);
* the table of this visit's values per region or ROI and side (CSA, FF, fRMA, VOL, water T2
  where measured), their change since baseline and since the previous visit (absolute,
  relative, and annualised since baseline), the model that made each value and flags
  (fat-water swap corrected, registration to review, earlier values of another version);
* one trend plot per key metric (fRMA, FF, CSA, water T2 where there is any): each region or
  ROI and side a line over all the subject's visits, the baseline marked;
* the algorithm version and the SOP Instance UID of the SR it summarises.

Every number is written with :func:`reports.precision.formatted`, as the SR writes it; the
rows printed are kept as :class:`SummaryRow` data (:attr:`Summary.rows`). No patient name or
ID is drawn on the page: they are in the DICOM header only (copied from the source images).

Rendering uses matplotlib's object API (Agg canvas, no pyplot state), colour-blind-safe
colours (Okabe & Ito) and cividis for the fat fraction.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from quant.enums import Side, Tissue
from quant.pipeline import StudyAnalysis

from . import codes
from .longitudinal import Comparison, PriorValue
from .precision import QUALITY_DECIMALS, formatted
from .seg import DEFAULT_SOFTWARE_VERSION, roi_label, sorted_source_images
from .uids import derive_uid

#: Size of the page in pixels (width, height): A4 landscape ratio.
PAGE_PX = (1600, 1131)
DPI = 100
SC_SERIES_NUMBER = 907
PDF_SERIES_NUMBER = 908
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
TITLE = "Muscle MRI summary (musclenode)"

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
_PLOT_TITLES = {"frma_mm2": "fRMA (mm²)", "ff_percent": "Fat fraction (%)", "csa_mm2": "CSA (mm²)",
                "t2w_ms": "Water T2 (ms)", "ff_t2_percent": "Fat fraction, T2 fit (%)"}
#: Short words of each model (``Measurement.model``) for the table.
MODEL_WORDS: Mapping[str, str] = {"dixon-rician-ml": "Dixon ML", "dixon-magnitude": "Dixon",
                                  "megre-pdff-6peak": "MEGRE", "epg-bicomponent": "EPG",
                                  "biexp-fixed-fat": "bi-exp"}
#: Area and volume: no model made them (as in the SR, no method under them).
_MODEL_FREE = frozenset({"csa_mm2", "vol_ml"})
_SWAP_WORDS = {"fat-water-swap-corrected-whole-series": "swap corrected",
               "fat-water-swap-corrected-regional": "swap corrected",
               "fat-water-swap-ambiguous": "swap check ambiguous"}

#: Okabe & Ito (2008) colour-blind-safe palette: the whole region first, then one per ROI.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442", "#000000")
_SIDE_STYLE = {Side.RIGHT: ("-", "o"), Side.LEFT: ("--", "s"), Side.NONE: (":", "^")}
_SIDE_LETTER = {Side.RIGHT: "R", Side.LEFT: "L", Side.NONE: "-"}


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
        return (where, _SIDE_LETTER[Side(self.side)], METRIC_LABELS.get(self.metric, self.metric), self.value,
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


@dataclass(frozen=True, eq=False)
class Summary:
    """The summary of one study: the Secondary Capture and Encapsulated PDF instances, and
    what the page shows (:attr:`rows` as printed, :attr:`trends`, the page's pixels and PDF).
    """

    sc: Dataset
    pdf: Dataset
    rows: tuple[SummaryRow, ...]
    trends: tuple[TrendLine, ...]
    rgb: np.ndarray        # (rows, columns, 3) uint8: the SC's pixels
    pdf_bytes: bytes
    truncated: int = 0     # table rows left off the page for want of room (all are in the SR)

    @property
    def png(self) -> bytes:
        """The page as an RGB PNG (encoded on demand: the node sends the SC and PDF only)."""
        buf = io.BytesIO()
        Image.fromarray(self.rgb).save(buf, format="PNG", optimize=True)
        return buf.getvalue()


# --------------------------------------------------------------------------- #
# What the page shows                                                           #
# --------------------------------------------------------------------------- #

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


def key_slice(analysis: StudyAnalysis, *, within: float = 0.05) -> int:
    """The slice (index on the anatomy grid) with the largest muscle area; among slices
    within ``within`` (fraction) of that area, the one nearest the middle of the stack (an
    end slice of a tapering thigh is often the largest, and the least typical).
    """
    muscle = analysis.segmentation.tissue == Tissue.MUSCLE
    areas = muscle.reshape(muscle.shape[0], -1).sum(axis=1)
    near = np.flatnonzero(areas >= (1.0 - within) * areas.max())
    return int(near[np.argmin(np.abs(near - (len(areas) - 1) / 2))])


# --------------------------------------------------------------------------- #
# Drawing                                                                       #
# --------------------------------------------------------------------------- #

def _roi_colours(analysis: StudyAnalysis) -> dict[str, str]:
    """Colour of the whole region ("") and of each ROI name."""
    out = {"": OKABE_ITO[0]}
    if analysis.rois is not None:
        for i, label in enumerate(sorted(analysis.rois.names)):
            out[analysis.rois.names[label]] = OKABE_ITO[1 + i % (len(OKABE_ITO) - 1)]
    return out


def _crop(mask: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return slice(None), slice(None)
    return (slice(max(rows.min() - margin, 0), rows.max() + margin + 1),
            slice(max(cols.min() - margin, 0), cols.max() + margin + 1))


def _draw_images(fig: Figure, analysis: StudyAnalysis, colours: Mapping[str, str], box: tuple) -> None:
    """The key slice with outlines and the FF map beside (or below) it, in ``box`` (left, bottom,
    width, height, figure fractions); the ROI legend under them.
    """
    left, bottom, width, height = box
    k = key_slice(analysis)
    volume = analysis.anatomy
    anatomy = np.asarray(volume.array if volume.array.ndim == 3 else volume.array[0], dtype=np.float64)[k]
    seg = analysis.segmentation
    tissue, side_map = seg.tissue[k], seg.side[k]
    body = tissue != Tissue.BACKGROUND
    rows, cols = _crop(body)
    aspect = float(volume.spacing_mm[1]) / float(volume.spacing_mm[2])
    img = anatomy[rows, cols]
    tissue, side_map, body = tissue[rows, cols], side_map[rows, cols], body[rows, cols]
    inside = img[body]
    lo, hi = (np.percentile(inside, [1, 99.5]) if inside.size else (0.0, 1.0))

    # the panels: side by side for a square crop, one above the other for a wide one (two legs)
    legend_h = 0.15 * height
    bar_w = 0.085 * width                                      # colour bar and its label
    wide = img.shape[1] / max(img.shape[0] * aspect, 1.0) > 1.6
    if wide:
        panel_w, panel_h = width - bar_w, (height - legend_h) / 2 - 0.035
        boxes = [(left, bottom + legend_h + panel_h + 0.035, panel_w, panel_h),
                 (left, bottom + legend_h, panel_w, panel_h)]
    else:
        panel_w, panel_h = (width - bar_w) / 2 - 0.005, height - legend_h - 0.03
        boxes = [(left, bottom + legend_h, panel_w, panel_h), (left + panel_w + 0.01, bottom + legend_h, panel_w,
                                                                 panel_h)]
    ax = fig.add_axes(boxes[0])
    ax.set_anchor("E")
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="bilinear")
    handles = []
    side_of = {Side.RIGHT: 1, Side.LEFT: 2}
    muscle = tissue == Tissue.MUSCLE
    if analysis.rois is not None:
        labels = analysis.rois.labels[k][rows, cols]
        for label in sorted(analysis.rois.names):
            name = analysis.rois.names[label]
            mask = (labels == label) & muscle
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colours[name]], linewidths=2.2)
            handles.append(Line2D([], [], color=colours[name], lw=4, label=codes.roi_words(name)))
    else:
        for side in (Side.RIGHT, Side.LEFT):
            mask = muscle & (side_map == side_of[side])
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colours[""]], linewidths=2.2)
        handles.append(Line2D([], [], color=colours[""], lw=4, label="muscle of each leg"))
    for side in (Side.RIGHT, Side.LEFT):   # R / L over each leg, from the patient coordinates
        leg = (side_map == side_of[side]) & body
        if leg.any():
            ax.text(float(np.nonzero(leg)[1].mean()), 0.5, _SIDE_LETTER[side], color="white", fontsize=18,
                    fontweight="bold", ha="center", va="top")
    ax.set_axis_off()
    ax.set_title(f"Slice {k + 1} of {seg.tissue.shape[0]} (largest muscle area)", fontsize=13, loc="left")
    ncol = 3 if sum(len(str(h.get_label())) for h in handles[:3]) < 50 else 2
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(left, bottom + legend_h),
               ncol=min(len(handles), ncol), fontsize=12, frameon=False, handlelength=1.6, columnspacing=1.2,
               borderaxespad=0.2)

    ax2 = fig.add_axes(boxes[1])
    ax2.set_title("Fat fraction", fontsize=13, loc="left")
    ax2.set_axis_off()
    ff = np.asarray(analysis.fat_fraction, dtype=np.float64)
    if ff.shape != seg.tissue.shape:
        ax2.text(0.5, 0.5, "no fat-fraction map on this grid", ha="center", va="center", fontsize=13,
                 transform=ax2.transAxes)
        return
    ffk = np.where(body & np.isfinite(ff[k][rows, cols]), ff[k][rows, cols] * 100.0, np.nan)
    ax2.imshow(np.zeros(ffk.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)   # black where no value
    im = ax2.imshow(np.ma.masked_invalid(ffk), cmap="cividis", vmin=0.0, vmax=100.0, aspect=aspect,
                    interpolation="nearest")
    ax2.set_anchor("E")   # the image against its colour bar
    bx = boxes[1][0] + boxes[1][2] + 0.008
    cax = fig.add_axes((bx, boxes[1][1] + 0.1 * boxes[1][3], 0.012, 0.8 * boxes[1][3]))
    bar = fig.colorbar(im, cax=cax)
    bar.set_label("FF (%)", fontsize=12)
    bar.ax.tick_params(labelsize=11)


def _draw_trends(fig: Figure, lines: Sequence[TrendLine], colours: Mapping[str, str], box: tuple, *,
                 region: str) -> None:
    """One plot per metric of ``lines`` (2 x 2), x: days since the subject's baseline."""
    left, bottom, width, height = box
    metrics = list(dict.fromkeys(t.metric for t in lines))
    dates = [d for t in lines for d, _ in t.points]
    base = min(dates) if dates else datetime.date.min
    cols = 2
    nrows = max(1, math.ceil(len(metrics) / cols))
    n_entries = len(set(t.roi for t in lines)) + len(set(t.side for t in lines)) + 1
    legend_h = (math.ceil(n_entries / 3) * 21 + 34) / PAGE_PX[1]   # its rows, and the x axis label above it
    cell_w, cell_h = width / cols, (height - legend_h) / nrows
    axes: list[Axes] = []
    for i, metric in enumerate(metrics):
        r, c = divmod(i, cols)
        ax = fig.add_axes((left + c * cell_w + 0.21 * cell_w, bottom + legend_h + (nrows - 1 - r) * cell_h
                           + 0.13 * cell_h, cell_w * 0.75, cell_h * 0.72))
        axes.append(ax)
        for t in (t for t in lines if t.metric == metric):
            style, marker = _SIDE_STYLE[t.side]
            x = [(d - base).days for d, _ in t.points]
            y = [v for _, v in t.points]
            ax.plot(x, y, linestyle=style, marker=marker, color=colours.get(t.roi, OKABE_ITO[-1]), lw=2, ms=6)
        ax.axvline(0, color="0.35", lw=1.5, ls=":")
        ax.set_title(_PLOT_TITLES.get(metric, metric), fontsize=13, pad=4)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.12)
        if max((d - base).days for d in dates) == 0:   # one visit: a point at baseline
            ax.set_xlim(-30, 60)
            ax.set_xticks([0])
        if r == nrows - 1 or i + cols >= len(metrics):
            ax.set_xlabel("days since baseline", fontsize=11)
    handles = [Line2D([], [], color=colours.get(roi, OKABE_ITO[-1]), lw=3,
                      label=codes.roi_words(roi) if roi else f"whole {region}")
               for roi in dict.fromkeys(t.roi for t in lines)]
    handles.append(Line2D([], [], color="0.35", lw=1.5, ls=":", label="baseline"))
    handles += [Line2D([], [], color="0.2", ls=_SIDE_STYLE[s][0], marker=_SIDE_STYLE[s][1], lw=2,
                       label={Side.RIGHT: "right", Side.LEFT: "left"}.get(s, "no side"))
                for s in dict.fromkeys(t.side for t in lines)]
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(left + width / 2, bottom),
                   ncol=min(len(handles), 3), fontsize=11, frameon=False, columnspacing=1.2, handlelength=2.2)


def _draw_table(fig: Figure, rows: Sequence[SummaryRow], box: tuple) -> int:
    """The table in ``box``; returns the number of rows left off for want of room."""
    left, bottom, width, height = box
    ax = fig.add_axes(box)
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    px_h = height * PAGE_PX[1]
    header_px = 44.0
    min_row_px = 17.0
    fit = max(int((px_h - header_px) // min_row_px), 1)
    shown = list(rows) if len(rows) <= fit else list(rows[:fit - 1])
    truncated = len(rows) - len(shown)
    n_lines = len(shown) + (1 if truncated else 0)
    row_px = min(28.0, (px_h - header_px) / max(n_lines, 1))
    font = max(8.5, min(11.5, row_px * 0.5 * 72 / DPI * 1.25))
    total = sum(w for _, _, w in COLUMNS)
    x0, edges = 0.0, []
    for _, align, w in COLUMNS:
        span = w / total
        edges.append((x0, x0 + span, align))
        x0 += span
    pad = 0.006
    y_head = 1 - header_px / px_h

    def x_of(a: float, b: float, align: str) -> float:
        return {"left": a + pad, "right": b - pad, "center": (a + b) / 2}[align]
    for first, last, words in COLUMN_SPANS:
        a, b = edges[first][0], edges[last][1]
        ax.text((a + b) / 2, 1 - 1 / px_h, words, ha="center", va="top", fontsize=font, fontweight="bold")
        ax.plot([a + pad, b - pad], [1 - 22 / px_h] * 2, color="0.3", lw=1)
    for (title, _, _), (a, b, align) in zip(COLUMNS, edges, strict=True):
        ax.text(x_of(a, b, align), y_head + 3 / px_h, title, ha=align, va="bottom", fontsize=font,
                fontweight="bold")
    ax.axhline(y_head, color="0.2", lw=1.2)
    step = row_px / px_h
    previous = None
    for i, row in enumerate(shown):
        top = y_head - i * step
        if row.group != previous and i:
            ax.axhline(top, color="0.55", lw=0.8)
        if i % 2:
            ax.axhspan(top - step, top, color="0.94", lw=0)
        cells = row.cells()
        if row.group == previous:
            cells = ("", "", *cells[2:])
        previous = row.group
        for text, (a, b, align) in zip(cells, edges, strict=True):
            ax.text(x_of(a, b, align), top - step / 2, text, ha=align, va="center", fontsize=font, clip_on=True)
    if truncated:
        ax.text(pad, y_head - len(shown) * step - step / 2, f"… {truncated} more rows in the SR", ha="left",
                va="center", fontsize=font, style="italic")
    return truncated


def _visits_line(rows_comps: Mapping[tuple, Comparison], study_date: datetime.date | None,
                 time_point: str) -> str:
    parts = [f"Visit {study_date.isoformat() if study_date else 'date unknown'}"
             + (f" ({time_point})" if time_point else "")]
    baselines = {c.baseline.study_date for c in rows_comps.values() if c.baseline is not None}
    previous = {c.previous.study_date for c in rows_comps.values() if c.previous is not None}
    if baselines:
        parts.append("baseline " + ", ".join(d.isoformat() for d in sorted(baselines)))
    if previous:
        parts.append("previous " + ", ".join(d.isoformat() for d in sorted(previous)))
    if not baselines:
        parts.append("first visit: no earlier values to compare")
    return " · ".join(parts)


def _context_line(analysis: StudyAnalysis) -> str:
    parts = []
    if analysis.dixon_series:
        swaps = [f for f in analysis.flags if f in codes.SWAP_FINDINGS and f]
        parts.append("fat-water swap: " + (codes.SWAP_FINDINGS[swaps[0]].meaning.lower() if swaps else "none"))
    if analysis.rois is not None:
        parts.append(f"ROIs: {codes.ROI_SOURCES[analysis.rois.source.value].meaning.lower()}")
        if analysis.carried is not None:
            dice = analysis.carried.dice_muscle
            parts.append("registration: " + ("to review" if analysis.carried.needs_review else "within thresholds")
                         + (f" (Dice {dice:.{QUALITY_DECIMALS}f})" if dice is not None else ""))
    if analysis.t2 is not None:
        parts.append(f"water T2 model: {MODEL_WORDS.get(analysis.t2.fit.model, analysis.t2.fit.model)}")
    return " · ".join(parts)


def render_page(analysis: StudyAnalysis, rows: Sequence[SummaryRow], trends: Sequence[TrendLine], *,
                comparisons: Mapping[tuple, Comparison] | None = None, study_date: datetime.date | None = None,
                time_point: str = "", sr_uid: str = "") -> tuple[np.ndarray, bytes, int]:
    """Draw the page.

    Returns
    -------
    (ndarray, bytes, int)
        The page's RGB pixels (``PAGE_PX[1]`` x ``PAGE_PX[0]`` x 3, uint8), the same page as
        PDF (matplotlib's PDF backend, vector), and the number of table rows left off for want
        of room.
    """
    fig = Figure(figsize=(PAGE_PX[0] / DPI, PAGE_PX[1] / DPI), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    region = codes.REGION_WORDS[analysis.segmentation.region.value]
    fig.text(0.015, 0.982, f"Muscle MRI summary: {region}", fontsize=22, fontweight="bold", va="top")
    fig.text(0.015, 0.945, _visits_line(comparisons or {}, study_date, time_point), fontsize=13, va="top")
    context = _context_line(analysis)
    if context:
        fig.text(0.015, 0.92, context, fontsize=12, va="top", color="0.25")
    colours = _roi_colours(analysis)
    _draw_images(fig, analysis, colours, (0.015, 0.50, 0.375, 0.40))
    _draw_trends(fig, trends, colours, (0.005, 0.04, 0.43, 0.46), region=region)
    truncated = _draw_table(fig, rows, (0.44, 0.075, 0.55, 0.83))
    fig.text(0.445, 0.065, "Values as in the SR (rounded to the method's precision). Δ: change; Δ %: relative "
             "change; Δ/yr: since baseline, per year of 365.25 days. FF and its changes in % / percentage points.",
             fontsize=10.5, va="top", color="0.25", wrap=True)
    fig.text(0.015, 0.012, f"Algorithm {analysis.algorithm_version} · summarises SR {sr_uid or '(none)'}",
             fontsize=11, va="bottom", color="0.2")
    canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
    pdf = io.BytesIO()
    fig.savefig(pdf, format="pdf", metadata={"Creator": "musclenode", "Producer": None, "CreationDate": None,
                                             "Title": TITLE})
    return rgb, pdf.getvalue(), truncated


# --------------------------------------------------------------------------- #
# DICOM                                                                         #
# --------------------------------------------------------------------------- #

def _source_instance_sequence(sr: Dataset) -> DicomSequence:
    item = Dataset()
    item.ReferencedSOPClassUID = str(sr.SOPClassUID)
    item.ReferencedSOPInstanceUID = str(sr.SOPInstanceUID)
    return DicomSequence([item])


def _referenced_series(sr: Dataset) -> DicomSequence:
    """Common Instance Reference: the SR's series and instance (it is in another series)."""
    series = Dataset()
    series.SeriesInstanceUID = str(sr.SeriesInstanceUID)
    series.ReferencedInstanceSequence = _source_instance_sequence(sr)
    return DicomSequence([series])


def _trend_digest(trends: Sequence[TrendLine]) -> str:
    text = repr(sorted((t.group, t.metric, [(d.isoformat(), repr(v)) for d, v in t.points]) for t in trends))
    return hashlib.sha256(text.encode()).hexdigest()


def build_summary(analysis: StudyAnalysis, source_images: Sequence[Dataset], sr: Dataset,
                  comparisons: Mapping[tuple, Comparison] | None = None,
                  history: Mapping[tuple, Sequence[PriorValue]] | None = None, *,
                  time_point: tuple[str, str] | None = None, version_excluded: Collection[tuple] = (),
                  software_version: str = DEFAULT_SOFTWARE_VERSION) -> Summary:
    """Build the one-page summary of a study as Secondary Capture and Encapsulated PDF.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
        The pipeline output the SR was built from.
    source_images : sequence of pydicom.Dataset
        The anatomy series' instances (any order): the patient, study and clinical-trial
        attributes are copied from them.
    sr : pydicom.Dataset
        The TID 1500 SR the page summarises: its SOP Instance UID is printed on the page and
        referenced (Source Instance Sequence, Referenced Series Sequence).
    comparisons : mapping, optional
        ``(region, side, metric, roi) -> Comparison``, the same the SR was given.
    history : mapping, optional
        ``(region, side, metric, roi) -> [PriorValue, ...]``: the values of all the subject's
        earlier visits (of this algorithm version) for the trend plots.
    time_point : (str, str), optional
        The visit's label and Clinical Trial Time Point ID (as given to the SR).
    version_excluded : collection of (region, side, roi)
        Groups not compared because their earlier values were of another algorithm version.
    software_version : str
        Software Versions of both instances.

    Returns
    -------
    Summary
        ``sc``: Secondary Capture Image (RGB, 8 bit, :data:`PAGE_PX`), series number 907;
        ``pdf``: Encapsulated PDF, series number 908; both in the study of the source images,
        Manufacturer "musclenode", UIDs derived from the study, the SR, the algorithm version
        and the trend values (:func:`reports.uids.derive_uid`); with the rows, trends and
        page as drawn.
    """
    sources = sorted_source_images(analysis, source_images)
    ref = sources[0]
    study_uid = str(ref.StudyInstanceUID)
    sr_uid = str(sr.SOPInstanceUID)
    try:
        study_date: datetime.date | None = datetime.datetime.strptime(str(ref.get("StudyDate", ""))[:8],
                                                                      "%Y%m%d").date()
    except ValueError:
        study_date = None
    rows = summary_rows(analysis, comparisons, version_excluded=version_excluded)
    trends = trend_lines(analysis, history or {}, study_date)
    whole = {k: c for k, c in (comparisons or {}).items() if len(k) < 4 or not k[3]}
    rgb, pdf_bytes, truncated = render_page(
        analysis, rows, trends, comparisons=whole, study_date=study_date,
        time_point=time_point[0] if time_point else "", sr_uid=sr_uid)
    parts = (study_uid, "summary", str(analysis.algorithm_version), sr_uid, _trend_digest(trends))
    laterality = str(ref.get("Laterality", "") or "")

    sc = hd.sc.SCImage.from_ref_dataset(
        ref, rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=("L", "P"),   # replaced below: a page has no patient orientation
        series_instance_uid=derive_uid(*parts, "sc", "series"), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derive_uid(*parts, "sc", "instance"), instance_number=1, manufacturer="musclenode",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="Muscle MRI summary (musclenode)", manufacturer_model_name="musclenode",
        software_versions=software_version)
    sc.BurnedInAnnotation = "NO"            # no name or ID on the page
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageType = ["DERIVED", "SECONDARY", "SUMMARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"Summary of the measurement report {sr_uid}"[:1024]
    sc.SourceInstanceSequence = _source_instance_sequence(sr)
    sc.ReferencedSeriesSequence = _referenced_series(sr)
    sc.Laterality = laterality
    # General Image: Patient Orientation is Type 2C, empty here (a page, not an image of the patient)
    sc.add_new("PatientOrientation", "CS", None)

    pdf = hd.base.SOPClass(
        study_instance_uid=study_uid, series_instance_uid=derive_uid(*parts, "pdf", "series"),
        series_number=PDF_SERIES_NUMBER, sop_instance_uid=derive_uid(*parts, "pdf", "instance"),
        sop_class_uid=ENCAPSULATED_PDF_STORAGE, instance_number=1, modality="DOC", manufacturer="musclenode",
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description="Muscle MRI summary, PDF (musclenode)",
        manufacturer_model_name="musclenode", software_versions=software_version)
    pdf.copy_patient_and_study_information(ref)
    pdf.ConversionType = "WSD"
    pdf.BurnedInAnnotation = "NO"
    pdf.RecognizableVisualFeatures = "NO"
    pdf.AcquisitionDateTime = None
    pdf.DocumentTitle = TITLE
    pdf.ConceptNameCodeSequence = []
    pdf.SourceInstanceSequence = _source_instance_sequence(sr)
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = pdf_bytes + (b"\0" if len(pdf_bytes) % 2 else b"")
    pdf.EncapsulatedDocumentLength = len(pdf_bytes)
    return Summary(sc, pdf, tuple(rows), tuple(trends), rgb, pdf_bytes, truncated)
