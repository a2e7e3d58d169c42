"""The multi-peak fat spectrum and the multi-echo gradient echo (MEGRE) signal model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import QuantError

GYROMAGNETIC_MHZ_PER_T = 42.577478518   # 1H, gamma / 2 pi


@dataclass(frozen=True)
class FatSpectrum:
    """A multi-peak fat spectrum: chemical shift of each peak from water (ppm; fat
    resonates below water, so negative) and its relative amplitude (summing to 1).
    """

    name: str
    ppm: tuple[float, ...]
    rel_amp: tuple[float, ...]

    def __post_init__(self):
        if len(self.ppm) != len(self.rel_amp) or not self.ppm:
            raise QuantError(f"fat spectrum {self.name!r}: ppm and rel_amp must have the same non-zero length")
        if abs(sum(self.rel_amp) - 1.0) > 0.01:
            raise QuantError(f"fat spectrum {self.name!r}: relative amplitudes sum to {sum(self.rel_amp):.3f}, not 1")

    def frequencies_hz(self, field_strength_t: float) -> np.ndarray:
        """Peak frequencies relative to water (Hz) at a field strength (T)."""
        return np.asarray(self.ppm) * GYROMAGNETIC_MHZ_PER_T * field_strength_t


# Hamilton et al., NMR Biomed 2011;24:784 (liver; used by the ISMRM fat-water toolbox):
# peaks at 0.90, 1.30, 2.10, 2.76, 4.20, 5.30 ppm against water at 4.70 ppm.
HAMILTON_6PEAK = FatSpectrum("hamilton-6peak", (-3.80, -3.40, -2.60, -1.94, -0.39, 0.60),
                             (0.087, 0.693, 0.128, 0.004, 0.039, 0.048))
# The single-peak model (methylene only), as in early 2- and 3-point Dixon.
SINGLE_PEAK = FatSpectrum("single-peak", (-3.40,), (1.0,))


def fat_signal_model(te_ms: Sequence[float] | np.ndarray, field_strength_t: float,
                     spectrum: FatSpectrum = HAMILTON_6PEAK) -> np.ndarray:
    """Complex fat signal ``c_n = sum_p a_p exp(i 2 pi f_p t_n)`` at each echo time (ms)."""
    t = np.asarray(te_ms, dtype=np.float64) * 1e-3
    f = spectrum.frequencies_hz(field_strength_t)
    amp = np.asarray(spectrum.rel_amp, dtype=np.float64)
    amp = amp / amp.sum()
    return (amp[None, :] * np.exp(2j * np.pi * f[None, :] * t[:, None])).sum(1)


def megre_signal(water: npt.ArrayLike, fat: npt.ArrayLike, r2star_s: npt.ArrayLike, fieldmap_hz: npt.ArrayLike,
                 te_ms: Sequence[float] | np.ndarray, *, field_strength_t: float = 3.0,
                 spectrum: FatSpectrum = HAMILTON_6PEAK, phase0_rad: npt.ArrayLike = 0.0) -> np.ndarray:
    """The forward model: complex signal (n_echo, ...) of water and fat (real amplitudes),
    a common R2* (1/s), a field map (Hz) and an initial phase (rad), all broadcast.
    """
    t = np.asarray(te_ms, dtype=np.float64) * 1e-3
    c = fat_signal_model(te_ms, field_strength_t, spectrum)
    water, fat, r2, psi, ph0 = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64)
                                                    for v in (water, fat, r2star_s, fieldmap_hz, phase0_rad)))
    ex = (t.reshape((-1,) + (1,) * water.ndim))
    cc = c.reshape((-1,) + (1,) * water.ndim)
    return (water + fat * cc) * np.exp((2j * np.pi * psi - r2) * ex) * np.exp(1j * ph0)
