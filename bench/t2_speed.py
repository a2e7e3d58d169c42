"""Speed of the water T2 fit: dictionary build time and voxels/s of ``fit_water_t2``.

Run: ``PYTHONPATH=. python bench/t2_speed.py [--voxels 60000] [--repeats 3]``.
Prints one line per configuration, after a warm-up call that compiles or loads the
numba kernels: the fastest of the repeats (wall clock; the least disturbed by other
processes) and the CPU time per voxel (``time.process_time``, all threads), which stays
meaningful on a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from quant.epg import MeseParameters
from quant.synthetic.mese_phantom import simulate_mese
from quant.t2 import build_dictionary, fit_biexponential_fixed_fat, fit_water_t2


def _timings(fn, repeats):
    """(fastest wall time, CPU time of that run) over ``repeats`` calls, in seconds."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=60000, help="voxels per fit (a whole exam's muscle)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is printed")
    ap.add_argument("--snr", type=float, default=100.0, help="first-echo SNR of the simulated voxels")
    args = ap.parse_args()

    params = MeseParameters(n_echoes=17, echo_spacing_ms=10.0)
    rng = np.random.default_rng(0)
    n = args.voxels
    sim = simulate_mese(rng.uniform(28, 45, n), rng.uniform(0, 0.6, n), rng.uniform(0.7, 1.1, n), params,
                        snr=args.snr, seed=1)
    signals = np.ascontiguousarray(sim.images.T)  # (n, n_echoes) float32
    print(f"cores: {os.cpu_count()}  voxels: {n}  echoes: {params.n_echoes}  ESP: {params.echo_spacing_ms} ms  "
          f"slice-profile points: {params.n_profile_points}")

    for step in (1.0, 0.5):
        t2_grid = np.arange(15.0, 80.0 + 1e-9, step)
        b1_grid = np.round(np.arange(0.5, 1.2 + 1e-9, 0.02), 6)
        build_dictionary(params, t2_grid, b1_grid)  # warm-up (compile or load cache)
        t_build, _ = _timings(lambda t2_grid=t2_grid, b1_grid=b1_grid: build_dictionary(params, t2_grid, b1_grid),
                              args.repeats)
        d = build_dictionary(params, t2_grid, b1_grid)
        for noise_sd in (None, sim.noise_sd):
            fit_water_t2(signals[:100], d, noise_sd=noise_sd)  # warm-up
            t_fit, cpu = _timings(lambda d=d, noise_sd=noise_sd: fit_water_t2(signals, d, noise_sd=noise_sd),
                                  args.repeats)
            print(f"epg-bicomponent  T2w {t2_grid[0]:g}-{t2_grid[-1]:g} ms step {step:g} x B1 "
                  f"{b1_grid[0]:g}-{b1_grid[-1]:g} step 0.02 = {d.n_atoms} atoms | build {t_build:.2f} s | "
                  f"noise-floor correction {'on ' if noise_sd else 'off'} | fit {t_fit:.3f} s = "
                  f"{n / t_fit:,.0f} voxels/s ({1e6 * cpu / n:.1f} CPU-us/voxel)")
    te = params.echo_times_ms
    fit_biexponential_fixed_fat(signals[:100], te)
    t_fit, cpu = _timings(lambda: fit_biexponential_fixed_fat(signals, te), args.repeats)
    print(f"biexp-fixed-fat  fit {t_fit:.3f} s = {n / t_fit:,.0f} voxels/s ({1e6 * cpu / n:.1f} CPU-us/voxel)")


if __name__ == "__main__":
    main()
