"""Time the two Dixon stages of the demo's visit 1 alone: :func:`quant.dixon.detect_swaps` and
:func:`quant.dixon.fat_fraction_dixon`, on the volumes :func:`quant.pipeline.analyse_study`
assembles, and keep their outputs to compare a change against.

    python bench/dixon_stages.py --runs 7 --save before.npz    # on the old version
    python bench/dixon_stages.py --runs 7 --compare before.npz # on the new one

Times are the minimum over the runs (wall clock and ``time.process_time``, which counts every
thread), after one warm-up call that loads (or compiles) the numba kernels.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from node.processing import load_datasets
from quant.dixon import detect_swaps, fat_fraction_dixon
from quant.enums import SeriesKind
from quant.pipeline import _pick, group_by_series
from quant.series import classify_series
from quant.volume import assemble_volume


def dixon_volumes(folder: Path) -> dict:
    """Water, fat, in-phase and opposed-phase arrays and the in-plane spacing, as analyse_study assembles them."""
    datasets, _ = load_datasets(sorted(folder.glob("*.dcm")))
    by_series = group_by_series(datasets)
    infos = tuple(classify_series(dss) for dss in by_series.values())
    vols = {kind: assemble_volume(by_series[_pick(infos, kind).series_instance_uid])
            for kind in (SeriesKind.WATER, SeriesKind.FAT, SeriesKind.IN_PHASE, SeriesKind.OPPOSED_PHASE)}
    return {"water": vols[SeriesKind.WATER].array, "fat": vols[SeriesKind.FAT].array,
            "in_phase": vols[SeriesKind.IN_PHASE].array, "opposed_phase": vols[SeriesKind.OPPOSED_PHASE].array,
            "pixel_mm": vols[SeriesKind.WATER].spacing_mm[1:]}


def timed(fn, runs: int):
    """(result, minimum wall seconds, minimum process seconds) of ``runs`` calls after a warm-up."""
    out = fn()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return out, min(wall), min(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "musclenode-job-latency" / "visit1")
    p.add_argument("--save", type=Path)
    p.add_argument("--compare", type=Path)
    p.add_argument("--only", choices=("swaps", "ff"))
    args = p.parse_args()
    if not args.folder.exists():
        from bench.job_latency import write_visit
        write_visit(args.folder)
    v = dixon_volumes(args.folder)
    w, f, ip, op = v["water"], v["fat"], v["in_phase"], v["opposed_phase"]
    res: dict[str, np.ndarray] = {}
    if args.only != "ff":
        sw, t, c = timed(lambda: detect_swaps(w, f, in_phase=ip, opposed_phase=op, pixel_mm=v["pixel_mm"]), args.runs)
        print(f"detect_swaps        {t:.3f} s wall, {c:.3f} s process  ({sw.message})")
        res.update(swap_regional=sw.regional, swap_fields=np.array(
            [sw.whole_series_swapped, sw.fraction, sw.shell_fat_fraction, sw.ambiguous, sw.regional_checked]),
            swap_message=np.array(sw.message))
    if args.only != "swaps":
        dx, t, c = timed(lambda: fat_fraction_dixon(w, f, in_phase=ip, opposed_phase=op), args.runs)
        print(f"fat_fraction_dixon  {t:.3f} s wall, {c:.3f} s process  ({w.size} voxels)")
        res.update(ff=dx.ff, water=dx.water, fat=dx.fat, flags=dx.flags,
                   noise_sd=np.array([dx.noise_sd[k] for k in sorted(dx.noise_sd)]))
    if args.save:
        np.savez(args.save, **res)
    if args.compare:
        ref = np.load(args.compare)
        for k in res:
            if k not in ref:
                continue
            a, b = ref[k], res[k]
            if k in ("ff", "water", "fat"):
                same_nan = np.array_equal(np.isnan(a), np.isnan(b))
                d = np.nanmax(np.abs(a.astype(np.float64) - b)) if np.isfinite(a).any() else 0.0
                print(f"{k}: NaN pattern {'identical' if same_nan else 'DIFFERS'}, max abs difference {d:.3g}")
            else:
                print(f"{k}: {'identical' if np.array_equal(a, b) else 'DIFFERS'}")


if __name__ == "__main__":
    main()
