"""Alembic environment: runs on the connection ``turnrelay.store.migrate`` hands over.

There is no alembic.ini and no URL here: ``migrate`` opens the (async) engine,
takes the advisory lock, and passes its sync connection in
``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

from turnrelay.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline mode is not supported
    raise RuntimeError("run migrations through turnrelay.store.migrate, not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things in place: batch mode copies the table.
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
