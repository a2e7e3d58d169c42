"""Our EPG against an independent simulator: CPMG echo trains computed by full Bloch
simulation with blochsimulator (PyPI, run in its own venv by bench/peers/bloch_cpmg.py;
the curves are stored in tests/data/bloch_cpmg.json so this test needs no peer)."""

import json
from pathlib import Path

import numpy as np
import pytest

from quant.epg import MeseParameters, epg_cpmg

CASES = json.loads((Path(__file__).parent / "data" / "bloch_cpmg.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T2={c['t2_ms']:g}ms-B1={c['b1']:g}")
def test_epg_matches_bloch_simulation(case):
    params = MeseParameters(n_echoes=case["n_echoes"], echo_spacing_ms=case["esp_ms"],
                            refocusing_angle_deg=case["refocusing_deg"], profile="none")
    ours = epg_cpmg(case["t2_ms"], case["t1_ms"], case["b1"], params)
    bloch = np.asarray(case["echoes"])
    # normalised to the first echo: agreement within 0.005 (the Bloch simulation's pulses
    # last 0.1 ms; the EPG's are instantaneous), imperfect refocusing included
    assert np.max(np.abs(ours / ours[0] - bloch / bloch[0])) < 0.005
    assert np.max(np.abs(ours - bloch)) < 0.005
    if case["b1"] < 1:   # the stimulated-echo pattern is there: echo 2 above echo 1's decay
        assert bloch[1] / bloch[0] > np.exp(-case["esp_ms"] / case["t2_ms"]) + 0.05
