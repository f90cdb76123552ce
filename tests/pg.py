"""PostgreSQL for tests: a fresh, throwaway database on the server at 127.0.0.1:5432 (or GENPIPE_TEST_PG_ADMIN_URL).

Use the session fixture ``postgres_url`` (register it with ``pytest_plugins = ["tests.pg"]`` in the root
conftest, or import it into a test module), or the ``fresh_database()`` context manager directly
(``cloned_database(url)`` copies a prepared one, which is much cheaper than preparing it again). When no
server listens there, tests that ask for it are skipped with the reason; any other failure is an error.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

#: Connection string of a role that may CREATE/DROP DATABASE, on its maintenance database.
ADMIN_URL = os.environ.get("GENPIPE_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin_connection():
    """An autocommit admin connection; skips the test when nothing listens at the server's address."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(ADMIN_URL)
    address = (url.host or "127.0.0.1", url.port or 5432)
    try:
        socket.create_connection(address, timeout=3).close()
    except OSError as exc:
        pytest.skip(f"no PostgreSQL server answers at {_masked(ADMIN_URL)}: {exc}")
    # A server that answers but refuses us (auth, missing role) is a broken setup: an error, not a skip.
    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


def _masked(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create ``genpipe_test_<random>``, yield its ``postgresql://`` URL, drop it (connections and all) after."""
    from sqlalchemy.engine import make_url

    name = f"genpipe_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        # A throwaway database needs no durable commits; skipping the WAL flush makes write-heavy tests fast.
        admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: PostgreSQL >= 13


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a database created for this test session and dropped at its end."""
    with fresh_database() as url:
        yield url


@contextmanager
def cloned_database(template_url: str) -> Iterator[str]:
    """A copy of the database at ``template_url`` (which must have no open connections), dropped after."""
    from sqlalchemy.engine import make_url

    template = make_url(template_url).database
    name = f"genpipe_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with _admin_connection() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
