"""Water-T2 fit: musclenode's EPG dictionary fit against a per-voxel scipy curve_fit
bi-exponential baseline and against myoqmri (the Basel group's open toolbox, run in its
own virtual environment), in one run on the same synthetic data.

    python bench/t2_bench.py [--voxels 20000] [--snr 100] [--myoqmri-voxels 2100]

Data: EPG-simulated 17-echo CPMG (ESP 10 ms, TR 3000 ms, sinc slice profile), T2w
25-45 ms, FF 0-40 %, B1 0.8-1.1, fat T2 151 ms, Rician noise. Prints voxels/s, the
ratios against ours, and bias / SD of water T2 (where FF < 20 %) and of FF. Ours and
myoqmri are timed as the fastest of 3 runs (scipy's, slower by far, once).
myoqmri is skipped (with the command that sets it up) when its venv is missing:
    bash bench/peers/setup.sh
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant.epg import MeseParameters  # noqa: E402
from quant.synthetic.mese_phantom import simulate_mese  # noqa: E402
from quant.t2 import build_dictionary, fit_water_t2  # noqa: E402

PARAMS = MeseParameters(n_echoes=17, echo_spacing_ms=10.0, repetition_time_ms=3000.0)
FAT_T2_MS = 151.0
MYOQMRI_PY = ROOT / ".bench-venvs" / "myoqmri" / "bin" / "python"
REPEATS = 3   # ours and myoqmri: the fastest of this many runs (the machine is shared)
TARGET_RATIO = 100.0   # issue 3: at least 100x myoqmri's voxels/s at equal or better accuracy


def make_data(n: int, snr: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    t2w = rng.uniform(25, 45, n)
    ff = rng.uniform(0, 0.4, n)
    b1 = rng.uniform(0.8, 1.1, n)
    sim = simulate_mese(t2w, ff, b1, PARAMS, snr=snr, seed=seed + 1)
    return np.moveaxis(sim.images, 0, -1).astype(np.float32), t2w, ff, b1, sim.noise_sd


def accuracy(name, t2_fit, ff_fit, t2w, ff):
    lean = ff < 0.2
    ok = lean & np.isfinite(t2_fit)
    d = t2_fit[ok] - t2w[ok]
    dff = (ff_fit - ff)[np.isfinite(ff_fit)] * 100
    return dict(name=name, t2_bias=float(np.mean(d)), t2_sd=float(np.std(d)), ff_bias=float(np.mean(dff)),
                ff_sd=float(np.std(dff)), fitted=float(ok.sum() / max(lean.sum(), 1)))


def ours(signals, noise_sd):
    t0 = time.perf_counter()
    d = build_dictionary(PARAMS, t2f_ms=FAT_T2_MS)
    t_dict = time.perf_counter() - t0
    fit_water_t2(signals[:100], d, noise_sd=noise_sd)   # compile / load kernels outside the timing
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fit = fit_water_t2(signals, d, noise_sd=noise_sd)
        times.append(time.perf_counter() - t0)
    return fit.t2w_ms, fit.ff, min(times), t_dict


def curve_fit_baseline(signals):
    """Per-voxel scipy curve_fit: A exp(-t/T2w) + B exp(-t/T2f), T2f fixed, first echo
    discarded (the published UCL approach)."""
    from scipy.optimize import curve_fit
    te = PARAMS.echo_times_ms[1:]
    t2 = np.full(len(signals), np.nan)
    ff = np.full(len(signals), np.nan)

    def model(t, a, b, t2w):
        return a * np.exp(-t / t2w) + b * np.exp(-t / FAT_T2_MS)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, y in enumerate(signals[:, 1:].astype(float)):
            try:
                p, _ = curve_fit(model, te, y, p0=(y[0] * 1.5, y[0] * 0.1, 35.0),
                                 bounds=([0, 0, 5], [np.inf, np.inf, 200]), maxfev=2000)
            except RuntimeError:
                continue
            t2[i] = p[2]
            ff[i] = p[1] / (p[0] + p[1])
    return t2, ff, time.perf_counter() - t0


def myoqmri(signals):
    if not MYOQMRI_PY.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, signals=signals, echo_spacing_ms=PARAMS.echo_spacing_ms, n_echoes=PARAMS.n_echoes,
                 refocusing_angle_deg=PARAMS.refocusing_angle_deg, fat_t2_ms=FAT_T2_MS, repeats=REPEATS)
        r = subprocess.run([str(MYOQMRI_PY), str(ROOT / "bench" / "peers" / "myoqmri_fit.py"), str(src), str(dst)],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
        if r.returncode != 0:
            print("myoqmri failed:", r.stderr[-2000:])
            return None
        out = np.load(dst)
        return out["t2w_ms"], out["ff"], float(out["seconds"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxels", type=int, default=20000)
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument("--curve-fit-voxels", type=int, default=1000)
    ap.add_argument("--myoqmri-voxels", type=int, default=2100,
                    help="myoqmri fits 14 rows of 50 voxels per matrix product: use multiples of 700")
    args = ap.parse_args()
    signals, t2w, ff, b1, noise_sd = make_data(args.voxels, args.snr)
    rows = []
    t2_o, ff_o, dt_o, t_dict = ours(signals, noise_sd)
    rows.append((accuracy("musclenode EPG dictionary", t2_o, ff_o, t2w, ff), args.voxels / dt_o))
    n = args.curve_fit_voxels
    t2_c, ff_c, dt_c = curve_fit_baseline(signals[:n])
    rows.append((accuracy("scipy curve_fit bi-exp", t2_c, ff_c, t2w[:n], ff[:n]), n / dt_c))
    m = args.myoqmri_voxels
    res = myoqmri(signals[:m])
    if res is not None:
        rows.append((accuracy("myoqmri 2.0.2", res[0], res[1], t2w[:m], ff[:m]), m / res[2]))
    else:
        print(f"(myoqmri skipped: no venv at {MYOQMRI_PY}; run `bash bench/peers/setup.sh`)")
    ours_vps = rows[0][1]
    print(f"{args.voxels} voxels, SNR {args.snr:g}, 17 echoes x 10 ms; "
          f"dictionary build {t_dict:.2f} s (cached by the node)")
    print(f"{'method':<28}{'voxels/s':>11}{'ours / it':>11}{'T2w bias':>10}{'T2w SD':>8}{'FF bias':>9}{'FF SD':>7}"
          f"{'fitted':>8}")
    for acc, vps in rows:
        print(f"{acc['name']:<28}{vps:>11.0f}{ours_vps / vps:>11.1f}{acc['t2_bias']:>+10.2f}{acc['t2_sd']:>8.2f}"
              f"{acc['ff_bias']:>+9.2f}{acc['ff_sd']:>7.2f}{100 * acc['fitted']:>7.0f}%")
    print("(T2w in ms over voxels with FF < 20 %; FF in percentage points; myoqmri's FF is its own definition)")
    peer = [(acc, vps) for acc, vps in rows if acc["name"].startswith("myoqmri")]
    if peer:
        ours_acc, (acc, vps) = rows[0][0], peer[0]
        as_good = all(abs(ours_acc[k]) <= abs(acc[k]) for k in ("t2_bias", "t2_sd", "ff_bias", "ff_sd"))
        met = ours_vps / vps >= TARGET_RATIO and as_good
        print(f"target (>= {TARGET_RATIO:g}x myoqmri's voxels/s at equal or better accuracy): "
              f"{'met' if met else 'NOT met'} ({ours_vps / vps:.0f}x; accuracy "
              f"{'equal or better' if as_good else 'worse'} on T2w bias/SD and FF bias/SD)")
    print(f"whole exam of 60,000 muscle voxels: {60000 / ours_vps:.2f} s (ours, after the dictionary is cached)")
    json.dump([dict(acc, voxels_per_s=vps) for acc, vps in rows], open(Path(tempfile.gettempdir()) /
                                                                      "musclenode-t2-bench.json", "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
