"""EPG dictionaries of the bi-component water T2 fit: grids, atoms and their cache key."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..epg import MeseParameters, epg_signals
from ..errors import QuantError

DEFAULT_WATER_T1_MS = 1400.0
DEFAULT_FAT_T1_MS = 365.0
DEFAULT_FAT_T2_MS = 151.0
"""Fat T2 (ms) when it is not calibrated per exam (Marty et al. 2016, 3 T)."""


DEFAULT_T2W_GRID_MS = np.arange(15.0, 80.0 + 1e-9, 1.0)
DEFAULT_B1_GRID = np.round(np.arange(0.5, 1.2 + 1e-9, 0.02), 6)

# status codes of the fit kernels
#: A source of EPG tables of one component, as :func:`epg_atoms` makes them:
#: (sequence, T2 grid in ms, B1 grid, T1 in ms) -> echo trains (n_T2, n_B1, n_echoes)
AtomsSource = Callable[[MeseParameters, np.ndarray, np.ndarray, float], np.ndarray]

_NOT_FITTED = 0   # below min_signal or not finite
_OK = 1
_T2_AT_EDGE = 2   # best T2w on the first or last grid point: outside the dictionary
_NO_WATER = 3     # water amplitude 0: T2w undefined


# --------------------------------------------------------------------------- dictionary


@dataclass(frozen=True, eq=False)
class T2Dictionary:
    """EPG atoms of the bi-component model for one sequence.

    Attributes
    ----------
    params : MeseParameters
        Sequence the atoms were computed for.
    t2w_grid_ms, b1_grid : ndarray
        Increasing grids of water T2 (ms) and relative B1.
    water_atoms : ndarray, shape (n_t2, n_b1, n_echoes)
        Water echo magnitudes per unit proton density.
    fat_atoms : ndarray, shape (n_b1, n_echoes)
        Fat echo magnitudes per unit proton density (zero when the dictionary has no
        second component).
    t1w_ms, t1f_ms, t2f_ms : float
        Relaxation times of the atoms (ms).
    key : str
        Stable hash of the sequence key, grids and relaxation times.
    """

    params: MeseParameters
    t2w_grid_ms: np.ndarray
    b1_grid: np.ndarray
    water_atoms: np.ndarray
    fat_atoms: np.ndarray
    t1w_ms: float
    t1f_ms: float
    t2f_ms: float
    key: str

    @property
    def n_atoms(self) -> int:
        """Number of (T2w, B1) atoms."""
        return self.t2w_grid_ms.size * self.b1_grid.size


def _grid(name, values, low, high):
    g = np.asarray(values, dtype=np.float64).ravel()
    if g.size < 3:
        raise QuantError(f"{name} needs at least 3 values, got {g.size}")
    if not np.all(np.isfinite(g)) or np.any(np.diff(g) <= 0):
        raise QuantError(f"{name} must be finite and strictly increasing")
    if g[0] < low or g[-1] > high:
        raise QuantError(f"{name} must lie in [{low}, {high}], got [{g[0]}, {g[-1]}]")
    return g


def table_key(prefix: str, params: MeseParameters, *arrays: Sequence[float] | np.ndarray, digits: int = 24) -> str:
    """``prefix`` + a hash of the sequence and of ``arrays`` (as little-endian float64):
    the name of an EPG table or dictionary, for caches and provenance.
    """
    h = hashlib.sha256(params.key().encode())
    for arr in arrays:
        h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
    return prefix + h.hexdigest()[:digits]


def _dictionary_key(params, t2_grid, b1_grid, t1w, t1f, t2f):
    return table_key("t2dict-", params, t2_grid, b1_grid, [t1w, t1f, t2f])


def epg_atoms(params: MeseParameters, t2_grid_ms: np.ndarray, b1_grid: np.ndarray, t1_ms: float) -> np.ndarray:
    """EPG echo trains of one component over a (T2, B1) grid, shape (n_T2, n_B1, n_echoes).

    This table depends only on the sequence, the grids and T1, not on the exam: it is
    what a cache keeps (see ``atoms`` of :func:`build_dictionary`).
    """
    t2 = np.asarray(t2_grid_ms, dtype=np.float64)
    b1 = np.asarray(b1_grid, dtype=np.float64)
    return epg_signals(t2[:, None], float(t1_ms), b1[None, :], params)


def build_dictionary(params: MeseParameters, t2w_grid_ms: Sequence[float] | np.ndarray = DEFAULT_T2W_GRID_MS,
                     b1_grid: Sequence[float] | np.ndarray = DEFAULT_B1_GRID, *,
                     t1w_ms: float = DEFAULT_WATER_T1_MS, t1f_ms: float = DEFAULT_FAT_T1_MS,
                     t2f_ms: float | None = DEFAULT_FAT_T2_MS, atoms: AtomsSource | None = None) -> T2Dictionary:
    """EPG dictionary of the bi-component water/fat model (numba, parallel over atoms).

    Parameters
    ----------
    params : MeseParameters
        Sequence.
    t2w_grid_ms : array_like
        Water T2 grid (ms), strictly increasing, at least 3 values. Uniform steps of
        0.5-1 ms suit muscle (refinement interpolates between grid points).
    b1_grid : array_like
        B1 grid (relative), strictly increasing, at least 3 values (0.02 steps suit).
    t1w_ms, t1f_ms : float
        Water and fat T1 (ms).
    t2f_ms : float or None
        Fat T2 (ms); ``None`` builds a one-component dictionary (fat atoms zero).
    atoms : callable, optional
        ``atoms(params, t2_grid_ms, b1_grid, t1_ms)`` returning the water table as
        :func:`epg_atoms` does (the default), e.g. from a cache shared across exams and
        workers. The fat column (one fat T2, all B1: a few dozen EPG trains) is always
        simulated here, since fat T2 is calibrated per exam.

    Returns
    -------
    T2Dictionary
    """
    if not isinstance(params, MeseParameters):
        raise QuantError(f"params must be MeseParameters, got {type(params).__name__}")
    t2g = _grid("t2w_grid_ms", t2w_grid_ms, 0.1, 10000.0)
    b1g = _grid("b1_grid", b1_grid, 0.05, 3.0)
    for name, v in (("t1w_ms", t1w_ms), ("t1f_ms", t1f_ms)) + ((("t2f_ms", t2f_ms),) if t2f_ms is not None else ()):
        scalar = bool(np.isscalar(v))   # (not a type guard: v stays a number to mypy)
        if not (scalar and math.isfinite(v) and v > 0):
            raise QuantError(f"{name} must be a finite number > 0, got {v!r}")
    water = np.asarray((atoms or epg_atoms)(params, t2g, b1g, float(t1w_ms)), dtype=np.float64)
    if water.shape != (t2g.size, b1g.size, params.n_echoes):
        raise QuantError(f"atoms gave a table of shape {water.shape}, expected "
                         f"{(t2g.size, b1g.size, params.n_echoes)}")
    if t2f_ms is None:
        fat = np.zeros((b1g.size, params.n_echoes))
        t2f = 0.0
    else:
        fat = epg_signals(float(t2f_ms), float(t1f_ms), b1g, params)
        t2f = float(t2f_ms)
    return T2Dictionary(params=params, t2w_grid_ms=t2g, b1_grid=b1g, water_atoms=water, fat_atoms=fat,
                        t1w_ms=float(t1w_ms), t1f_ms=float(t1f_ms), t2f_ms=t2f,
                        key=_dictionary_key(params, t2g, b1g, float(t1w_ms), float(t1f_ms), t2f))


# --------------------------------------------------------------------------- results
