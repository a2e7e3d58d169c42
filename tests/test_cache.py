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
