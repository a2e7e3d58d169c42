import numpy as np
import pytest

from node.cache import ArrayCache


def test_builds_once_then_reads(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"a": np.arange(5.0), "b": np.eye(2)}

    cache = ArrayCache(tmp_path)
    first = cache.get_or_build("epg-abc123", build)
    again = ArrayCache(tmp_path).get_or_build("epg-abc123", build)
    assert len(calls) == 1
    np.testing.assert_array_equal(first["a"], again["a"])
    np.testing.assert_array_equal(again["b"], np.eye(2))


def test_damaged_entry_is_rebuilt_and_bad_keys_refused(tmp_path):
    cache = ArrayCache(tmp_path)
    cache.path("k").parent.mkdir(parents=True, exist_ok=True)
    cache.path("k").write_bytes(b"garbage")
    assert cache.get_or_build("k", lambda: {"x": np.ones(3)})["x"].sum() == 3
    with pytest.raises(ValueError, match="cache key"):
        cache.path("../escape")


def test_epg_tables_cached_across_exams_with_different_fat_t2(tmp_path):
    """The node caches the per-sequence EPG tables, not whole dictionaries: exams of one
    protocol with different calibrated fat T2 share the water table (and the fat-T2
    calibration's table), and the dictionary is the same as one built without a cache."""
    from node.processing import cached_atoms
    from quant.epg import MeseParameters
    from quant.t2 import build_dictionary, calibrate_fat_t2

    params = MeseParameters(n_echoes=8, echo_spacing_ms=10.0, profile="none")
    atoms = cached_atoms(tmp_path)
    a = build_dictionary(params, t2f_ms=140.0, atoms=atoms)
    b = build_dictionary(params, t2f_ms=155.3, atoms=atoms)
    assert len(list(tmp_path.glob("epg-atoms-*.npz"))) == 1
    plain = build_dictionary(params, t2f_ms=155.3)
    np.testing.assert_array_equal(b.water_atoms, plain.water_atoms)
    np.testing.assert_allclose(b.fat_atoms, plain.fat_atoms)
    assert b.key == plain.key and a.key != b.key
    assert not np.allclose(a.fat_atoms, b.fat_atoms)
    # fat-T2 calibration: its own table (fat T1 over the fat-T2 grid), cached once too
    signals = build_dictionary(params, t2f_ms=150.0).fat_atoms[[20, 25, 30]] * 1000.0
    t2f = calibrate_fat_t2(np.repeat(signals, 5, axis=0), params, water_t2_ms=None, min_voxels=5, atoms=atoms)
    assert t2f == pytest.approx(150.0, abs=1.0)
    assert len(list(tmp_path.glob("epg-atoms-*.npz"))) == 2
    calibrate_fat_t2(np.repeat(signals, 5, axis=0), params, water_t2_ms=None, min_voxels=5, atoms=atoms)
    assert len(list(tmp_path.glob("epg-atoms-*.npz"))) == 2
