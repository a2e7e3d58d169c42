"""Cost of the one-page summary (reports.summary) and the parametric maps (reports.pmap) on the
demo's study, and the README's picture. Target (issue 12): maps and page add under 3 s to a study.

Builds the demo's two visits (``node.demo.VISITS``: 20 slices of 160 x 256, automatic
compartments, visit 2 compared with visit 1) as the node does, then times
:func:`reports.summary.build_summary` on visit 2 (median of ``--repeat``: drawing, PNG and PDF
encoding, both DICOM objects) against the rest of :func:`node.processing.build_outputs`.
``--png FILE`` writes visit 2's page (as a 256-colour PNG, for the README).

    python bench/summary.py [--repeat 5] [--png docs/summary.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()

    from PIL import Image

    from node.demo import VISITS
    from node.processing import build_outputs, comparisons_for, history_for, parse_date, prior_key, time_point_of
    from quant.enums import Region, Roi
    from quant.synthetic.exam import exam_datasets
    from quant.synthetic.phantom import make_leg_phantom
    from reports.longitudinal import PriorValue
    from reports.pmap import build_parametric_maps
    from reports.summary import build_summary

    priors: dict = {}
    for n, (date, ff, scale, t2w, anterior_ff, shift, rotation) in enumerate(VISITS, start=1):
        ph = make_leg_phantom(Region.THIGH, muscle_ff=ff, muscle_scale=scale, snr=40, seed=n, supersample=3,
                              bias_field=0.3, fascia_mm=1.0, compartments=True,
                              compartment_ff={Roi.ANTERIOR_COMPARTMENT.value: anterior_ff}, shift_mm=shift,
                              rotation_deg=rotation)
        dss = exam_datasets(ph, t2w_muscle_ms=t2w, enhanced_mese=(n == 2), patient_id="ALS-0001",
                            patient_name="Demo^Subject", study_date=date, uid_seed="musclenode-demo")
        t0 = time.perf_counter()
        out = build_outputs(dss, priors, compartments=True)
        total = time.perf_counter() - t0
        if n < len(VISITS):
            for m in out.analysis.measurements:
                priors.setdefault(prior_key(m.region, m.side.value, m.metric, m.roi, m.source), []).append(
                    PriorValue(out.study_uid, parse_date(out.study_date), m.value, m.algorithm_version))
            continue
        a = out.analysis
        water = [d for d in dss if str(d.SeriesInstanceUID) == a.anatomy.series_instance_uid]
        comps, excluded = comparisons_for(a, out.study_date, priors)
        history = history_for(a, out.study_date, priors)
        time_point = time_point_of(water[0], out.study_date, priors)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            summary = build_summary(a, water, out.sr, comps, history, time_point=time_point,
                                    version_excluded=excluded)
            times.append(time.perf_counter() - t0)
        assert out.summary is not None and summary.sc.SOPInstanceUID == out.summary.sc.SOPInstanceUID
        map_times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            maps = build_parametric_maps(a, dss)
            map_times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        med_maps = statistics.median(map_times)
        print(f"visit {n}: {a.anatomy.array.shape[-3]} slices of {a.anatomy.array.shape[-2]}x"
              f"{a.anatomy.array.shape[-1]}, {len(summary.rows)} table rows, {len(summary.trends)} trend lines")
        print(f"build_summary: median {med:.2f} s (min {min(times):.2f}, max {max(times):.2f}, n={len(times)}); "
              f"build_outputs with it {total:.2f} s, so the page is {100 * med / total:.0f} % of it")
        print(f"build_parametric_maps ({len(maps)} maps): median {med_maps:.2f} s; maps and page together "
              f"{med + med_maps:.2f} s of build_outputs' {total:.2f} s ({100 * (med + med_maps) / total:.0f} %; "
              f"target: under 3 s)")
        print(f"SC {summary.rgb.nbytes / 1e6:.1f} MB of pixels, PNG {len(summary.png) / 1e3:.0f} kB, "
              f"PDF {len(summary.pdf_bytes) / 1e3:.0f} kB")
        if args.png is not None:
            image = Image.fromarray(summary.rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            image.save(args.png, format="PNG", optimize=True)
            print(f"wrote {args.png} ({args.png.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
