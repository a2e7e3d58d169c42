"""Several nodes on one database and reprocessing (issue 14): jobs.claimed_by, trigger, send,
version_note; outbox.claimed_until, claimed_by. Each has a server default, so the rows already
there stay valid (a job of the previous release was triggered by a completed study and sends).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

#: (table, column) added here.
COLUMNS: tuple[tuple[str, sa.Column], ...] = (
    ("jobs", sa.Column("claimed_by", sa.String(length=128), server_default="", nullable=False)),
    ("jobs", sa.Column("trigger", sa.String(length=16), server_default="", nullable=False)),
    ("jobs", sa.Column("send", sa.Boolean(), server_default="1", nullable=False)),
    ("jobs", sa.Column("version_note", sa.Text(), server_default="", nullable=False)),
    ("outbox", sa.Column("claimed_until", sa.Float(), server_default="0", nullable=False)),
    ("outbox", sa.Column("claimed_by", sa.String(length=128), server_default="", nullable=False)),
)


def upgrade() -> None:
    """Add the columns (ADD COLUMN with a default needs no table rebuild on SQLite). A database
    made by the development code between the baseline and Alembic may have some already: those
    are kept as they are.
    """
    found = sa.inspect(op.get_bind())
    for table, column in COLUMNS:
        if column.name not in {c["name"] for c in found.get_columns(table)}:
            op.add_column(table, column)


def downgrade() -> None:
    """Drop the columns (SQLite rebuilds the tables in batch mode)."""
    for table in ("jobs", "outbox"):
        with op.batch_alter_table(table) as batch:
            for name in reversed([c.name for t, c in COLUMNS if t == table]):
                batch.drop_column(name)
