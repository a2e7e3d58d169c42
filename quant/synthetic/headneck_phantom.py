"""A numerical phantom of the neck for Dixon MRI: an axial section at the level of the fourth
cervical vertebra (C4), with known truth per muscle and side.

Anatomy per slice (neck-local coordinates: ``u`` across the neck towards the patient's left,
``v`` from the front of the neck towards the back, mm from the neck's centre): skin (a
water-rich rim) around subcutaneous fat; the airway (no signal) in front, within the soft
tissue of the larynx and thyroid (water-rich, not muscle); the vertebral body (dark cortex
around fatty marrow) behind it, the spinal canal (low signal) within the laminae and the
spinous process behind; the carotid artery and jugular vein (flow voids) on each side.
Three muscles on each side, each an ROI a reader would draw: ``sternocleidomastoid``
(antero-lateral, under the skin, over the vessels), ``trapezius`` (a thin posterior band
under the skin) and ``paraspinal`` (the deep neck extensors beside the spinous process:
semispinalis, multifidus, splenius). Fat separates the muscles from each other and the
right muscles from the left (by the spinous process and the nuchal fat), so an outline
drawn on the majority-muscle voxels is each muscle, and every muscle lies on one side of
the neck's midline. The sternocleidomastoid gets thinner and the trapezius thicker towards
the shoulders (the last slice).

Signals as in :mod:`quant.synthetic.phantom`: water and fat of every sub-voxel, block
means to the voxel grid (partial volume), then complex Gaussian noise of standard deviation
``pd / snr`` on each of water, fat, in-phase and opposed-phase, and the magnitude. The
result is a :class:`~quant.synthetic.phantom.LegPhantom` (region HEAD_NECK), so the exam
builders of :mod:`quant.synthetic.phantom` and :mod:`quant.synthetic.exam` write it
unchanged: its ``compartment`` map holds the muscles (label k + 1 for
``HEADNECK_ROIS[k]``, both sides; ``side`` tells right from left) and
``compartment_truth`` their truth by ``(side, ROI name, metric)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..enums import Region, Side, SideLabel, Tissue
from .hand_phantom import SKIN_FF, _union
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
)

#: The muscles of the neck phantom, in label order (each on both sides).
HEADNECK_ROIS: tuple[str, ...] = ("sternocleidomastoid", "trapezius", "paraspinal")

#: thin: the swap check's skin shell (the body's outer two voxels, :mod:`quant.dixon.swaps`)
#: must read fat-like; a 1 mm skin at 1 mm pixels leaves it ambiguous (54 % fat-like)
SKIN_MM = 0.5
VISCERA_FF = 0.05      # larynx and thyroid: water-rich soft tissue, not muscle
VISCERA_PD = 0.9 * PD
CANAL_PD = 0.25 * PD   # spinal canal: cerebrospinal fluid, dark on a T1-weighted Dixon
VESSEL_PD = CORTEX_PD  # flow voids

# shapes on the left side, in (|u|, v): centre, half-axes (mm), angle (rad, from +u towards
# +v); mirrored to the right side. The outline is centred on the midline.
_OUTLINE = (((0.0, 6.0), (60.0, 58.0), 0.0),)
_MUSCLES = {
    "sternocleidomastoid": (((40.0, -14.0), (13.0, 6.0), 0.6),),
    "trapezius": (((26.0, 47.0), (16.0, 4.5), -0.4),),
    "paraspinal": (((16.0, 31.0), (12.0, 10.0), 0.25),),
}
#: thickness change towards the last slice (the shoulders): < 0 thinner
_TAPER = {"sternocleidomastoid": -0.15, "trapezius": 0.2, "paraspinal": 0.0}
_VISCERA = ((0.0, -30.0), (20.0, 13.0))
_AIRWAY = ((0.0, -30.0), (9.0, 6.0))
# bone: (u, v) centre, outer half-axes, marrow half-axes (mm)
_VERTEBRA = ((0.0, 0.0), (10.0, 8.0), (8.5, 6.5))
_LAMINAE = ((0.0, 16.0), (10.0, 8.0), (8.5, 6.5))
_CANAL = ((0.0, 15.0), (7.0, 5.5))
_SPINOUS = ((0.0, 30.0), (3.0, 9.0))
# vessels on the left side, mirrored: (|u|, v) centre, radius (mm)
_VESSELS = (((22.0, -12.0), 3.5), ((28.0, -6.0), 5.0))

DEFAULT_HEADNECK_FF: Mapping[str, float] = {"sternocleidomastoid": 0.06, "trapezius": 0.08, "paraspinal": 0.10}


@dataclass(frozen=True, eq=False)
class HeadNeckPhantom(LegPhantom):
    """A :class:`~quant.synthetic.phantom.LegPhantom` of the neck: ``roi_names`` are the
    muscles of ``compartment`` (label k + 1 for ``roi_names[k]``, both sides).
    """

    roi_names: tuple[str, ...] = HEADNECK_ROIS


def _muscle_ffs(muscle_ff: Mapping[str, float] | None) -> dict[tuple[str, str], float]:
    """(side value, muscle) -> FF: the defaults, then the both-sides values given, then the
    ``"right:<name>"`` / ``"left:<name>"`` values given (these win on their side).
    """
    both = dict(DEFAULT_HEADNECK_FF)
    one: dict[tuple[str, str], float] = {}
    for key, val in (muscle_ff or {}).items():
        which, _, name = str(key).rpartition(":")
        if name not in both:
            raise ValueError(f"muscle_ff: {name!r} is not a muscle of the neck phantom ({', '.join(HEADNECK_ROIS)})")
        if which and which not in (Side.RIGHT.value, Side.LEFT.value):
            raise ValueError(f"muscle_ff: {key!r}: the side must be right or left")
        if which:
            one[(which, name)] = float(val)
        else:
            both[name] = float(val)
    return {(s.value, name): one.get((s.value, name), both[name])
            for s in (Side.RIGHT, Side.LEFT) for name in HEADNECK_ROIS}


def make_headneck_phantom(*, shape: tuple[int, int, int] = (6, 136, 144), pixel_mm: float = 1.0,
                          slice_mm: float = 4.0, muscle_ff: Mapping[str, float] | None = None,
                          snr: float = 40.0, seed: int = 0, supersample: int = 3, bias_field: float = 0.0,
                          centre_x_mm: float = 0.0, shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
                          rotation_deg: float = 0.0) -> HeadNeckPhantom:
    """Make a Dixon phantom of the neck (an axial section at C4).

    Parameters
    ----------
    shape, pixel_mm, slice_mm : the grid (slices, rows, columns) and its spacing
    muscle_ff : muscle -> fat fraction 0..1 on both sides (default
        :data:`DEFAULT_HEADNECK_FF`; muscles not given keep theirs); a key
        ``"right:<name>"`` or ``"left:<name>"`` sets that side only (and wins over the
        both-sides value). A smooth texture of ±1 pp is added.
    snr : muscle proton density over the noise SD of each channel
    supersample : sub-voxels per voxel edge (partial volume; the truth is fractional)
    bias_field : amplitude of a smooth receive sensitivity across the field of view
    centre_x_mm : patient x of the neck's midline (+x is the patient's left)
    shift_mm, rotation_deg : repositioning on the same grid, as in
        :func:`quant.synthetic.phantom.make_leg_phantom` (rotation about the patient z axis
        through the field of view's centre, then the shift)

    Returns
    -------
    HeadNeckPhantom
        Images, label maps (``compartment``: the muscles; ``side``: right where the voxel's
        centre is on the patient's right of the neck's midline), whole-neck truth ``truth``
        (all muscles of a side) and per-muscle truth ``compartment_truth``.
    """
    ffs = _muscle_ffs(muscle_ff)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    f = int(supersample)
    origin, x, y, sz = section_grid(shape, pixel_mm, slice_mm, f, shift_mm, rotation_deg)
    u, v = x - centre_x_mm, y
    au = np.abs(u)
    left = u > 0
    texture = 0.01 * np.sin(u / 4.0) * np.cos(v / 3.0)
    n_roi = len(HEADNECK_ROIS)
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
    left_voxel = _block_mean(left.astype(np.float64), f) > 0.5
    for k in range(nz):
        t = (k - sz / slice_mm) / max(nz - 1, 1)   # 0 at the head's end, 1 at the shoulders' end
        neck = _union(au, v, _OUTLINE)
        h_tissue = np.zeros(neck.shape, np.uint8)
        h_comp = np.zeros(neck.shape, np.uint8)
        h_ff = np.zeros(neck.shape, np.float64)
        h_pd = np.zeros(neck.shape, np.float64)
        # skin rim, then fat inside it
        h_tissue[neck] = Tissue.SUBCUTANEOUS_FAT
        h_ff[neck] = SKIN_FF
        h_pd[neck] = 0.8 * PD
        inner = _union(au, v, _OUTLINE, grow=-SKIN_MM) & neck
        h_ff[inner] = SAT_FF
        h_pd[inner] = PD
        (cu, cv), (a, b) = _VISCERA
        viscera = _ellipse(u, v, cu, cv, a, b) & inner
        h_tissue[viscera] = Tissue.BACKGROUND
        h_ff[viscera] = VISCERA_FF
        h_pd[viscera] = VISCERA_PD
        (cu, cv), (a, b) = _AIRWAY
        airway = _ellipse(u, v, cu, cv, a, b)
        h_tissue[airway] = Tissue.BACKGROUND
        h_ff[airway] = 0.0
        h_pd[airway] = 0.0
        for i, name in enumerate(HEADNECK_ROIS):
            mus = _union(au, v, _MUSCLES[name], scale=1.0 + _TAPER[name] * t) & inner & ~viscera
            h_tissue[mus] = Tissue.MUSCLE
            h_comp[mus] = i + 1
            base = np.where(left, ffs[(Side.LEFT.value, name)], ffs[(Side.RIGHT.value, name)])
            h_ff[mus] = np.clip(base + texture, 0, 1)[mus]
        for (cu, cv), r in _VESSELS:
            vessel = _ellipse(au, v, cu, cv, r, r) & inner & (h_tissue != Tissue.MUSCLE)
            h_tissue[vessel] = Tissue.BACKGROUND
            h_ff[vessel] = 0.0
            h_pd[vessel] = VESSEL_PD
        for (cu, cv), (oa, ob), (ma, mb) in (_VERTEBRA, _LAMINAE):
            cortex = _ellipse(u, v, cu, cv, oa, ob) & inner
            marrow = _ellipse(u, v, cu, cv, ma, mb) & inner
            h_tissue[cortex] = Tissue.BONE
            h_comp[cortex] = 0
            h_ff[cortex] = 0.3
            h_pd[cortex] = CORTEX_PD
            h_ff[marrow] = MARROW_FF
            h_pd[marrow] = PD
        (cu, cv), (a, b) = _SPINOUS
        spinous = _ellipse(u, v, cu, cv, a, b) & inner
        h_tissue[spinous] = Tissue.BONE
        h_comp[spinous] = 0
        h_ff[spinous] = 0.3
        h_pd[spinous] = CORTEX_PD
        (cu, cv), (a, b) = _CANAL
        canal = _ellipse(u, v, cu, cv, a, b)
        h_tissue[canal] = Tissue.BACKGROUND
        h_ff[canal] = 0.0
        h_pd[canal] = CANAL_PD
        w_true[k], f_true[k], pd[k], mfrac[k], mff[k], ff[k], fractions, is_m = to_grid(h_pd, h_ff, h_tissue, f)
        body = _block_mean(neck.astype(np.float64), f) > 0
        tissue[k] = np.where(body, np.argmax(fractions, axis=0), 0)
        side_map[k][body] = np.where(left_voxel, SideLabel.LEFT, SideLabel.RIGHT)[body]
        cfrac[:, k], cfw[:, k] = label_fractions(is_m, h_comp, h_ff, n_roi, f)
        comp[k] = np.where(tissue[k] == Tissue.MUSCLE, np.argmax(cfrac[:, k], axis=0) + 1, 0)
    return section_phantom(HeadNeckPhantom, region=Region.HEAD_NECK, w_true=w_true, f_true=f_true, tissue=tissue,
                           side=side_map, ff=ff, pd=pd, mfrac=mfrac, comp=comp, cfrac=cfrac, cfw=cfw,
                           names=HEADNECK_ROIS, spacing=(slice_mm, pixel_mm, pixel_mm), origin=origin, snr=snr,
                           bias_field=bias_field, rng=rng)


def headneck_exam_datasets(phantom: LegPhantom, *, body_part: str = "NECK", description: str | None = None,
                           mese: bool = False, **kwargs: Any) -> list[Dataset]:
    """The neck phantom as a scanner sends it: the Dixon series of
    :func:`quant.synthetic.phantom.phantom_datasets` with Body Part Examined ``body_part``
    (the defined terms NECK or HEADNECK) and no Laterality (both sides in one image), plus a
    MESE series when ``mese``.

    Parameters
    ----------
    phantom : the neck phantom
    body_part : Body Part Examined ("" leaves it out)
    description : Study Description, e.g. "MRT Hals" or "IRM cou" (None keeps the default)
    mese : add a multi-echo spin-echo series (:func:`quant.synthetic.exam.mese_datasets`)
    kwargs : passed to :func:`~quant.synthetic.phantom.phantom_datasets` (``uid_seed``,
        ``patient_id``, ``study_date``...)
    """
    kwargs.setdefault("patient_name", "Phantom^Neck")
    out = phantom_datasets(phantom, body_part=body_part, **kwargs)
    if description is not None:
        for ds in out:
            ds.StudyDescription = description
    if mese:
        from .exam import mese_datasets
        out += mese_datasets(phantom, out[0])
    return out
