"""A numerical phantom of both legs (thigh or calf) for Dixon MRI, with known truth.

Anatomy per leg and slice: skin-bounded subcutaneous fat (SAT) around a fascia
ellipse; inside it muscle with thin pure-fat septa between muscle groups, and the long
bones (femur; or tibia and fibula) as a dark cortex around fatty marrow. The leg
tapers along the slices. Muscle fat fraction varies smoothly around a chosen mean.

With ``compartments=True`` the septa radiate from the femur (or the fibula) and divide
the muscle into the compartments of :data:`quant.enums.COMPARTMENTS` (thigh: anterior,
medial, posterior; calf: anterior, lateral, triceps surae, deep posterior), each with
its own optional extra FF and water T2, and the truth is given per compartment too.
With ``muscles=True`` the thigh's anterior compartment is further divided, by thin fat
planes like the septa, into the muscles of :data:`THIGH_MUSCLES` (rectus femoris, the
three vasti, sartorius), each with its own optional extra FF and its own truth.
``shift_mm`` and ``rotation_deg`` reposition the anatomy on the same image grid (another
visit of the same subject).

Signals are magnitude images as a scanner sends them: complex Gaussian noise of
standard deviation ``pd / snr`` on each of water, fat, in-phase and opposed-phase, then
the magnitude (Rician). Truth metrics are computed from the label map and the true FF,
with the same definitions as :mod:`quant.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from reports.uids import derive_uid

if TYPE_CHECKING:
    from pydicom.dataset import FileMetaDataset

from ..enums import COMPARTMENTS, Region, Roi, Side, SideLabel, Tissue

PD = 1000.0  # proton density of muscle and fat (arbitrary units)
SAT_FF = 0.92
MARROW_FF = 0.88
SEPTUM_FF = 0.95
CORTEX_PD = 25.0


def file_meta(sop_class: str, sop_instance_uid: str) -> FileMetaDataset:
    """File meta information (explicit VR little endian) of a dataset built in memory."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


@dataclass(frozen=True, eq=False)
class LegPhantom:
    """Images, geometry and truth of one synthetic exam.

    ``truth`` maps ``(Side, metric)`` to the whole-leg value. With compartments,
    ``compartment`` is a uint8 map on the voxel grid (0 where the voxel's tissue label
    is not muscle, k + 1 for ``COMPARTMENTS[region][k]``: the compartment of most of
    the voxel's muscle), ``compartment_truth`` maps ``(side value, Roi value, metric)``
    to the value (csa_mm2, vol_ml, ff_percent, frma_mm2 with partial volume; t2w_ms
    where given), and ``t2w_ms_map`` holds the given water T2 of muscle voxels by
    compartment (NaN elsewhere and in compartments without one). With muscles,
    ``muscle_labels`` is a uint8 map (0 outside the muscles, j + 1 for ``muscle_names[j]``:
    the muscle of most of the voxel's muscle, set exactly where ``compartment`` is the
    anterior one) and ``muscle_truth`` maps ``(side value, muscle name, metric)`` to the
    value, as ``compartment_truth``.
    """

    water: np.ndarray
    fat: np.ndarray
    in_phase: np.ndarray
    opposed_phase: np.ndarray
    tissue: np.ndarray             # Tissue values (truth)
    side: np.ndarray               # SideLabel values (truth)
    ff: np.ndarray                 # true fat fraction 0..1
    region: Region
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    truth: dict = field(default_factory=dict)  # (side, metric) -> value
    snr: float = 0.0
    pd: np.ndarray | None = None               # proton density relative to muscle (0..1)
    muscle_fraction: np.ndarray | None = None  # muscle fraction of each voxel (partial volume)
    # compartments (``make_leg_phantom(compartments=True)``): uint8 map, 0 outside muscle,
    # k + 1 for COMPARTMENTS[region][k]; truth (side value, Roi value, metric) -> value
    compartment: np.ndarray | None = None
    compartment_truth: dict = field(default_factory=dict)
    t2w_ms_map: np.ndarray | None = None       # water T2 (ms) of muscle by compartment; NaN elsewhere/unset
    # muscles of the thigh's anterior compartment (``make_leg_phantom(muscles=True)``): uint8 map,
    # 0 outside them, j + 1 for muscle_names[j]; truth (side value, muscle name, metric) -> value
    muscle_labels: np.ndarray | None = None
    muscle_names: tuple[str, ...] = ()
    muscle_truth: dict = field(default_factory=dict)


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def truth_metrics(tissue: np.ndarray, side: np.ndarray, ff: np.ndarray, spacing_mm: tuple[float, float, float],
                  muscle_fraction: np.ndarray | None = None, muscle_ff: np.ndarray | None = None,
                  ) -> dict[tuple[Side, str], float]:
    """Truth per leg with the definitions of :mod:`quant.metrics`. With partial volume,
    ``muscle_fraction`` is the muscle fraction of every voxel (CSA = its sum x pixel
    area), ``muscle_ff`` the FF of the muscle tissue in each voxel, and the FF truth is
    the muscle-fraction-weighted mean of it.
    """
    dz, dy, dx = spacing_mm
    area = dy * dx
    out = {}
    for s, code in ((Side.RIGHT, SideLabel.RIGHT), (Side.LEFT, SideLabel.LEFT)):
        if muscle_fraction is None:
            frac = ((tissue == Tissue.MUSCLE) & (side == code)).astype(np.float64)
            mff = ff
        else:
            if muscle_ff is None:
                raise ValueError("muscle_fraction needs muscle_ff")
            frac = np.where(side == code, muscle_fraction, 0.0)
            mff = muscle_ff
        if not frac.any():
            continue
        per = frac.sum(axis=(1, 2))
        present = per > 0
        frma = (frac * (1 - mff)).sum(axis=(1, 2)) * area
        out[(s, "csa_mm2")] = float(per[present].mean() * area)
        out[(s, "vol_ml")] = float(frac.sum() * area * dz / 1000.0)
        out[(s, "ff_percent")] = float((frac * mff).sum() / frac.sum() * 100)
        out[(s, "frma_mm2")] = float(frma[present].mean())
    return out


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a.astype(np.float64)
    ny, nx = a.shape[0] // f, a.shape[1] // f
    return a.reshape(ny, f, nx, f).mean(axis=(1, 3))


# Compartments, in leg-local coordinates: u lateral (mm from the leg centre, towards the
# leg's own side), v posterior (+y). Every intermuscular septum is a ray from one long
# bone's centre (the bone covers its start); the compartments are the wedges between
# consecutive rays, counter-clockwise in (u, v) from the listed angle atan2(v, u).
# Thigh, around the femur: the lateral septum (lateral, a little anterior), the
# posteromedial septum and the medial septum (antero-medial) give a large anterior,
# a posterior and a medial compartment.
# Calf, around the fibula: the anterior and posterior intermuscular septa bound the
# lateral (peroneal) compartment; the interosseous membrane runs from the fibula to the
# back half of the tibia and, past it, on to the medial fascia; the deep transverse
# septum runs medially behind the tibia, between deep posterior and triceps surae.
_SEPTA: dict[Region, tuple[tuple[float, float], tuple[tuple[float, Roi], ...]]] = {
    Region.THIGH: ((6.0, 8.0), ((-0.25, Roi.POSTERIOR_COMPARTMENT), (2.3, Roi.MEDIAL_COMPARTMENT),
                                (3.55, Roi.ANTERIOR_COMPARTMENT))),
    Region.CALF: ((16.0, 8.0), ((-1.55, Roi.LATERAL_COMPARTMENT), (-0.05, Roi.TRICEPS_SURAE),
                                (3.15, Roi.DEEP_POSTERIOR_COMPARTMENT), (3.55, Roi.ANTERIOR_COMPARTMENT))),
}


def _rays(region: Region, septa_deg: Sequence[float] | None) -> tuple[tuple[float, float], list[tuple[float, Roi]]]:
    """The septum origin and rays of the region, each turned by ``septa_deg`` (degrees, in ray order)."""
    (bu, bv), rays = _SEPTA[region]
    turn = [0.0] * len(rays) if septa_deg is None else [float(d) for d in septa_deg]
    if len(turn) != len(rays):
        raise ValueError(f"septa_deg: {len(rays)} values for the {region.value}, got {len(turn)}")
    return (bu, bv), [(ang + float(np.deg2rad(d)), roi) for (ang, roi), d in zip(rays, turn, strict=True)]


def _compartment_labels(u: np.ndarray, v: np.ndarray, region: Region,
                        septa_deg: Sequence[float] | None = None) -> np.ndarray:
    """Compartment label (k + 1 for ``COMPARTMENTS[region][k]``) of leg-local points."""
    (bu, bv), rays = _rays(region, septa_deg)
    phi = np.arctan2(v - bv, u - bu)
    labels = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v)), np.uint8)
    order = COMPARTMENTS[region]
    for i, (start, roi) in enumerate(rays):
        end = rays[(i + 1) % len(rays)][0]
        width = np.mod(end - start, 2 * np.pi)
        inside = np.mod(phi - start, 2 * np.pi) < width
        labels[inside] = order.index(roi) + 1
    return labels


def _septum_rays(u: np.ndarray, v: np.ndarray, region: Region, half_width: float,
                 septa_deg: Sequence[float] | None = None) -> np.ndarray:
    """Thin bands along the septum rays of the region (leg-local coordinates)."""
    (bu, bv), rays = _rays(region, septa_deg)
    du, dv = u - bu, v - bv
    out = np.zeros(np.broadcast_shapes(np.shape(u), np.shape(v)), bool)
    for ang, _ in rays:
        ca, sa = np.cos(ang), np.sin(ang)
        out |= (du * ca + dv * sa > 0) & (np.abs(-du * sa + dv * ca) <= half_width)
    return out


def _roi_values(region: Region, values: Mapping[str, float] | None, what: str,
                side: Side | None = None) -> np.ndarray:
    """Per-label lookup table (index 0: no compartment, NaN where not given). Keys are Roi
    values (both legs) or, with ``side``, also ``"<side>:<roi>"`` (that leg, added on top).
    """
    rois = COMPARTMENTS.get(region, ())
    lut = np.full(len(rois) + 1, np.nan)
    for key, val in (values or {}).items():
        which, _, name = str(getattr(key, "value", key)).rpartition(":")
        if which and (side is None or Side(which) not in (Side.RIGHT, Side.LEFT)):
            raise ValueError(f"{what}: no per-side value allowed here ({key})")
        roi = Roi(name)
        if roi not in rois:
            raise ValueError(f"{what}: {roi.value} is not a compartment of the {region.value}")
        if which and Side(which) is not side:
            continue
        i = rois.index(roi) + 1
        lut[i] = np.nan_to_num(lut[i]) + float(val)
    return lut


#: The muscles of the thigh's anterior compartment (``make_leg_phantom(muscles=True)``),
#: named as the ROIs of :mod:`quant.muscles`; label j + 1 is ``THIGH_MUSCLES[j]``.
THIGH_MUSCLES: tuple[str, ...] = ("rectus_femoris", "vastus_lateralis", "vastus_intermedius", "vastus_medialis",
                                  "sartorius")

# The muscles, in the same leg-local coordinates and angles about the femur's centre as
# _SEPTA (anterior is 3 pi / 2; the anterior compartment spans about 203 to 346 degrees),
# sizes in mm at the nominal leg, scaled with the fascia: vastus intermedius a crescent on
# the anterior femur out to _VI_RADIUS between the angles _VI_ARC; rectus femoris an ellipse
# superficial anterior (_RF: axis angle, radial and tangential semi-axes) from just inside
# the vastus intermedius out past the fascia; sartorius a strap _SARTORIUS_MM thick under
# the fascia, from the medial septum to _SARTORIUS_END; the rest vastus medialis (medial of
# _VM_VL) and vastus lateralis (lateral of it).
_VI_RADIUS = 19.0       # beyond the femur's cortex (radius 14 mm, not scaled)
_VI_ARC = (np.deg2rad(218.0), np.deg2rad(332.0))
_RF = (np.deg2rad(268.0), 22.0, 15.0)
_SARTORIUS_MM = 10.0
_SARTORIUS_END = np.deg2rad(236.0)
_VM_VL = np.deg2rad(268.0)


def _ellipse_distance(a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> np.ndarray:
    """Signed distance (mm, first order, positive outside) of points (a, b) from the
    ellipse of semi-axes (ra, rb) centred at the origin.
    """
    q = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    grad = np.sqrt((a / ra ** 2) ** 2 + (b / rb ** 2) ** 2)
    return (q - 1.0) * q / np.maximum(grad, 1e-9)


def _ray_band(du: np.ndarray, dv: np.ndarray, ang: float, half_width: float) -> np.ndarray:
    """Points within ``half_width`` of the ray from the origin at angle ``ang``."""
    ca, sa = np.cos(ang), np.sin(ang)
    return (du * ca + dv * sa > 0) & (np.abs(-du * sa + dv * ca) <= half_width)


def _muscle_labels(u: np.ndarray, v: np.ndarray, fx: float, fy: float, scale: float,
                   half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Muscle label (j + 1 for ``THIGH_MUSCLES[j]``) of leg-local points of a thigh whose
    fascia has semi-axes (fx, fy), sizes scaled by ``scale``, and the thin fat planes
    between the muscles; both valid inside the anterior compartment only.
    """
    (bu, bv), _ = _SEPTA[Region.THIGH]
    du, dv = u - bu, v - bv
    r = np.hypot(du, dv)
    phi = np.mod(np.arctan2(dv, du), 2 * np.pi)
    # sartorius: under the fascia, medial end of the compartment
    t = _SARTORIUS_MM * scale
    d_sar = _ellipse_distance(u, v, fx - t, fy - t)
    sar = (d_sar > 0) & (phi < _SARTORIUS_END)
    # rectus femoris: an ellipse from just inside the vastus intermedius out past the fascia
    r_vi = 14.0 + _VI_RADIUS * scale
    ang, ra, rb = _RF[0], _RF[1] * scale, _RF[2] * scale
    centre = r_vi - 2.0 * scale + ra
    ca, sa = np.cos(ang), np.sin(ang)
    a, b = du - centre * ca, dv - centre * sa
    d_rf = _ellipse_distance(a * ca + b * sa, -a * sa + b * ca, ra, rb)
    rf = (d_rf <= 0) & ~sar
    in_arc = (phi > _VI_ARC[0]) & (phi < _VI_ARC[1])
    vi = (r < r_vi) & in_arc & ~rf & ~sar
    labels = np.where(phi < _VM_VL, THIGH_MUSCLES.index("vastus_medialis") + 1,
                      THIGH_MUSCLES.index("vastus_lateralis") + 1).astype(np.uint8)
    labels[vi] = THIGH_MUSCLES.index("vastus_intermedius") + 1
    labels[rf] = THIGH_MUSCLES.index("rectus_femoris") + 1
    labels[sar] = THIGH_MUSCLES.index("sartorius") + 1
    hw = half_width
    planes = (np.abs(d_sar) <= hw) & (phi < _SARTORIUS_END)                       # sartorius, deep side
    planes |= _ray_band(du, dv, _SARTORIUS_END, hw) & (d_sar > -hw)               # sartorius, lateral end
    planes |= np.abs(d_rf) <= hw                                                  # rectus femoris
    planes |= (np.abs(r - r_vi) <= hw) & in_arc & (d_rf > 0)                      # intermedius, superficial
    for edge in _VI_ARC:                                                          # intermedius, sides
        planes |= _ray_band(du, dv, edge, hw) & (r <= r_vi + hw)
    planes |= _ray_band(du, dv, _VM_VL, hw) & (r >= r_vi) & (d_rf > 0)            # medialis | lateralis
    return labels, planes


def _muscle_values(values: Mapping[str, float] | None, side: Side) -> np.ndarray:
    """Per-label lookup of extra FF (index 0: no muscle) for one leg: keys are names of
    :data:`THIGH_MUSCLES` (both legs) or ``"<side>:<name>"`` (that leg, added on top).
    """
    lut = np.zeros(len(THIGH_MUSCLES) + 1)
    for key, val in (values or {}).items():
        which, _, name = str(key).rpartition(":")
        if which and Side(which) not in (Side.RIGHT, Side.LEFT):
            raise ValueError(f"muscles_ff: {key} is not right or left")
        if name not in THIGH_MUSCLES:
            raise ValueError(f"muscles_ff: {name} is not one of {', '.join(THIGH_MUSCLES)}")
        if which and Side(which) is not side:
            continue
        lut[THIGH_MUSCLES.index(name) + 1] += float(val)
    return lut


def compartment_truth_metrics(side: np.ndarray, fractions: np.ndarray, fat_weighted: np.ndarray,
                              region: Region, spacing_mm: tuple[float, float, float],
                              t2w_ms: np.ndarray | None = None) -> dict[tuple[str, str, str], float]:
    """Truth per leg and compartment with the definitions of :func:`truth_metrics`.

    Parameters
    ----------
    side : SideLabel map (z, y, x)
    fractions : (K, z, y, x) fraction of each voxel that is muscle of compartment k
    fat_weighted : (K, z, y, x) the same fractions times the muscle FF (0..1)
    region : the region, whose :data:`quant.enums.COMPARTMENTS` the K compartments are
    spacing_mm : (slice, row, column) spacing
    t2w_ms : per-label water T2 lookup (index k + 1), NaN where not given; optional

    Returns
    -------
    dict
        ``(side value, Roi value, metric) -> value`` for csa_mm2, vol_ml, ff_percent,
        frma_mm2 and, where given, t2w_ms.
    """
    return truth_by_label(side, fractions, fat_weighted, [roi.value for roi in COMPARTMENTS[region]],
                           spacing_mm, t2w_ms)


def to_grid(h_pd: np.ndarray, h_ff: np.ndarray, h_tissue: np.ndarray, f: int) -> tuple[np.ndarray, ...]:
    """One slice's sub-voxel maps onto the voxel grid (``f`` × ``f`` block means): true water
    and fat signals, proton density, muscle fraction and muscle FF, the voxel FF, the fraction
    of each tissue (0..4) and the sub-voxel muscle indicator (for per-label fractions).
    """
    water = _block_mean(h_pd * (1 - h_ff), f)
    fat = _block_mean(h_pd * h_ff, f)
    pd = _block_mean(h_pd, f)
    is_m = (h_tissue == Tissue.MUSCLE).astype(np.float64)
    mfrac = _block_mean(is_m, f)
    with np.errstate(invalid="ignore", divide="ignore"):
        mff = np.nan_to_num(_block_mean(is_m * h_ff, f) / mfrac)
        ff = np.nan_to_num(fat / (water + fat))
    fractions = np.stack([_block_mean((h_tissue == c).astype(np.float64), f) for c in range(5)])
    return water, fat, pd, mfrac, mff, ff, fractions, is_m


def section_grid(shape: tuple[int, int, int], pixel_mm: float, slice_mm: float, supersample: int,
                 shift_mm: Sequence[float], rotation_deg: float
                 ) -> tuple[tuple[float, float, float], np.ndarray, np.ndarray, float]:
    """The sub-voxel grid of a section phantom centred on the origin: (origin of the voxel
    grid, anatomical x and y of each sub-voxel after the patient's in-plane shift and
    rotation, through-plane shift in mm).
    """
    nz, ny, nx = shape
    hp = pixel_mm / supersample
    origin = (-(nx - 1) * pixel_mm / 2, -(ny - 1) * pixel_mm / 2, -(nz - 1) * slice_mm / 2)
    y = origin[1] - pixel_mm / 2 + hp / 2 + np.arange(ny * supersample)[:, None] * hp
    x = origin[0] - pixel_mm / 2 + hp / 2 + np.arange(nx * supersample)[None, :] * hp
    sx, sy, sz = (float(v) for v in shift_mm)
    if rotation_deg or sx or sy:   # anatomical coordinates of the grid points: R^T (q - shift)
        th = np.deg2rad(rotation_deg)
        x, y = (np.cos(th) * (x - sx) + np.sin(th) * (y - sy),
                -np.sin(th) * (x - sx) + np.cos(th) * (y - sy))
    x, y = np.broadcast_arrays(x, y)
    return origin, x, y, sz


def section_phantom(cls: type, *, region: Region, w_true: np.ndarray, f_true: np.ndarray, tissue: np.ndarray,
                    side: np.ndarray, ff: np.ndarray, pd: np.ndarray, mfrac: np.ndarray, comp: np.ndarray,
                    cfrac: np.ndarray, cfw: np.ndarray, names: Sequence[str],
                    spacing: tuple[float, float, float], origin: tuple[float, float, float], snr: float,
                    bias_field: float, rng: np.random.Generator) -> Any:
    """A section phantom measured in ROIs only (hand, neck) from its voxel maps: a receive
    bias field, Dixon magnitudes each with its own complex noise, and the truth of all the
    ROIs together (``truth``) and of each (``compartment_truth``).
    """
    if bias_field:
        ny, nx = w_true.shape[1:]
        yn = np.linspace(-1, 1, ny)[:, None]
        xn = np.linspace(-1, 1, nx)[None, :]
        bias = 1.0 + bias_field * (0.7 * xn + 0.3 * (2 * yn ** 2 - 1))
        w_true = w_true * bias[None]
        f_true = f_true * bias[None]
    sigma = PD / snr
    shape = w_true.shape

    def mag(a: np.ndarray) -> np.ndarray:
        return np.abs(a + rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)).astype(np.float32)

    truth_all = truth_by_label(side, cfrac.sum(axis=0, keepdims=True), cfw.sum(axis=0, keepdims=True),
                               ("muscle",), spacing)
    truth = {(Side(s), metric): val for (s, _, metric), val in truth_all.items()}
    return cls(water=mag(w_true), fat=mag(f_true), in_phase=mag(w_true + f_true), opposed_phase=mag(w_true - f_true),
               tissue=tissue, side=side, ff=ff, region=region, spacing_mm=spacing, origin_mm=origin, truth=truth,
               snr=snr, pd=pd / PD, muscle_fraction=mfrac, compartment=comp,
               compartment_truth=truth_by_label(side, cfrac, cfw, names, spacing))


def label_fractions(is_m: np.ndarray, h_labels: np.ndarray, h_ff: np.ndarray, n: int,
                    f: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 1..n of a sub-voxel label map: the voxel fraction that is muscle of that
    label, and the same weighted by the muscle FF (block means of ``f`` × ``f``).
    """
    frac = np.stack([_block_mean(is_m * (h_labels == c + 1), f) for c in range(n)])
    fat_weighted = np.stack([_block_mean(is_m * (h_labels == c + 1) * h_ff, f) for c in range(n)])
    return frac, fat_weighted


def truth_by_label(side: np.ndarray, fractions: np.ndarray, fat_weighted: np.ndarray, names: Sequence[str],
                    spacing_mm: tuple[float, float, float],
                    t2w_ms: np.ndarray | None = None) -> dict[tuple[str, str, str], float]:
    """Truth per leg and labelled part (``names[k]``), see :func:`compartment_truth_metrics`."""
    dz, dy, dx = spacing_mm
    area = dy * dx
    out: dict[tuple[str, str, str], float] = {}
    for s, code in ((Side.RIGHT, SideLabel.RIGHT), (Side.LEFT, SideLabel.LEFT)):
        on = side == code
        for k, name in enumerate(names):
            frac = np.where(on, fractions[k], 0.0)
            total = float(frac.sum(dtype=np.float64))
            if total <= 0:
                continue
            fw = np.where(on, fat_weighted[k], 0.0)
            per = frac.sum(axis=(1, 2), dtype=np.float64)
            present = per > 0
            frma = (frac - fw).sum(axis=(1, 2), dtype=np.float64) * area
            key = (s.value, name)
            out[(*key, "csa_mm2")] = float(per[present].mean() * area)
            out[(*key, "vol_ml")] = float(total * area * dz / 1000.0)
            out[(*key, "ff_percent")] = float(fw.sum(dtype=np.float64) / total * 100)
            out[(*key, "frma_mm2")] = float(frma[present].mean())
            if t2w_ms is not None and np.isfinite(t2w_ms[k + 1]):
                out[(*key, "t2w_ms")] = float(t2w_ms[k + 1])
    return out


def make_leg_phantom(region: Region | str = Region.THIGH, *, shape: tuple[int, int, int] = (20, 160, 256),
                     pixel_mm: float = 1.5,
                     slice_mm: float = 5.0, muscle_ff: float = 0.06, muscle_scale: float = 1.0,
                     right_ff_offset: float = 0.0, snr: float = 40.0, seed: int = 0,
                     leg_gap_mm: float = 30.0, supersample: int = 1, bias_field: float = 0.0,
                     infiltration: float = 0.0, fascia_mm: float = 0.0, compartments: bool = False,
                     compartment_ff: Mapping[str, float] | None = None,
                     compartment_t2w_ms: Mapping[str, float] | None = None,
                     shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
                     rotation_deg: float = 0.0, septa_deg: Sequence[float] | None = None,
                     muscles: bool = False, muscles_ff: Mapping[str, float] | None = None) -> LegPhantom:
    """Make a two-leg Dixon phantom.

    Parameters
    ----------
    region : "thigh" or "calf"
    muscle_ff : mean fat fraction of muscle (0..1)
    muscle_scale : muscle cross-sectional area relative to the nominal leg (atrophy < 1)
    right_ff_offset : added to the right leg's muscle FF (asymmetry)
    snr : muscle proton density over the noise SD of each channel
    leg_gap_mm : skin-to-skin distance between the legs (0 or less: the legs touch)
    supersample : render each voxel from ``supersample`` x ``supersample`` sub-voxels
        (partial volume at every boundary; the truth is then fractional)
    bias_field : amplitude of a smooth multiplicative receive-coil sensitivity across the
        field of view (0.3: from 0.7 to 1.3), the same on every image
    infiltration : extra fat fraction, up to this value, in patches of one muscle group
        of each leg (fatty infiltration: up to ``muscle_ff + infiltration``)
    fascia_mm : thickness of a dark fascia line between subcutaneous fat and muscle
    compartments : anatomical compartments (:data:`quant.enums.COMPARTMENTS`) separated
        by thin pure-fat septa radiating from the femur (thigh: anterior, medial,
        posterior) or the fibula (calf: anterior, lateral, triceps surae, deep
        posterior), instead of the three generic septa; fills
        :attr:`LegPhantom.compartment` and :attr:`LegPhantom.compartment_truth`.
        Implied by ``compartment_ff`` or ``compartment_t2w_ms``. False (the default)
        gives the phantom as before, without a compartment map.
    compartment_ff : Roi value -> extra fat fraction (0..1) added to the muscle FF of
        that compartment in both legs; a key ``"right:<roi>"`` or ``"left:<roi>"`` adds
        to that leg only (on top of a both-legs value)
    compartment_t2w_ms : Roi value -> water T2 (ms) of the muscle of that compartment:
        :attr:`LegPhantom.t2w_ms_map` (used by :func:`quant.synthetic.exam.mese_truth_maps`)
        and ``t2w_ms`` in the compartment truth
    shift_mm : (x, y, z) translation of the whole anatomy in patient coordinates (LPS:
        +x towards the patient's left, +y posterior, +z head) relative to the fixed
        image grid; z moves the anatomy along the slices (a shift of one slice spacing
        puts the anatomy of slice k on slice k + 1)
    rotation_deg : in-plane rotation of the anatomy about the patient z axis through the
        centre of the field of view (x = y = 0), applied before ``shift_mm``; positive
        turns +x (patient left) towards +y (posterior). An anatomical point p is at
        ``R(rotation) p + shift`` on the grid.
    septa_deg : with compartments, degrees each septum is turned about its bone (another
        subject's anatomy; positive from +u lateral towards +v posterior, leg-local), in
        the order of the rays: thigh (lateral, posteromedial, medial septum), calf
        (anterior and posterior intermuscular septa, deep transverse septum, interosseous
        membrane). The compartment truth follows; None: the nominal septa.
    muscles : thigh only, implies ``compartments``: the anterior compartment divided into
        the muscles of :data:`THIGH_MUSCLES` by thin pure-fat planes like the septa
        (vastus intermedius deep on the anterior femur, vastus lateralis lateral, vastus
        medialis medial, rectus femoris superficial anterior, sartorius a thin strap under
        the fascia antero-medially); fills :attr:`LegPhantom.muscle_labels`,
        :attr:`LegPhantom.muscle_names` and :attr:`LegPhantom.muscle_truth`. The planes take
        their muscle out of the anterior compartment. Implied by ``muscles_ff``. False (the
        default) leaves every other output as without the option.
    muscles_ff : muscle name (:data:`THIGH_MUSCLES`) -> extra fat fraction (0..1) added to
        that muscle's FF in both legs; ``"right:<name>"`` or ``"left:<name>"`` adds to that
        leg only (on top of a both-legs value). Not to be confused with ``muscle_ff``, the
        mean FF of all muscle.

    Returns
    -------
    LegPhantom
        Images, label maps and truth. The grid (origin, spacing, orientation) does not
        depend on ``shift_mm`` or ``rotation_deg``; the anatomy, the FF texture and the
        truth move with them, while the bias field and the noise stay with the scanner.
    """
    region = Region(region)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    f = int(supersample)
    ff_luts = {code: np.nan_to_num(_roi_values(region, compartment_ff, "compartment_ff", code.side))
               for code in (SideLabel.RIGHT, SideLabel.LEFT)}
    t2_lut = _roi_values(region, compartment_t2w_ms, "compartment_t2w_ms")
    muscles = bool(muscles or muscles_ff)
    if muscles and region is not Region.THIGH:
        raise ValueError(f"no individual muscles for the {region.value} (thigh only)")
    m_luts = {code: _muscle_values(muscles_ff, code.side) for code in (SideLabel.RIGHT, SideLabel.LEFT)}
    compartments = bool(compartments or compartment_ff or compartment_t2w_ms or muscles)
    if compartments and region not in _SEPTA:
        raise ValueError(f"no compartments for the {region.value}")
    n_comp = len(COMPARTMENTS[region]) if compartments else 0
    n_mus = len(THIGH_MUSCLES) if muscles else 0
    anterior = COMPARTMENTS[region].index(Roi.ANTERIOR_COMPARTMENT) + 1 if muscles else 0
    # sub-voxel centres of the hi-res grid (block averages give the voxel grid), in anatomical coordinates
    origin, x, y, sz = section_grid(shape, pixel_mm, slice_mm, f, shift_mm, rotation_deg)
    tissue = np.zeros(shape, np.uint8)
    side = np.zeros(shape, np.uint8)
    ff = np.zeros(shape, np.float32)
    pd = np.zeros(shape, np.float32)
    mfrac = np.zeros(shape, np.float32)
    mff = np.zeros(shape, np.float32)
    w_true = np.zeros(shape, np.float64)
    f_true = np.zeros(shape, np.float64)
    cfrac = np.zeros((n_comp, *shape), np.float32)
    cfw = np.zeros((n_comp, *shape), np.float32)
    comp = np.zeros(shape, np.uint8) if compartments else None
    mfr = np.zeros((n_mus, *shape), np.float32)
    mfw = np.zeros((n_mus, *shape), np.float32)
    mlab = np.zeros(shape, np.uint8) if muscles else None
    if region is Region.THIGH:
        fascia = (62.0, 56.0)
        bones = [((6.0, 8.0), 14.0, 8.0)]          # (offset from leg centre), outer radius, marrow radius
    else:
        fascia = (46.0, 42.0)
        bones = [((-10.0, -14.0), 12.0, 6.5), ((16.0, 8.0), 6.5, 3.0)]
    s = np.sqrt(muscle_scale)
    # smooth FF texture in muscle (zero mean over the field of view), in voxel units
    yy, xx = (y - origin[1]) / pixel_mm, (x - origin[0]) / pixel_mm
    texture = 0.02 * np.sin(xx / 7.0) * np.cos(yy / 9.0)
    patches = 0.5 + 0.5 * np.sin(xx / 5.0 + 1.0) * np.sin(yy / 4.0)      # 0..1, patchy infiltration
    for k in range(nz):
        t = (k - sz / slice_mm) / max(nz - 1, 1)
        taper = 1.0 - 0.12 * t
        fx, fy = fascia[0] * taper * s, fascia[1] * taper * s
        sat_t = 11.0 + 3.0 * t
        outer_x = fx + sat_t
        h_tissue = np.zeros((ny * f, nx * f), np.uint8)
        h_side = np.zeros_like(h_tissue)
        h_comp = np.zeros_like(h_tissue)
        h_mus = np.zeros_like(h_tissue)
        h_ff = np.zeros((ny * f, nx * f), np.float64)
        h_pd = np.zeros_like(h_ff)
        for sgn, code in ((-1, SideLabel.RIGHT), (+1, SideLabel.LEFT)):
            # the legs' skin is leg_gap_mm apart at x = 0 when outer_x is the nominal size
            cx = sgn * (fascia[0] * taper + 14.0 + leg_gap_mm / 2)
            cy = 0.0
            skin = _ellipse(x, y, cx, cy, outer_x, fy + sat_t, 0.0)
            inner = _ellipse(x, y, cx, cy, fx, fy, 0.0)
            leg = skin & ~(h_side > 0)
            h_side[leg] = code
            h_tissue[leg & ~inner] = Tissue.SUBCUTANEOUS_FAT
            h_ff[leg & ~inner] = SAT_FF
            h_pd[leg & ~inner] = PD
            mus = leg & inner
            h_tissue[mus] = Tissue.MUSCLE
            ffm = muscle_ff + (right_ff_offset if code == SideLabel.RIGHT else 0.0) + texture
            if infiltration > 0:  # one muscle group (a sector between two septa) infiltrated in patches
                ang = np.mod(np.arctan2(y - cy, (x - cx) * sgn), 2 * np.pi)
                group = (ang > 0.6) & (ang < 2.3)
                ffm = ffm + np.where(group, infiltration * patches, 0.0)
            if compartments:  # leg-local coordinates: u lateral, v posterior
                u, v = (x - cx) * sgn, y - cy
                labels = np.broadcast_to(_compartment_labels(u, v, region, septa_deg), mus.shape)
                h_comp[mus] = labels[mus]
                ffm = ffm + ff_luts[code][labels]
            if muscles:  # the muscles of the anterior compartment
                m_labels, planes = _muscle_labels(u, v, fx, fy, taper * s, pixel_mm * 0.6)
                m_labels = np.where(labels == anterior, m_labels, 0)
                h_mus[mus] = m_labels[mus]
                ffm = ffm + m_luts[code][m_labels]
            h_ff[mus] = np.clip(ffm, 0, 1)[mus]
            h_pd[mus] = PD
            if fascia_mm > 0:  # dark connective tissue between SAT and muscle
                band = leg & ~inner & _ellipse(x, y, cx, cy, fx + fascia_mm, fy + fascia_mm, 0.0)
                h_tissue[band] = Tissue.SUBCUTANEOUS_FAT
                h_ff[band] = 0.1
                h_pd[band] = CORTEX_PD
            if compartments:  # septa: thin pure-fat planes from the bone to the fascia
                sep = _septum_rays(u, v, region, pixel_mm * 0.6, septa_deg) & mus
                h_tissue[sep] = Tissue.INTERMUSCULAR_FAT
                h_ff[sep] = SEPTUM_FF
                if muscles:  # thin fat planes between the muscles of the anterior compartment
                    sep = planes & (labels == anterior) & mus
                    h_tissue[sep] = Tissue.INTERMUSCULAR_FAT
                    h_ff[sep] = SEPTUM_FF
            else:  # septa: thin pure-fat lines from the fascia towards the centre
                for theta in (0.6, 2.3, 4.1):
                    px, py = cx + np.cos(theta) * fx * 0.55, cy + np.sin(theta) * fy * 0.55
                    sep = _ellipse(x, y, px, py, fx * 0.42, pixel_mm * 0.6, theta) & mus
                    h_tissue[sep] = Tissue.INTERMUSCULAR_FAT
                    h_ff[sep] = SEPTUM_FF
            for (ox, oy), r_out, r_marrow in bones:
                bx, by = cx + sgn * ox, cy + oy
                cortex = _ellipse(x, y, bx, by, r_out, r_out) & leg
                marrow = _ellipse(x, y, bx, by, r_marrow, r_marrow) & leg
                h_tissue[cortex] = Tissue.BONE
                h_ff[cortex] = 0.3
                h_pd[cortex] = CORTEX_PD
                h_ff[marrow] = MARROW_FF
                h_pd[marrow] = PD
        # to the voxel grid: signals and tissue fractions are block means
        w_true[k], f_true[k], pd[k], mfrac[k], mff[k], ff[k], fractions, is_m = to_grid(h_pd, h_ff, h_tissue, f)
        tissue[k] = np.argmax(fractions, axis=0)
        side_frac = np.stack([_block_mean((h_side == c).astype(np.float64), f) for c in range(3)])
        side_frac[0] *= 0.0  # a voxel touched by a leg belongs to it
        side[k] = np.where(side_frac.max(axis=0) > 0, np.argmax(side_frac, axis=0), 0)
        if comp is not None:  # the voxel's compartment: that of most of its muscle sub-voxels
            cfrac[:, k], cfw[:, k] = label_fractions(is_m, h_comp, h_ff, n_comp, f)
            comp[k] = np.where(tissue[k] == Tissue.MUSCLE, np.argmax(cfrac[:, k], axis=0) + 1, 0)
        if mlab is not None and comp is not None:  # the voxel's muscle: that of most of its muscle sub-voxels
            mfr[:, k], mfw[:, k] = label_fractions(is_m, h_mus, h_ff, n_mus, f)
            mlab[k] = np.where(comp[k] == anterior, np.argmax(mfr[:, k], axis=0) + 1, 0)
    if bias_field:
        yn = np.linspace(-1, 1, ny)[:, None]
        xn = np.linspace(-1, 1, nx)[None, :]
        b = 1.0 + bias_field * (0.7 * xn + 0.3 * (2 * yn ** 2 - 1)) / 1.0
        w_true = w_true * b[None]
        f_true = f_true * b[None]
    sigma = PD / snr

    def mag(a):
        return np.abs(a + rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)).astype(np.float32)

    spacing = (slice_mm, pixel_mm, pixel_mm)
    if f == 1:
        truth = truth_metrics(tissue, side, ff, spacing)
    else:
        truth = truth_metrics(tissue, side, ff, spacing, muscle_fraction=mfrac, muscle_ff=mff)
    c_truth: dict = {}
    t2_map = None
    if comp is not None:
        c_truth = compartment_truth_metrics(side, cfrac, cfw, region, spacing, t2w_ms=t2_lut)
        if compartment_t2w_ms:
            t2_map = np.where(comp > 0, t2_lut[comp], np.nan).astype(np.float32)
    m_truth = truth_by_label(side, mfr, mfw, THIGH_MUSCLES, spacing) if mlab is not None else {}
    return LegPhantom(water=mag(w_true), fat=mag(f_true), in_phase=mag(w_true + f_true),
                      opposed_phase=mag(w_true - f_true), tissue=tissue, side=side, ff=ff, region=region,
                      spacing_mm=spacing, origin_mm=origin, truth=truth, snr=snr,
                      pd=pd / PD, muscle_fraction=mfrac, compartment=comp, compartment_truth=c_truth,
                      t2w_ms_map=t2_map, muscle_labels=mlab, muscle_names=THIGH_MUSCLES if muscles else (),
                      muscle_truth=m_truth)


# --- the phantom as a scanner would send it ------------------------------------------

_SIEMENS_DIXON = (
    ("water", "t1_vibe_dixon_tra_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"]),
    ("fat", "t1_vibe_dixon_tra_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"]),
    ("in_phase", "t1_vibe_dixon_tra_in", ["DERIVED", "PRIMARY", "DIXON", "IN_PHASE"]),
    ("opposed_phase", "t1_vibe_dixon_tra_opp", ["DERIVED", "PRIMARY", "DIXON", "OPP_PHASE"]),
)


def phantom_datasets(phantom: LegPhantom, *, patient_id: str = "MN-0001", patient_name: str = "Phantom^Leg",
                     issuer: str = "MUSCLENODE-DEMO", study_uid: str | None = None, study_date: str = "20260101",
                     accession: str = "", body_part: str | None = None, uid_seed: str = "",
                     series_number_base: int = 10) -> list:
    """The phantom as classic single-frame MR Image Storage datasets of a Siemens-style
    Dixon exam (water, fat, in-phase, opposed-phase series), 16-bit unsigned.

    UIDs are derived deterministically from ``uid_seed``, patient and study date, so
    the same call gives the same instances. ``body_part`` None writes the region's
    Body Part Examined; "" leaves it out (the node then tells the level from anatomy).
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import MRImageStorage

    def uid(*parts) -> str:  # 2.25.<UUID from a name>: the same inputs give the same UID
        return derive_uid("synthetic", uid_seed, patient_id, study_date, *map(str, parts))

    study_uid = study_uid or uid("study")
    for_uid = uid("frame-of-reference")
    nz, ny, nx = phantom.water.shape
    dz, dy, dx = phantom.spacing_mm
    part = phantom.region.value.upper() if body_part is None else body_part
    out = []
    for n, (kind, desc, image_type) in enumerate(_SIEMENS_DIXON):
        series_uid = uid("series", kind)
        pixels = getattr(phantom, kind)
        data = np.clip(np.rint(pixels), 0, 65535).astype(np.uint16)
        for k in range(nz):
            ds = Dataset()
            ds.file_meta = file_meta(MRImageStorage, uid("instance", kind, k))
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = image_type
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "090000"
            ds.AccessionNumber = accession
            ds.Modality = "MR"
            ds.Manufacturer = "SIEMENS"
            ds.ManufacturerModelName = "Phantom"
            ds.InstitutionName = "musclenode"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "MSK^Muscle quantification"
            ds.SeriesDescription = desc
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.IssuerOfPatientID = issuer
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "O"
            if part:
                ds.BodyPartExamined = part
            ds.Laterality = ""  # both legs in one image: no single laterality
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.SliceThickness = f"{dz:g}"
            ds.SpacingBetweenSlices = f"{dz:g}"
            ds.RepetitionTime = "6.8"
            ds.EchoTime = "2.39"
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "3"
            ds.FlipAngle = "9"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = series_number_base + n
            ds.InstanceNumber = k + 1
            ds.ImagesInAcquisition = nz   # as Siemens writes it: the slices of the series
            ds.PatientPosition = "FFS"
            ds.ImagePositionPatient = [f"{v:.4f}" for v in (phantom.origin_mm[0], phantom.origin_mm[1],
                                                             phantom.origin_mm[2] + k * dz)]
            ds.ImageOrientationPatient = [f"{v:g}" for v in phantom.orientation]
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = f"{phantom.origin_mm[2] + k * dz:.4f}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ny, nx
            ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.WindowCenter = "500"
            ds.WindowWidth = "1200"
            ds.PixelData = data[k].tobytes()
            out.append(ds)
    return out
