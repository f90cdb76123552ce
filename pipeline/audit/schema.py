"""The audit DB schema: every table the audit log has, in one module; migrations live alongside it
(``pipeline/audit/migrations``), and a test checks the two never drift apart.

Current-state tables (``jobs``, ``runs``, ``items``, ``reviewers``) are what readers query; ``events`` is the
append-only, hash-chained log every change to them is also written to (see ``pipeline.audit.chain``).

Columns mirror the fields of ``schemas.record.Item`` one to one, with the same names at the table
level (``Item.metadata`` is the ORM attribute ``ItemRow.meta``, because ``metadata`` is reserved on
declarative classes, but the column and its Core key are both ``metadata``).
Timestamps come from the database clock and are stored and returned as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import FunctionElement


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend. SQLite has no time zones, so values are stored as
    naive UTC there and given their UTC tzinfo back when read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: audit timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class utcnow(FunctionElement):  # noqa: N801 - reads as the SQL function it renders to
    """The database clock in UTC, with sub-second precision where the backend has it."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_postgresql(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "now()"  # timestamptz: an absolute instant, returned in UTC by UTCDateTime


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: Any, **kw: Any) -> str:
    # CURRENT_TIMESTAMP has whole-second resolution; %f gives milliseconds. Parenthesised so it is a
    # valid column DEFAULT expression too.
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now'))"


@compiles(utcnow)
def _utcnow_default(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


class Base(DeclarativeBase):
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class JobRow(Base):
    """One row per job name; a rerun with the same name is the same job."""

    __tablename__ = "jobs"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(server_default=utcnow())
    updated_at: Mapped[datetime] = mapped_column(server_default=utcnow())
    # The validated spec of the latest run; NULL when items were written before any run began.
    spec: Mapped[dict[str, Any] | None]


class RunRow(Base):
    """One execution of a job: what ran it (library versions, resolved model) and how it ended."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(ForeignKey("jobs.name"), index=True)
    started_at: Mapped[datetime] = mapped_column(server_default=utcnow())
    ended_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16))  # running | succeeded | failed
    versions: Mapped[dict[str, Any]]  # library name -> version
    model_info: Mapped[dict[str, Any]]  # id, revision, resolved path, weight file sha256s
    counts: Mapped[dict[str, Any] | None]  # items by status at the end of the run
    summary: Mapped[dict[str, Any] | None]
    host: Mapped[str | None] = mapped_column(String(255))


class ItemRow(Base):
    """The audit record of one item (manifest row x sample); ``Item`` fields, plus who wrote it and when."""

    __tablename__ = "items"

    item_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job: Mapped[str] = mapped_column(ForeignKey("jobs.name"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))  # the run that last wrote the item
    # Manifest-derived text is unbounded: a rejected row's fields are whatever the manifest held, and the
    # record of a bad row must never fail to insert.
    prompt_id: Mapped[str] = mapped_column(String)
    sample_index: Mapped[int]
    row_number: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int | None] = mapped_column(BigInteger)  # up to 2**63 - 1
    seed_source: Mapped[str | None] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String)
    model_revision: Mapped[str | None] = mapped_column(String)
    lora: Mapped[list[Any]]
    sampler: Mapped[str] = mapped_column(String(64))
    steps: Mapped[int]
    guidance_scale: Mapped[float] = mapped_column(Float)
    width: Mapped[int]
    height: Mapped[int]
    format: Mapped[str] = mapped_column(String(16))
    campaign: Mapped[str | None] = mapped_column(String, index=True)
    sku: Mapped[str | None] = mapped_column(String)
    locale: Mapped[str | None] = mapped_column(String)
    tags: Mapped[list[Any]]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    decision: Mapped[str | None] = mapped_column(String(16))
    reasons: Mapped[list[Any]]
    image_uri: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    scores: Mapped[dict[str, Any]]
    timings: Mapped[dict[str, Any]]
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(server_default=utcnow())  # first write; upserts keep it
    updated_at: Mapped[datetime] = mapped_column(server_default=utcnow())

    __table_args__ = (
        Index("ix_items_job_status", "job", "status"),
        # Serves both "WHERE job = ?" and keyset pages "WHERE job = ? AND item_id > ? ORDER BY item_id",
        # so the job column needs no single-column index of its own.
        Index("ix_items_job_item_id", "job", "item_id"),
        Index("ix_items_job_prompt_id", "job", "prompt_id"),  # a prompt's earlier records, to supersede them
    )


metadata = Base.metadata


class ReviewerRow(Base):
    """A person who may review: a name, a role, and the salted hashes of their password and API token."""

    __tablename__ = "reviewers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # reviewer | admin
    password_hash: Mapped[str | None] = mapped_column(String(255))  # scrypt$n$r$p$salt$hash; NULL: token only
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)  # sha256 of the bearer token
    disabled: Mapped[bool] = mapped_column(Boolean, server_default=false())
    created_at: Mapped[datetime] = mapped_column(server_default=utcnow())


class ReviewSessionRow(Base):
    """A signed-in review-page session (``pipeline.audit.sessions``): the sha256 of the key in the browser's
    cookie. Operational state, not audit history (so not chained): signing out deletes the row."""

    __tablename__ = "review_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    expires_at: Mapped[float] = mapped_column(Float)  # epoch seconds, the review app's clock
    created_at: Mapped[datetime] = mapped_column(server_default=utcnow())


#: ``audit_settings`` name: rows first recorded after this seq carry their events' times (migration 0005).
ROW_TIMES_FROM_SEQ = "row_times_from_seq"


class AuditSettingRow(Base):
    """Facts about the database that migrations record and the application only reads (on PostgreSQL the
    application role may not write them: ``infra/db/postgres-roles.sql``). ``row_times_from_seq``: rows first
    recorded after this event carry their events' times exactly, and ``verify`` checks them (migration 0005)."""

    __tablename__ = "audit_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


#: ``events.seq`` is the chain position: BIGINT, but INTEGER on SQLite so that it is the rowid itself.
SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")


class EventRow(Base):
    """The append-only audit log: one row per recorded change, each hash-chained to the one before.

    ``seq`` is assigned by the writer under the chain lock (1, 2, 3, ... without gaps), never by a sequence,
    so a missing row is visible. ``payload`` is canonical JSON text, kept byte for byte as hashed.
    """

    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(SEQ_TYPE, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32))
    job: Mapped[str | None] = mapped_column(ForeignKey("jobs.name"))
    item_id: Mapped[str | None] = mapped_column(ForeignKey("items.item_id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"))
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("reviewers.id"))
    reason_code: Mapped[str | None] = mapped_column(String(64))
    text: Mapped[str | None] = mapped_column(Text)
    supersedes: Mapped[int | None] = mapped_column(SEQ_TYPE, ForeignKey("events.seq"))  # the review event this replaces
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]  # the database clock, read inside the appending transaction, and hashed
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        Index("ix_events_item_id_seq", "item_id", "seq"),  # an item's history; its latest record
        Index("ix_events_kind_item_id_seq", "kind", "item_id", "seq"),  # latest review decision per item
    )


class LeaseRow(Base):
    """Who is running a job right now: one row per running job, renewed by its holder's heartbeat.

    Operational state, not audit history (so not chained): a lease whose holder died expires on its own.
    ``expires_at`` is the holder's clock in epoch seconds; hosts of one cluster are assumed NTP-synchronised.
    """

    __tablename__ = "leases"

    job: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))  # a random id per run_job call
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[datetime] = mapped_column(server_default=utcnow())
