"""Reprocessing a trial (issue 14): jobs.algorithm_version, the algorithm version a job ran with
("" for a job of an earlier revision, whose version ``musclenode reprocess`` reads from the
study's measurements instead).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the column (with a default: no table rebuild on SQLite)."""
    op.add_column("jobs", sa.Column("algorithm_version", sa.String(length=64), server_default="", nullable=False))


def downgrade() -> None:
    """Drop the column (SQLite rebuilds the table in batch mode)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("algorithm_version")
