"""Run inside myoqmri's own virtual environment (GPL-3.0 code, never imported by
musclenode): fit water T2 with myoqmri's fast single-process path (``fitSlcFast``:
dictionary over T2 x B1 x FF matched by the correlation of squared, normalised
signals), on signals from an .npz; write t2w_ms, b1, ff and the fit's wall time.

    python myoqmri_fit.py IN.npz OUT.npz
IN.npz: signals (N, n_echoes), echo_spacing_ms, n_echoes, fat_t2_ms, repeats (optional).
"""

import sys
import time

import MyoQMRI.waterT2.waterT2 as w
import numpy as np
import numpy.linalg as linalg
from MyoQMRI.waterT2.FatFractionLookup import FatFractionLookup


def main(src, dst):
    d = np.load(src)
    signals = d["signals"].astype(np.float64)
    n, etl = signals.shape
    cols = 50
    rows = -(-n // cols)
    stack = np.zeros((rows * cols, etl))
    stack[:n] = signals
    t0 = time.perf_counter()
    # myoqmri's defaults: T2 20-80 ms, B1 0.5-1.2, refocusing slab factor 1.2
    ffl = FatFractionLookup(w.t2Lim, w.b1Lim, float(d["fat_t2_ms"]), etl, float(d["echo_spacing_ms"]),
                            w.refocusingFactor)
    params, sigs = ffl.getAllSignals()
    sigs = sigs ** 2
    t_dict = time.perf_counter() - t0
    norms = linalg.norm(sigs, axis=1, keepdims=True)
    w.signalsCPU = np.transpose(sigs / np.repeat(norms, sigs.shape[1], axis=1))
    w.parameterCombinations = params
    w.ROWSTEP = 14
    w.DOPLOT = 0
    w.dicomStack = stack.reshape(rows, cols, 1, etl)
    times = []
    for _ in range(int(d["repeats"]) if "repeats" in d else 1):   # the fastest of these runs
        t2 = np.zeros((rows, cols, 1))
        b1 = np.zeros((rows, cols, 1))
        ff = np.zeros((rows, cols, 1))
        t0 = time.perf_counter()
        w.fitSlcFast(0, False, t2, b1, ff)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    np.savez(dst, t2w_ms=t2.ravel()[:n], b1=b1.ravel()[:n], ff=ff.ravel()[:n], seconds=dt,
             dictionary_seconds=t_dict, atoms=len(params))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
