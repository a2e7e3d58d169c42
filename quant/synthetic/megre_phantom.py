"""A multi-echo gradient echo (MEGRE) phantom of both thighs with what real data has.

Complex echoes from :func:`quant.dixon.multiecho_signal` (the 6-peak fat spectrum at the
field strength, one R2* and one field map per voxel, a smooth initial phase), with complex
Gaussian noise added to the complex echoes before magnitude and phase are taken. The
anatomy is what makes field-map estimation hard:

- two legs (tissue islands) separated by an air gap, and a small water tube (a third
  island) under them;
- in each leg a subcutaneous fat ring (PDFF 92 %), water-dominant muscle (PDFF 2-15 %,
  by compartment), a cortical bone ring without signal and fat-dominant marrow
  (PDFF 90 %). In the right leg (x > 0) the cortex has a gap, so marrow touches muscle;
  in the left leg the marrow is an island of its own inside the bone;
- a field map with a steep gradient across the legs that wraps through ``wraps`` periods
  ``1 / delta TE`` across the field of view, plus a smooth curved component and a slow
  change along the slices;
- partial volume at tissue borders (water and fat maps blurred by half a voxel).

``snr`` is the median first-echo noise-free magnitude in tissue over the noise SD.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..dixon import HAMILTON_6PEAK, FatSpectrum, multiecho_signal

#: (field strength in T, echo times in ms) of the two protocols
PROTOCOLS: dict[str, tuple[float, tuple[float, ...]]] = {
    # 3 echoes at 1.5 T, opposed/in/opposed phase (fat methylene at -217 Hz: half a cycle per 2.3 ms)
    "1.5T-3echo": (1.5, (2.3, 4.6, 6.9)),
    # 6 echoes at 3 T, TE1 1.2 ms, delta TE 1.0 ms
    "3T-6echo": (3.0, (1.2, 2.2, 3.2, 4.2, 5.2, 6.2)),
}


@dataclass(frozen=True, eq=False)
class MegrePhantom:
    """Simulated multi-echo complex gradient echo with its truth.

    Attributes
    ----------
    magnitude, phase : ndarray, shape (n_echo, nz, ny, nx)
        Noisy magnitude and phase (radians) of each echo.
    te_ms : ndarray
        Echo times (ms).
    field_strength_t : float
        Main field (T).
    water, fat, pdff, r2star_s, fieldmap_hz : ndarray, shape (nz, ny, nx)
        Truth: amplitudes, fat fraction ``F / (W + F)`` (NaN outside tissue), R2* (1/s)
        and the field map (Hz, not wrapped).
    tissue, muscle, marrow, fat_layer : ndarray of bool
        Voxels with signal; muscle, marrow and subcutaneous fat (each eroded by one voxel
        in-plane, away from partial volume).
    period_hz : float
        ``1 / delta TE``.
    noise_sd : float
        Noise SD per real channel.
    spacing_mm : tuple of float
        Voxel size (slice, row, column).
    """

    magnitude: np.ndarray
    phase: np.ndarray
    te_ms: np.ndarray
    field_strength_t: float
    water: np.ndarray
    fat: np.ndarray
    pdff: np.ndarray
    r2star_s: np.ndarray
    fieldmap_hz: np.ndarray
    tissue: np.ndarray
    muscle: np.ndarray
    marrow: np.ndarray
    fat_layer: np.ndarray
    period_hz: float
    noise_sd: float
    spacing_mm: tuple[float, float, float]


def make_megre_phantom(protocol: str = "3T-6echo", *, shape: tuple[int, int, int] = (4, 96, 160),
                       fov_mm: tuple[float, float] = (250.0, 400.0), slice_mm: float = 5.0,
                       wraps: float = 1.4, snr: float = 40.0, seed: int = 0,
                       spectrum: FatSpectrum = HAMILTON_6PEAK) -> MegrePhantom:
    """Both thighs in a multi-echo gradient echo.

    Parameters
    ----------
    protocol : str
        A key of :data:`PROTOCOLS`.
    shape : tuple of int
        (slices, rows, columns).
    fov_mm : tuple of float
        In-plane field of view (rows, columns) in mm.
    slice_mm : float
        Slice thickness (mm).
    wraps : float
        Field-map change across the columns of the field of view, in periods ``1 / delta TE``.
    snr : float
        Median first-echo tissue signal over the noise SD.
    seed : int
        Noise seed.
    spectrum : FatSpectrum
        Fat spectrum of the simulation.

    Returns
    -------
    MegrePhantom
    """
    field, te = PROTOCOLS[protocol]
    te = np.asarray(te, dtype=np.float64)
    period = 1.0 / (float(np.median(np.diff(te))) * 1e-3)
    nz, ny, nx = shape
    dy, dx = fov_mm[0] / ny, fov_mm[1] / nx
    z = (np.arange(nz) - (nz - 1) / 2) * slice_mm
    y = (np.arange(ny) - (ny - 1) / 2) * dy
    x = (np.arange(nx) - (nx - 1) / 2) * dx
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    pd = np.zeros(shape)
    ff = np.zeros(shape)
    r2 = np.zeros(shape)
    scale = field / 1.5      # R2* grows roughly with the field
    muscle = np.zeros(shape, bool)
    marrow = np.zeros(shape, bool)
    sat = np.zeros(shape, bool)
    for side in (-1, 1):
        cx = side * 100.0
        radius = 86.0 + 4.0 * np.cos(Z / 60.0)               # thighs narrow along the slices
        u, v = (X - cx) / 1.0, Y / 0.92
        r = np.hypot(u, v)
        ang = np.arctan2(Y, X - cx)
        leg = r < radius
        inner = r < radius - 12.0 - 3.0 * np.sin(2 * ang)       # SAT 9-15 mm thick
        sat |= leg & ~inner
        bx, by = cx - side * 12.0, 8.0                          # femur medial and posterior
        rb = np.hypot(X - bx, Y - by)
        cortex = (rb < 15.0) & (rb >= 9.5)
        if side > 0:                                            # a gap in the cortex: marrow meets muscle
            bang = np.arctan2(Y - by, X - bx)
            cortex &= np.abs(bang - 0.5) > 0.45
        mar = rb < 9.5
        mus = inner & ~cortex & ~mar
        muscle |= mus
        marrow |= mar
        # muscle compartments of different fat fraction (2-15 %), fatty septa between them
        comp = np.floor((ang + np.pi) / (2 * np.pi / 5)).astype(int) % 5
        ff_comp = np.array([0.02, 0.05, 0.08, 0.12, 0.15]) if side > 0 else np.array([0.03, 0.06, 0.04, 0.10, 0.14])
        ff[mus] = ff_comp[comp[mus]]
        pd[mus] = 700.0
        r2[mus] = 30.0 * scale
        ff[mar] = 0.90
        pd[mar] = 900.0
        r2[mar] = 60.0 * scale
        pd[leg & ~inner] = 1000.0
        ff[leg & ~inner] = 0.92
        r2[leg & ~inner] = 40.0 * scale
        pd[cortex & inner] = 0.0
    # a water tube (a separate island) between and under the legs
    tube = np.hypot(X, Y - 100.0) < 11.0
    pd[tube] = 900.0
    ff[tube] = 0.0
    r2[tube] = 8.0
    tissue = pd > 0
    # partial volume: half a voxel of in-plane blur of the amplitudes (R2* from the dominant tissue)
    blur = (0.0, 0.5, 0.5)
    water = ndi.gaussian_filter(pd * (1 - ff), blur, mode="constant")
    fat = ndi.gaussian_filter(pd * ff, blur, mode="constant")
    r2 = np.where(tissue, r2, ndi.grey_dilation(r2, size=(1, 3, 3)))
    tissue = (water + fat) > 0.5 * 700.0
    # field map: a steep gradient across the legs wrapping `wraps` periods over the FOV, a curved
    # part (susceptibility of the legs, shim) and a slow change along the slices
    psi = (wraps * period * X / fov_mm[1] + 120.0 * scale * np.cos(np.pi * Y / fov_mm[0]) * (1 - (X / 200.0) ** 2)
           + 40.0 * scale * np.exp(-((np.abs(X) - 100.0) ** 2 + Y ** 2) / (2 * 50.0 ** 2)) + 1.5 * Z - 30.0)
    phase0 = 0.8 + 1.2 * X / fov_mm[1] - 0.8 * Y / fov_mm[0]
    s = multiecho_signal(water, fat, r2, psi, te, field_strength_t=field, spectrum=spectrum, phase0_rad=phase0)
    noise_sd = float(np.median(np.abs(s[0])[tissue])) / snr
    rng = np.random.default_rng(seed)
    s = s + rng.normal(0.0, noise_sd, s.shape) + 1j * rng.normal(0.0, noise_sd, s.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        pdff = np.where(tissue, fat / (water + fat), np.nan)
    core = np.ones((1, 3, 3), bool)
    return MegrePhantom(
        magnitude=np.abs(s), phase=np.angle(s), te_ms=te, field_strength_t=field, water=water, fat=fat, pdff=pdff,
        r2star_s=r2, fieldmap_hz=psi, tissue=tissue, muscle=ndi.binary_erosion(muscle, core),
        marrow=ndi.binary_erosion(marrow, core), fat_layer=ndi.binary_erosion(sat, core), period_hz=period,
        noise_sd=noise_sd, spacing_mm=(slice_mm, dy, dx))
