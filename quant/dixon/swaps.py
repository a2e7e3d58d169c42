"""Fat-water swaps of magnitude Dixon found from anatomy (subcutaneous fat is fat), and their correction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..errors import SeriesError
from ..fatfraction import fat_fraction
from ..noise import _inplane, _open_inplane, body_mask_from
from ..segment import fill_holes_per_slice
from ..volume import bounding_box
from .magnitude import _channels


@dataclass(frozen=True, eq=False)
class SwapReport:
    """Result of :func:`detect_swaps`.

    Attributes
    ----------
    whole_series_swapped : bool
        The series labelled water is fat (and vice versa) throughout.
    regional : ndarray of bool
        Voxels exchanged in addition (relative to the whole-series decision): connected
        regions whose water and fat are swapped.
    fraction : float
        Fraction of the body in ``regional``.
    message : str
        One line for logs and reports.
    shell_fat_fraction : float
        Fraction of the shell under the skin (outer 2 voxels of the body once the voxels
        lying wholly within the skin are set aside) that reads fat-like (FF >= 0.5) as
        labelled; near 1 normally, near 0 when the series are swapped.
    ambiguous : bool
        The shell gives no clear answer (thin or absent SAT): nothing was corrected.
    regional_checked : bool
        Regional swaps were looked for: False where the section has no subcutaneous fat
        layer separate from deeper tissue (less than 10 % of it lies deeper than the layer
        reaches, e.g. a hand, whose fat runs from the skin between the muscles).
    body : ndarray of bool, optional
        The body mask used (given, or :func:`body_mask_from` of the in-phase image or of
        W + F, which a swap does not change): pass it on as the ``body_mask`` of
        :func:`fat_fraction_dixon`, which would find the same one again.
    """

    whole_series_swapped: bool
    regional: np.ndarray
    fraction: float
    message: str
    shell_fat_fraction: float = float("nan")
    ambiguous: bool = False
    regional_checked: bool = True
    body: np.ndarray | None = None

    @property
    def exchange(self) -> np.ndarray:
        """Voxels whose water and fat must be exchanged in the images as given."""
        return ~self.regional if self.whole_series_swapped else self.regional.copy()

    @property
    def any(self) -> bool:
        """True if anything is swapped (the whole series or a region)."""
        return bool(self.whole_series_swapped or self.regional.any())


def _depth_in_plane(body: np.ndarray, sampling: tuple[float, float] | None = None) -> np.ndarray:
    """Distance of each body voxel to the outside, within its slice (voxels, or mm with
    ``sampling`` the row and column spacing): the distance from the voxel's centre to the
    nearest outside voxel's centre, i.e. to the body's edge plus half a voxel.
    """
    if body.ndim == 2:
        return ndi.distance_transform_edt(body, sampling=sampling)
    out = np.zeros(body.shape, np.float64)
    flat_b = body.reshape(-1, *body.shape[-2:])
    flat_o = out.reshape(-1, *body.shape[-2:])
    for k in range(flat_b.shape[0]):
        if flat_b[k].any():
            flat_o[k] = ndi.distance_transform_edt(flat_b[k], sampling=sampling)
    return out


def _skin(body: np.ndarray, pixel_mm: float | tuple[float, float] | None, skin_mm: float) -> np.ndarray:
    """Body voxels that lie wholly within the skin: their far side (the distance of
    :func:`_depth_in_plane` in mm) no deeper than ``skin_mm``. None without a pixel size.
    """
    if pixel_mm is None or skin_mm <= 0:
        return np.zeros(body.shape, dtype=bool)
    if isinstance(pixel_mm, (int, float)):
        sampling = (float(pixel_mm), float(pixel_mm))
    else:
        sampling = (float(pixel_mm[0]), float(pixel_mm[1]))
    return body & (_depth_in_plane(body, sampling) <= skin_mm)


def _under_skin(core: np.ndarray, skin: np.ndarray) -> np.ndarray:
    """For each skin voxel, the flat index of the nearest ``core`` voxel in its slice (the
    tissue under it); -1 elsewhere and in slices without core.
    """
    out = np.full(core.shape, -1, dtype=np.int64)
    plane = core.shape[-2:]
    n_plane = plane[0] * plane[1]
    flat_c = core.reshape(-1, *plane)
    flat_s = skin.reshape(-1, *plane)
    flat_o = out.reshape(-1, *plane)
    for k in range(flat_c.shape[0]):
        if flat_s[k].any() and flat_c[k].any():
            iy, ix = ndi.distance_transform_edt(~flat_c[k], return_distances=False, return_indices=True)
            flat_o[k][flat_s[k]] = (k * n_plane + iy * plane[1] + ix)[flat_s[k]]
    return out


def detect_swaps(water: np.ndarray, fat: np.ndarray, *, in_phase: np.ndarray | None = None,
                 opposed_phase: np.ndarray | None = None, body_mask: np.ndarray | None = None,
                 pixel_mm: float | tuple[float, float] | None = None, skin_mm: float = 1.5,
                 shell_voxels: float = 2.0, min_region_voxels: int = 30) -> SwapReport:
    """Find fat-water swaps in magnitude Dixon images from anatomy.

    Magnitude in-phase and opposed-phase images cannot show a swap (``W + F`` and
    ``|W - F|`` do not change when W and F are exchanged); they serve here only as the
    total signal for the body mask. The evidence is the subcutaneous fat (SAT) under the
    skin, which is fat in every patient. The skin itself (dermis) is water-rich: where the
    pixels are finer than the skin (``pixel_mm`` given, e.g. a hand at 0.8 mm), the voxels
    lying wholly within the outer ``skin_mm`` carry no SAT signal and are set aside, and
    the tests below run on the body under them (a voxel only partly in the skin, as at
    2.5 mm, stays: its signal is mostly SAT's). Otherwise the skin's water would outvote a
    thin SAT layer in the shell and a hand would read ambiguous.

    - **Whole series**: the shell under the skin (outer ``shell_voxels`` of the body so
      reduced, in-plane) reads water-like (FF < 0.5) in more than 65 % of its voxels.
      Between 35 % and 65 % the answer is ambiguous (no SAT, e.g. a cachectic limb) and
      nothing is decided.
    - **Regional** (a phase error of the scanner's reconstruction): a connected
      water-like region that touches the skin over at least ``min_region_voxels`` voxels
      and lies within the SAT layer (70 % of it no deeper than 1.5 times the SAT
      thickness, which is measured on the fat-like tissue at the skin elsewhere), together
      with the fat-like regions inside the body that border it and do not reach the skin
      (the swapped muscle under it) and what these enclose. Regions not reaching the skin
      cannot be told from fatty infiltration and are not reported. The skin over a
      swapped segment (voxels set aside above) is swapped with it. The layer test needs
      tissue beyond the layer's reach: where less than 10 % of the section lies deeper
      (a hand, whose fat runs from the skin between the muscles and bones), regional
      swaps are not looked for (``regional_checked`` False); the whole-series test stands.

    Parameters
    ----------
    water, fat : ndarray
        Magnitude images as labelled by the scanner.
    in_phase, opposed_phase : ndarray, optional
        Used for the body mask (in-phase) only, see above.
    body_mask : ndarray of bool, optional
        Default: :func:`body_mask_from` of the in-phase image (or of W + F).
    pixel_mm : float or (row, column) spacing in mm, optional
        In-plane pixel size; without it no voxel is set aside as skin.
    skin_mm : float
        Thickness of the skin (epidermis and dermis, 1-2 mm on the limbs and the hand).
    shell_voxels : float
        Depth of the shell under the skin in voxels.
    min_region_voxels : int
        Smallest skin contact of a regional swap (voxels).

    Returns
    -------
    SwapReport
    """
    # opposed phase: only checked (it plays no part below)
    if opposed_phase is not None and np.shape(opposed_phase) != np.shape(water):
        raise SeriesError(f"opposed_phase {np.shape(opposed_phase)} and water {np.shape(water)} differ in shape")
    arrays, _, _ = _channels(water, fat, in_phase, None)
    w, f = arrays[0], arrays[1]
    if w.ndim < 2:
        raise SeriesError(f"swap detection needs images (2-D or 3-D), got shape {w.shape}")
    total = arrays[2] if in_phase is not None else w + f
    body = np.asarray(body_mask, dtype=bool) if body_mask is not None else body_mask_from(total)
    if body.shape != w.shape:
        raise SeriesError(f"body_mask {body.shape} and water {w.shape} differ in shape")
    nothing = np.zeros(w.shape, dtype=bool)
    # everything below lies within the body (in-plane morphology, components of body voxels):
    # work on its bounding box, 2 voxels wider in-plane so that the distance transforms see
    # the outside, rather than on the whole volume (same result, in half the time or less)
    box = bounding_box(body, margin=2)
    n_body = int(np.count_nonzero(body))
    whole_body = body
    w, f, total, body = w[box], f[box], total[box], body[box]
    ff = fat_fraction(w, f)
    skin = _skin(body, pixel_mm, skin_mm)
    core = body & ~skin
    depth = _depth_in_plane(core)
    shell = core & (depth <= shell_voxels) & np.isfinite(ff)
    if shell.sum() < 20:
        return SwapReport(False, nothing, 0.0, "swap check not possible: no body found", ambiguous=True,
                          body=whole_body)
    shell_fat = float(np.mean(ff[shell] >= 0.5))
    if 0.35 <= shell_fat <= 0.65:
        return SwapReport(False, nothing, 0.0,
                          f"swap check ambiguous: {shell_fat:.0%} of the shell under the skin reads fat-like "
                          "(thin or absent subcutaneous fat); nothing corrected",
                          shell_fat_fraction=shell_fat, ambiguous=True, body=whole_body)
    whole = shell_fat < 0.35
    ffc = 1.0 - ff if whole else ff
    valid = core & np.isfinite(ffc)
    fat_like = _open_inplane(valid & (ffc >= 0.5))
    water_like = _open_inplane(valid & (ffc < 0.5))
    conn = ndi.generate_binary_structure(w.ndim, 1)
    lab_f, n_f = ndi.label(fat_like, structure=conn)
    lab_w, n_w = ndi.label(water_like, structure=conn)
    idx_f = np.arange(1, n_f + 1)
    idx_w = np.arange(1, n_w + 1)
    # SAT thickness from fat-like tissue reaching the skin
    f_contact = ndi.sum(shell, lab_f, idx_f) if n_f else np.zeros(0)
    sat_labels = idx_f[f_contact >= min_region_voxels]
    if sat_labels.size:
        t_sat = max(2.0 * float(np.median(depth[np.isin(lab_f, sat_labels)])), shell_voxels + 1.0)
    else:
        t_sat = 3.0 * shell_voxels
    region = np.zeros(w.shape, dtype=bool)   # of the box
    reach = 1.5 * t_sat + 1.0
    # the layer test needs tissue beyond the fat layer's reach; in a small section whose fat
    # runs from the skin between the muscles (a hand) everything is "within the layer"
    deep_share = int(np.count_nonzero(core & (depth > reach))) / max(int(np.count_nonzero(core)), 1)
    layered = deep_share >= 0.1
    if n_w and layered:
        w_contact = ndi.sum(shell, lab_w, idx_w)
        shallow = ndi.mean((depth <= reach).astype(np.float64), lab_w, idx_w)
        cand = idx_w[(w_contact >= min_region_voxels) & (shallow >= 0.7)]
        if cand.size:
            region = np.isin(lab_w, cand)
            region = _swapped_tissue_under(region, valid, ffc, depth, t_sat, total, core, conn)
            region = fill_holes_per_slice(region) & core
            if skin.any():   # with the skin over it
                under = _under_skin(core, skin)
                has = under >= 0
                region[has] = region.ravel()[under[has]]
            lab_r, n_r = ndi.label(region, structure=conn)
            if n_r:
                sizes = ndi.sum(region, lab_r, np.arange(1, n_r + 1))
                region = np.isin(lab_r, np.arange(1, n_r + 1)[sizes >= min_region_voxels])
    frac = float(region.sum() / max(n_body, 1))
    n_regions = int(ndi.label(region, structure=conn)[1]) if region.any() else 0
    regional = nothing
    regional[box] = region
    parts = []
    if whole:
        parts.append(f"whole series swapped: {1 - shell_fat:.0%} of the shell under the skin reads water-like")
    if n_regions:
        parts.append(f"regional swap: {n_regions} region(s), {frac:.1%} of the body")
    msg = "; ".join(parts) if parts else f"no swap found ({shell_fat:.0%} of the shell under the skin fat-like)"
    if not layered:
        msg += (f"; regional swaps not checked ({deep_share:.0%} of the section lies deeper than its fat layer "
                "reaches: no separate subcutaneous layer)")
    return SwapReport(bool(whole), regional, frac, msg, shell_fat_fraction=shell_fat, regional_checked=layered,
                      body=whole_body)


def _swapped_tissue_under(region, valid, ffc, depth, t_sat, total, body, conn):
    """Add to a swapped SAT segment the fat-like tissue beneath it that is swapped muscle.

    Candidates are fat-like voxels deeper than the SAT layer with normal signal (the dark
    cortex separates marrow), thin septa cut by an opening; a candidate region is taken
    when it borders the swapped segment more than it borders normal SAT.
    """
    ndim = region.ndim
    sig = valid & (total >= 0.2 * float(np.median(total[body])))
    fatty = sig & (ffc >= 0.5) & ~region
    layer = 1.2 * t_sat
    deep = ndi.binary_opening(fatty & (depth > layer), structure=_inplane(ndim, 2))
    sat = fatty & (depth <= layer)
    lab, n = ndi.label(deep, structure=conn)
    if n == 0:
        return region
    near_c = ndi.binary_dilation(region, structure=_inplane(ndim), iterations=3)
    reach = _inplane(ndim)
    keep = np.zeros(n + 1, dtype=bool)
    for k in range(1, n + 1):
        comp = lab == k
        ring = ndi.binary_dilation(comp, structure=reach, iterations=3) & ~comp
        c_contact = np.count_nonzero(ring & region)
        s_contact = np.count_nonzero(ring & sat & ~near_c)
        keep[k] = c_contact > max(s_contact, 3)
    chosen = keep[lab]
    if not chosen.any():
        return region
    # give back what the opening shaved off (within fat-like tissue), and the thin gap to the segment
    chosen = ndi.binary_dilation(chosen, structure=_inplane(ndim), iterations=3, mask=fatty & (depth > 0.8 * t_sat))
    gap = fatty & near_c & ndi.binary_dilation(chosen, structure=_inplane(ndim), iterations=3)
    return region | chosen | gap


def correct_swaps(water: np.ndarray, fat: np.ndarray, report: SwapReport) -> tuple[np.ndarray, np.ndarray]:
    """Water and fat with the swaps of ``report`` exchanged back (new arrays; nothing is
    changed when the report is ambiguous).
    """
    water = np.asarray(water)
    fat = np.asarray(fat)
    if water.shape != fat.shape or water.shape != report.regional.shape:
        raise SeriesError(f"water {water.shape}, fat {fat.shape} and the report {report.regional.shape} "
                          "differ in shape")
    ex = report.exchange
    return np.where(ex, fat, water), np.where(ex, water, fat)
