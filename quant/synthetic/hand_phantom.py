"""A numerical phantom of one hand for Dixon MRI: a transverse section through the palm at
the level of the metacarpal shafts, with known truth per muscle group.

Anatomy per slice (hand-local coordinates: ``u`` across the hand from the thumb's side,
``v`` from the palm towards the back of the hand, mm): skin (a water-rich rim) around
subcutaneous and palmar fat; the five metacarpals (dark cortex around fatty marrow), the
thumb's lying palmar to the others; three muscle groups, each an ROI a reader would draw:
``thenar`` (the ball of the thumb), ``hypothenar`` (the ball of the little finger) and
``interossei`` (the three spaces between metacarpals II-V); four flexor tendons (dark) in
the palm's fat. Fat separates the groups, so an outline drawn on the majority-muscle voxels
is each group. The thenar and hypothenar groups get thinner towards the fingers.

Signals as in :mod:`quant.synthetic.phantom`: water and fat of every sub-voxel, block
means to the voxel grid (partial volume), then complex Gaussian noise of standard deviation
``pd / snr`` on each of water, fat, in-phase and opposed-phase, and the magnitude. The
result is a :class:`~quant.synthetic.phantom.LegPhantom` (region HAND), so the exam
builders of :mod:`quant.synthetic.phantom` and :mod:`quant.synthetic.exam` write it
unchanged: its ``compartment`` map holds the muscle groups (label k + 1 for
``HAND_ROIS[k]``) and ``compartment_truth`` their truth by ``(side, ROI name, metric)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..enums import Region, Side, SideLabel, Tissue
from .phantom import (
    CORTEX_PD,
    MARROW_FF,
    PD,
    SAT_FF,
    LegPhantom,
    _block_mean,
    _ellipse,
    label_fractions,
    phantom_datasets,
    section_grid,
    section_phantom,
    to_grid,
    truth_by_label,
)

#: The muscle groups of the hand phantom, in label order.
HAND_ROIS: tuple[str, ...] = ("thenar", "hypothenar", "interossei")

SKIN_FF = 0.15     # dermis: water-rich
SKIN_MM = 1.2
TENDON_FF = 0.05

# (u, v) centre, half-axes (mm), angle (rad), tapering (shrinks towards the fingers)
_OUTLINE = (((0.0, 0.0), (42.0, 15.0), 0.0), ((-30.0, -7.0), (17.0, 12.5), 0.3))
_MUSCLES = {
    "thenar": (((-26.0, -9.0), (13.0, 7.5), 0.3),),
    "hypothenar": (((26.0, -3.0), (9.0, 5.5), -0.2),),
    "interossei": (((-13.5, 2.5), (4.6, 7.0), 0.0), ((1.0, 2.5), (4.4, 7.0), 0.0), ((14.5, 2.5), (4.2, 6.5), 0.0)),
}
_TAPER = {"thenar": 0.25, "hypothenar": 0.2, "interossei": 0.0}
# metacarpals I-V: (u, v) centre, outer radius, marrow radius (mm)
_BONES = (((-38.0, -2.0), 4.5, 2.6), ((-21.0, 3.0), 4.2, 2.5), ((-6.0, 3.0), 4.0, 2.4), ((8.0, 3.0), 3.6, 2.1),
          ((21.0, 3.0), 3.4, 2.0))
_TENDONS = (((-8.0, -9.0), 2.4), ((0.0, -9.5), 2.4), ((8.0, -9.5), 2.2), ((16.0, -8.5), 2.0))

DEFAULT_HAND_FF: Mapping[str, float] = {"thenar": 0.05, "hypothenar": 0.07, "interossei": 0.12}


@dataclass(frozen=True, eq=False)
class HandPhantom(LegPhantom):
    """A :class:`~quant.synthetic.phantom.LegPhantom` of one hand: ``roi_names`` are the
    muscle groups of ``compartment`` (label k + 1 for ``roi_names[k]``).
    """

    roi_names: tuple[str, ...] = HAND_ROIS


def _union(u: np.ndarray, v: np.ndarray, shapes, scale: float = 1.0, grow: float = 0.0) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for (cu, cv), (au, av), ang in shapes:
        out |= _ellipse(u, v, cu, cv, au * scale + grow, av * scale + grow, ang)
    return out


def hand_truth(side: np.ndarray, fractions: np.ndarray, fat_weighted: np.ndarray, names: tuple[str, ...],
               spacing_mm: tuple[float, float, float]) -> dict[tuple[str, str, str], float]:
    """Truth per side and muscle group, with the definitions of :mod:`quant.metrics`.

    Parameters
    ----------
    side : SideLabel map (z, y, x)
    fractions : (K, z, y, x) fraction of each voxel that is muscle of group k
    fat_weighted : (K, z, y, x) the same fractions times the muscle FF (0..1)
    names : the K group names
    spacing_mm : (slice, row, column) spacing

    Returns
    -------
    dict
        ``(side value, name, metric) -> value`` for csa_mm2, vol_ml, ff_percent, frma_mm2.
    """
    return truth_by_label(side, fractions, fat_weighted, names, spacing_mm)


def make_hand_phantom(side: Side | str = Side.RIGHT, *, shape: tuple[int, int, int] = (10, 96, 144),
                      pixel_mm: float = 0.8, slice_mm: float = 3.0, muscle_ff: Mapping[str, float] | None = None,
                      snr: float = 40.0, seed: int = 0, supersample: int = 3, bias_field: float = 0.0,
                      centre_x_mm: float = 0.0, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
                      rotation_deg: float = 0.0) -> HandPhantom:
    """Make a Dixon phantom of one hand (a transverse section through the palm).

    Parameters
    ----------
    side : the hand ("right" or "left"); the left hand is the mirror image in patient x
    shape, pixel_mm, slice_mm : the grid (slices, rows, columns) and its spacing
    muscle_ff : muscle group -> fat fraction 0..1 (default :data:`DEFAULT_HAND_FF`; groups
        not given keep theirs); a smooth texture of ±1 pp is added
    snr : muscle proton density over the noise SD of each channel
    supersample : sub-voxels per voxel edge (partial volume; the truth is fractional)
    bias_field : amplitude of a smooth receive sensitivity across the field of view
    centre_x_mm : patient x of the hand's centre (+x is the patient's left)
    shift_mm, rotation_deg : repositioning on the same grid, as in
        :func:`quant.synthetic.phantom.make_leg_phantom` (rotation about the patient z axis
        through the field of view's centre, then the shift)

    Returns
    -------
    HandPhantom
        Images, label maps (``compartment``: the muscle groups), whole-hand truth ``truth``
        (all muscle) and per-group truth ``compartment_truth``.
    """
    side = Side(side)
    code = SideLabel.RIGHT if side is Side.RIGHT else SideLabel.LEFT
    sgn = 1.0 if side is Side.RIGHT else -1.0   # u (from the thumb's side) along -x for the right hand
    ffs = dict(DEFAULT_HAND_FF)
    for key, val in (muscle_ff or {}).items():
        if key not in ffs:
            raise ValueError(f"muscle_ff: {key!r} is not a muscle group of the hand ({', '.join(HAND_ROIS)})")
        ffs[key] = float(val)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    f = int(supersample)
    origin, x, y, sz = section_grid(shape, pixel_mm, slice_mm, f, shift_mm, rotation_deg)
    u, v = -sgn * (x - centre_x_mm), y
    texture = 0.01 * np.sin(u / 4.0) * np.cos(v / 3.0)
    n_roi = len(HAND_ROIS)
    tissue = np.zeros(shape, np.uint8)
    side_map = np.zeros(shape, np.uint8)
    ff = np.zeros(shape, np.float32)
    pd = np.zeros(shape, np.float32)
    mfrac = np.zeros(shape, np.float32)
    mff = np.zeros(shape, np.float32)
    w_true = np.zeros(shape, np.float64)
    f_true = np.zeros(shape, np.float64)
    cfrac = np.zeros((n_roi, *shape), np.float32)
    cfw = np.zeros((n_roi, *shape), np.float32)
    comp = np.zeros(shape, np.uint8)
    for k in range(nz):
        t = (k - sz / slice_mm) / max(nz - 1, 1)   # 0 at the wrist's end, 1 at the fingers' end
        hand = _union(u, v, _OUTLINE, scale=1.0 - 0.05 * t)
        h_tissue = np.zeros(hand.shape, np.uint8)
        h_comp = np.zeros(hand.shape, np.uint8)
        h_ff = np.zeros(hand.shape, np.float64)
        h_pd = np.zeros(hand.shape, np.float64)
        # skin rim, then fat inside it
        h_tissue[hand] = Tissue.SUBCUTANEOUS_FAT
        h_ff[hand] = SKIN_FF
        h_pd[hand] = 0.8 * PD
        inner = _union(u, v, _OUTLINE, scale=1.0 - 0.05 * t, grow=-SKIN_MM) & hand
        h_ff[inner] = SAT_FF
        h_pd[inner] = PD
        for i, name in enumerate(HAND_ROIS):
            mus = _union(u, v, _MUSCLES[name], scale=1.0 - _TAPER[name] * t) & inner
            h_tissue[mus] = Tissue.MUSCLE
            h_comp[mus] = i + 1
            h_ff[mus] = np.clip(ffs[name] + texture, 0, 1)[mus]
        for (cu, cv), r in _TENDONS:   # dark tendons in the palm's fat
            ten = _ellipse(u, v, cu, cv, r, r * 0.8) & inner & (h_tissue != Tissue.MUSCLE)
            h_tissue[ten] = Tissue.BONE
            h_ff[ten] = TENDON_FF
            h_pd[ten] = CORTEX_PD
        for (cu, cv), r_out, r_marrow in _BONES:
            cortex = _ellipse(u, v, cu, cv, r_out, r_out) & inner
            marrow = _ellipse(u, v, cu, cv, r_marrow, r_marrow) & inner
            h_tissue[cortex] = Tissue.BONE
            h_comp[cortex] = 0
            h_ff[cortex] = 0.3
            h_pd[cortex] = CORTEX_PD
            h_ff[marrow] = MARROW_FF
            h_pd[marrow] = PD
        w_true[k], f_true[k], pd[k], mfrac[k], mff[k], ff[k], fractions, is_m = to_grid(h_pd, h_ff, h_tissue, f)
        body = _block_mean(hand.astype(np.float64), f) > 0
        tissue[k] = np.where(body, np.argmax(fractions, axis=0), 0)
        side_map[k][body] = code
        cfrac[:, k], cfw[:, k] = label_fractions(is_m, h_comp, h_ff, n_roi, f)
        comp[k] = np.where(tissue[k] == Tissue.MUSCLE, np.argmax(cfrac[:, k], axis=0) + 1, 0)
    return section_phantom(HandPhantom, region=Region.HAND, w_true=w_true, f_true=f_true, tissue=tissue,
                           side=side_map, ff=ff, pd=pd, mfrac=mfrac, comp=comp, cfrac=cfrac, cfw=cfw, names=HAND_ROIS,
                           spacing=(slice_mm, pixel_mm, pixel_mm), origin=origin, snr=snr, bias_field=bias_field,
                           rng=rng)


def hand_exam_datasets(phantom: LegPhantom, *, laterality: str | None = None, body_part: str = "HAND",
                       mese: bool = False, **kwargs: Any) -> list[Dataset]:
    """The hand phantom as a scanner sends it: the Dixon series of
    :func:`quant.synthetic.phantom.phantom_datasets` with Body Part Examined ``body_part``
    (the defined term HAND) and Laterality R or L, plus a MESE series when ``mese``.

    Parameters
    ----------
    phantom : the hand phantom
    laterality : "R", "L" or "" (left out); default: the phantom's hand
    body_part : Body Part Examined ("" leaves it out)
    mese : add a multi-echo spin-echo series (:func:`quant.synthetic.exam.mese_datasets`)
    kwargs : passed to :func:`~quant.synthetic.phantom.phantom_datasets` (``uid_seed``,
        ``patient_id``, ``study_date``...)
    """
    if laterality is None:
        laterality = "L" if (phantom.side == SideLabel.LEFT).any() else "R"
    kwargs.setdefault("patient_name", "Phantom^Hand")
    out = phantom_datasets(phantom, body_part=body_part, **kwargs)
    for ds in out:
        ds.Laterality = laterality
    if mese:
        from .exam import mese_datasets
        out += mese_datasets(phantom, out[0])
    return out
