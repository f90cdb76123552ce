"""Alembic environment: runs on the connection (and inside the transaction) that ``pipeline.audit.migrate`` passes.

There is no offline (SQL script) mode: PostgreSQL deployments that need reviewed SQL can take it from a
test database with ``pg_dump --schema-only`` after ``genpipe audit migrate``.
"""

from alembic import context

from pipeline.audit.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run audit migrations through `genpipe audit migrate --db URL` (pipeline.audit.migrate)")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():  # a no-op inside the caller's transaction, which commits or rolls back
    context.run_migrations()
