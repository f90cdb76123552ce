"""Alembic migrations of the audit DB, run programmatically by ``pipeline.audit.migrate`` (no alembic.ini)."""
