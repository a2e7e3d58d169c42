"""Alembic's environment for the node: always online, on the connection the caller passes in
``config.attributes["connection"]`` (:mod:`node.migrations` opens it, locks it and commits it).
"""

from alembic import context

from node.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("node.migrations runs only on a connection given by node.migrations.upgrade "
                       "(musclenode db upgrade), not from the alembic command line")
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",   # ALTER on SQLite: copy-and-move in batch mode
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
