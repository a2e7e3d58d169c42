"""Time what a worker does before it records the SEG and SR of the demo's visit 1, and check
that a change leaves the outputs as they were.

The demo's visit 1 (``node.demo``: the thigh phantom, Dixon water/fat/in/opposed phase and a
17-echo MESE, 250 instances) is written once to a folder and then, per run, read back
(:func:`node.processing.load_datasets`), analysed with the automatic compartments, and its
SEG and SR built and encoded, as :func:`node.worker.execute_job` does before its first
transaction (``build_outputs(..., summary=False)``). ``--save FILE`` keeps the measurements
and the outputs (maps included); ``--compare FILE`` prints the largest difference of every
measurement and which objects differ (times and highdicom's random dimension organisation
UIDs aside).

    python bench/job_latency.py --runs 3 --save before.pkl    # on the old version
    python bench/job_latency.py --runs 3 --compare before.pkl # on the new one
"""

from __future__ import annotations

import argparse
import copy
import pickle
import tempfile
import time
from pathlib import Path

from node.config import Config
from node.processing import (
    StudyOutputs,
    build_outputs,
    cached_atoms,
    encode,
    load_datasets,
    output_datasets,
    with_summary,
)

#: Attributes that differ from run to run whatever the inputs (creation times, highdicom's
#: Dimension Organization UIDs).
VOLATILE = ("0018A002", "00080013", "00080033", "00209164")


def write_visit(folder: Path) -> None:
    """The demo's visit 1 as DICOM files in ``folder``."""
    from node.demo import VISITS
    from quant.enums import Region, Roi
    from quant.synthetic.exam import exam_datasets
    from quant.synthetic.phantom import make_leg_phantom
    date, ff, scale, t2w, anterior_ff, shift, rotation = VISITS[0]
    ph = make_leg_phantom(Region.THIGH, muscle_ff=ff, muscle_scale=scale, snr=40.0, seed=1, supersample=3,
                          bias_field=0.3, fascia_mm=1.0, compartments=True,
                          compartment_ff={Roi.ANTERIOR_COMPARTMENT.value: anterior_ff}, shift_mm=shift,
                          rotation_deg=rotation)
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(exam_datasets(ph, t2w_muscle_ms=t2w, patient_id="ALS-0001", patient_name="Demo^Subject",
                                         study_date=date, uid_seed="musclenode-demo")):
        (folder / f"{i:04d}.dcm").write_bytes(encode(ds))


def run_once(folder: Path, cache: Path) -> tuple[StudyOutputs, dict[str, float]]:
    """Read, analyse and build SEG and SR as a job does before recording them; the seconds of each."""
    t0 = time.perf_counter()
    datasets, _ = load_datasets(sorted(folder.glob("*.dcm")))
    t1 = time.perf_counter()
    out = build_outputs(datasets, {}, [], t2_options=Config().t2.options(), atoms=cached_atoms(cache),
                        compartments=True, summary=False)
    t2 = time.perf_counter()
    for _, ds in output_datasets(out):
        encode(ds)
    t3 = time.perf_counter()
    return out, {"read": t1 - t0, "analysis, SEG and SR": t2 - t1, "encode": t3 - t2, "total": t3 - t0}


def snapshot(out: StudyOutputs) -> dict:
    """The measurements and every object's attributes and pixel data (maps built, no page)."""
    out = with_summary(out)
    objects: dict[str, object] = {}
    for kind, ds in output_datasets(out):
        if kind.startswith("summary"):
            continue
        ds = copy.deepcopy(ds)
        key = f"{kind}{ds.get('SeriesNumber', '')}"
        for px in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if px in ds:
                objects[key + " pixels"] = bytes(ds[px].value)
                del ds[px]
        objects[key] = ds.to_json_dict()
    measurements = {(m.region, m.roi, m.source, m.side.value, m.metric): m.value for m in out.analysis.measurements}
    return {"measurements": measurements, "objects": objects}


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [path] if a != b and not any(v in path for v in VOLATILE) else []


def compare(before: dict, after: dict) -> None:
    """Print the largest difference of the measurements and the objects that differ."""
    mb, ma = before["measurements"], after["measurements"]
    if set(mb) != set(ma):
        print(f"measurements differ in keys: {sorted(set(mb) ^ set(ma))}")
    diffs = {k: abs(mb[k] - ma[k]) for k in set(mb) & set(ma)}
    worst = max(diffs, key=lambda k: diffs[k])
    ff = max((v for k, v in diffs.items() if "ff" in k[4]), default=0.0)
    print(f"{len(diffs)} measurements: largest difference {diffs[worst]:.3g} ({' '.join(filter(None, worst))}); "
          f"largest in a fat fraction {ff:.3g} pp")
    for key in sorted(set(before["objects"]) | set(after["objects"])):
        d = _differences(before["objects"].get(key), after["objects"].get(key))
        print(f"{key}: {'identical' if not d else 'differs at ' + ', '.join(d[:5])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "musclenode-job-latency")
    p.add_argument("--save", type=Path)
    p.add_argument("--compare", type=Path)
    args = p.parse_args()
    visit, cache = args.folder / "visit1", args.folder / "cache"
    if not visit.exists():
        write_visit(visit)
    out, _ = run_once(visit, cache)   # kernels loaded, EPG tables cached
    for _ in range(args.runs):
        out, seconds = run_once(visit, cache)
        print(", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()), flush=True)
    snap = snapshot(out)
    if args.save:
        args.save.write_bytes(pickle.dumps(snap))
    if args.compare:
        compare(pickle.loads(args.compare.read_bytes()), snap)


if __name__ == "__main__":
    main()
