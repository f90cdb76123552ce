"""The audit store: the one place that reads and writes the audit DB (a SQLite file or PostgreSQL).

Writes are idempotent on ``item_id`` (insert, or update every field), one transaction per call, retried
on transient errors, so reruns, retried batches and many concurrent writer processes never duplicate or
lose a record. Every write also appends hash-chained events in the same transaction (``pipeline.audit.chain``),
so the current rows can always be checked against the log (``pipeline.audit.verify``). Reads stream in pages
and never hold a transaction open between pages.

Open one ``AuditStore`` per process (engines and their pools must not cross a fork); hold it for the
process's life, and keep every write short: GPU actors never hold a session longer than a batch write.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import (
    BigInteger,
    Connection,
    Float,
    Integer,
    String,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError, StatementError

from pipeline.audit import migrate as migrations
from pipeline.audit import reviews
from pipeline.audit.chain import (
    ITEM_FIELDS,
    ITEM_RECORDED,
    RUN_ENDED,
    RUN_STARTED,
    NewEvent,
    append_events,
    append_rows,
    canonical_json,
    chain_head,
    head_and_clock,
    json_default,
    json_encoder,
    lock_chain,
    run_payload,
)
from pipeline.audit.schema import ROW_TIMES_FROM_SEQ, AuditSettingRow, ItemRow, JobRow, RunRow, utcnow
from pipeline.errors import GenpipeError
from schemas.record import Item

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["ITEM_FIELDS", "AuditStore", "AuditStoreError", "json_default", "safe_url"]

_JSON_FIELDS = ("lora", "tags", "metadata", "reasons", "scores", "timings")
_SCALAR_FIELDS = tuple(name for name in ITEM_FIELDS if name not in _JSON_FIELDS)
RUN_STATUSES = ("running", "succeeded", "failed")

_items = ItemRow.__table__
_settings = AuditSettingRow.__table__
_jobs = JobRow.__table__
_runs = RunRow.__table__


def _python_type(column: Any) -> type | None:
    kind = column.type
    if isinstance(kind, Float):
        return float
    if isinstance(kind, Integer | BigInteger):
        return int
    if isinstance(kind, String):  # Text too
        return str
    return None


#: The Python type each scalar item column holds once stored, so the hashed record and the row agree
#: (an ``int`` guidance scale comes back from the database as a ``float``).
_COERCE: dict[str, type] = {name: t for name in _SCALAR_FIELDS if (t := _python_type(_items.c[name])) is not None}

#: The statuses of records that say what became of a planned item (an image made, or not); ``rejected`` records
#: belong to manifest positions instead.
OUTPUT_STATUSES = ("generated", "blocked", "failed")
_IN_CHUNK = 500  # ids per IN (...) list: far below every backend's bound-parameter limit
_WRITE_TRIES = 8  # with the backoff below: ~5 s of retrying on top of SQLite's own 30 s busy timeout
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_LOCK_ID = 0x67656E70  # "genp": PostgreSQL advisory lock serialising schema creation
_BEGIN_IMMEDIATE = "genpipe_sqlite_begin_immediate"  # execution option read by the SQLite "begin" hook
# PostgreSQL SQLSTATEs worth retrying: serialization failure, deadlock; class 08 is a lost connection.
_PG_RETRY_SQLSTATES = {"40001", "40P01"}


class AuditStoreError(GenpipeError):
    """The audit DB cannot be reached or used; the message names the URL (never its password)."""


class EmptyAuditDatabase(AuditStoreError):
    """Opened without migrating, the database has no audit tables yet (a run would create them)."""


def safe_url(url: str | URL) -> str:
    """The URL with its password masked, for messages and logs."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Unparseable: mask anything that may be user:password@.
        return re.sub(r"[^\s/@]*@", "***@", url)


def _engine_url(url: str) -> URL:
    """Parse ``url``; plain ``postgresql://`` (and Heroku-style ``postgres://``) use psycopg 3."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


#: ``json.dumps(obj, ensure_ascii=False, default=json_default, allow_nan=False)``, the text of every JSON column.
_column_dumps = json_encoder((", ", ": "), sort_keys=False)


def _json_dumps(obj: Any) -> str:
    # JSON has no NaN/Infinity: PostgreSQL rejects them and SQLite would store text no other tool reads,
    # so both backends refuse them alike (a scorer's NaN must become a reason, not a number).
    try:
        return _column_dumps(obj)
    except ValueError:
        shown = json.dumps(obj, ensure_ascii=False, default=json_default)[:200]
        raise ValueError(f"NaN or Infinity in a JSON field of an audit record: {shown}") from None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _item_to_row(item: Item, run_id: int | None) -> dict[str, Any]:
    """The ``items`` row of ``item``, with every scalar as the Python type the database gives back: also the
    payload of its ``item_recorded`` event (``chain.item_payload`` of the row is the same dict)."""
    row = {name: getattr(item, name) for name in ITEM_FIELDS}
    for name, kind in _COERCE.items():  # JSON fields are handled by the serializer
        value = row[name]
        if value is None or type(value) is kind:
            pass
        elif isinstance(value, np.generic):
            row[name] = kind(value.item())  # numpy ints/floats from upstream stages; drivers want Python numbers
        else:
            row[name] = kind(value)
        if kind is str and value is not None and "\x00" in row[name]:
            # PostgreSQL text cannot hold NUL; refusing it on SQLite too keeps the backends interchangeable.
            raise ValueError(
                f"item {item.item_id}: {name} contains a NUL (0x00) character, which the audit DB cannot store"
            )
    row["run_id"] = run_id
    return row


class _Prepared:
    """A statement compiled once per store, run through the DB-API ``executemany`` (``exec_driver_sql``) with
    each row's values already in their stored form: SQLAlchemy's per-row parameter processing and statement
    caching cost more than the insert itself. Values of ``text_columns`` are passed as they are (the caller
    serialised them); every other column's bind processor (e.g. SQLite's float coercion) is applied here."""

    def __init__(self, stmt: Any, dialect: Any, keys: list[str], text_columns: tuple[str, ...] = ()) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=keys)
        self.sql = compiled.string
        self.names = names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
        self._processors = [
            (name, proc)
            for name in names
            if name not in text_columns
            and (proc := compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        # Positional drivers (SQLite: qmark) take tuples in bind order; named ones (psycopg: pyformat) the dict.
        self._ordered: Callable[[dict[str, Any]], tuple] | None = None
        if compiled.positional:
            getter = operator.itemgetter(*names)
            self._ordered = getter if len(names) > 1 else lambda values: (getter(values),)

    def params(self, values: dict[str, Any]) -> Any:
        """One row of ``executemany`` from ``values`` (every bind name; modified in place)."""
        for name, proc in self._processors:
            values[name] = proc(values[name])
        return self._ordered(values) if self._ordered else values


class _ItemStatements:
    """``write_items``'s three statements for one store's dialect."""

    def __init__(self, store: AuditStore) -> None:
        dialect = store.engine.dialect
        ins = store._insert(_items)
        # created_at and updated_at are the time of the write's events (``write_items``), bound per transaction:
        # a rewrite keeps created_at, so it stays the time of the item's first item_recorded event.
        updated = {c.key: ins.excluded[c.key] for c in _items.c if c.key not in ("item_id", "created_at")}
        upsert = ins.on_conflict_do_update(index_elements=[_items.c.item_id], set_=updated)
        self.upsert = _Prepared(upsert, dialect, [*ITEM_FIELDS, "run_id"], text_columns=_JSON_FIELDS)
        self.stamped = _Prepared(upsert, dialect, [*ITEM_FIELDS, "run_id", "created_at", "updated_at"],
                                 text_columns=_JSON_FIELDS)  # fmt: skip
        # The two timestamps are the last two binds, so a prepared row gets them by appending (see stamp_rows).
        assert self.stamped.names == [*self.upsert.names, "created_at", "updated_at"], self.stamped.names
        self._time_processor = _items.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
        self._positional = self.stamped._ordered is not None
        new_jobs = store._insert(_jobs).on_conflict_do_nothing(index_elements=[_jobs.c.name])
        self.new_jobs = _Prepared(new_jobs, dialect, ["name"])

    def stamp_rows(self, rows: list[Any], now: datetime) -> list[Any]:
        """``upsert``-prepared rows with created_at and updated_at set to ``now``."""
        stored = self._time_processor(now) if self._time_processor else now
        if self._positional:
            return [(*row, stored, stored) for row in rows]
        return [{**row, "created_at": stored, "updated_at": stored} for row in rows]


def row_times_setting(conn: Connection) -> str | None:
    """The stored text of ``audit_settings.row_times_from_seq`` (migration 0005), as found: ``verify`` judges it."""
    return conn.scalar(select(_settings.c.value).where(_settings.c.name == ROW_TIMES_FROM_SEQ))


def _row_to_item(row: Any) -> Item:
    m = row._mapping
    return Item(**{name: m[name] for name in ITEM_FIELDS})


class AuditStore:
    """Jobs, runs, item records, reviewers and the event chain in one SQLAlchemy database.

    Opening a store brings the database to the newest schema revision through the migrations (creating it
    when empty); ``migrate=False`` (read-only tools) never changes the schema and refuses a database that is
    missing or not at head, saying to run ``genpipe audit migrate``.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.safe_url = safe_url(url)
        try:
            self.url = _engine_url(url)
        except (ArgumentError, ValueError):
            raise AuditStoreError(
                f"audit DB URL {self.safe_url!r} is not a SQLAlchemy URL "
                "(expected e.g. sqlite:///path/genpipe.db or postgresql://user@host:5432/db)"
            ) from None
        self.safe_url = safe_url(self.url)
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise AuditStoreError(f"audit DB {self.safe_url}: only SQLite and PostgreSQL URLs are supported")

        connect_args: dict[str, Any] = {}
        if self.dialect == "sqlite" and migrate:
            self._make_sqlite_dir()
        elif self.dialect == "sqlite":
            self._require_sqlite_file()  # read-only tools never create a database file
        elif self.dialect == "postgresql":
            connect_args["connect_timeout"] = 10  # a dead host fails the run in seconds, not minutes
        try:
            self.engine = create_engine(
                self.url,
                json_serializer=_json_dumps,
                pool_pre_ping=self.dialect != "sqlite",  # long runs outlive idle server connections
                connect_args=connect_args,
            )
        except (NoSuchModuleError, ImportError, ArgumentError) as exc:
            raise AuditStoreError(f"cannot open audit DB {self.safe_url}: {_first_line(exc)}") from None
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        # Writers on SQLite take the write lock up front (BEGIN IMMEDIATE) so they queue on the busy
        # timeout instead of failing when a read transaction tries to upgrade.
        self._writer = self.engine.execution_options(**{_BEGIN_IMMEDIATE: True})
        #: The schema revision found on opening (None: empty; "legacy": pre-migration tables).
        self.revision_found: str | None = None
        try:
            self._prepare_schema_retrying(migrate)
        except DBAPIError as exc:
            self.engine.dispose()
            reason = _first_line(exc)
            if self.url.password:
                reason = reason.replace(self.url.password, "***")
            raise AuditStoreError(f"cannot open audit DB {self.safe_url}: {reason}") from None
        except (migrations.MigrationError, AuditStoreError) as exc:
            self.engine.dispose()
            error = EmptyAuditDatabase if isinstance(exc, EmptyAuditDatabase) else AuditStoreError
            raise error(f"audit DB {self.safe_url}: {exc}") from None
        log.info("audit store: %s", self.safe_url)

    def __repr__(self) -> str:
        return f"AuditStore({self.safe_url!r})"

    def _make_sqlite_dir(self) -> None:
        path = sqlite_file(self.url)
        if path is None:
            return
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise AuditStoreError(
                f"cannot open audit DB {self.safe_url}: cannot create directory {directory}: {exc.strerror}"
            ) from None

    def _require_sqlite_file(self) -> None:
        path = sqlite_file(self.url)
        if path is not None and not os.path.exists(path):
            raise AuditStoreError(f"audit DB {self.safe_url}: no such file {os.path.abspath(path)}")

    def _prepare_schema_retrying(self, migrate: bool) -> None:
        # Several processes opening one fresh SQLite file at once: the first one's switch to WAL can, rarely, make
        # another's connect fail with "database is locked" at once, without waiting on the busy timeout (seen once
        # in ~40 runs of the 8-process test under a loaded CI). Opening is idempotent: try again, briefly.
        for attempt in range(6):
            try:
                return self._prepare_schema(migrate)
            except OperationalError as exc:
                if self.dialect != "sqlite" or "locked" not in str(exc) or attempt == 5:
                    raise
                self.engine.dispose()  # the next connection runs the PRAGMAs again
                time.sleep(0.05 * 2**attempt)

    def _prepare_schema(self, migrate: bool) -> None:
        head = migrations.head_revision()
        with self.engine.connect() as conn:
            self.revision_found = migrations.current_revision(conn)
        if self.revision_found == head:
            return
        migrations.check_known(self.revision_found)
        if not migrate:
            raise (EmptyAuditDatabase if self.revision_found is None else AuditStoreError)(
                f"the database is {migrations.describe(self.revision_found)}, not at schema revision {head}; "
                f"run `genpipe audit migrate --db URL` first"
            )
        with self._writer.begin() as conn:
            if self.dialect == "postgresql":
                # Several processes may open a fresh database at once; the lock makes one migrate while the
                # others wait and then find it done. (SQLite gets the same from BEGIN IMMEDIATE.)
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_ID)))
            migrations.upgrade(conn)
        log.info("audit DB %s: migrated from %s to %s", self.safe_url, self.revision_found, head)

    # --- transactions ---------------------------------------------------------------------------------
    def _insert(self, table: Any) -> Any:
        """The dialect's INSERT, which has ``on_conflict_do_update`` / ``on_conflict_do_nothing``."""
        return postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)

    def _retryable(self, exc: OperationalError) -> bool:
        if exc.connection_invalidated:
            return True
        if self.dialect == "sqlite":
            text = str(exc.orig).lower()
            return "locked" in text or "busy" in text
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        return sqlstate in _PG_RETRY_SQLSTATES or sqlstate.startswith("08")

    def _write(self, what: str, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction, retrying the whole transaction on transient errors."""
        delay = 0.05
        for attempt in range(1, _WRITE_TRIES + 1):
            try:
                with self._writer.begin() as conn:
                    # Every write appends events: take the chain lock before any row lock, so writers queue
                    # here instead of deadlocking on FK key-share locks (PostgreSQL; SQLite: BEGIN IMMEDIATE).
                    lock_chain(conn)
                    return fn(conn)
            except StatementError as exc:
                if not isinstance(exc, DBAPIError) and isinstance(exc.orig, ValueError):
                    raise exc.orig from None  # a value we refused (see _json_dumps): its message says which
                if not isinstance(exc, OperationalError) or not self._retryable(exc):
                    raise
                if attempt == _WRITE_TRIES:
                    raise AuditStoreError(
                        f"{what} on {self.safe_url} failed after {attempt} tries: {_first_line(exc)}"
                    ) from exc
                log.warning("%s on %s: %s; retry %d", what, self.safe_url, _first_line(exc), attempt)
                time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: concurrent writers do not retry in step
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    # --- runs -----------------------------------------------------------------------------------------
    def begin_run(
        self,
        job: str,
        spec: dict[str, Any],
        versions: dict[str, Any],
        model_info: dict[str, Any],
        *,
        host: str | None = None,
    ) -> int:
        """Record the job (with this run's spec) and a new ``running`` run; returns the run id."""

        def tx(conn: Connection) -> int:
            head = head_and_clock(conn)  # the run starts at the time of its run_started event
            ins = self._insert(_jobs).values(name=job, spec=spec)
            conn.execute(
                ins.on_conflict_do_update(
                    index_elements=[_jobs.c.name], set_={"spec": ins.excluded.spec, "updated_at": utcnow()}
                )
            )
            result = conn.execute(
                insert(_runs).values(
                    job=job,
                    status="running",
                    versions=versions,
                    model_info=model_info,
                    host=host or socket.gethostname(),
                    started_at=head[2],
                )
            )
            run_id = int(result.inserted_primary_key[0])
            # Read back, so the hashed payload is exactly what the database holds (JSON round trip and all).
            stored_spec = conn.execute(select(_jobs.c.spec).where(_jobs.c.name == job)).scalar_one()
            payload = {"run": self._run_payload(conn, run_id), "spec": stored_spec}
            append_events(conn, [NewEvent(RUN_STARTED, payload, job=job, run_id=run_id)], locked=True, head=head)
            return run_id

        return self._write("begin_run", tx)

    def end_run(self, run_id: int, status: str, counts: dict[str, int], summary: dict[str, Any]) -> None:
        """Close a run with its final status, item counts by status and summary."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"end_run status {status!r}: must be one of {', '.join(RUN_STATUSES[1:])}")

        def tx(conn: Connection) -> int:
            head = head_and_clock(conn)  # the run ends at the time of its run_ended event
            stmt = (
                update(_runs)
                .where(_runs.c.id == run_id)
                .values(status=status, counts=counts, summary=summary, ended_at=head[2])
            )
            if conn.execute(stmt).rowcount == 0:
                return 0
            run = self._run_payload(conn, run_id)
            event = NewEvent(RUN_ENDED, {"run": run}, job=run["job"], run_id=run_id)
            append_events(conn, [event], locked=True, head=head)
            return 1

        if self._write("end_run", tx) == 0:
            raise AuditStoreError(f"end_run: no run with id {run_id} in {self.safe_url}")

    @staticmethod
    def _run_payload(conn: Connection, run_id: int) -> dict[str, Any]:
        return run_payload(conn.execute(select(_runs).where(_runs.c.id == run_id)).mappings().one())

    def runs(self, job: str) -> list[dict[str, Any]]:
        """Every run of ``job``, oldest first, as dicts of the ``runs`` columns."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(_runs).where(_runs.c.job == job).order_by(_runs.c.id))
            return [dict(r._mapping) for r in rows]

    # --- items ----------------------------------------------------------------------------------------
    def write_items(self, items: list[Item], run_id: int | None) -> None:
        """Insert or fully update ``items`` (by ``item_id``) in one transaction; ``pixels`` are never stored.

        Each item also gets an ``item_recorded`` event holding its full record, in the same transaction (a
        re-written item gets another one: the log shows every write). A job row is created (with no spec)
        if the items' job has none yet, so a write never depends on call order. Within one call the last
        record of an id wins.
        """
        if not items:
            return
        by_id = {item.item_id: _item_to_row(item, run_id) for item in items}
        statements = self._item_statements
        # Everything is serialised once, outside the transaction (a retry reuses it); NaN is refused here, before
        # any I/O. Sorted: concurrent writers of overlapping ids lock rows in the same order, so cannot deadlock.
        upserts, events = [], []
        for item_id in sorted(by_id):
            row = by_id[item_id]
            values = row.copy()
            for name in _JSON_FIELDS:
                values[name] = _json_dumps(row[name])
            upserts.append(statements.upsert.params(values))
            # An EventTuple; the row is the event's payload as it is (its keys are item_payload's).
            events.append((ITEM_RECORDED, row["job"], item_id, run_id, None, None, None, None, canonical_json(row)))
        jobs = [statements.new_jobs.params({"name": j}) for j in sorted({ev[1] for ev in events})]

        def tx(conn: Connection) -> None:
            head = head_and_clock(conn)  # _write took the chain lock: the head cannot move before append_rows
            conn.exec_driver_sql(statements.new_jobs.sql, jobs)
            # executemany: one prepared statement, every row; stamped with the time its events get
            conn.exec_driver_sql(statements.stamped.sql, statements.stamp_rows(upserts, head[2]))
            append_rows(conn, events, locked=True, head=head)

        self._write("write_items", tx)

    @functools.cached_property
    def _item_statements(self) -> _ItemStatements:
        return _ItemStatements(self)

    def get_items(self, item_ids: list[str]) -> dict[str, Item]:
        """The stored records of ``item_ids`` by id; ids with no record are absent."""
        ids = list(dict.fromkeys(item_ids))
        found: dict[str, Item] = {}
        cols = [_items.c[name] for name in ITEM_FIELDS]
        with self.engine.connect() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                for row in conn.execute(select(*cols).where(_items.c.item_id.in_(chunk))):
                    found[row.item_id] = _row_to_item(row)
        return found

    def iter_records(self, job: str, batch: int = 1000) -> Iterator[tuple[Item, datetime]]:
        """Every record of ``job`` with its ``created_at``, ordered by ``item_id``, streamed ``batch`` at a time.

        Keyset pages (``item_id > last``) each in their own short read, so memory stays flat in job size
        and no transaction is held while the caller works; a record written during the iteration appears
        if its id sorts after the current page.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        cols = [_items.c[name] for name in ITEM_FIELDS] + [_items.c.created_at]
        last: str | None = None
        while True:
            query = select(*cols).where(_items.c.job == job).order_by(_items.c.item_id).limit(batch)
            if last is not None:
                query = query.where(_items.c.item_id > last)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            for row in rows:
                yield _row_to_item(row), row.created_at
            if len(rows) < batch:
                return
            last = rows[-1].item_id

    def iter_items(self, job: str, batch: int = 1000) -> Iterator[Item]:
        """Every record of ``job`` ordered by ``item_id``; see ``iter_records``."""
        for item, _ in self.iter_records(job, batch):
            yield item

    def rejected_rows(self, job: str) -> np.ndarray:
        """The manifest positions (``row_number``) that hold ``rejected`` records of ``job``, sorted."""
        query = select(_items.c.row_number).where(_items.c.job == job, _items.c.status == "rejected").distinct()
        with self.engine.connect() as conn:
            return np.unique(np.fromiter((r for (r,) in conn.execute(query)), dtype=np.int64))

    def rejected_at(self, job: str, rows: list[int]) -> list[Item]:
        """The ``rejected`` records of ``job`` at these manifest positions."""
        cols = [_items.c[name] for name in ITEM_FIELDS]
        found: list[Item] = []
        with self.engine.connect() as conn:
            for start in range(0, len(rows), _IN_CHUNK):
                where = (_items.c.job == job, _items.c.status == "rejected",
                         _items.c.row_number.in_(rows[start : start + _IN_CHUNK]))  # fmt: skip
                found.extend(_row_to_item(row) for row in conn.execute(select(*cols).where(*where)))
        return found

    def outputs_of_prompts(self, job: str, prompt_ids: list[str]) -> list[tuple[str, int]]:
        """(item_id, attempt) of the ``generated``, ``blocked`` and ``failed`` records of ``job`` for these prompt
        ids: a light read (no JSON decoded), for the planner to pick what it needs whole."""
        found: list[tuple[str, int]] = []
        with self.engine.connect() as conn:
            for start in range(0, len(prompt_ids), _IN_CHUNK):
                where = (_items.c.job == job, _items.c.status.in_(OUTPUT_STATUSES),
                         _items.c.prompt_id.in_(prompt_ids[start : start + _IN_CHUNK]))  # fmt: skip
                found.extend((i, a) for i, a in conn.execute(select(_items.c.item_id, _items.c.attempt).where(*where)))
        return found

    def item_ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` item ids that start with ``prefix`` (hex), in order."""
        query = select(_items.c.item_id).where(_items.c.item_id >= prefix, _items.c.item_id < prefix + "g")
        with self.engine.connect() as conn:
            return [i for (i,) in conn.execute(query.order_by(_items.c.item_id).limit(limit))]

    def has_outputs(self, job: str) -> bool:
        """Whether ``job`` has any ``generated``, ``blocked`` or ``failed`` record."""
        query = select(_items.c.item_id).where(_items.c.job == job, _items.c.status.in_(OUTPUT_STATUSES))
        with self.engine.connect() as conn:
            return conn.execute(query.limit(1)).first() is not None

    def row_times_from_seq(self) -> int | None:
        """``audit_settings.row_times_from_seq`` (see ``pipeline.audit.verify``); None when it is not a number."""
        with self.engine.connect() as conn:
            value = row_times_setting(conn)
        return int(value) if isinstance(value, str) and value.isdigit() else None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A connection in one read transaction: every query on it sees the database as of its first one
        (PostgreSQL: REPEATABLE READ; SQLite: a WAL read transaction). Writers go on meanwhile."""
        conn = self.engine.connect()
        if self.dialect == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn, conn.begin():
            yield conn

    def counts(self, job: str) -> dict[str, int]:
        """Number of records of ``job`` by status (statuses with no records are absent)."""
        query = select(_items.c.status, func.count()).where(_items.c.job == job).group_by(_items.c.status)
        with self.engine.connect() as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    # --- the chain, reviewers and reviews (pipeline.audit.chain, pipeline.audit.reviews) -----------------
    def chain_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the newest event; None only for a chain with no events at all."""
        with self.engine.connect() as conn:
            return chain_head(conn)

    def add_reviewer(self, name: str, role: str = "reviewer", password: str | None = None) -> str:
        """Create a reviewer (role ``reviewer`` or ``admin``); returns their API token, shown only this once."""
        return reviews.add_reviewer(self, name, role, password)

    def update_reviewer(
        self,
        name: str,
        *,
        role: str | None = None,
        disabled: bool | None = None,
        password: str | None = None,
        rotate_token: bool = False,
        end_sessions: bool = False,
    ) -> str | None:
        """Change a reviewer; returns the new token when ``rotate_token``. A new password, disabling, or
        ``end_sessions`` signs the reviewer's review-page sessions out."""
        return reviews.update_reviewer(self, name, role=role, disabled=disabled, password=password,
                                       rotate_token=rotate_token, end_sessions=end_sessions)  # fmt: skip

    def authenticate(self, name: str, password: str) -> dict[str, Any] | None:
        """The enabled reviewer with this name and password (id, name, role, disabled, created_at), else None."""
        return reviews.authenticate(self, name, password)

    def authenticate_token(self, token: str) -> dict[str, Any] | None:
        """The enabled reviewer holding this API token, else None."""
        return reviews.authenticate_token(self, token)

    def reviewers(self) -> list[dict[str, Any]]:
        return reviews.reviewers(self)

    def record_review(
        self,
        item_ids: list[str],
        action: str,
        reviewer: str,
        reason_code: str | None = None,
        text: str | None = None,
        supersedes: int | None = None,
    ) -> list[int]:
        """Record ``action`` (approve | reject | escalate | comment) on each item by the named (authenticated)
        reviewer, in one transaction; returns the new events' seq numbers. See ``pipeline.audit.reviews``."""
        return reviews.record_review(self, item_ids, action, reviewer, reason_code, text, supersedes)

    def history(self, item_id: str) -> list[dict[str, Any]]:
        """Every event of one item, oldest first (payload parsed, reviewer name joined)."""
        return reviews.history(self, item_id)

    def effective_decisions(self, item_ids: list[str]) -> dict[str, str | None]:
        """pass | review | block (the pipeline's) or approved | rejected | escalated (the latest review)."""
        return reviews.effective_decisions(self, item_ids)

    def effective_decision(self, item_id: str) -> str | None:
        return self.effective_decisions([item_id]).get(item_id)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()


def _sqlite_url(url: str | URL) -> URL | None:
    try:
        u = make_url(url)
    except (ArgumentError, ValueError):
        return None  # AuditStore names what is wrong with it
    return u if u.get_backend_name() == "sqlite" else None


def sqlite_in_memory(url: str | URL) -> bool:
    """Whether ``url`` is an in-memory SQLite database (one per connection)."""
    u = _sqlite_url(url)
    return u is not None and (u.database in (None, "", ":memory:") or u.query.get("mode") == "memory")


def sqlite_file(url: str | URL) -> str | None:
    """The file a SQLite URL names; None for other backends, in-memory databases and ``file:`` URIs."""
    u = _sqlite_url(url)
    if u is None or sqlite_in_memory(u) or u.database.startswith("file:"):
        return None
    return u.database


#: The SQL name of Python's ``str.casefold`` on SQLite connections (see ``_configure_sqlite``).
CASEFOLD_SQL = "genpipe_casefold"


def _casefold(text: Any) -> Any:
    return text.casefold() if isinstance(text, str) else text


def _configure_sqlite(engine: Any) -> None:
    """Per-connection SQLite settings, and SQLAlchemy (not the sqlite3 module) in charge of BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # sqlite3's legacy mode would skip BEGIN before SELECT/DDL; the "begin" hook below emits it instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")  # first: the WAL switch may wait
        cur.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
        cur.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; WAL stays consistent on crash
        cur.execute("PRAGMA foreign_keys = ON")  # same integrity as PostgreSQL
        cur.close()
        # SQLite's lower() folds ASCII only: text search ("Été", "İstanbul") folds case with Python's rules.
        dbapi_conn.create_function(CASEFOLD_SQL, 1, _casefold, deterministic=True)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_BEGIN_IMMEDIATE) else "BEGIN")
