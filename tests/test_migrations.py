"""Schema migrations (node/migrations, Alembic): the revisions agree with node/db.py, a database made
by the previous release (3c9fd39, frozen in tests/data/db_previous_release.py) upgrades without loss on
SQLite and PostgreSQL, concurrent starts migrate once, and ``musclenode db upgrade|current``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, Table, create_engine, insert, select, text

from node import db, migrations
from node.completion import queue_job
from node.errors import SchemaError
from node.jobs import claim_job
from node.migrations import baseline

ROOT = Path(__file__).resolve().parents[1]
HEAD = "0003"


def _previous_release():
    """node/db.py of the previous release, as a module."""
    spec = importlib.util.spec_from_file_location("db_previous_release", ROOT / "tests/data/db_previous_release.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prev = _previous_release()




@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'musclenode.db'}"
    return request.getfixturevalue("pg_url")


def _default_text(value) -> str | None:
    """A server default as its bare value: ``''::character varying``, ``('')`` and ``''`` -> "", ``true`` -> "1"."""
    if value is None:
        return None
    value = getattr(value, "text", value)          # a TextClause
    value = re.sub(r"::[a-z ]+(\(\d+\))?$", "", str(value)).strip()
    value = value[1:-1] if value.startswith("(") and value.endswith(")") else value   # SQLite: ('')
    value = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value
    return {"true": "1", "false": "0"}.get(value, value)


def _defaults_differ(_ctx, _inspected_col, metadata_col, inspected_default, _metadata_default, _rendered) -> bool:
    metadata_default = metadata_col.server_default.arg if metadata_col.server_default is not None else None
    return _default_text(inspected_default) != _default_text(metadata_default)


def differences(engine, target: MetaData) -> list:
    """What Alembic's autogenerate finds between the database and ``target``: tables, columns, types,
    nullability, server defaults, indexes, unique constraints and foreign keys.
    """
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": _defaults_differ})
        return compare_metadata(ctx, target)


def rows_of(engine, metadata: MetaData) -> dict[str, list[dict]]:
    """Every row of every table of ``metadata``, by table, in id order (only that metadata's columns)."""
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(select(t).order_by(t.c.id))]
                for t in metadata.sorted_tables}


def fill_previous_release(engine) -> None:
    """Rows a node of the previous release holds after a visit was processed and sent (every table)."""
    t0 = 1_780_000_000.0
    study, sop = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.1.{}"
    with engine.begin() as conn:
        conn.execute(insert(prev.studies).values(
            study_uid=study, subject_key="patient::T-0001", study_date="20260110", state="done", revision=1,
            n_instances=2, first_received_at=t0, last_received_at=t0 + 3.5, message="processed",
            time_point="baseline"))
        for i in (1, 2):
            conn.execute(insert(prev.instances).values(
                sop_uid=sop.format(i), study_uid=study, series_uid=f"{study}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                path=f"/data/store/{study}/{i}.dcm", size=123_456 + i, received_at=t0 + i, calling_ae="SCANNER1",
                header='{"kind": "water"}', echo_times="2.3;3.45", images_in_acquisition=8, echo_train_length=2,
                temporal_positions=1, echo_number=i, temporal_position=1, slice_key="0.0;0.0;12.5", n_frames=1))
        conn.execute(insert(prev.quarantine).values(path="/data/quarantine/x.dcm", reason="no Pixel Data",
                                                    sop_uid="1.2.3.9", study_uid=study, received_at=t0 + 1,
                                                    calling_ae="SCANNER1"))
        conn.execute(insert(prev.series).values(study_uid=study, series_uid=f"{study}.1", kind="water",
                                                reason="Dixon water image", description="DIXON_W"))
        job = conn.execute(insert(prev.jobs).values(
            study_uid=study, revision=1, state="done", attempts=1, lease_until=t0 + 400, created_at=t0 + 10,
            started_at=t0 + 11, finished_at=t0 + 95.25, message="2 outputs")).inserted_primary_key[0]
        conn.execute(insert(prev.measurements).values(
            subject_key="patient::T-0001", study_uid=study, study_date="20260110", region="thigh", side="left",
            metric="ff_percent", value=6.125, unit="%", algorithm_version="0.9.0", model="dixon-2pt", job_id=job,
            roi="vastus_lateralis", source="reader"))
        conn.execute(insert(prev.pacs_history).values(
            subject_key="patient::T-0001", study_uid="1.2.3.4.0", study_date="20250101", region="thigh",
            side="right", metric="csa_mm2", value=10234.5, unit="mm2", algorithm_version="0.8.0", roi="",
            source="", sr_uid="1.2.3.4.0.9", destination="PACS", fetched_at=t0 - 50))
        conn.execute(insert(prev.tokens).values(name="coordinator-1", role="coordinator", token_hash="ab" * 32,
                                                created_at=t0 - 100, revoked_at=None))
        conn.execute(insert(prev.scores).values(subject_key="patient::T-0001", study_uid=study, name="alsfrs_r",
                                                value=41.0, unit="points", uploaded_at=t0 + 200))
        conn.execute(insert(prev.subject_groups).values(subject_key="patient::T-0001", name="arm A"))
        conn.execute(insert(prev.roi_sets).values(subject_key="patient::T-0001", region="thigh", study_uid=study,
                                                  study_date="20260110", seg_sop_uid="1.2.3.7", n_rois=5,
                                                  path="/data/rois/1.2.3.7.npz", created_at=t0 + 5))
        conn.execute(insert(prev.study_rois).values(study_uid=study, source="carried", seg_sop_uid="1.2.3.7",
                                                    n_rois=5, dice=0.93, mismatch=0.07, needs_review=True,
                                                    updated_at=t0 + 90))
        output = conn.execute(insert(prev.outputs).values(
            study_uid=study, kind="sr", sop_uid="1.2.3.8", path="/data/outputs/sr-1.2.3.8.dcm", job_id=job,
            created_at=t0 + 94)).inserted_primary_key[0]
        conn.execute(insert(prev.outbox).values(output_id=output, destination="PACS", state="sent", attempts=2,
                                                next_try_at=t0 + 120, last_error="", sent_at=t0 + 121.5))
        conn.execute(insert(prev.outbox).values(output_id=output, destination="RESEARCH", state="pending", attempts=3,
                                                next_try_at=t0 + 900, last_error="association rejected",
                                                sent_at=None))
        prev.record_audit(conn, "study-received", f"{study} from SCANNER1")


def test_head_is_the_newest_revision():
    assert migrations.head() == HEAD
    assert [s.revision for s in migrations.script_directory().walk_revisions()] == ["0003", "0002", "0001"]


def test_empty_database_upgrades_to_head_and_matches_node_db(url):
    """The drift guard: node/db.py changed without a migration (or a migration without node/db.py) fails here."""
    engine = db.make_engine(url)
    assert migrations.current(engine) == HEAD
    assert differences(engine, db.metadata) == []
    with engine.connect() as conn:
        audit = conn.execute(select(db.audit.c.event, db.audit.c.detail)).all()
    assert [tuple(a) for a in audit] == [("schema-upgraded", f"empty -> {HEAD}")]
    assert db.make_engine(url) is not None and migrations.current(engine) == HEAD   # a second start changes nothing
    with engine.connect() as conn:
        assert conn.execute(select(db.audit)).all().__len__() == 1


def test_baseline_revision_is_the_previous_release_schema(url):
    """Revision 0001 creates exactly what the previous release's create_all made (and the frozen baseline)."""
    engine = db.make_engine(url, migrate=False)
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), migrations.BASELINE)
    assert migrations.current(engine) == "0001"
    assert differences(engine, prev.metadata) == []
    assert differences(engine, baseline.metadata) == []


def test_sqlite_pragmas_still_apply(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'n.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2   # FULL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000


def test_previous_release_database_upgrades_without_loss(url):
    old = prev.make_engine(url)
    fill_previous_release(old)
    before = rows_of(old, prev.metadata)
    old.dispose()
    assert sum(len(r) for r in before.values()) == 17 and all(before.values())   # every table

    engine = db.make_engine(url)    # the node's start
    assert migrations.current(engine) == HEAD
    assert differences(engine, db.metadata) == []
    after = rows_of(engine, db.metadata)
    for name, rows in before.items():
        assert len(after[name]) == len(rows) + (name == "audit"), name   # the upgrade is audited
        assert [{k: r[k] for k in rows[0]} for r in after[name][:len(rows)]] == rows, name
    jobs = [(j["claimed_by"], j["trigger"], j["send"], j["version_note"]) for j in after["jobs"]]
    assert jobs == [("", "", True, "")]
    assert [(o["claimed_until"], o["claimed_by"]) for o in after["outbox"]] == [(0.0, ""), (0.0, "")]
    assert [(a["event"], a["detail"]) for a in after["audit"][1:]] == [("schema-upgraded", f"before Alembic -> {HEAD}")]

    # the node works on it: a re-completed study queues revision 2, which is claimed
    study = before["studies"][0]["study_uid"]
    with engine.begin() as conn:
        job_id = queue_job(conn, study, 2, time.time())
    claimed = claim_job(engine, lease_seconds=60)
    assert claimed is not None and claimed[0] == job_id
    with engine.connect() as conn:
        job = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).one()
    assert (job.state, job.attempts, job.send, job.trigger) == ("running", 1, True, "")


def test_database_from_before_the_baseline_is_adopted(tmp_path):
    """An older database (tables without the columns earlier versions added at start, tables missing) gains
    them with their defaults, as the earlier node did, then upgrades.
    """
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine0 = create_engine(url)
    older = ("studies", "instances", "quarantine", "series", "jobs", "measurements", "outputs", "outbox", "audit")
    prev.metadata.create_all(engine0, tables=[prev.metadata.tables[name] for name in older])  # no ROI sets, web
    with engine0.begin() as conn:
        for name in older:   # the columns that came later, with a server default
            for col in prev.metadata.tables[name].columns:
                if col.server_default is not None:
                    conn.execute(text(f"ALTER TABLE {name} DROP COLUMN {col.name}"))
        conn.execute(text("DROP INDEX ix_jobs_state"))
        conn.execute(insert(Table("instances", MetaData(), autoload_with=conn)).values(
            sop_uid="1.2.3.1", study_uid="1.2.3", series_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            path="/x.dcm", size=10, received_at=5.0, calling_ae="SCANNER1"))
    engine0.dispose()

    engine = db.make_engine(url)
    assert migrations.current(engine) == HEAD
    assert differences(engine, db.metadata) == []   # missing tables created with their indexes, columns added
    with engine.connect() as conn:
        row = conn.execute(select(db.instances)).one()
    assert (row.sop_uid, row.header, row.echo_times, row.images_in_acquisition, row.n_frames) == ("1.2.3.1", "", "",
                                                                                                  0, 1)


def test_database_with_other_tables_only_is_treated_as_empty(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with create_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE other_app (id INTEGER PRIMARY KEY)"))
    result = migrations.upgrade(db.make_engine(url, migrate=False))
    assert result == (None, HEAD, False)
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(db.audit.c.detail)).scalars().all() == [f"empty -> {HEAD}"]
        assert conn.execute(text("SELECT count(*) FROM other_app")).scalar() == 0   # left alone


def test_missing_column_without_default_is_an_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    with create_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE tokens (id INTEGER PRIMARY KEY, name VARCHAR(64) NOT NULL)"))
    with pytest.raises(SchemaError, match="tokens lacks column role, which has no default"):
        db.make_engine(url)


def test_newer_revision_is_refused(url, tmp_path):
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(SchemaError, match=f"revision 0099, which this version of musclenode does not know "
                                          f"\\(its newest is {HEAD}\\)"):
        db.make_engine(url)
    cfg = _config(tmp_path, url)
    r = cli(cfg, "db", "upgrade")
    assert r.returncode == 2 and "revision 0099" in r.stderr and "Traceback" not in r.stderr
    r = cli(cfg, "db", "current")
    assert (r.returncode, r.stdout) == (0, f"0099 (unknown to this version, whose head is {HEAD}: a newer version "
                                           "made it)\n")
    assert migrations.current(engine) == "0099"


def _start_together(url: str, n: int) -> list[subprocess.CompletedProcess]:
    """``n`` processes that open ``url`` with make_engine at the same moment."""
    at = time.time() + 4.0    # after every interpreter has imported the node
    code = ("import sys, time; from node import db; time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
            "db.make_engine(sys.argv[1])")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(at)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), "", p.stderr.read() if p.stderr else "")
            for p in procs]


@pytest.mark.slow
def test_concurrent_starts_migrate_once(url):
    done = _start_together(url, 3)
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr[-2000:] for d in done]
    engine = db.make_engine(url)
    assert migrations.current(engine) == HEAD
    with engine.connect() as conn:
        assert conn.execute(select(db.audit.c.event)).scalars().all() == ["schema-upgraded"]


@pytest.mark.slow
def test_concurrent_starts_on_a_previous_release_database(url):
    fill_previous_release(prev.make_engine(url))
    done = _start_together(url, 3)
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr[-2000:] for d in done]
    engine = db.make_engine(url)
    with engine.connect() as conn:
        events = conn.execute(select(db.audit.c.event).order_by(db.audit.c.id)).scalars().all()
        assert conn.execute(select(db.outbox)).all().__len__() == 2
    assert events == ["study-received", "schema-upgraded"]


def _config(tmp_path: Path, url: str) -> Path:
    cfg = tmp_path / "musclenode.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "node-data"}"\n\n[database]\nurl = "{url}"\n')
    return cfg


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_db_upgrade_and_current_commands(url, tmp_path):
    fill_previous_release(prev.make_engine(url))
    cfg = _config(tmp_path, url)
    r = cli(cfg, "db", "current")
    assert r.returncode == 0 and r.stdout == f"none (empty, or made before schema migrations) (head is {HEAD}: " \
                                             "musclenode db upgrade, or the node at start, upgrades)\n"
    r = cli(cfg, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"database schema upgraded from 0001 (adopted: made before schema migrations) to {HEAD}\n"
    r = cli(cfg, "db", "current")
    assert (r.returncode, r.stdout) == (0, f"{HEAD} (head)\n")
    r = cli(cfg, "db", "upgrade")
    assert (r.returncode, r.stdout) == (0, f"database schema already at {HEAD} (head)\n")
    engine = db.make_engine(url, migrate=False)
    assert rows_of(engine, db.metadata)["outbox"][1]["last_error"] == "association rejected"


def test_db_upgrade_of_an_older_revision(tmp_path):
    url = f"sqlite:///{tmp_path / 'n.db'}"
    engine = db.make_engine(url, migrate=False)
    with engine.begin() as conn:
        command.upgrade(migrations.alembic_config(conn), "0001")
    r = cli(_config(tmp_path, url), "db", "upgrade")
    assert (r.returncode, r.stdout) == (0, f"database schema upgraded from 0001 to {HEAD}\n"), r.stderr
