"""Tables the fit kernel reads, computed once per dictionary: subspace basis, Gram terms, fine-grid atoms."""

from __future__ import annotations

import collections
import functools

import numpy as np

from .dictionary import T2Dictionary
from .kernels import _COARSE_RANK, _FINE, _coarse_strides


def _pad_linear(arr: np.ndarray, axes) -> np.ndarray:
    """``arr`` with one point added at each end of each of ``axes``, linearly extrapolated
    (the padding :func:`_interp_atoms` expects).
    """
    for ax in axes:
        lo = 2 * np.take(arr, [0], axis=ax) - np.take(arr, [1], axis=ax)
        hi = 2 * np.take(arr, [-1], axis=ax) - np.take(arr, [-2], axis=ax)
        arr = np.concatenate([lo, arr, hi], axis=ax)
    return arr


def _cr_matrix(n: int, factor: int) -> np.ndarray:
    """Catmull-Rom interpolation matrix from ``n + 2`` padded grid values to the
    ``factor * (n - 1) + 1`` points of a grid ``factor`` times finer (as
    :func:`_interp_atoms` interpolates).
    """
    x = np.arange(factor * (n - 1) + 1) / factor
    ix = np.clip(np.floor(x).astype(int), 0, n - 2)
    w = _cr_weights_numpy(x - ix).T   # (points, 4)
    m = np.zeros((x.size, n + 2))
    for q in range(4):
        m[np.arange(x.size), ix + q] = w[:, q]
    return m


def _cr_weights_numpy(t):
    """Catmull-Rom weights of :func:`_cr_weights` for scalar or array ``t``, shape (4, ...)."""
    return np.array([-0.5 * t ** 3 + t ** 2 - 0.5 * t, 1.5 * t ** 3 - 2.5 * t ** 2 + 1,
                     -1.5 * t ** 3 + 2 * t ** 2 + 0.5 * t, 0.5 * t ** 3 - 0.5 * t ** 2])


_Tables = collections.namedtuple("_Tables", "water_c fat_c c_a c_b c_c inv_ww inv_ff st sb basis fine fine_fat "
                                             "water_pad fat_pad")
"""What the fit kernel reads. Coarse search (in the rank-``_COARSE_RANK`` subspace):
``water_c`` (n_b1c, rank, n_t2c), ``fat_c`` (n_b1c, rank), the Gram terms of
:func:`_gram_terms` and the strides ``st``, ``sb``, ``basis`` (rank, n_echoes). Fine grid
(``_FINE`` points per grid step), one record per atom for locality: ``fine`` (n_j, n_i,
n_echoes + 4, padded to a multiple of 8 values: the echoes, ``ff/det``, ``wf/det``,
``ww/det``, ``1/ww``), ``fine_fat`` (n_j, n_echoes + 1: the echoes, ``1/ff``). Padded
atoms for interpolation anywhere: ``water_pad`` (n_b1 + 2, n_t2 + 2, n_echoes),
``fat_pad``."""


@functools.lru_cache(maxsize=2)
def _tables(dictionary: T2Dictionary) -> _Tables:
    """The kernel's tables of a dictionary (7.5 MB for 2,376 atoms, 20 ms; cached for the
    last two dictionary objects, as an exam fits several times with one).
    """
    water = np.transpose(dictionary.water_atoms, (1, 0, 2))  # (n_b1, n_t2, E)
    fat = np.ascontiguousarray(dictionary.fat_atoms, dtype=np.float64)
    n_b1, n_t2, n_e = water.shape
    water_pad = _pad_linear(water, (0, 1))
    fat_pad = _pad_linear(fat, (0,))
    # fine grid: atoms interpolated _FINE times finer than the dictionary grid
    mb = _cr_matrix(n_b1, _FINE)
    fine = np.einsum("ia,jab->jib", _cr_matrix(n_t2, _FINE), np.einsum("ja,aie->jie", mb, water_pad), optimize=True)
    fine_fat = mb @ fat_pad
    c_a, c_b, c_c, inv_ww, inv_ff = _gram_terms(fine, fine_fat)
    record = np.zeros(fine.shape[:2] + (-(-(n_e + 4) // 8) * 8,))
    record[..., :n_e] = fine
    for k, term in enumerate((c_a, c_b, c_c, inv_ww)):
        record[..., n_e + k] = term
    fat_record = np.concatenate([fine_fat, inv_ff[:, None]], axis=1)
    # coarse subgrid of the first search stage: every st-th T2 and sb-th B1 atom,
    # projected onto the dictionary's first singular vectors
    st, sb = _coarse_strides(n_t2, n_b1)
    basis = _coarse_basis(dictionary)
    wc = water[::sb, ::st] @ basis.T
    fc = fat[::sb] @ basis.T
    c = np.ascontiguousarray
    return _Tables(c(np.transpose(wc, (0, 2, 1))), c(fc), *_gram_terms(wc, fc), st, sb, c(basis), record,
                   c(fat_record), c(water_pad), c(fat_pad))


def _gram_terms(water: np.ndarray, fat: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per atom of ``water`` (n_b1, n_t2, E) with ``fat`` (n_b1, E): ``ff/det, wf/det,
    ww/det`` of the 2x2 Gram matrix (0 where it is singular) and the inverse norms
    ``1/ww``, ``1/ff`` (0 for a zero fat atom).
    """
    gww = np.einsum("jie,jie->ji", water, water)
    gwf = np.einsum("jie,je->ji", water, fat)
    gff = np.einsum("je,je->j", fat, fat)
    det = gww * gff[:, None] - gwf ** 2
    ok = det > 1e-12 * gww * gff[:, None]
    safe = np.where(ok, det, 1.0)
    c = np.ascontiguousarray
    return (c(np.where(ok, gff[:, None] / safe, 0.0)), c(np.where(ok, gwf / safe, 0.0)),
            c(np.where(ok, gww / safe, 0.0)), c(1.0 / gww),
            c(np.where(gff > 0, 1.0 / np.where(gff > 0, gff, 1.0), 0.0)))


def _coarse_basis(dictionary: T2Dictionary) -> np.ndarray:
    """(``_COARSE_RANK``, n_echoes): the first right singular vectors of the dictionary's
    unit-norm water and fat atoms.
    """
    atoms = np.concatenate([dictionary.water_atoms.reshape(-1, dictionary.params.n_echoes), dictionary.fat_atoms])
    norms = np.linalg.norm(atoms, axis=1, keepdims=True)
    atoms = atoms[norms[:, 0] > 0] / norms[norms[:, 0] > 0]
    basis = np.zeros((_COARSE_RANK, atoms.shape[1]))   # zero rows where there are fewer echoes
    v = np.linalg.svd(atoms, full_matrices=False)[2][:_COARSE_RANK]
    basis[:v.shape[0]] = v
    return basis
