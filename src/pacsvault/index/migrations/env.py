"""Alembic's environment for the index: always the vault's own open connection.

``index.schema`` builds the ``Config`` in code and hands over a connection of the engine
the vault opened (``index.db.open_index``: the SQLCipher key already applied; or
``index.postgres.open_postgres``: the column sealer already attached, so the baseline's
tables get their ``bytea`` columns), and nothing here knows a URL or a key.
``render_as_batch`` lets later revisions alter SQLite tables (copy and move) and costs
nothing on PostgreSQL.
"""

from __future__ import annotations

from alembic import context

from pacsvault.index.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=True, transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
