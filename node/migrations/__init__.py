"""Schema migrations of the node's database (Alembic), applied when the node opens its database.

The revisions are in ``versions/`` (shipped with the package); Alembic is configured here in code,
no ``alembic.ini``. :func:`upgrade` brings a database to the newest revision ("head"):

- an empty database gets every revision from the baseline (0001) on;
- a database an earlier version made, before Alembic (its tables but no ``alembic_version``), is adopted:
  the baseline tables, indexes and columns it lacks are added (columns with their server defaults, as
  earlier versions did at start), it is stamped 0001, and the later revisions run;
- a database at a revision this version does not know (made by a newer version) raises
  :class:`node.errors.SchemaError` naming both revisions; nothing is changed.

Two nodes starting on one database do not migrate at once: the upgrade runs in one transaction that
holds a PostgreSQL advisory lock (``pg_advisory_xact_lock``) or, on SQLite, the write lock
(``BEGIN IMMEDIATE``); the second node finds the schema at head when it gets the lock.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import NamedTuple

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from sqlalchemy import Column, inspect, text
from sqlalchemy.engine import Connection, Engine

from .. import db
from ..errors import SchemaError
from . import baseline

log = logging.getLogger(__name__)

#: The folder with env.py and versions/.
SCRIPT_LOCATION = Path(__file__).resolve().parent

#: The revision whose schema is that of the last release before Alembic (commit 3c9fd39).
BASELINE = "0001"

#: Key of the PostgreSQL advisory lock held while migrating (any fixed 64-bit number; "mnschema").
ADVISORY_LOCK_KEY = 0x6D6E736368656D61


class UpgradeResult(NamedTuple):
    """What :func:`upgrade` did: the revision before (None: empty, or adopted from before Alembic),
    the revision after (head), and whether a database from before Alembic was adopted.
    """

    before: str | None
    after: str
    adopted: bool


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration of the node's migrations, bound to ``connection`` (env.py runs on it)."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    """The node's revisions (read once per process)."""
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this version knows, e.g. ``"0002"``."""
    rev = script_directory().get_current_head()
    assert rev is not None, "node/migrations/versions holds no revision"
    return rev


def current(engine: Engine) -> str | None:
    """The database's revision; None when it has no ``alembic_version`` (empty, or before Alembic)."""
    with engine.connect() as conn:
        return _current(conn)


def _current(conn: Connection) -> str | None:
    heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) > 1:
        raise SchemaError(f"database has several schema revisions {', '.join(heads)}; this version "
                          f"knows one line of revisions up to {head()}")
    return heads[0] if heads else None


def upgrade(engine: Engine) -> UpgradeResult:
    """Bring the database of ``engine`` to :func:`head`; see the module's description.

    Returns
    -------
    UpgradeResult
        The revisions before and after; ``before == after`` when there was nothing to do.

    Raises
    ------
    node.errors.SchemaError
        The database is at a revision this version does not know (a newer version made it), or an
        earlier version's table lacks a baseline column that has no default.
    """
    target = head()
    with engine.connect() as conn:   # the common case, without taking a lock
        before = _current(conn)
    if before == target:
        return UpgradeResult(before, target, adopted=False)
    with engine.connect() as conn:
        _lock(conn)
        before = _current(conn)   # again: another node may have migrated meanwhile
        _check_known(before, target)
        adopted = False
        if before is None and set(baseline.metadata.tables) & set(inspect(conn).get_table_names()):
            _adopt(conn)
            MigrationContext.configure(conn).stamp(script_directory(), BASELINE)
            adopted = True
        if before != target:
            command.upgrade(alembic_config(conn), "head")
            db.record_audit(conn, "schema-upgraded",
                            f"{'before Alembic' if adopted else before or 'empty'} -> {target}")
            log.info("database schema upgraded from %s to %s",
                     "the schema before Alembic" if adopted else before or "an empty database", target)
        conn.commit()
    return UpgradeResult(BASELINE if adopted else before, target, adopted)


def _lock(conn: Connection) -> None:
    """Hold off other nodes' migrations until this connection's transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")   # the write lock, waited for up to busy_timeout


def known(revision: str) -> bool:
    """Whether this version has ``revision`` (a database made by a newer version may be at one it has not)."""
    return revision in {s.revision for s in script_directory().walk_revisions()}


def _check_known(revision: str | None, target: str) -> None:
    if revision is not None and not known(revision):
        raise SchemaError(f"database schema is at revision {revision}, which this version of musclenode does not "
                          f"know (its newest is {target}): a newer version made it; run that version or a newer one")


def _adopt(conn: Connection) -> None:
    """Give a database from before Alembic the baseline's tables, columns and indexes it lacks.

    Earlier versions created missing tables and added missing columns (each with a server default)
    at start; this does the same against the frozen baseline, so the database then matches 0001.
    """
    found = inspect(conn)
    have = set(found.get_table_names())
    baseline.metadata.create_all(conn, checkfirst=True)
    ops = Operations(MigrationContext.configure(conn))
    for table in baseline.metadata.sorted_tables:
        if table.name not in have:
            continue
        columns = {c["name"] for c in found.get_columns(table.name)}
        for col in table.columns:
            if col.name in columns:
                continue
            if col.server_default is None:
                raise SchemaError(f"database table {table.name} lacks column {col.name}, which has no default")
            ops.add_column(table.name, Column(col.name, col.type, nullable=col.nullable,
                                              server_default=col.server_default.arg))  # type: ignore[attr-defined]
            log.info("database table %s: added column %s of the baseline schema", table.name, col.name)
        indexes = {i["name"] for i in found.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)
