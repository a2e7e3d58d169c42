"""``musclenode demo``: a synthetic two-visit thigh exam pushed through a real node.

It makes the phantom (two legs with subcutaneous fat, femur with marrow, muscle whose
fat fraction rises and whose area falls between visits, Rician noise), starts a node and
a small PACS on loopback, pushes both visits over DICOM (visit 2 after visit 1's results
are back, as six months apart), waits for SEG and SR to reach the PACS, and prints the
measurements against the truth.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from quant.enums import Region, Side
from quant.synthetic.exam import exam_datasets
from quant.synthetic.phantom import make_leg_phantom

from . import db
from .config import Config, Destination, JobSettings, NodeSettings, SendSettings
from .demo_peers import MiniPACS, push
from .service import Node

VISITS = (  # (study date, muscle FF, muscle area scale, muscle water T2 ms): ALS-like progression over 6 months
    ("20260112", 0.06, 1.00, 32.0),
    ("20260713", 0.11, 0.92, 36.0),
)


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
                                      data_dir=workdir / "node-data", complete_after_seconds=2.0),
                    jobs=JobSettings(workers=1, executor="process"),
                    send=SendSettings(retry_initial_seconds=1.0, retry_max_seconds=10.0),
                    destinations=(Destination("demo-pacs", "DEMOPACS", "127.0.0.1", pacs_port),))
    echo(f"musclenode demo in {workdir}")
    echo(f"  node MUSCLENODE on 127.0.0.1:{config.node.port}, PACS DEMOPACS on 127.0.0.1:{pacs_port}")
    truths, study_uids, latencies, outputs = [], [], [], {}
    try:
        with Node(config) as node:
            for n, (date, ff, scale, t2w) in enumerate(VISITS, start=1):
                ph = make_leg_phantom(Region.THIGH, muscle_ff=ff, muscle_scale=scale, snr=snr, seed=n,
                                      supersample=3, bias_field=0.3, fascia_mm=1.0)
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
                echo(f"  sent in {t_last - t0:.1f} s; waiting for completion "
                     f"({config.node.complete_after_seconds:g} s quiet), processing and sending")
                waited = {m: pacs.wait_for(m, study_uid, timeout) for m in ("SEG", "SR")}
                got = {m: v for m, v in waited.items() if v is not None}
                if len(got) < len(waited):
                    echo("  results did not arrive in time; see `musclenode status`")
                    return 1
                latencies.append(got["SR"][0] - t_last)
                outputs[n] = {m: v[1] for m, v in got.items()}
                truth = dict(ph.truth)
                for side in (Side.RIGHT, Side.LEFT):
                    truth[(side, "t2w_ms")] = t2w
                    truth[(side, "ff_t2_percent")] = ph.truth[(side, "ff_percent")]
                truths.append(truth)
                study_uids.append(study_uid)
                echo(f"  SEG and SR stored in PACS {latencies[-1]:.1f} s after the last instance")
            with node.engine.begin() as conn:
                rows = conn.execute(select(db.measurements)).all()
    finally:
        pacs.stop()
    values = {(r.study_uid, r.side, r.metric): r.value for r in rows}
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
    echo("")
    for n, files in outputs.items():
        echo(f"visit {n}: SEG {files['SEG']}")
        echo(f"         SR  {files['SR']}")
    echo(f"visit 2's SR carries the baseline values and the change since visit 1 "
         f"(interval {_days(VISITS[0][0], VISITS[1][0])} days).")
    echo("Time from last instance received to SR in PACS: "
         + ", ".join(f"visit {i + 1} {t:.1f} s" for i, t in enumerate(latencies))
         + f" (including the {config.node.complete_after_seconds:g} s completion wait)")
    return 0


def _days(a: str, b: str) -> int:
    from .processing import parse_date
    first, second = parse_date(a), parse_date(b)
    if first is None or second is None:
        raise ValueError(f"not a DICOM date: {a!r} or {b!r}")
    return (second - first).days
