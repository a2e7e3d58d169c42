"""Fat-fraction kernel: against its numpy reference, and against simulated truth."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quant.fatfraction import fat_fraction, fat_fraction_reference

finite = st.floats(min_value=-50, max_value=5000, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, (3, 4, 5), elements=finite), arrays(np.float32, (3, 4, 5), elements=finite),
       st.floats(min_value=0, max_value=100))
def test_matches_reference_and_stays_in_range(water, fat, min_signal):
    ff = fat_fraction(water, fat, min_signal=min_signal)
    ref = fat_fraction_reference(water, fat, min_signal=min_signal)
    np.testing.assert_array_equal(np.isnan(ff), np.isnan(ref))
    np.testing.assert_allclose(ff[~np.isnan(ff)], ref[~np.isnan(ref)], rtol=1e-6, atol=1e-7)
    assert np.all((ff[~np.isnan(ff)] >= 0) & (ff[~np.isnan(ff)] <= 1))


def test_water_fat_swap_symmetry():
    rng = np.random.default_rng(0)
    w, f = rng.uniform(1, 100, (2, 50)).astype(np.float32)
    np.testing.assert_allclose(fat_fraction(w, f) + fat_fraction(f, w), 1.0, rtol=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        fat_fraction(np.zeros((2, 2)), np.zeros((2, 3)))


@pytest.mark.parametrize("snr,true_ff,max_bias_pp,max_sd_pp", [
    (40, 0.05, 0.8, 4.0),    # noise floor: magnitude fat at 5 % FF is 2 noise SDs
    (40, 0.20, 0.3, 3.0),
    (100, 0.05, 0.2, 1.5),
    (100, 0.50, 0.1, 1.0),
])
def test_bias_and_precision_against_simulated_truth(snr, true_ff, max_bias_pp, max_sd_pp):
    """Magnitude Dixon FF from Rician water and fat: stated bias and per-voxel SD (pp)."""
    rng = np.random.default_rng(1)
    n = 200_000
    sigma = 1000.0 / snr

    def rician(a):
        return np.abs(a + rng.normal(0, sigma, n) + 1j * rng.normal(0, sigma, n)).astype(np.float32)

    ff = fat_fraction(rician(1000 * (1 - true_ff)), rician(1000 * true_ff))
    bias = (np.nanmean(ff) - true_ff) * 100
    sd = np.nanstd(ff) * 100
    assert abs(bias) < max_bias_pp, f"bias {bias:+.2f} pp"
    assert sd < max_sd_pp, f"SD {sd:.2f} pp"
