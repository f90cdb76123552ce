"""Schema migrations of the audit DB: Alembic, configured in code, with its scripts inside the package.

``upgrade`` runs on a connection the caller holds in a write transaction that already serialises schema
changes (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so several processes opening a fresh
database at once end with one of them migrating and the others finding it done. A database created by the
pre-migration store (tables, no version table) is stamped at the baseline revision and upgraded from there.
"""

from __future__ import annotations

import os
from functools import lru_cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
BASELINE = "0001"


class MigrationError(RuntimeError):
    """The database's schema revision is one this code cannot bring to head."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the package's migrations; ``connection`` is what env.py runs on."""
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS_DIR)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _script().get_current_head()
    assert head is not None, "no migrations found"
    return head


def current_revision(conn: Connection) -> str | None:
    """The database's revision; ``"legacy"`` for pre-migration tables without a version table, else None
    for an empty database."""
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is None and inspect(conn).has_table("items"):
        return "legacy"
    return revision


def describe(revision: str | None) -> str:
    if revision is None:
        return "empty (no audit tables)"
    if revision == "legacy":
        return "created before schema migrations (no version table)"
    return f"revision {revision}"


def check_known(revision: str | None) -> None:
    """Raise ``MigrationError`` for a revision this code has no script for (written by a newer genpipe)."""
    if revision in (None, "legacy"):
        return
    try:
        _script().get_revision(revision)
    except CommandError:
        raise MigrationError(
            f"its schema is at revision {revision}, which this genpipe does not know (written by a newer "
            f"version; this one goes up to {head_revision()})"
        ) from None


def upgrade(conn: Connection) -> str | None:
    """Bring the database on ``conn`` to head inside the caller's transaction; returns the revision before."""
    before = current_revision(conn)
    check_known(before)
    if before == head_revision():
        return before
    cfg = alembic_config(conn)
    if before == "legacy":
        command.stamp(cfg, BASELINE)
    command.upgrade(cfg, "head")
    return before
