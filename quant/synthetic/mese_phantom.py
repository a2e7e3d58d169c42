"""Simulated multi-echo spin echo (MESE) images with known water T2, fat fraction and B1.

Signals follow the bi-component EPG model of :mod:`quant.t2` exactly (slice profile
included), from per-voxel maps; noise is complex Gaussian of SD ``noise_sd`` per
channel, then the magnitude (Rician). ``snr`` is the first-echo total signal over the
noise SD: ``noise_sd = median(first-echo noise-free magnitude over voxels with PD > 0) / snr``.

Signals are computed voxel by voxel (no interpolation), so the phantom is an exact
test of the fit, not a copy of its dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..enums import Tissue
from ..epg import MeseParameters, epg_signals
from ..errors import QuantError
from ..t2 import DEFAULT_FAT_T1_MS, DEFAULT_FAT_T2_MS, DEFAULT_WATER_T1_MS


@dataclass(frozen=True, eq=False)
class MeseSimulation:
    """Simulated magnitude images.

    Attributes
    ----------
    images : ndarray, float32, shape (n_echoes, ...)
        Magnitude echo images (noisy when a noise level was given).
    noise_free : ndarray, float64, shape (n_echoes, ...)
        The same without noise.
    noise_sd : float
        Noise SD per channel (0 for noise-free images).
    """

    images: np.ndarray
    noise_free: np.ndarray
    noise_sd: float


def _unique_signals(t2, t1, b1, params):
    """:func:`epg_signals` of each distinct (T2, T1, B1) once (maps repeat values a lot)."""
    keys = np.stack([t2, t1, b1], axis=-1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    return epg_signals(uniq[:, 0], uniq[:, 1], uniq[:, 2], params)[inverse.reshape(-1)]


def simulate_mese(t2w_ms: npt.ArrayLike, ff: npt.ArrayLike, b1: npt.ArrayLike, params: MeseParameters, *,
                  pd: npt.ArrayLike = 1.0, t2f_ms: npt.ArrayLike = DEFAULT_FAT_T2_MS,
                  t1w_ms: npt.ArrayLike = DEFAULT_WATER_T1_MS, t1f_ms: npt.ArrayLike = DEFAULT_FAT_T1_MS,
                  snr: float | None = None,
                  noise_sd: float | None = None, seed: int | np.random.Generator = 0) -> MeseSimulation:
    """MESE magnitude images of voxels with given water T2, PD fat fraction and B1.

    Parameters
    ----------
    t2w_ms, ff, b1 : array_like
        Broadcastable maps: water T2 (ms), proton-density fat fraction (0..1), relative B1.
    params : MeseParameters
        Sequence.
    pd : array_like
        Proton density (water + fat); 0 gives background (noise only).
    t2f_ms, t1w_ms, t1f_ms : array_like
        Fat T2, water T1, fat T1 (ms), scalars or maps.
    snr : float or None
        First-echo total signal over noise SD (see the module notes). Exclusive with
        ``noise_sd``; neither: noise free.
    noise_sd : float or None
        Noise SD per channel, absolute.
    seed : int or numpy.random.Generator
        Noise seed.

    Returns
    -------
    MeseSimulation
        ``images`` of shape ``(n_echoes,) + broadcast shape``.
    """
    if snr is not None and noise_sd is not None:
        raise QuantError("give snr or noise_sd, not both")
    maps = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in
                                 (t2w_ms, ff, b1, pd, t2f_ms, t1w_ms, t1f_ms)))
    t2w, ffm, b1m, pdm, t2f, t1w, t1f = maps
    if np.any((ffm < 0) | (ffm > 1)) or not np.all(np.isfinite(ffm)):
        raise QuantError("ff must lie in [0, 1]")
    if np.any(pdm < 0):
        raise QuantError("pd must be >= 0")
    shape = t2w.shape
    tissue = pdm > 0
    water = np.zeros(shape + (params.n_echoes,))
    fat = np.zeros_like(water)
    if tissue.any():
        water[tissue] = _unique_signals(t2w[tissue], t1w[tissue], b1m[tissue], params)
        fat[tissue] = _unique_signals(t2f[tissue], t1f[tissue], b1m[tissue], params)
    clean = (pdm * (1 - ffm))[..., None] * water + (pdm * ffm)[..., None] * fat
    clean = np.moveaxis(clean, -1, 0)
    if snr is not None:
        if not snr > 0:
            raise QuantError(f"snr must be > 0, got {snr!r}")
        if not tissue.any():
            raise QuantError("snr needs at least one voxel with pd > 0")
        sd = float(np.median(clean[0][tissue])) / float(snr)
    elif noise_sd is not None:
        if not noise_sd >= 0:
            raise QuantError(f"noise_sd must be >= 0, got {noise_sd!r}")
        sd = float(noise_sd)
    else:
        sd = 0.0
    if sd > 0:
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        noisy = np.hypot(clean + rng.normal(0.0, sd, clean.shape), rng.normal(0.0, sd, clean.shape))
    else:
        noisy = clean.copy()
    return MeseSimulation(images=noisy.astype(np.float32), noise_free=clean, noise_sd=sd)


@dataclass(frozen=True, eq=False)
class MesePhantom:
    """A leg-like MESE slice with its truth.

    Attributes
    ----------
    images : ndarray, float32, shape (n_echoes, ny, nx)
        Magnitude echo images.
    tissue : ndarray, uint8
        :class:`~quant.enums.Tissue` labels.
    muscle_id : ndarray, int16
        0 outside muscle, 1..n for the muscles (each has its own T2w and FF).
    t2w_ms, ff, b1 : ndarray
        Truth maps (water T2 where there is water, PD fat fraction, B1).
    t2f_ms : float
        Fat T2 (ms) of the phantom.
    noise_sd : float
        Noise SD per channel.
    params : MeseParameters
        Sequence.
    """

    images: np.ndarray
    tissue: np.ndarray
    muscle_id: np.ndarray
    t2w_ms: np.ndarray
    ff: np.ndarray
    b1: np.ndarray
    t2f_ms: float
    noise_sd: float
    params: MeseParameters


def make_leg_t2_phantom(params: MeseParameters, *, shape: tuple[int, int] = (96, 96), snr: float = 100.0,
                        t2f_ms: float = DEFAULT_FAT_T2_MS, n_muscles: int = 8,
                        seed: int = 0) -> MesePhantom:
    """A cross-section of one leg: subcutaneous fat ring, muscles, a marrow-filled bone.

    Muscles are angular sectors of the muscle ellipse, each with its own water T2
    (28-45 ms) and fat fraction (0-60 %, rising with the sector index), plus a smooth
    within-muscle FF gradient (+/-2 points). B1 falls smoothly from about 1.1 at the
    centre to 0.7 at the skin (a dielectric/coil pattern). Subcutaneous fat and marrow
    have FF 0.92 / 0.88 with water T2 35 ms. SNR as in :func:`simulate_mese`.

    Returns
    -------
    MesePhantom
    """
    if len(shape) != 2 or min(shape) < 32:
        raise QuantError(f"shape must be 2-D with both sides >= 32, got {shape}")
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    u = (xx - (nx - 1) / 2) / (0.46 * nx)
    v = (yy - (ny - 1) / 2) / (0.42 * ny)
    r_skin = np.hypot(u, v)
    r_fascia = np.hypot(u / 0.85, v / 0.85)
    r_bone = np.hypot((u - 0.12) / 0.16, (v + 0.05) / 0.16)
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[r_skin <= 1] = Tissue.SUBCUTANEOUS_FAT
    tissue[r_fascia <= 1] = Tissue.MUSCLE
    tissue[r_bone <= 1] = Tissue.BONE
    angle = np.mod(np.arctan2(v, u), 2 * np.pi)
    sector = np.minimum((angle / (2 * np.pi) * n_muscles).astype(int), n_muscles - 1)
    muscle_id = np.where(tissue == Tissue.MUSCLE, sector + 1, 0).astype(np.int16)
    t2_per = rng.uniform(28.0, 45.0, n_muscles)
    ff_per = np.linspace(0.0, 0.58, n_muscles)
    rng.shuffle(ff_per)
    t2w = np.full(shape, 35.0)
    ff = np.zeros(shape)
    m = muscle_id > 0
    t2w[m] = t2_per[muscle_id[m] - 1]
    ff[m] = np.clip(ff_per[muscle_id[m] - 1] + 0.02 * (u[m] + v[m]) / 1.2, 0.0, 0.6)
    ff[tissue == Tissue.SUBCUTANEOUS_FAT] = 0.92
    ff[tissue == Tissue.BONE] = 0.88
    b1 = np.clip(1.1 - 0.4 * r_skin ** 2, 0.7, 1.1)
    pd = np.where(tissue > 0, 1000.0, 0.0)
    sim = simulate_mese(t2w, ff, b1, params, pd=pd, t2f_ms=t2f_ms, snr=snr, seed=rng)
    return MesePhantom(images=sim.images, tissue=tissue, muscle_id=muscle_id, t2w_ms=t2w, ff=ff, b1=b1,
                       t2f_ms=float(t2f_ms), noise_sd=sim.noise_sd, params=params)
