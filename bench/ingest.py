"""Ingest throughput: DCMTK storescu pushes N MR instances over one association to
(a) DCMTK storescp (baseline, writes files, no fsync) and (b) the musclenode SCP (checks,
fsync'd file, database row, then Success). Prints instances/s and the ratio.

    python bench/ingest.py [--n 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, node_config, write_datasets  # noqa: E402

from quant.synthetic.phantom import make_leg_phantom, phantom_datasets  # noqa: E402


def make_files(n: int, folder: Path) -> list[Path]:
    slices = max(1, n // 4)
    ph = make_leg_phantom(shape=(slices, 256, 256), pixel_mm=1.5, snr=40)   # 128 KiB per instance
    return write_datasets(phantom_datasets(ph, uid_seed="bench")[:n], folder)


def push(files, port, aec) -> float:
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))
    return time.perf_counter() - t0


def bench_storescp(files, work: Path) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"))
    time.sleep(0.5)
    try:
        return push(files, port, "STORESCP")
    finally:
        proc.terminate()
        proc.wait()


def bench_node(files, work: Path) -> float:
    from node.service import Node
    config = node_config(work, complete_after=3600)
    with Node(config) as node:
        return push(files, node.port, "MUSCLENODE")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not Path("/usr/bin/storescu").exists():
        print("needs DCMTK (apt-get install dcmtk)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_files(args.n, tmp / "files")
        size_kib = files[0].stat().st_size / 1024
        results = {"DCMTK storescp": [], "musclenode SCP": []}
        for i in range(args.repeat):
            for name, fn in (("DCMTK storescp", bench_storescp), ("musclenode SCP", bench_node)):
                work = tmp / f"{name.split()[0]}-{i}"
                work.mkdir()
                results[name].append(len(files) / fn(files, work))
                shutil.rmtree(work)
    print(f"{len(files)} MR instances of {size_kib:.0f} KiB, one association, loopback, median of {args.repeat}")
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in med.items():
        print(f"  {k:<16} {v:8.0f} instances/s   (runs: {', '.join(f'{x:.0f}' for x in results[k])})")
    print(f"  ratio musclenode / storescp: {med['musclenode SCP'] / med['DCMTK storescp']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
