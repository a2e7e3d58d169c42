"""Run inside the blochsimulator virtual environment: CPMG echo trains by full Bloch
simulation (independent of musclenode's EPG code), written to JSON.

Hard pulses (rect, 0.1 ms): 90° about x, then refocusing pulses about y (phase x 1j),
scaled together by B1. Dephasing between pulses (the crushers of a real sequence) is
made by ~400 isochromats spread over one cycle of off-resonance during half an echo
spacing; the echo is the mean transverse magnetisation at n x ESP.

    python bloch_cpmg.py OUT.json
"""

import json
import sys

import numpy as np
from blochsimulator.simulator import BlochSimulator, TissueParameters

GAMMA_HZ_PER_G = 4258.0
DT = 1e-5
PULSE_S = 1e-4


def cpmg(t1_ms, t2_ms, b1, n_echoes=17, esp_ms=10.0, refocusing_deg=180.0, n_iso=400):
    esp = esp_ms / 1000.0
    n_total = int(round((n_echoes * esp + esp / 2) / DT)) + 1
    rf = np.zeros(n_total, complex)
    n_p = int(round(PULSE_S / DT))

    def amp(deg):
        return b1 * np.deg2rad(deg) / (2 * np.pi * GAMMA_HZ_PER_G * PULSE_S)
    rf[:n_p] = amp(90.0)
    centre90 = PULSE_S / 2
    for n in range(n_echoes):
        t_c = centre90 + esp / 2 + n * esp
        i0 = int(round((t_c - PULSE_S / 2) / DT))
        rf[i0:i0 + n_p] = 1j * amp(refocusing_deg)
    time = np.arange(n_total) * DT
    grads = np.zeros((n_total, 3))
    freqs = np.arange(n_iso) / n_iso * (2.0 / esp)          # one cycle over esp/2
    sim = BlochSimulator()
    res = sim.simulate((rf, grads, time), TissueParameters("t", t1_ms / 1000.0, t2_ms / 1000.0),
                       positions=np.zeros((1, 3)), frequencies=freqs, mode=2, dt=DT)
    mxy = np.asarray(res["mx"]) + 1j * np.asarray(res["my"])
    mxy = mxy.reshape(len(res["time"]), -1)
    t_out = np.asarray(res["time"])
    echoes = []
    for n in range(1, n_echoes + 1):
        k = int(np.argmin(np.abs(t_out - (centre90 + n * esp))))
        echoes.append(abs(mxy[k].mean()))
    return echoes


def main(dst):
    cases = []
    for t1, t2 in ((1400.0, 35.0), (365.0, 151.0)):
        for b1 in (1.0, 0.83, 0.67):
            cases.append(dict(t1_ms=t1, t2_ms=t2, b1=b1, n_echoes=17, esp_ms=10.0, refocusing_deg=180.0,
                              echoes=cpmg(t1, t2, b1)))
    json.dump(dict(generator="blochsimulator 2.9.5 (bench/peers/bloch_cpmg.py): hard 0.1 ms pulses, 90x then "
                             "refocusing about y, 400 isochromats over one dephasing cycle per half echo spacing",
                   cases=cases), open(dst, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
