"""Fuzzing the path from received bytes to a volume (issue 13, hostile input).

Each case is a small valid series with one instance mutated, by bytes (flips, insertions,
deletions, truncation, rewritten VRs and value lengths) or by structure (the attributes
that size the pixels, geometry that is missing, contradictory, NaN or negative, bad DS/IS
numbers, wrong transfer syntaxes, broken functional groups). Every case goes the way a
received instance goes: :func:`node.instances.parse_instance` (pydicom's reading, the
node's checks, bounded inflation), then :func:`quant.series.classify_series` and
:func:`quant.volume.assemble_volume` on what was accepted. The only exceptions allowed are
the project's own: :class:`node.errors.InstanceRejected` and :class:`quant.errors.QuantError`.

The runs are derandomized (the same cases in every CI run) and bounded: ``FUZZ_EXAMPLES``
cases in all.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from fuzz_mutations import byte_ops, make_seeds, mutate_bytes, structured, structured_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import InstanceRejected
from node.instances import parse_instance
from quant.errors import QuantError
from quant.series import classify_series
from quant.volume import assemble_volume

SEEDS = make_seeds()
BYTE_EXAMPLES = 1500
STRUCTURED_EXAMPLES = 1200
FUZZ_EXAMPLES = BYTE_EXAMPLES + STRUCTURED_EXAMPLES

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def received_to_volume(files: list[bytes]) -> str:
    """The path of one series from received bytes to a volume; returns how far it got."""
    datasets = []
    for data in files:
        try:
            datasets.append(parse_instance(data))
        except InstanceRejected as exc:
            assert str(exc), "a rejection must say why"
    if not datasets:
        return "rejected"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            classify_series(datasets)
            volume = assemble_volume(datasets)
        except QuantError as exc:
            assert str(exc), "a refusal must say why"
            return "refused"
    assert np.all(np.isfinite(volume.spacing_mm)) and min(volume.spacing_mm) > 0
    assert np.all(np.isfinite(volume.origin_mm))
    assert np.all(np.isfinite(volume.array))
    return "volume"


@pytest.fixture(autouse=True)
def quiet_pydicom():
    """pydicom logs a warning for every odd value; thousands of cases would flood the report."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_seeds_are_valid():
    for seed in SEEDS:
        assert received_to_volume(list(seed.files)) == "volume", seed.name


@pytest.mark.slow
@settings(max_examples=BYTE_EXAMPLES, **FUZZ)
@given(seed=st.integers(0, len(SEEDS) - 1), index=st.integers(0, 2), ops=byte_ops())
def test_byte_mutations_end_in_our_errors(seed, index, ops):
    s = SEEDS[seed]
    files = list(s.files)
    files[index] = mutate_bytes(files[index], s.headers[index], ops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        received_to_volume(files)


@pytest.mark.slow
@settings(max_examples=STRUCTURED_EXAMPLES, **FUZZ)
@given(case=structured_cases())
def test_structured_mutations_end_in_our_errors(case):
    seed, index, mutations, ops = case
    s = SEEDS[seed]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = structured(s, index, mutations)
        if ops:
            files[index] = mutate_bytes(files[index], (), ops)
        received_to_volume(files)


# ---- the SCP's own header reader -----------------------------------------------------------------

FAST_READER_CASES = 1500


def _outcome(read, data: bytes):
    """("ok", the recorded fields) or ("rejected",) of one way of reading a received file."""
    from node.instances import received_fields
    try:
        return "ok", received_fields(read(data))
    except InstanceRejected as exc:
        assert str(exc)
        return ("rejected",)


def test_fast_reader_reads_what_pydicom_reads():
    """The SCP reads a received instance with its own reader (:func:`node.instances._fast_read`,
    pydicom's raw elements found by their lengths, only the attributes the SCP records
    converted, a value converted once for the same element bytes). On the seeds and on 1,500
    mutants, byte-level and structured, it must accept and record exactly what pydicom's reading
    (with the same checks) accepts and records: read once, then again with its kept values.
    """
    import random

    from fuzz_mutations import random_mutant

    from node.instances import _CONVERTED, _read_simple, check_instance, read_with_pydicom

    def by_pydicom(data: bytes):
        ds = read_with_pydicom(data)
        check_instance(ds, decode_all=False)
        return ds

    def fast(data: bytes):
        return parse_instance(data, decode_all=False)

    rng = random.Random(2026)
    cases = [f for seed in SEEDS for f in seed.files] + [random_mutant(SEEDS, rng)[1] for _ in range(FAST_READER_CASES)]
    read_fast = 0
    _CONVERTED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [_outcome(by_pydicom, data) for data in cases]
        for i, data in enumerate(cases):
            assert _outcome(fast, data) == expected[i], f"case {i}"
            read_fast += _read_simple(data) is not None
        # again, backwards, with the values the fast reader converted before kept: the same
        assert len(_CONVERTED) > 50
        for i, data in reversed(list(enumerate(cases))):
            assert _outcome(fast, data) == expected[i], f"case {i}, the second time"
    assert read_fast >= len(cases) * 0.5, f"the fast reader took only {read_fast} of {len(cases)}"
    print(f"\n{len(cases)} files: {read_fast} read by the fast reader, the rest by pydicom; the same outcome for each")
