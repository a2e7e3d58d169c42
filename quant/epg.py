"""Extended phase graph (EPG) signal of a multi-echo spin echo (CPMG) train.

The model (Hennig 1988; Weigel, JMRI 2015;41:266) tracks the configuration states
``F+_k, F-_k, Z_k`` of the magnetisation through the echo train:

* excitation about *y* (RF phase 90°), so the magnetisation lies along *x*;
* per echo: relaxation and one unit of dephasing over ``ESP/2``, refocusing about *x*
  (RF phase 0°: the CPMG condition), relaxation and dephasing over ``ESP/2``, then the
  echo is ``F+_0``;
* relaxation: ``F *= exp(-t/T2)``, ``Z_k *= exp(-t/T1)`` and ``Z_0`` recovers towards 1.

Slice profile (2D multi-slice)
------------------------------
Across a 2D slice the flip angles vary with position *z*. The voxel signal is the
complex sum over *z* of the EPG echoes computed with the local angles
``b1 * alpha_exc * P_exc(z)`` and ``b1 * alpha_ref * P_ref(z)``, then its magnitude.

The profiles come from the RF pulse shape by the **small-tip (Fourier) approximation**:
the flip-angle profile is taken proportional to the Fourier transform of the pulse
envelope, ``P(z) = B(TBW * z) / B(0)`` with ``B`` the transform of a Hann-windowed sinc
``b(t) = sinc(TBW * t) * (0.5 + 0.5 cos 2 pi t)`` on ``t in [-1/2, 1/2]`` (pulse
duration 1) and *z* in units of the nominal slice thickness (the ideal slab is
``|z| < 1/2``). The refocusing profile is ``P(z / r)`` with ``r`` the refocusing-to-
excitation slab ratio. The approximation is exact in the small-tip limit; for 90° and
180° pulses it gets the transition band wrong by a few per cent of the slice width
(Bloch-simulated profiles, as in Lebel & Wilman, MRM 2010;64:1005, are more exact), and
it ignores relaxation and off-resonance during the pulses. Most of the remaining
mismatch is absorbed by the fitted B1. The profile is sampled at
``n_profile_points`` mid-points of ``0 <= z <= z_max`` (the profile is symmetric), with
``z_max`` where the excitation profile has fallen below 0.5 % of its centre; the
weights integrate over the whole slice so that an ideal rectangular profile gives
weight 1.

Repetition time
---------------
With ``repetition_time_ms`` set, the longitudinal magnetisation before each
excitation is the steady state of the train (``Z_0`` at the last echo recovering for
``TR - n_echoes * ESP``; higher ``Z_k`` are assumed spoiled). Left at ``None``, every
train starts from full magnetisation (TR >> T1). Water (T1 ~1400 ms) recovers less than
fat (T1 ~365 ms) at short TR, so the fat fraction of a fit made without TR is T1-weighted.

Nothing here does I/O. :func:`epg_cpmg_reference` is a plain-numpy implementation of
the same recursion (matrix form, one profile point at a time) used by the tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from .errors import QuantError

EPG_MODEL_VERSION = "epg-cpmg 1"
"""Changes whenever the simulation changes its numbers (part of every cache key)."""

PROFILE_KINDS = ("sinc", "none")

DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO = 1.2
"""Refocusing slab 1.2x the excitation slab: the Siemens product MESE default used by
MyoQMRI (Santini et al., Front Neurol 2021;12:630387, ``--refocusing-width 1.2``).
A wider refocusing slab gives flatter refocusing across the excited slice. Set it from
the protocol where known (GE and Philips product sequences differ)."""


@dataclass(frozen=True)
class MeseParameters:
    """Sequence parameters of a multi-echo spin echo (CPMG) acquisition.

    Parameters
    ----------
    n_echoes : int
        Echo train length (echoes acquired).
    echo_spacing_ms : float
        Echo spacing ESP (ms); echo *n* (1-based) is at ``n * ESP``.
    refocusing_angle_deg : float
        Nominal refocusing flip angle (degrees).
    excitation_angle_deg : float
        Nominal excitation flip angle (degrees).
    profile : str
        ``"sinc"``: Hann-windowed sinc pulses with slice-profile integration (product
        2D sequences, the default); ``"none"``: ideal, uniform flip angles (3D or
        non-selective refocusing).
    time_bandwidth : float
        Time-bandwidth product of both pulses (``"sinc"`` only).
    refocusing_to_excitation_slab_ratio : float
        Refocusing slab thickness over excitation slab thickness (``"sinc"`` only);
        default :data:`DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO`.
    n_profile_points : int
        Positions across the half slice at which the EPG is evaluated (``"sinc"``).
    repetition_time_ms : float or None
        TR (ms) for the longitudinal steady state; ``None``: full relaxation.
    """

    n_echoes: int
    echo_spacing_ms: float
    refocusing_angle_deg: float = 180.0
    excitation_angle_deg: float = 90.0
    profile: str = "sinc"
    time_bandwidth: float = 2.0
    refocusing_to_excitation_slab_ratio: float = DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO
    n_profile_points: int = 24
    repetition_time_ms: float | None = None

    def __post_init__(self):
        def bad(name, why):
            raise QuantError(f"MeseParameters.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.n_echoes, bool) or not isinstance(self.n_echoes, (int, np.integer)):
            bad("n_echoes", "must be an integer")
        if self.n_echoes < 2:
            bad("n_echoes", "need at least 2 echoes")
        for name in ("echo_spacing_ms", "time_bandwidth", "refocusing_to_excitation_slab_ratio"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v) and v > 0):
                bad(name, "must be a finite number > 0")
        for name in ("refocusing_angle_deg", "excitation_angle_deg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.floating, np.integer)) and 0 < v <= 360):
                bad(name, "must be in (0, 360] degrees")
        if self.profile not in PROFILE_KINDS:
            bad("profile", f"must be one of {PROFILE_KINDS}")
        if isinstance(self.n_profile_points, bool) or not isinstance(self.n_profile_points, (int, np.integer)) \
                or self.n_profile_points < 1:
            bad("n_profile_points", "must be an integer >= 1")
        if self.repetition_time_ms is not None:
            tr = self.repetition_time_ms
            if not (isinstance(tr, (int, float, np.floating, np.integer)) and math.isfinite(tr)):
                bad("repetition_time_ms", "must be a finite number or None")
            if tr <= self.n_echoes * self.echo_spacing_ms:
                bad("repetition_time_ms", f"must exceed the echo train ({self.n_echoes} x "
                                          f"{self.echo_spacing_ms} ms)")

    @property
    def echo_times_ms(self) -> np.ndarray:
        """Echo times (ms), ``ESP * (1..n_echoes)``."""
        return self.echo_spacing_ms * np.arange(1, self.n_echoes + 1, dtype=np.float64)

    def key(self) -> str:
        """A stable hash of every parameter and the model version (for caching dictionaries).

        Equal parameters give equal keys in every process and on every machine; any
        change of a parameter (or of :data:`EPG_MODEL_VERSION`) changes the key.
        """
        canon = {}
        for k, v in asdict(self).items():
            if v is None or k == "profile":
                canon[k] = v
            elif k in ("n_echoes", "n_profile_points"):
                canon[k] = int(v)
            else:  # every other field is a float: 10 and 10.0 give the same key
                canon[k] = repr(float(v))
        canon["_model"] = EPG_MODEL_VERSION
        blob = json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()
        return "mese-" + hashlib.sha256(blob).hexdigest()[:24]


@dataclass(frozen=True, eq=False)
class SliceProfile:
    """Flip angles across the slice at which the EPG is evaluated.

    Attributes
    ----------
    z : ndarray
        Positions (units of the nominal slice thickness; 0 is the slice centre).
    excitation_deg, refocusing_deg : ndarray
        Flip angles at ``z`` for B1 = 1 (degrees).
    weights : ndarray
        Integration weights (sum over the full slice; 1 for an ideal slab).
    """

    z: np.ndarray
    excitation_deg: np.ndarray
    refocusing_deg: np.ndarray
    weights: np.ndarray


def pulse_profile(time_bandwidth: float, z: np.ndarray, *, n_time: int = 2001) -> np.ndarray:
    """Small-tip profile of a Hann-windowed sinc pulse, normalised to 1 at the centre.

    Parameters
    ----------
    time_bandwidth : float
        Time-bandwidth product of the pulse.
    z : ndarray
        Positions in units of the nominal slice thickness.
    n_time : int
        Samples of the pulse envelope for the numerical Fourier transform.

    Returns
    -------
    ndarray
        ``B(TBW z) / B(0)`` with ``B`` the Fourier transform of the envelope (real:
        the envelope is even).
    """
    t = np.linspace(-0.5, 0.5, n_time)
    b = np.sinc(time_bandwidth * t) * (0.5 + 0.5 * np.cos(2 * np.pi * t))
    z = np.asarray(z, dtype=np.float64)
    phase = 2 * np.pi * time_bandwidth * np.multiply.outer(z, t)
    prof = np.trapezoid(b * np.cos(phase), t, axis=-1)
    return prof / np.trapezoid(b, t)


@functools.lru_cache(maxsize=64)
def _profile_extent(time_bandwidth: float) -> float:
    """Smallest z beyond which the excitation profile stays below 0.5 % of its centre."""
    fine = np.linspace(0.0, 4.0, 1601)
    pe = np.abs(pulse_profile(time_bandwidth, fine, n_time=1001))
    above = np.nonzero(pe >= 0.005)[0]
    return float(fine[above[-1]]) if above.size else 1.0


@functools.lru_cache(maxsize=64)
def slice_profile(params: MeseParameters) -> SliceProfile:
    """Flip-angle profiles of ``params`` (see the module notes for the approximation).

    Results are cached per parameter set; their arrays are read-only.
    """
    exc = float(params.excitation_angle_deg)
    ref = float(params.refocusing_angle_deg)
    if params.profile == "none":
        one = np.ones(1)
        out = SliceProfile(np.zeros(1), exc * one, ref * one, one)
    else:
        tbw = float(params.time_bandwidth)
        z_max = _profile_extent(tbw)
        n = int(params.n_profile_points)
        z = (np.arange(n) + 0.5) * (z_max / n)
        weights = np.full(n, 2.0 * z_max / n)
        p_exc = pulse_profile(tbw, z)
        p_ref = pulse_profile(tbw, z / float(params.refocusing_to_excitation_slab_ratio))
        out = SliceProfile(z, exc * p_exc, ref * p_ref, weights)
    for arr in (out.z, out.excitation_deg, out.refocusing_deg, out.weights):
        arr.setflags(write=False)
    return out


# --------------------------------------------------------------------------- numba kernels


@njit(cache=True)
def _epg_train(t2_ms, t1_ms, exc_rad, ref_rad, n_echoes, esp_ms, m_init, fp, fm, zz, echoes):
    """One CPMG train from longitudinal magnetisation ``m_init``; echoes into ``echoes``
    (complex, length n_echoes). Returns Z_0 after the last echo. ``fp, fm, zz`` are
    scratch arrays of length >= 2 * n_echoes + 2.
    """
    nk = 2 * n_echoes + 2
    for k in range(nk):
        fp[k] = 0.0
        fm[k] = 0.0
        zz[k] = 0.0
    # excitation about y (phase pi/2) from Z_0 = m_init
    fp[0] = math.sin(exc_rad) * m_init
    fm[0] = fp[0]
    zz[0] = math.cos(exc_rad) * m_init
    e2 = math.exp(-0.5 * esp_ms / t2_ms)
    e1 = math.exp(-0.5 * esp_ms / t1_ms)
    c2 = math.cos(0.5 * ref_rad) ** 2
    s2 = math.sin(0.5 * ref_rad) ** 2
    sa = math.sin(ref_rad)
    ca = math.cos(ref_rad)
    kmax = 0  # highest populated order
    for n in range(n_echoes):
        for half in range(2):
            # relaxation over ESP/2
            for k in range(kmax + 1):
                fp[k] *= e2
                fm[k] *= e2
                zz[k] *= e1
            zz[0] += 1.0 - e1
            # dephasing by one unit: F+ up, F- down
            kmax += 1
            for k in range(kmax, 0, -1):
                fp[k] = fp[k - 1]
            for k in range(0, kmax):
                fm[k] = fm[k + 1]
            fm[kmax] = 0.0
            fp[0] = fm[0].conjugate()
            if half == 0:
                # refocusing about x (phase 0): T(alpha, 0) of Weigel 2015
                for k in range(kmax + 1):
                    a = fp[k]
                    b = fm[k]
                    c = zz[k]
                    fp[k] = c2 * a + s2 * b - 1j * sa * c
                    fm[k] = s2 * a + c2 * b + 1j * sa * c
                    zz[k] = -0.5j * sa * a + 0.5j * sa * b + ca * c
        echoes[n] = fp[0]
    return zz[0].real


@njit(cache=True)
def _epg_profile_sum(t2_ms, t1_ms, b1, exc_rad, ref_rad, weights, n_echoes, esp_ms, tr_ms,
                     fp, fm, zz, e_a, e_b, acc, out):
    """Slice-profile sum of one (T2, T1, B1): magnitudes into ``out`` (n_echoes)."""
    for n in range(n_echoes):
        acc[n] = 0.0
    for p in range(exc_rad.size):
        ae = b1 * exc_rad[p]
        ar = b1 * ref_rad[p]
        if tr_ms > 0.0:
            z1 = _epg_train(t2_ms, t1_ms, ae, ar, n_echoes, esp_ms, 1.0, fp, fm, zz, e_a)
            z0 = _epg_train(t2_ms, t1_ms, ae, ar, n_echoes, esp_ms, 0.0, fp, fm, zz, e_b)
            e = math.exp(-(tr_ms - n_echoes * esp_ms) / t1_ms)
            m = (1.0 - e + e * z0) / (1.0 - e * (z1 - z0))
            for n in range(n_echoes):
                acc[n] += weights[p] * (e_b[n] + m * (e_a[n] - e_b[n]))
        else:
            _epg_train(t2_ms, t1_ms, ae, ar, n_echoes, esp_ms, 1.0, fp, fm, zz, e_a)
            for n in range(n_echoes):
                acc[n] += weights[p] * e_a[n]
    for n in range(n_echoes):
        out[n] = abs(acc[n])


@njit(cache=True, parallel=True)
def _epg_signals(t2_ms, t1_ms, b1, exc_rad, ref_rad, weights, n_echoes, esp_ms, tr_ms, out):
    """Slice-profile EPG magnitudes for M parameter sets: ``out[m] = S(t2[m], t1[m], b1[m])``."""
    m_total = t2_ms.size
    nk = 2 * n_echoes + 2
    n_chunks = min(m_total, 256)
    for c in prange(n_chunks):
        fp = np.empty(nk, np.complex128)
        fm = np.empty(nk, np.complex128)
        zz = np.empty(nk, np.complex128)
        e_a = np.empty(n_echoes, np.complex128)
        e_b = np.empty(n_echoes, np.complex128)
        acc = np.empty(n_echoes, np.complex128)
        for m in range(c, m_total, n_chunks):
            _epg_profile_sum(t2_ms[m], t1_ms[m], b1[m], exc_rad, ref_rad, weights, n_echoes,
                             esp_ms, tr_ms, fp, fm, zz, e_a, e_b, acc, out[m])


# --------------------------------------------------------------------------- public API


def _check_positive(name, value):
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise QuantError(f"{name} must be finite and > 0, got {value!r}"[:200])
    return arr


def epg_signals(t2_ms: npt.ArrayLike, t1_ms: npt.ArrayLike, b1: npt.ArrayLike, params: MeseParameters) -> np.ndarray:
    """Slice-profile EPG echo magnitudes for many parameter sets (numba, parallel).

    Parameters
    ----------
    t2_ms, t1_ms, b1 : array_like
        Broadcastable arrays of T2 (ms), T1 (ms) and B1 (relative transmit field).
    params : MeseParameters
        Sequence.

    Returns
    -------
    ndarray, float64, shape ``broadcast_shape + (n_echoes,)``
        Echo magnitudes per unit proton density.
    """
    t2, t1, b = np.broadcast_arrays(_check_positive("t2_ms", t2_ms), _check_positive("t1_ms", t1_ms),
                                    _check_positive("b1", b1))
    shape = t2.shape
    prof = slice_profile(params)
    out = np.empty((t2.size, params.n_echoes))
    tr = -1.0 if params.repetition_time_ms is None else float(params.repetition_time_ms)
    if t2.size:
        _epg_signals(np.ascontiguousarray(t2.ravel()), np.ascontiguousarray(t1.ravel()),
                     np.ascontiguousarray(b.ravel()), np.deg2rad(prof.excitation_deg),
                     np.deg2rad(prof.refocusing_deg), prof.weights, int(params.n_echoes),
                     float(params.echo_spacing_ms), tr, out)
    return out.reshape(shape + (params.n_echoes,))


def epg_cpmg(t2_ms: float, t1_ms: float, b1: float, params: MeseParameters) -> np.ndarray:
    """Echo magnitudes ``(n_echoes,)`` of one tissue (per unit proton density).

    Parameters
    ----------
    t2_ms, t1_ms : float
        Relaxation times (ms).
    b1 : float
        Relative transmit field: every flip angle is scaled by it.
    params : MeseParameters
        Sequence (echo train, pulses, slice profile, TR).

    Returns
    -------
    ndarray, float64, shape (n_echoes,)
        ``|sum_z w_z F+_0(n; z)|``, the magnitude of the slice-integrated echo.

    Examples
    --------
    >>> p = MeseParameters(n_echoes=4, echo_spacing_ms=10.0, profile="none")
    >>> np.round(epg_cpmg(40.0, 1400.0, 1.0, p), 4)
    array([0.7788, 0.6065, 0.4724, 0.3679])
    """
    for name, v in (("t2_ms", t2_ms), ("t1_ms", t1_ms), ("b1", b1)):
        if np.ndim(v) != 0:
            raise QuantError(f"{name} must be a scalar (use epg_signals for arrays)")
    return epg_signals(t2_ms, t1_ms, b1, params)


# --------------------------------------------------------------------------- numpy reference


def _rotation(alpha, phi):
    """Weigel's (2015) EPG rotation matrix acting on (F+, F-, Z)."""
    c2 = np.cos(alpha / 2) ** 2
    s2 = np.sin(alpha / 2) ** 2
    s = np.sin(alpha)
    e = np.exp(1j * phi)
    return np.array([[c2, e * e * s2, -1j * e * s],
                     [s2 / (e * e), c2, 1j * s / e],
                     [-0.5j * s / e, 0.5j * e * s, np.cos(alpha)]])


def _train_reference(t2_ms, t1_ms, exc, ref, n_echoes, esp_ms, m_init):
    nk = 2 * n_echoes + 2
    state = np.zeros((3, nk), dtype=np.complex128)  # rows F+, F-, Z; column k
    state[2, 0] = m_init
    state[:, :1] = _rotation(exc, np.pi / 2) @ state[:, :1]
    r_ref = _rotation(ref, 0.0)
    relax = np.array([np.exp(-esp_ms / 2 / t2_ms)] * 2 + [np.exp(-esp_ms / 2 / t1_ms)])
    echoes = np.zeros(n_echoes, dtype=np.complex128)

    def interval(s):
        s = s * relax[:, None]
        s[2, 0] += 1 - relax[2]
        fp = np.concatenate(([0.0], s[0, :-1]))
        fm = np.concatenate((s[1, 1:], [0.0]))
        fp[0] = np.conj(fm[0])
        return np.vstack((fp, fm, s[2]))

    for n in range(n_echoes):
        state = interval(state)
        state = r_ref @ state
        state = interval(state)
        echoes[n] = state[0, 0]
    return echoes, state[2, 0].real


def epg_cpmg_reference(t2_ms: float, t1_ms: float, b1: float, params: MeseParameters) -> np.ndarray:
    """Plain-numpy reference of :func:`epg_cpmg` (matrix form; used by the tests)."""
    prof = slice_profile(params)
    total = np.zeros(params.n_echoes, dtype=np.complex128)
    for ae, ar, w in zip(np.deg2rad(prof.excitation_deg), np.deg2rad(prof.refocusing_deg), prof.weights, strict=True):
        m = 1.0
        if params.repetition_time_ms is not None:
            # run whole trains until the longitudinal magnetisation repeats (no closed form)
            e = np.exp(-(params.repetition_time_ms - params.n_echoes * params.echo_spacing_ms) / t1_ms)
            for _ in range(100):
                _, z_end = _train_reference(t2_ms, t1_ms, b1 * ae, b1 * ar, params.n_echoes,
                                            params.echo_spacing_ms, m)
                m_next = 1 - (1 - z_end) * e
                if abs(m_next - m) < 1e-13:
                    break
                m = m_next
        e1, _ = _train_reference(t2_ms, t1_ms, b1 * ae, b1 * ar, params.n_echoes, params.echo_spacing_ms, m)
        total += w * e1
    return np.abs(total)
