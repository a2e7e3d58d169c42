"""quant.epg: the CPMG extended phase graph against analytic answers, an independent
isochromat (Bloch) simulation and its plain-numpy reference; slice profiles; cache keys."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quant.epg import (
    DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO,
    MeseParameters,
    epg_cpmg,
    epg_cpmg_reference,
    epg_signals,
    pulse_profile,
    slice_profile,
)
from quant.errors import QuantError

PROTOCOL = dict(n_echoes=17, echo_spacing_ms=10.0)  # 17 echoes, ESP 10 ms (TE 10-170 ms)


def _rot(axis, angle):
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def isochromat_cpmg(t2_ms, t1_ms, exc_rad, ref_rad, n_echoes, esp_ms, n_iso=512):
    """Bloch simulation of a CPMG train with ``n_iso`` isochromats spread evenly over one
    cycle of crusher dephasing per ESP/2: excitation about y, refocusing about x."""
    theta = 2 * np.pi * np.arange(n_iso) / n_iso
    m = np.zeros((n_iso, 3))
    m[:, 2] = 1.0
    m = m @ _rot("y", exc_rad).T
    e2, e1 = np.exp(-esp_ms / 2 / t2_ms), np.exp(-esp_ms / 2 / t1_ms)

    def free(m):
        c, s = np.cos(theta), np.sin(theta)
        x = c * m[:, 0] - s * m[:, 1]
        y = s * m[:, 0] + c * m[:, 1]
        return np.stack([x * e2, y * e2, m[:, 2] * e1 + 1 - e1], axis=1)

    echoes = []
    for _ in range(n_echoes):
        m = free(free(m) @ _rot("x", ref_rad).T)
        echoes.append(np.mean(m[:, 0] + 1j * m[:, 1]))
    return np.abs(np.array(echoes))


def test_ideal_180_refocusing_gives_exact_exponential_decay():
    p = MeseParameters(**PROTOCOL, profile="none")
    s = epg_cpmg(33.0, 1400.0, 1.0, p)
    np.testing.assert_allclose(s, np.exp(-p.echo_times_ms / 33.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("refocusing_deg, excitation_deg", [(180.0, 90.0), (150.0, 90.0), (120.0, 70.0)])
def test_first_echo_is_sin_excitation_times_sin2_half_refocusing(refocusing_deg, excitation_deg):
    p = MeseParameters(**PROTOCOL, profile="none", refocusing_angle_deg=refocusing_deg,
                       excitation_angle_deg=excitation_deg)
    b1 = 0.9
    s = epg_cpmg(40.0, 1000.0, b1, p)
    expected = abs(np.sin(np.deg2rad(b1 * excitation_deg))) * np.sin(np.deg2rad(b1 * refocusing_deg) / 2) ** 2 \
        * np.exp(-p.echo_spacing_ms / 40.0)
    assert s[0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("t2_ms, t1_ms, b1, refocusing_deg", [(35.0, 1400.0, 0.85, 180.0), (30.0, 365.0, 0.7, 160.0),
                                                                (151.0, 365.0, 1.1, 180.0), (45.0, 1400.0, 1.0, 120.0)])
def test_epg_equals_an_independent_isochromat_bloch_simulation_to_1e_9(t2_ms, t1_ms, b1, refocusing_deg):
    p = MeseParameters(**PROTOCOL, profile="none", refocusing_angle_deg=refocusing_deg)
    s = epg_cpmg(t2_ms, t1_ms, b1, p)
    ref = isochromat_cpmg(t2_ms, t1_ms, np.deg2rad(90 * b1), np.deg2rad(refocusing_deg * b1), 17, 10.0)
    np.testing.assert_allclose(s, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("profile", ["none", "sinc"])
@pytest.mark.parametrize("tr_ms", [None, 2500.0])
@pytest.mark.parametrize("t2_ms, t1_ms, b1", [(32.0, 1400.0, 0.8), (151.0, 365.0, 1.05)])
def test_numba_kernel_equals_numpy_reference_to_1e_6(profile, tr_ms, t2_ms, t1_ms, b1):
    p = MeseParameters(**PROTOCOL, profile=profile, repetition_time_ms=tr_ms, refocusing_angle_deg=165.0,
                       n_profile_points=12)
    fast = epg_cpmg(t2_ms, t1_ms, b1, p)
    ref = epg_cpmg_reference(t2_ms, t1_ms, b1, p)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-6)
    assert np.max(np.abs(fast - ref)) < 1e-12  # in practice equal to rounding


def test_epg_signals_broadcasts_and_matches_single_calls():
    p = MeseParameters(**PROTOCOL, n_profile_points=8)
    t2 = np.array([25.0, 35.0, 45.0])[:, None]
    b1 = np.array([0.7, 0.9, 1.0, 1.1])[None, :]
    s = epg_signals(t2, 1400.0, b1, p)
    assert s.shape == (3, 4, 17)
    np.testing.assert_allclose(s[1, 2], epg_cpmg(35.0, 1400.0, 1.0, p), rtol=0, atol=0)


def test_long_tr_equals_full_relaxation_and_short_tr_saturates_water_more_than_fat():
    base = MeseParameters(**PROTOCOL, n_profile_points=8)
    long_tr = dataclasses.replace(base, repetition_time_ms=1e6)
    np.testing.assert_allclose(epg_cpmg(35.0, 1400.0, 0.9, long_tr), epg_cpmg(35.0, 1400.0, 0.9, base), atol=1e-12)
    short = dataclasses.replace(base, repetition_time_ms=3000.0)
    water = epg_cpmg(35.0, 1400.0, 0.9, short)[0] / epg_cpmg(35.0, 1400.0, 0.9, base)[0]
    fat = epg_cpmg(151.0, 365.0, 0.9, short)[0] / epg_cpmg(151.0, 365.0, 0.9, base)[0]
    assert 0.8 < water < 0.95 and fat > 0.99  # 1 - exp(-(3000 - 170) / 1400) = 0.87 for water


def test_stimulated_echoes_make_the_even_echo_exceed_the_odd_one_at_low_b1():
    """CPMG with refocusing < 180 deg: echo 2 gains a stimulated echo and exceeds echo 1."""
    p = MeseParameters(**PROTOCOL)
    s = epg_cpmg(35.0, 1400.0, 0.7, p)
    assert s[1] > s[0]
    s1 = epg_cpmg(35.0, 1400.0, 1.0, dataclasses.replace(p, profile="none"))
    assert s1[1] < s1[0]


def test_slice_profile_is_nominal_at_the_centre_and_falls_towards_the_edges():
    p = MeseParameters(**PROTOCOL)
    prof = slice_profile(p)
    assert prof.z.size == p.n_profile_points
    assert prof.excitation_deg[0] == pytest.approx(90.0, abs=0.5)
    assert prof.refocusing_deg[0] == pytest.approx(180.0, abs=1.0)
    assert np.all(np.diff(prof.excitation_deg[prof.z < 1.0]) < 0)
    # the wider refocusing slab: refocusing falls off later than excitation
    assert np.all(prof.refocusing_deg / 180.0 >= prof.excitation_deg / 90.0 - 1e-12)
    assert pulse_profile(2.0, np.array([0.0]))[0] == pytest.approx(1.0)
    assert DEFAULT_REFOCUSING_TO_EXCITATION_SLAB_RATIO == 1.2


def test_ideal_profile_has_one_point_of_weight_one():
    prof = slice_profile(MeseParameters(**PROTOCOL, profile="none", refocusing_angle_deg=170.0))
    assert prof.weights.tolist() == [1.0] and prof.refocusing_deg.tolist() == [170.0]


@settings(max_examples=40, deadline=None)
@given(t2=st.floats(5.0, 400.0), t1=st.floats(100.0, 3000.0), b1=st.floats(0.3, 1.5),
       ref=st.floats(60.0, 180.0))
def test_echo_magnitudes_are_bounded_by_the_excited_magnetisation(t2, t1, b1, ref):
    p = MeseParameters(**PROTOCOL, refocusing_angle_deg=ref, n_profile_points=6)
    s = epg_cpmg(t2, t1, b1, p)
    prof = slice_profile(p)
    bound = np.sum(prof.weights * np.abs(np.sin(np.deg2rad(b1 * prof.excitation_deg)))) + 1e-12
    assert np.all(s >= 0) and np.all(s <= bound)
    assert np.all(np.isfinite(s))


def test_key_is_stable_and_changes_with_every_parameter():
    p = MeseParameters(**PROTOCOL)
    assert p.key() == MeseParameters(n_echoes=17, echo_spacing_ms=10.0).key()
    assert p.key() == MeseParameters(n_echoes=np.int64(17), echo_spacing_ms=10, refocusing_angle_deg=180).key()
    changes = dict(n_echoes=16, echo_spacing_ms=9.5, refocusing_angle_deg=175.0, excitation_angle_deg=85.0,
                   profile="none", time_bandwidth=3.0, refocusing_to_excitation_slab_ratio=1.0,
                   n_profile_points=25, repetition_time_ms=3000.0)
    assert set(changes) == {f.name for f in dataclasses.fields(MeseParameters)}
    keys = {p.key()}
    for name, value in changes.items():
        keys.add(dataclasses.replace(p, **{name: value}).key())
    assert len(keys) == len(changes) + 1
    # the same in another interpreter (no dependence on hash randomisation)
    code = "from quant.epg import MeseParameters as M; print(M(n_echoes=17, echo_spacing_ms=10.0).key())"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == p.key()


@pytest.mark.parametrize("bad", [dict(n_echoes=1), dict(n_echoes=2.0), dict(echo_spacing_ms=0.0),
                                 dict(echo_spacing_ms=float("nan")), dict(refocusing_angle_deg=0.0),
                                 dict(excitation_angle_deg=400.0), dict(profile="gauss"),
                                 dict(time_bandwidth=-1.0), dict(refocusing_to_excitation_slab_ratio=0.0),
                                 dict(n_profile_points=0), dict(repetition_time_ms=100.0)])
def test_invalid_parameters_raise_quant_error_naming_the_attribute(bad):
    args = dict(PROTOCOL)
    args.update(bad)
    with pytest.raises(QuantError, match=next(iter(bad))):
        MeseParameters(**args)


@pytest.mark.parametrize("t2, t1, b1", [(0.0, 1400.0, 1.0), (30.0, -1.0, 1.0), (30.0, 1400.0, float("nan")),
                                        (np.array([30.0, 40.0]), 1400.0, 1.0)])
def test_invalid_tissue_values_raise_quant_error(t2, t1, b1):
    with pytest.raises(QuantError):
        epg_cpmg(t2, t1, b1, MeseParameters(**PROTOCOL))
