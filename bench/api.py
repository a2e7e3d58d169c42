"""Speed of the coordinators' web API on a synthetic trial (issue 11's targets).

Fills a database with 300 subjects x 3 visits x 4 regions x 2 sides x 8 metrics, plus the
automatic compartments of thigh and calf (node/web/demo_trial.py), then times through the
real FastAPI application (in-process, httpx's ASGI transport): the subject list, one
subject's timeline, the stats of one metric, and the full CSV export. SQLite always;
PostgreSQL too when a server answers on 127.0.0.1:5432 (trust auth).

Targets: list and timeline under 200 ms, stats under 1 s, full export under 10 s.

    python bench/api.py [--subjects 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(url: str, data_dir: Path, n_subjects: int, repeat: int) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from node import db
    from node.web.app import create_app
    from node.web.demo_trial import fill_trial
    from node.web.tokens import create_token

    engine = db.make_engine(url)
    t0 = time.perf_counter()
    n_rows = fill_trial(engine, n_subjects)
    fill = time.perf_counter() - t0
    token = create_token(engine, f"bench-{time.time_ns()}", "coordinator")
    client = TestClient(create_app(engine, data_dir), headers={"Authorization": f"Bearer {token}"})
    subjects = client.get("/api/v1/subjects").json()
    one = subjects[len(subjects) // 2]["subject"]
    out = {"rows": float(n_rows), "fill_s": fill}
    out["list_ms"] = 1000 * _time(lambda: client.get("/api/v1/subjects").raise_for_status(), repeat)
    out["timeline_ms"] = 1000 * _time(lambda: client.get(f"/api/v1/subjects/{one}").raise_for_status(), repeat)
    stats = client.get("/api/v1/stats", params={"metric": "frma_mm2", "region": "thigh", "side": "right"})
    if stats.status_code == 200:
        out["stats_ms"] = 1000 * _time(lambda: client.get("/api/v1/stats", params={
            "metric": "frma_mm2", "region": "thigh", "side": "right"}).raise_for_status(), repeat)
    out["export_s"] = _time(lambda: client.get("/api/v1/measurements", params={"format": "csv"}).raise_for_status(),
                            max(1, repeat // 2))
    engine.dispose()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=300)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    targets = {"list_ms": 200.0, "timeline_ms": 200.0, "stats_ms": 1000.0, "export_s": 10.0}
    work = Path(tempfile.mkdtemp(prefix="musclenode-bench-api-"))
    runs = {"sqlite": f"sqlite:///{work / 'api.db'}"}
    try:
        import psycopg
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True,
                             connect_timeout=3) as conn:
            conn.execute("DROP DATABASE IF EXISTS musclenode_bench_api")
            conn.execute("CREATE DATABASE musclenode_bench_api")
        runs["postgresql"] = "postgresql+psycopg://postgres@127.0.0.1:5432/musclenode_bench_api"
    except Exception as exc:   # no server: SQLite only
        print(f"PostgreSQL not used: {exc}")
    for name, url in runs.items():
        r = bench(url, work, args.subjects, args.repeat)
        print(f"{name}: {int(r['rows'])} measurement rows ({args.subjects} subjects; filled in {r['fill_s']:.1f} s)")
        for key, target in targets.items():
            if key not in r:
                print(f"  {key:<12} not available")
                continue
            ok = "met" if r[key] <= target else "NOT met"
            print(f"  {key:<12} {r[key]:9.1f}  (target {target:g}: {ok}; ratio to target {r[key] / target:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
