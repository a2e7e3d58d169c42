"""Sizing (issue 14): studies per minute on local worker processes and on a Dask cluster, and
where the time goes. Target: 2 Dask workers reach at least 1.6x the studies per minute of one.

A synthetic study set (``--studies`` thigh exams of the project's phantom: Dixon water, fat,
in-phase and opposed-phase series plus a MESE, ``--slices`` slices of 96 x 160, one subject each)
is written once to a temporary folder. For each configuration, in one run:

- ``local-1``: ``[jobs] executor = "process"``, 1 worker (the baseline);
- ``dask-1``: ``executor = "dask"`` on a ``distributed.LocalCluster`` of 1 worker process (1 thread);
- ``dask-2``: the same with 2 worker processes;

a fresh node (SQLite, its own storage root) receives every study over DICOM with its job runner
held back, so that each study has its pending job before any runs; then the runner starts (the
workers warm up first, not timed) and the figures are taken from the first job's start to the
last job's end: studies per minute, seconds per study (claim to recorded, from the job rows),
the stages each job logs (read, analysis with SEG/SR, store; "dispatch": the rest of the time from
claim to recorded), the CPU seconds per study of the node and its workers (and of the node process
alone: SCP, job runner, the LocalCluster's scheduler), the CPU used by the whole machine
meanwhile and by the node and its workers alone (the machine may be shared: its load average is
printed too). The Dask workers run at the local pool's lower priority (``nice``), as a fair
comparison on a shared machine.

Every worker process runs numba, OpenMP and BLAS on ``--library-threads`` threads (1 by default,
as the Dask executor runs each job's numba kernels): a job that starts a thread per core beside
another job oversubscribes the cores (``--library-threads 0`` shows it).

    python bench/scale.py [--studies 6] [--slices 8] [--configs local-1,dask-1,dask-2,local-2]
                          [--library-threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
import pydicom  # noqa: E402
from conftest import node_config, write_datasets  # noqa: E402
from sqlalchemy import select  # noqa: E402

from node import db  # noqa: E402
from node.config import JobSettings  # noqa: E402
from node.demo_peers import push  # noqa: E402
from quant.enums import Region  # noqa: E402
from quant.synthetic.exam import exam_datasets  # noqa: E402
from quant.synthetic.phantom import make_leg_phantom  # noqa: E402

#: What :func:`node.worker.execute_job` logs at the end of a job.
DONE = re.compile(r"job (\d+) done: study \S+ in ([\d.]+) s \(read ([\d.]+) s, analysis and SEG/SR ([\d.]+) s, "
                  r"store ([\d.]+) s\)")
TRIAL = 300 * 3 * 4   # subjects x visits x regions
LIBRARY_THREADS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def make_studies(n: int, slices: int, folder: Path) -> list[list[Path]]:
    """``n`` thigh exams of distinct subjects, written to ``folder``; the files of each."""
    out = []
    for k in range(n):
        ph = make_leg_phantom(Region.THIGH, shape=(slices, 96, 160), pixel_mm=2.5, slice_mm=6.0, snr=40, seed=100 + k,
                              muscle_ff=0.04 + 0.02 * (k % 5), supersample=3, bias_field=0.3, fascia_mm=1.0)
        dss = exam_datasets(ph, patient_id=f"SCALE-{k:03d}", study_date="20260301", uid_seed=f"scale-{k}")
        out.append(write_datasets(dss, folder / f"study-{k:03d}"))
    return out


def run(name: str, studies: list[list[Path]], work: Path, log_path: Path) -> dict:
    """One configuration (``local-N`` or ``dask-N``): the figures of processing every study."""
    from distributed import Client, LocalCluster

    from node.service import Node
    from node.worker import WORKER_NICENESS

    kind, workers = name.split("-")
    n_workers = int(workers)
    cluster = None
    if kind == "dask":
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, protocol="tcp",
                               host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)
        with Client(cluster.scheduler_address, set_as_default=False) as client:
            # like the local pool's workers (node.worker._init_worker): a fair comparison on a shared machine
            client.run(os.nice, WORKER_NICENESS)
        jobs = JobSettings(workers=n_workers, executor="dask", scheduler_address=cluster.scheduler_address)
    else:
        jobs = JobSettings(workers=n_workers, executor="process")
    cfg = dataclasses.replace(node_config(work / name, complete_after=1.0), jobs=jobs)
    node = Node(cfg, poll_seconds=0.2)
    try:
        node.completion.start()                   # the runner is held back: every study gets its pending job
        node.receiver.start("127.0.0.1", cfg.node.port)
        for files in studies:
            statuses = push([pydicom.dcmread(p) for p in files], "127.0.0.1", node.port, called_ae="MUSCLENODE")
            assert set(statuses) == {0}, statuses
        _wait(lambda: len(_jobs(node)) == len(studies), 120, "every study's job")
        load = os.getloadavg()[0]
        offset = log_path.stat().st_size if log_path.exists() else 0
        t_warm = time.time()
        node.jobs.start()                         # warm-up (not timed), then the jobs run
        warm = time.time() - t_warm
        cpu0, ours0, t0 = psutil.cpu_times(), _tree_cpu(), time.time()
        rows = _wait(lambda: (r := _jobs(node)) and all(j.finished_at for j in r) and r, 1800, "every job")
        cpu1, ours1, t1 = psutil.cpu_times(), _tree_cpu(), time.time()
    finally:
        node.stop()
        if cluster is not None:
            cluster.close()
    states = {j.state for j in rows}
    assert states == {"done"}, [(j.id, j.state, j.message) for j in rows]
    span = max(j.finished_at for j in rows) - min(j.started_at for j in rows)
    busy = (cpu1.user + cpu1.system + cpu1.nice) - (cpu0.user + cpu0.system + cpu0.nice)
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        logged = [tuple(map(float, m.groups()[1:])) for m in DONE.finditer(f.read())]
    return dict(name=name, workers=n_workers, n=len(rows), span=span, per_min=60.0 * len(rows) / span,
                per_study=statistics.median(j.finished_at - j.started_at for j in rows), warm=warm,
                cpu=busy / ((t1 - t0) * psutil.cpu_count()), load=load, logged=logged,
                ours=(sum(ours1) - sum(ours0)) / (t1 - t0), cpu_per_study=(sum(ours1) - sum(ours0)) / len(rows),
                node_cpu_per_study=(ours1[0] - ours0[0]) / len(rows))


def _tree_cpu() -> tuple[float, float]:
    """CPU seconds used so far by this process (the node: SCP, runner, and the Dask scheduler of a
    LocalCluster) and by its descendants (the worker processes, and the nannies of Dask's).
    """
    me = psutil.Process()
    total = [0.0, 0.0]
    for k, p in enumerate([me, *me.children(recursive=True)]):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total[min(k, 1)] += t.user + t.system
    return total[0], total[1]


def _jobs(node) -> list:
    with node.engine.begin() as conn:
        return conn.execute(select(db.jobs).order_by(db.jobs.c.id)).all()


def _wait(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def report(results: list[dict], library_threads: int) -> None:
    ncpu = psutil.cpu_count()
    threads = f"{library_threads} numba/OpenMP/BLAS thread(s)" if library_threads else "the libraries' default threads"
    print(f"\n{ncpu} CPU(s); load average (1 min) before each run shown; {results[0]['n']} studies; "
          f"worker processes with {threads} (Dask jobs: numba on 1 thread, node.dask_executor)")
    print(f"{'config':8} {'studies/min':>11} {'s/study':>8} {'read':>6} {'analysis':>9} {'store':>6} "
          f"{'dispatch':>8} {'cores ours':>10} {'CPU s/study':>11} {'of it node':>10} {'machine CPU':>11} "
          f"{'load':>5} {'warm-up':>8}")
    for r in results:
        if r["logged"]:
            total, read, analysis, store = (statistics.median(x) for x in zip(*r["logged"], strict=True))
            stages = f"{read:6.1f} {analysis:9.1f} {store:6.1f} {r['per_study'] - total:8.1f}"
        else:
            stages = f"{'-':>6} {'-':>9} {'-':>6} {'-':>8}"
        print(f"{r['name']:8} {r['per_min']:11.2f} {r['per_study']:8.1f} {stages} {r['ours']:10.2f} "
              f"{r['cpu_per_study']:11.1f} {r['node_cpu_per_study']:10.1f} {100 * r['cpu']:10.0f}% "
              f"{r['load']:5.1f} {r['warm']:7.1f}s")
    by = {r["name"]: r for r in results}
    base = by.get("local-1")
    if base and "dask-1" in by:
        d1 = by["dask-1"]
        print(f"\nDask overhead, 1 worker: {d1['per_study'] - base['per_study']:+.1f} s per study "
              f"({100 * (d1['per_study'] / base['per_study'] - 1):+.0f} %); studies/min "
              f"{d1['per_min'] / base['per_min']:.2f}x of local-1")
    if "dask-1" in by and "dask-2" in by:
        ratio = by["dask-2"]["per_min"] / by["dask-1"]["per_min"]
        verdict = "target met" if ratio >= 1.6 else "target (1.6x) NOT met"
        d1, d2 = by["dask-1"], by["dask-2"]
        print(f"2 Dask workers vs 1: {ratio:.2f}x studies/min ({verdict}); cores used by the node and its "
              f"workers {d1['ours']:.2f} -> {d2['ours']:.2f} of {ncpu}; whole machine {100 * d1['cpu']:.0f}% -> "
              f"{100 * d2['cpu']:.0f}% busy")
        print(f"CPU-bound ceiling on {ncpu} free core(s): {60 * ncpu / d2['cpu_per_study']:.2f} studies/min "
              f"({d2['cpu_per_study']:.1f} CPU s per study); with 1 worker, a job used "
              f"{d1['cpu_per_study'] / d1['per_study']:.2f} core(s) while it ran")
    best = max(results, key=lambda r: r["per_min"])
    print(f"\nprojection, {TRIAL:,} studies (300 subjects x 3 visits x 4 regions) at these study sizes: "
          + "; ".join(f"{r['name']} {TRIAL / r['per_min'] / 60:.1f} h" for r in results)
          + f"; per worker of {best['name']}: {best['per_study']:.1f} s/study")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--configs", default="local-1,dask-1,dask-2")
    parser.add_argument("--library-threads", type=int, default=1,
                        help="threads of numba, OpenMP and BLAS in each worker process (NUMBA_NUM_THREADS etc.); "
                             "0: the libraries' defaults (a thread per core)")
    args = parser.parse_args()
    if args.library_threads:   # the worker processes (spawned) inherit them
        for var in LIBRARY_THREADS:
            os.environ[var] = str(args.library_threads)
    names = args.configs.split(",")
    for name in names:
        if not re.fullmatch(r"(local|dask)-[1-9]\d*", name):
            parser.error(f"--configs: {name!r} is not local-N or dask-N")
    with tempfile.TemporaryDirectory(prefix="musclenode-scale-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        studies = make_studies(args.studies, args.slices, work / "studies")
        print(f"{len(studies)} studies of {len(studies[0])} instances written in {time.time() - t0:.0f} s",
              flush=True)
        # what the node and its workers log goes to a file (the workers inherit it): the stages of each job
        log_path = work / "node.log"
        saved = os.dup(2)
        with open(log_path, "ab", buffering=0) as log_file:
            os.dup2(log_file.fileno(), 2)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            for noisy in ("pynetdicom", "distributed", "highdicom"):
                logging.getLogger(noisy).setLevel(logging.WARNING)
            results = []
            try:
                for name in names:
                    r = run(name, studies, work, log_path)
                    print(f"{name}: {r['per_min']:.2f} studies/min ({r['n']} in {r['span']:.0f} s)", flush=True)
                    results.append(r)
            finally:
                os.dup2(saved, 2)
    report(results, args.library_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
