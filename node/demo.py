"""``musclenode demo``: a synthetic two-visit thigh exam pushed through a real node.

It makes the phantom (two legs with subcutaneous fat, femur with marrow, three muscle
compartments separated by septa, muscle whose fat fraction rises and whose area falls
between visits, the anterior compartment fattier, Rician noise, the patient repositioned at
visit 2), starts a node and a small PACS on loopback, pushes visit 1 over DICOM, has a
reader send the compartments of visit 1 as a SEG, then pushes visit 2 (as six months later),
waits for SEG and SR to reach the PACS, and prints the measurements per leg and per
compartment (visit 2 in the reader's ROIs carried by registration) against the truth.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from sqlalchemy import func, select

from quant.enums import COMPARTMENTS, Region, Roi, Side
from quant.synthetic.exam import exam_datasets
from quant.synthetic.phantom import make_leg_phantom

from . import db
from .config import Config, Destination, JobSettings, NodeSettings, Protocol, SendSettings
from .demo_peers import MiniPACS, push, reader_seg
from .service import Node

# ALS-like progression over 6 months: (study date, muscle FF, muscle area scale, muscle water T2 ms,
# extra FF of the anterior compartment, patient position: shift mm (x, y, z) and rotation degrees)
VISITS = (
    ("20260112", 0.06, 1.00, 32.0, 0.00, (0.0, 0.0, 0.0), 0.0),
    ("20260713", 0.11, 0.92, 36.0, 0.08, (8.0, -5.0, 0.0), 5.0),
)
COMPARTMENT_METRICS = ("csa_mm2", "ff_percent", "frma_mm2")
#: The demo's thigh exam: processing starts as soon as these series are complete
#: (the quiet time is only the fallback).
THIGH_PROTOCOL = Protocol("thigh", "THIGH", ("dixon_water", "dixon_fat", "dixon_in_phase", "dixon_opposed_phase",
                                              "mese"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(workdir: Path | None = None, *, snr: float = 40.0, echo: Callable[[str], None] = print,
             timeout: float = 600.0) -> int:
    """Run the demo in ``workdir`` (default: a new temporary folder), printing with ``echo``;
    returns 0 if both visits' SEG and SR reached the PACS within ``timeout`` seconds each, else 1.
    """
    workdir = Path(workdir or tempfile.mkdtemp(prefix="musclenode-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pacs = MiniPACS(workdir / "pacs")
    pacs_port = pacs.start()
    config = Config(node=NodeSettings(ae_title="MUSCLENODE", bind_address="127.0.0.1", port=free_port(),
                                      data_dir=workdir / "node-data", complete_after_seconds=10.0),
                    jobs=JobSettings(workers=1, executor="process"),
                    send=SendSettings(retry_initial_seconds=1.0, retry_max_seconds=10.0),
                    destinations=(Destination("demo-pacs", "DEMOPACS", "127.0.0.1", pacs_port),),
                    protocols=(THIGH_PROTOCOL,))
    echo(f"musclenode demo in {workdir}")
    echo(f"  node MUSCLENODE on 127.0.0.1:{config.node.port}, PACS DEMOPACS on 127.0.0.1:{pacs_port}")
    truths, study_uids, latencies, outputs = [], [], [], {}
    maps: dict[int, list] = {}
    compartment_truths: list[dict] = []
    try:
        with Node(config) as node:
            for n, (date, ff, scale, t2w, anterior_ff, shift, rotation) in enumerate(VISITS, start=1):
                ph = make_leg_phantom(Region.THIGH, muscle_ff=ff, muscle_scale=scale, snr=snr, seed=n,
                                      supersample=3, bias_field=0.3, fascia_mm=1.0, compartments=True,
                                      compartment_ff={Roi.ANTERIOR_COMPARTMENT.value: anterior_ff},
                                      shift_mm=shift, rotation_deg=rotation)
                dss = exam_datasets(ph, t2w_muscle_ms=t2w, enhanced_mese=(n == 2), patient_id="ALS-0001",
                                    patient_name="Demo^Subject", study_date=date, uid_seed="musclenode-demo")
                study_uid = str(dss[0].StudyInstanceUID)
                echo(f"visit {n} ({date}): pushing {len(dss)} instances (Dixon water/fat/in/opp, "
                     f"{ph.water.shape[0]} slices of {ph.water.shape[1]}x{ph.water.shape[2]}; 17-echo spin echo "
                     f"for water T2{', as Enhanced MR' if n == 2 else ''})")
                t0 = time.time()
                statuses = push(dss, "127.0.0.1", node.port, called_ae="MUSCLENODE")
                t_last = time.time()
                bad = [s for s in statuses if s != 0]
                if bad:
                    echo(f"  {len(bad)} instances not accepted (status 0x{bad[0]:04X})")
                    return 1
                echo(f"  sent in {t_last - t0:.1f} s; processing starts when the {THIGH_PROTOCOL.name} protocol's "
                     f"series are complete (fallback: {config.node.complete_after_seconds:g} s quiet), then sending")
                waited = {m: pacs.wait_for(m, study_uid, timeout) for m in ("SEG", "SR")}
                got = {m: v for m, v in waited.items() if v is not None}
                if len(got) < len(waited):
                    echo("  results did not arrive in time; see `musclenode status`")
                    return 1
                latencies.append(got["SR"][0] - t_last)
                outputs[n] = {m: v[1] for m, v in got.items()}
                maps[n] = _maps_and_page(pacs, study_uid, 30.0)   # the parametric maps and summary page (OT)
                truth = dict(ph.truth)
                for side in (Side.RIGHT, Side.LEFT):
                    truth[(side, "t2w_ms")] = t2w
                    truth[(side, "ff_t2_percent")] = ph.truth[(side, "ff_percent")]
                truths.append(truth)
                compartment_truths.append(ph.compartment_truth)
                study_uids.append(study_uid)
                echo(f"  SEG and SR stored in PACS {latencies[-1]:.1f} s after the last instance (job queued "
                     f"{_job_queued(node, study_uid) - t_last:.2f} s after it, by the {THIGH_PROTOCOL.name} protocol)")
                if n == 1 and not _reader_draws(dss, ph, node, pacs, study_uid, timeout, echo):
                    return 1
            with node.engine.begin() as conn:
                rows = conn.execute(select(db.measurements)).all()
    finally:
        pacs.stop()
    values = {(r.study_uid, r.side, r.metric): r.value for r in rows if not r.roi}
    region = rows[0].region if rows else "?"
    echo("")
    echo(f"Measurements ({region}, per leg): measured [truth]")
    echo(f"{'metric':<14}{'side':<7}{'visit 1':>22}{'visit 2':>22}{'change':>22}")
    for metric in ("csa_mm2", "vol_ml", "ff_percent", "frma_mm2", "t2w_ms", "ff_t2_percent", "b1"):
        for side in (Side.RIGHT, Side.LEFT):
            v1 = values.get((study_uids[0], side.value, metric))
            v2 = values.get((study_uids[1], side.value, metric))
            if v1 is None or v2 is None:
                continue
            if (side, metric) not in truths[0]:   # B1 varies across the field of view: no single truth
                echo(f"{metric:<14}{side.value:<7}{v1:>12.2f} {'':>9}{v2:>12.2f} {'':>9}{v2 - v1:>12.2f}")
                continue
            t1, t2 = truths[0][(side, metric)], truths[1][(side, metric)]
            echo(f"{metric:<14}{side.value:<7}{v1:>12.1f} [{t1:>7.1f}]{v2:>12.1f} [{t2:>7.1f}]"
                 f"{v2 - v1:>12.1f} [{t2 - t1:>7.1f}]")
    _compartment_table(rows, study_uids, compartment_truths, echo)
    echo("")
    for n, files in outputs.items():
        echo(f"visit {n}: SEG {files['SEG']}")
        echo(f"         SR  {files['SR']}")
        for path in maps.get(n, []):
            what = pydicom.dcmread(path, stop_before_pixels=True).get("SeriesDescription", "parametric map")
            echo(f"         {what}: {path}")
    echo(f"visit 2's SR carries the baseline values and the change since visit 1 "
         f"(interval {_days(VISITS[0][0], VISITS[1][0])} days).")
    echo("Time from last instance received to SR in PACS: "
         + ", ".join(f"visit {i + 1} {t:.1f} s" for i, t in enumerate(latencies))
         + f" (started by the {THIGH_PROTOCOL.name} protocol, no quiet time)")
    return 0


def _job_queued(node: Node, study_uid: str) -> float:
    """When the first job of a study was queued (its completion time)."""
    with node.engine.begin() as conn:
        return float(conn.execute(select(func.min(db.jobs.c.created_at))
                                  .where(db.jobs.c.study_uid == study_uid)).scalar_one())


def _maps_and_page(pacs: MiniPACS, study_uid: str, timeout: float) -> list:
    """The parametric maps and the summary page of a study received by ``pacs`` (all Modality
    OT), once the summary page (series 907, made last) is among them or ``timeout`` has passed.
    """
    end = time.time() + timeout
    while True:
        files = pacs.received_of("OT", study_uid)
        numbers = {int(pydicom.dcmread(p, stop_before_pixels=True).get("SeriesNumber", 0) or 0) for p in files}
        if 907 in numbers or time.time() > end:
            return sorted(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber or 0))
        time.sleep(0.2)


def _reader_draws(dss, ph, node: Node, pacs: MiniPACS, study_uid: str, timeout: float,
                  echo: Callable[[str], None]) -> bool:
    """A reader outlines the thigh compartments on visit 1 in a viewer and sends the SEG
    to the node; the visit is measured again in them (a new SR in PACS). True when it came back.
    """
    names = {i + 1: r.value for i, r in enumerate(COMPARTMENTS[Region.THIGH])}
    water = _water_series(dss)
    seg = reader_seg(water, ph.compartment, names)
    echo(f"  a reader outlines the {', '.join(n.replace('_', ' ') for n in names.values())} on visit 1 "
         "and sends the SEG (C-STORE)")
    t0 = time.time()
    statuses = push([seg], "127.0.0.1", node.port, called_ae="MUSCLENODE", calling_ae="READER")
    if statuses != [0]:
        echo(f"  the reader's SEG was not accepted (status 0x{statuses[0]:04X})")
        return False
    got = pacs.wait_for("SR", study_uid, timeout, after=t0)
    if got is None:
        echo("  visit 1 was not measured again in time; see `musclenode status`")
        return False
    echo(f"  visit 1 measured again in the reader's ROIs: new SR in PACS {got[0] - t0:.1f} s later; the set is "
         "kept as the subject's and carried to every other visit by registration")
    return True


def _water_series(dss) -> list:
    """The Dixon water series of a study, in slice order (what a viewer's SEG references)."""
    from quant.enums import SeriesKind
    from quant.pipeline import group_by_series
    from quant.series import classify_series
    from quant.volume import assemble_volume
    for series in group_by_series(dss).values():
        if classify_series(series).kind is SeriesKind.WATER:
            by_uid = {str(d.SOPInstanceUID): d for d in series}
            return [by_uid[u] for u in assemble_volume(series).sop_instance_uids]
    raise ValueError("the demo study has no Dixon water series")


def _compartment_table(rows, study_uids: list[str], truths: list[dict], echo: Callable[[str], None]) -> None:
    """Per compartment and side: visit 1 in the reader's ROIs, visit 2 in the same ROIs
    carried by registration, each with its truth, and the change.
    """
    values = {(r.study_uid, r.roi, r.side, r.metric): (r.value, r.source) for r in rows if r.roi}
    if len(study_uids) < 2 or not values:
        return
    echo("")
    echo("Per compartment: visit 1 in the reader's ROIs, visit 2 in the same ROIs carried by registration "
         "(repositioned 8 mm, -5 mm, 5 degrees): measured [truth]")
    echo(f"{'compartment':<24}{'side':<7}{'metric':<12}{'visit 1':>20}{'visit 2':>20}{'change':>20}")
    for roi in (r.value for r in COMPARTMENTS[Region.THIGH]):
        for side in (Side.RIGHT, Side.LEFT):
            for metric in COMPARTMENT_METRICS:
                v1 = values.get((study_uids[0], roi, side.value, metric))
                v2 = values.get((study_uids[1], roi, side.value, metric))
                if v1 is None or v2 is None:
                    continue
                t1 = truths[0].get((side.value, roi, metric), float("nan"))
                t2 = truths[1].get((side.value, roi, metric), float("nan"))
                echo(f"{roi.replace('_', ' '):<24}{side.value:<7}{metric:<12}{v1[0]:>11.1f} [{t1:>6.1f}]"
                     f"{v2[0]:>11.1f} [{t2:>6.1f}]{v2[0] - v1[0]:>11.1f} [{t2 - t1:>6.1f}]")
    sources = sorted({src for (st, *_), (_, src) in values.items() if st == study_uids[1]})
    echo(f"visit 2's ROIs: {', '.join(sources)}; its SR compares each compartment with visit 1 "
         "(same tracking UID) and gives the registration quality")


def _days(a: str, b: str) -> int:
    from .processing import parse_date
    first, second = parse_date(a), parse_date(b)
    if first is None or second is None:
        raise ValueError(f"not a DICOM date: {a!r} or {b!r}")
    return (second - first).days
