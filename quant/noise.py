"""Noise SD of magnitude images, body masks and Otsu thresholds shared by the fits and the segmentation."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .errors import QuantError, SeriesError
from .segment import fill_holes_per_slice, otsu_threshold

_RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))   # median of Rayleigh(1)


def _otsu(values: np.ndarray) -> float:
    return otsu_threshold(values, upper_percentile=99.5)


def _inplane(ndim: int, r: int = 1) -> np.ndarray:
    """Structuring element acting within slices (the last two axes) only."""
    base = ndi.generate_binary_structure(2, 1)
    if r > 1:
        base = ndi.iterate_structure(base, r)
    return base if ndim == 2 else base.reshape((1,) * (ndim - 2) + base.shape)


def _dilate_inplane(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """``ndi.binary_dilation`` by the in-plane cross (:func:`_inplane`), ``iterations``
    times, with array slices: the same mask several times faster than the generic filter.
    """
    out = np.array(mask, dtype=bool)
    for _ in range(iterations):
        src = out.copy()
        out[..., 1:, :] |= src[..., :-1, :]
        out[..., :-1, :] |= src[..., 1:, :]
        out[..., :, 1:] |= src[..., :, :-1]
        out[..., :, :-1] |= src[..., :, 1:]
    return out


def _open_inplane(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening`` by the in-plane cross (:func:`_inplane`) with array slices
    (the same mask; outside the array counts as background, as there).
    """
    mask = np.asarray(mask, dtype=bool)
    core = mask.copy()
    core[..., 1:, :] &= mask[..., :-1, :]
    core[..., :-1, :] &= mask[..., 1:, :]
    core[..., :, 1:] &= mask[..., :, :-1]
    core[..., :, :-1] &= mask[..., :, 1:]
    core[..., 0, :] = False
    core[..., -1, :] = False
    core[..., :, 0] = False
    core[..., :, -1] = False
    return _dilate_inplane(core)


def body_mask_from(image: np.ndarray) -> np.ndarray:
    """Body (tissue) mask of a high-signal image (in-phase or W + F): above Otsu's
    threshold, small specks removed, holes filled slice by slice.
    """
    a = np.asarray(image, dtype=np.float64)
    m = a > _otsu(a.ravel())
    m = _open_inplane(m)
    return fill_holes_per_slice(m)


def _highpass_sd(image: np.ndarray, region: np.ndarray) -> float:
    """Noise SD from neighbour differences along the last axis inside ``region``
    (robust MAD, so edges and texture count little).
    """
    a = np.asarray(image, dtype=np.float64)
    d = (a[..., 1:] - a[..., :-1]) / math.sqrt(2.0)
    both = region[..., 1:] & region[..., :-1]
    v = d[both]
    if v.size < 50:
        raise QuantError("noise SD cannot be estimated: no background and too few tissue voxels")
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def estimate_noise_sd(image: np.ndarray, body_mask: np.ndarray | None = None) -> float:
    """Noise standard deviation (per real channel, the ``sigma`` of the Rician model) of a
    magnitude image, in the image's units.

    From the background (outside ``body_mask`` grown by 2 voxels in-plane), where the
    magnitude is Rayleigh distributed: ``sigma = median / sqrt(2 ln 2)``; exact zeros
    (zero-filled or masked background) are ignored. Where fewer than 200 background
    voxels remain, from neighbour differences inside the body (high-pass, robust MAD).

    Parameters
    ----------
    image : ndarray
        Magnitude image, 2-D or 3-D (slices first).
    body_mask : ndarray of bool, optional
        Tissue mask. Pass one made from a high-signal image (in-phase or W + F): in a fat
        image normal muscle is near the noise floor and would pass for background.
        Default: :func:`body_mask_from` of ``image`` itself.

    Returns
    -------
    float
        Noise SD. Multi-coil (non-central chi) or parallel-imaging backgrounds are not
        Rayleigh: the value is then an approximation.

    Raises
    ------
    QuantError
        Neither a background nor enough tissue to estimate the noise.
    """
    a = np.asarray(image, dtype=np.float64)
    if body_mask is None:
        body_mask = body_mask_from(a)
    body_mask = np.asarray(body_mask, dtype=bool)
    if body_mask.shape != a.shape:
        raise SeriesError(f"body_mask {body_mask.shape} and image {a.shape} differ in shape")
    return _noise_sd(a, body_mask, _grown(body_mask))


def _grown(body_mask: np.ndarray) -> np.ndarray:
    """The body grown by 2 voxels in-plane: what :func:`estimate_noise_sd` does not count as background."""
    return _dilate_inplane(body_mask, 2)


def _noise_sd(a: np.ndarray, body_mask: np.ndarray, grown: np.ndarray) -> float:
    """:func:`estimate_noise_sd` of float64 ``a`` with the grown body given (several
    channels of one body share it).
    """
    bg = a[~grown & (a > 0) & np.isfinite(a)]
    if bg.size >= 200:
        return float(np.median(bg) / _RAYLEIGH_MEDIAN)
    # no background: neighbour differences inside the body, away from its edge
    inner = ndi.binary_erosion(body_mask, structure=_inplane(a.ndim), iterations=2)
    return _highpass_sd(a, inner)
