"""Drawing of the one-page study summary (:mod:`reports.summary`) with matplotlib's object API
(an Agg canvas, no pyplot state, safe in worker processes): the page's pixels and the same
figure as PDF. Colour-blind-safe colours (Okabe & Ito), cividis for the fat fraction, type
of 10-22 pt.
"""

from __future__ import annotations

import datetime
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from quant.enums import Side, Tissue
from quant.pipeline import StudyAnalysis

from . import codes
from .longitudinal import Comparison
from .precision import QUALITY_DECIMALS
from .summary_content import COLUMN_SPANS, COLUMNS, MODEL_WORDS, SIDE_LETTER, SummaryRow, TrendLine, key_slice

#: Size of the page in pixels (width, height): A4 landscape ratio.
PAGE_PX = (1600, 1131)
DPI = 100
TITLE = "Muscle MRI summary (musclenode)"
_PLOT_TITLES = {"frma_mm2": "fRMA (mm²)", "ff_percent": "Fat fraction (%)", "csa_mm2": "CSA (mm²)",
                "t2w_ms": "Water T2 (ms)", "ff_t2_percent": "Fat fraction, T2 fit (%)"}
#: Okabe & Ito (2008) colour-blind-safe palette: the whole region first, then one per ROI.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442", "#000000")
_SIDE_STYLE = {Side.RIGHT: ("-", "o"), Side.LEFT: ("--", "s"), Side.NONE: (":", "^")}


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
            ax.text(float(np.nonzero(leg)[1].mean()), 0.5, SIDE_LETTER[side], color="white", fontsize=18,
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
