"""Baseline: the schema of the last release before Alembic (commit 3c9fd39).

A new database gets these tables, those of the frozen baseline (:mod:`node.migrations.baseline`,
the one copy of that schema the node keeps); a database that release made (tables, no
``alembic_version``) is stamped with this revision instead (:func:`node.migrations.upgrade`).
tests/test_migrations.py checks it against that release's own db.py. Never edit this file
to follow node/db.py: a change to the schema is a new revision.

Revision ID: 0001
Revises:
"""

from alembic import op

from node.migrations import baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the tables of the baseline schema."""
    baseline.metadata.create_all(op.get_bind())


def downgrade() -> None:
    """Drop every table (the node keeps no downgrade path below its first managed schema)."""
    baseline.metadata.drop_all(op.get_bind())
