"""Ingest throughput: DCMTK ``storescu`` pushes the same N MR instances over loopback
(``TCP_NODELAY=1``) to three receivers, in one run, and prints instances per second and
the ratios:

- DCMTK ``storescp`` (writes each file, no fsync),
- Orthanc (Debian's package, a throwaway one with its own config and storage),
- the musclenode SCP (header checked, appended to the ingest journal and synced, then Success; the
  file and its row follow, in groups), with its default 256 MiB journal,
- the same with ``journal_mb = 0`` (the file fsync'd and renamed into place, its row committed, then
  Success: the node before the journal),

each on one association (one ``storescu``) and on four parallel associations (four
``storescu`` processes, each sending a quarter). Then the node once more while it
quantifies a study: a demo thigh exam is pushed first, its job (executor ``process``) starts
at once by the protocol rule, and the N instances are pushed while it runs.

    python bench/ingest.py [--n 500] [--repeat 3]

Each figure is the median of ``--repeat`` runs; the receivers alternate within each run, so
that the load of a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Orthanc, free_port, node_config, write_datasets  # noqa: E402

from quant.synthetic.exam import exam_datasets  # noqa: E402
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets  # noqa: E402

STORESCU = "/usr/bin/storescu"
ENV = dict(os.environ, TCP_NODELAY="1")


def make_files(n: int, folder: Path) -> list[Path]:
    """``n`` Dixon MR instances of 256 x 256 (128 KiB each) written to ``folder``."""
    slices = max(1, -(-n // 4))
    ph = make_leg_phantom(shape=(slices, 256, 256), pixel_mm=1.5, snr=40)
    return write_datasets(phantom_datasets(ph, uid_seed="bench")[:n], folder)


def push(files: list[Path], port: int, aec: str, associations: int = 1) -> float:
    """Seconds to push ``files`` to ``port`` with ``associations`` parallel ``storescu`` processes."""
    parts = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", aec, "127.0.0.1", str(port), *map(str, part)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV) for part in parts]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - t0
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0 or b"E:" in err:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err.decode(errors='replace')[-500:]}")
    return elapsed


def bench_storescp(files: list[Path], work: Path, associations: int) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), "-aet", "STORESCP", str(port)], env=ENV)
    time.sleep(0.5)
    try:
        return push(files, port, "STORESCP", associations)
    finally:
        proc.terminate()
        proc.wait()


def bench_orthanc(files: list[Path], work: Path, associations: int) -> float:
    orthanc = Orthanc(work / "orthanc").start()
    try:
        return push(files, orthanc.dicom_port, "ORTHANC", associations)
    finally:
        orthanc.stop()


def _config(work: Path, journal_mb: int, **kw):
    """The tests' node configuration with the ingest journal of ``journal_mb`` (the default's, 256 MiB, or 0)."""
    import dataclasses
    config = node_config(work, **kw)
    return dataclasses.replace(config, node=dataclasses.replace(config.node, journal_mb=journal_mb))


#: CPU seconds per instance of the last :func:`bench_node` run: (the node, the storescu senders).
CPU_PER_INSTANCE: dict[tuple[int, int], list[tuple[float, float]]] = {}


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) so far of this process (the node runs in it) and of its
    children that have ended (the storescu senders)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def bench_node(files: list[Path], work: Path, associations: int, journal_mb: int = 256) -> float:
    from node.service import Node
    with Node(_config(work, journal_mb, complete_after=3600)) as node:
        before = _cpu()
        elapsed = push(files, node.port, "MUSCLENODE", associations)
        after = _cpu()
        _check_stored(node, len(files))
        CPU_PER_INSTANCE.setdefault((journal_mb, associations), []).append(
            ((after[0] - before[0]) / len(files), (after[1] - before[1]) / len(files)))
        return elapsed


def bench_node_unjournalled(files: list[Path], work: Path, associations: int) -> float:
    """The node with ``journal_mb = 0``: each instance's file fsync'd and its row committed before Success."""
    return bench_node(files, work, associations, journal_mb=0)


def _check_stored(node, n: int) -> None:
    from sqlalchemy import func, select

    from node import db
    with node.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(db.instances)).scalar_one()
    if rows < n:
        raise RuntimeError(f"the node recorded {rows} of {n} instances")


def durable_write_seconds(files: list[Path], work: Path) -> float:
    """Seconds per instance of the node's durable write alone (temporary file, fsync, rename, folder
    fsync: :func:`node.store.durable_write`) of ``files``, one after the other. On one association
    each C-STORE waits for its own write before Success, so one over this is the most any receiver
    that acknowledges after a durable write reaches on this disk.
    """
    from node.store import durable_write
    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        durable_write(work / "store" / f"{i}.dcm", blob, work / "tmp")
    return (time.perf_counter() - t0) / len(blobs)


def journal_append_seconds(files: list[Path], work: Path) -> float:
    """Seconds per instance of the node's durable write as it is now: one record appended to
    the ingest journal (CRC-32, ``pwritev`` over blocks already written) and ``fdatasync``
    (:meth:`node.ingest.Journal.append`), one after the other, as on one association.
    """
    from node.ingest import Journal
    blobs = [f.read_bytes() for f in files]
    journal = Journal.create(work / "journal", 128 << 20)
    try:
        t0 = time.perf_counter()
        for i, blob in enumerate(blobs):
            journal.append(f"store/{i}.dcm", blob, lambda half: half)  # type: ignore[arg-type, return-value]
        return (time.perf_counter() - t0) / len(blobs)
    finally:
        journal.close()


def bench_node_during_job(files: list[Path], work: Path, associations: int) -> tuple[float, str]:
    """Push ``files`` while the node quantifies a demo exam; returns the seconds and how the
    job overlapped the push.
    """
    from sqlalchemy import select

    from node import db
    from node.demo import THIGH_PROTOCOL
    from node.demo_peers import push as push_datasets
    from node.service import Node
    config = _config(work, 256, executor="process", complete_after=3600, protocols=(THIGH_PROTOCOL,))
    ph = make_leg_phantom(muscle_ff=0.08, snr=40, seed=5, supersample=3, bias_field=0.3, fascia_mm=1.0)
    exam = exam_datasets(ph, patient_id="BENCH-JOB", study_date="20260110", uid_seed="bench-job")
    with Node(config) as node:
        statuses = push_datasets(exam, "127.0.0.1", node.port, called_ae="MUSCLENODE")
        if any(s != 0 for s in statuses):
            raise RuntimeError("the job's exam was not accepted")
        end = time.time() + 60
        while time.time() < end:   # the protocol rule queues the job once its series are complete
            with node.engine.connect() as conn:
                state = conn.execute(select(db.jobs.c.state)).scalar()
            if state == db.JobState.RUNNING:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("the job did not start")
        t0 = time.time()
        elapsed = push(files, node.port, "MUSCLENODE", associations)
        t1 = time.time()
        _check_stored(node, len(files) + len(exam))
        while time.time() < end + 120:
            with node.engine.connect() as conn:
                job = conn.execute(select(db.jobs.c.state, db.jobs.c.finished_at)).first()
            if job is not None and job.finished_at is not None:
                break
            time.sleep(0.1)
        finished = job.finished_at if job is not None and job.finished_at else float("inf")
        overlap = "job ran during the whole push" if finished >= t1 else \
            f"job ended {t1 - finished:.1f} s before the push ({(finished - t0) / (t1 - t0):.0%} overlap)"
        return elapsed, overlap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="instances pushed (default 500)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the medians are printed (default 3)")
    ap.add_argument("--no-job", action="store_true", help="skip the measurement during a job")
    args = ap.parse_args()
    if not Path(STORESCU).exists() or not (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists()):
        print("needs DCMTK and Orthanc (apt-get install dcmtk orthanc)")
        return 1
    receivers: dict[str, Callable[[list[Path], Path, int], float]] = {
        "DCMTK storescp": bench_storescp, "Orthanc": bench_orthanc, "musclenode": bench_node,
        "node, no journal": bench_node_unjournalled}
    results: dict[tuple[str, int], list[float]] = {}
    during: list[float] = []
    overlaps: list[str] = []
    writes: list[float] = []
    appends: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = make_files(args.n, tmp / "files")
        size_kib = files[0].stat().st_size / 1024
        for i in range(args.repeat):
            for associations in (1, 4):
                for name, fn in receivers.items():
                    work = tmp / f"run-{i}-{associations}-{name.split()[-1]}"
                    results.setdefault((name, associations), []).append(len(files) / fn(files, work, associations))
                    shutil.rmtree(work, ignore_errors=True)
            writes.append(durable_write_seconds(files, tmp / f"run-{i}-fsync"))
            shutil.rmtree(tmp / f"run-{i}-fsync", ignore_errors=True)
            appends.append(journal_append_seconds(files, tmp / f"run-{i}-journal"))
            shutil.rmtree(tmp / f"run-{i}-journal", ignore_errors=True)
            if not args.no_job:
                work = tmp / f"run-{i}-job"
                elapsed, overlap = bench_node_during_job(files, work, 1)
                during.append(len(files) / elapsed)
                overlaps.append(overlap)
                shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{len(files)} MR instances of {size_kib:.0f} KiB, loopback, TCP_NODELAY=1, median of {args.repeat} runs "
          f"(instances/s)")
    for associations in (1, 4):
        print(f"{associations} association{'s' if associations > 1 else ''}:")
        for name in receivers:
            runs = ", ".join(f"{x:.0f}" for x in results[(name, associations)])
            print(f"  {name:<16} {med[(name, associations)]:7.0f}   (runs: {runs})")
    node1, node4 = med[("musclenode", 1)], med[("musclenode", 4)]
    print("ratios:")
    for associations in (1, 4):
        ours = med[("musclenode", associations)]
        print(f"  {associations} assoc.: musclenode / Orthanc {ours / med[('Orthanc', associations)]:.2f}, "
              f"musclenode / storescp {ours / med[('DCMTK storescp', associations)]:.2f}"
              + ("   (targets on one association: >= 1.5 and >= 0.5)" if associations == 1 else ""))
    print(f"  musclenode 4 associations / 1 association: {node4 / node1:.2f} (target >= 2.5)")
    cores = len(os.sched_getaffinity(0))
    for associations in (1, 4):
        cpu = CPU_PER_INSTANCE[(256, associations)]
        node_cpu = statistics.median(c[0] for c in cpu)
        sender_cpu = statistics.median(c[1] for c in cpu)
        ceiling = cores / (node_cpu + sender_cpu)
        print(f"  CPU per instance, {associations} assoc.: node {node_cpu * 1e3:.2f} ms, "
              f"storescu {sender_cpu * 1e3:.2f} ms; all {cores} cores busy at that cost: at most {ceiling:.0f}/s "
              f"= {ceiling / node1:.2f} x the node on 1 association (on this machine, senders included)")
    for associations in (1, 4):
        print(f"  {associations} assoc.: journal / no journal (the node before it): "
              f"{med[('musclenode', associations)] / med[('node, no journal', associations)]:.2f}")
    write, append = statistics.median(writes), statistics.median(appends)
    print(f"durable write alone, one after the other, on this disk (the most one association can reach when each "
          f"instance waits for its own):\n"
          f"  a file (tmp file, fsync, rename, folder fsync; journal_mb = 0): {write * 1e3:.2f} ms "
          f"(runs: {', '.join(f'{x * 1e3:.2f}' for x in writes)}), at most {1 / write:.0f}/s\n"
          f"  a journal record (CRC-32, pwritev, fdatasync): {append * 1e3:.2f} ms "
          f"(runs: {', '.join(f'{x * 1e3:.2f}' for x in appends)}), at most {1 / append:.0f}/s = "
          f"{1 / append / med[('Orthanc', 1)]:.2f} x Orthanc, "
          f"{1 / append / med[('DCMTK storescp', 1)]:.2f} x storescp; "
          f"musclenode reaches {node1 * append:.0%} of it")
    if during:
        d = statistics.median(during)
        print(f"  musclenode on 1 association while a job runs: {d:.0f} instances/s "
              f"(runs: {', '.join(f'{x:.0f}' for x in during)}; {'; '.join(overlaps)}); "
              f"/ without a job: {d / node1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
