"""The same node on PostgreSQL (127.0.0.1:5432, trust auth) instead of SQLite."""


import pytest
from conftest import node_config, wait_until
from sqlalchemy import select

from node import db
from node.demo_peers import push

psycopg = pytest.importorskip("psycopg")




@pytest.mark.postgres
def test_study_processed_on_postgres(make_node, thigh_visits, tmp_path, pg_url):
    (phantom, datasets), _ = thigh_visits
    node = make_node(node_config(tmp_path, database_url=pg_url))
    assert node.engine.dialect.name == "postgresql"
    assert all(s == 0 for s in push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE"))
    # a duplicate push changes nothing
    assert all(s == 0 for s in push(datasets[:3], "127.0.0.1", node.port, called_ae="MUSCLENODE"))

    def measured():
        with node.engine.begin() as conn:
            return conn.execute(select(db.measurements)).all()
    rows = wait_until(measured, timeout=120, what="measurements in PostgreSQL")
    with node.engine.begin() as conn:
        study = conn.execute(select(db.studies)).one()
        job = conn.execute(select(db.jobs)).one()
    assert study.n_instances == len(datasets) and study.state == "done" and job.state == "done"
    got = {(r.side, r.metric): r.value for r in rows if not r.roi}
    for (side, metric), truth in phantom.truth.items():
        if metric == "ff_percent":
            assert abs(got[(side.value, metric)] - truth) < 1.0
        else:
            assert got[(side.value, metric)] == pytest.approx(truth, rel=0.03)
