"""Reviewers' queries over the audit log (``genpipe audit query``) and the approved-images export.

``QueryFilters`` says what to select; ``select_records`` turns it into one parameterised SQLAlchemy
statement (every filter value is a bound parameter, LIKE wildcards in ``search`` are escaped), and
``iter_records`` streams the result (a server-side cursor on PostgreSQL) as public records: the
``item_to_record`` fields, plus ``effective_decision`` and ``review`` (the latest approve / reject /
escalate: state, reviewer, reason, text, time, event seq); ``pipeline.audit.formats`` writes them out.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from sqlalchemy import Connection, String, case, exists, func, select, type_coerce

from pipeline.audit.chain import ITEM_FIELDS, REVIEW_KINDS, canonical_json, chain_head
from pipeline.audit.formats import open_output, write_parquet
from pipeline.audit.records import RECORD_FIELDS, RESULTS_SCHEMA
from pipeline.audit.reviews import EFFECTIVE_DECISIONS, PUBLISHABLE, effective_decision_expr, latest_decision_subquery
from pipeline.audit.schema import EventRow, ItemRow, ReviewerRow
from pipeline.audit.store import CASEFOLD_SQL
from pipeline.errors import GenpipeError
from schemas.record import SUPERSEDED, TERMINAL_STATUSES

STATUSES = ("pending", *TERMINAL_STATUSES, SUPERSEDED)
DECISIONS = (*EFFECTIVE_DECISIONS, "none")  # none: no decision (rejected rows, failures)
#: Score keys the scorers write; any other key must match the pattern and be present in the database.
KNOWN_SCORE_KEYS = ("clip_cosine", "clipscore", "nsfw")
SCORE_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}(\.[a-z0-9_]{1,64})?")  # nested: nsfw_categories.porn
SORT_FIELDS = (
    "item_id", "job", "prompt_id", "sample_index", "campaign", "status", "decision", "seed", "created_at",
    "updated_at", "reviewed_at",
)  # fmt: skip

_items = ItemRow.__table__
_events = EventRow.__table__
_reviewers = ReviewerRow.__table__


class QueryError(GenpipeError):
    """A query that cannot run as asked: bad filter value, unknown score key, unwritable output."""


@dataclass
class ScoreRange:
    key: str
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    flag: str = "--min-score/--max-score"  # named in errors


@dataclass
class QueryFilters:
    """Every filter is optional; values within one filter are OR-ed, filters are AND-ed."""

    jobs: list[str] = field(default_factory=list)
    campaigns: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # effective decisions, or "none"
    scores: list[ScoreRange] = field(default_factory=list)
    reviewers: list[str] = field(default_factory=list)  # items with any review event by one of them
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until
    search: str | None = None  # case-insensitive substring of the prompt
    sort: str = "item_id"  # a SORT_FIELDS name or a score key
    descending: bool = False
    limit: int | None = None


def check_score_key(key: str) -> str:
    if not SCORE_KEY_PATTERN.fullmatch(key):
        raise ValueError(f"score key {key!r}: lower-case letters, digits and _, optionally one .subkey")
    return key


def _score_value(key: str, dialect: str) -> Any:
    """The numeric value of ``scores[key]`` (a.b = nested), or NULL when absent or not a number."""
    parts = key.split(".")
    col = _items.c.scores
    if dialect == "postgresql":
        element = col[parts[0]] if len(parts) == 1 else col[tuple(parts)]
        return case((func.json_typeof(element) == "number", element.as_float()), else_=None)
    path = "$." + ".".join(f'"{p}"' for p in parts)  # parts match SCORE_KEY_PATTERN: nothing to escape
    return case((func.json_type(col, path).in_(("real", "integer")), func.json_extract(col, path)), else_=None)


def _check(filters: QueryFilters, conn: Connection) -> None:
    for name, values, allowed in (
        ("--status", filters.statuses, STATUSES),
        ("--decision", filters.decisions, DECISIONS),
    ):
        for value in values:
            if value not in allowed:
                raise QueryError(f"{name} {value!r}: must be one of {', '.join(allowed)}")
    for r in filters.scores:
        try:
            check_score_key(r.key)
        except ValueError as exc:
            raise QueryError(f"{r.flag}: {exc}") from None
        if r.low is not None and r.high is not None and r.low > r.high:
            raise QueryError(f"{r.flag}: the range for {r.key!r} is empty (min {r.low} > max {r.high})")
        if r.key not in KNOWN_SCORE_KEYS and not _score_key_present(conn, r.key):
            raise QueryError(
                f"{r.flag}: unknown score key {r.key!r}: no item has a number under it "
                f"(always known: {', '.join(KNOWN_SCORE_KEYS)})"
            )
    sort = filters.sort
    known_sort = sort in SORT_FIELDS or sort in KNOWN_SCORE_KEYS
    if not known_sort and not (SCORE_KEY_PATTERN.fullmatch(sort) and _score_key_present(conn, sort)):
        raise QueryError(f"--sort {sort!r}: must be one of {', '.join(SORT_FIELDS + KNOWN_SCORE_KEYS)} or a score key")
    if filters.limit is not None and filters.limit < 1:
        raise QueryError(f"--limit {filters.limit}: must be at least 1")
    if filters.since and filters.until and filters.since >= filters.until:
        raise QueryError("--since/--until: the date range is empty")


def _score_key_present(conn: Connection, key: str) -> bool:
    value = _score_value(key, conn.dialect.name)
    return conn.execute(select(_items.c.item_id).where(value.is_not(None)).limit(1)).first() is not None


def _comparable_time(column: Any, dialect: str) -> Any:
    # SQLite has no time type: timestamps are text, "YYYY-MM-DD HH:MM:SS.fff" from the DB clock (server default)
    # or ".ffffff" when bound from Python, and compare as text. A bound must be text of the same shape, or the
    # same instant compares unequal ("...00.000" < "...00.000000").
    return type_coerce(column, String) if dialect == "sqlite" else column


def _time_bound(when: datetime, dialect: str, up: bool = False) -> Any:
    """``when`` as the backend compares it; on SQLite, text to the millisecond the DB clock keeps (rounded up for
    an exclusive upper bound, so ``--until`` a record's own time still includes it)."""
    if dialect != "sqlite":
        return when
    utc = when.astimezone(UTC)
    if up and utc.microsecond % 1000:
        utc += timedelta(microseconds=1000 - utc.microsecond % 1000)
    return utc.strftime("%Y-%m-%d %H:%M:%S.") + f"{utc.microsecond // 1000:03d}"


def select_records(filters: QueryFilters, dialect: str) -> Any:
    """The parameterised SELECT for ``filters`` (validated beforehand by ``_check``)."""
    latest = latest_decision_subquery()
    review = _events.alias("review")
    who = _reviewers.alias("review_by")
    effective = effective_decision_expr(review.c.kind, _items.c.decision)
    cols = [_items.c[name] for name in ITEM_FIELDS] + [_items.c.created_at, _items.c.updated_at]
    cols += [
        effective.label("effective_decision"),
        review.c.kind.label("review_kind"),
        review.c.seq.label("review_seq"),
        review.c.reason_code.label("review_reason_code"),
        review.c.text.label("review_text"),
        review.c.created_at.label("review_at"),
        who.c.name.label("review_by"),
    ]
    query = select(*cols).select_from(
        _items.outerjoin(latest, latest.c.item_id == _items.c.item_id)
        .outerjoin(review, review.c.seq == latest.c.seq)
        .outerjoin(who, who.c.id == review.c.reviewer_id)
    )
    if filters.jobs:
        query = query.where(_items.c.job.in_(filters.jobs))
    if filters.campaigns:
        query = query.where(_items.c.campaign.in_(filters.campaigns))
    if filters.statuses:
        query = query.where(_items.c.status.in_(filters.statuses))
    if filters.decisions:
        named = [d for d in filters.decisions if d != "none"]
        cond = effective.in_(named)
        query = query.where(cond | effective.is_(None) if "none" in filters.decisions else cond)
    for r in filters.scores:
        value = _score_value(r.key, dialect)
        if r.low is not None:
            query = query.where(value >= r.low)
        if r.high is not None:
            query = query.where(value <= r.high)
    if filters.reviewers:
        by = (
            select(_events.c.seq)
            .join(_reviewers, _reviewers.c.id == _events.c.reviewer_id)
            .where(_events.c.item_id == _items.c.item_id, _events.c.kind.in_(REVIEW_KINDS))
            .where(_reviewers.c.name.in_(filters.reviewers))
        )
        query = query.where(exists(by))
    created = _comparable_time(_items.c.created_at, dialect)
    if filters.since is not None:
        query = query.where(created >= _time_bound(filters.since, dialect))
    if filters.until is not None:
        query = query.where(created < _time_bound(filters.until, dialect, up=True))
    if filters.search:
        if dialect == "sqlite":  # lower() there folds ASCII only; ILIKE on PostgreSQL folds every script
            folded = getattr(func, CASEFOLD_SQL)(_items.c.prompt)
            query = query.where(folded.contains(filters.search.casefold(), autoescape=True))
        else:
            query = query.where(_items.c.prompt.icontains(filters.search, autoescape=True))
    sort_by = {"decision": effective, "reviewed_at": review.c.created_at}
    if filters.sort in sort_by:
        key = sort_by[filters.sort]
    elif filters.sort in SORT_FIELDS:
        key = _items.c[filters.sort]
    else:
        key = _score_value(filters.sort, dialect)
    key = key.desc() if filters.descending else key.asc()
    tiebreak = _items.c.item_id.desc() if filters.descending else _items.c.item_id.asc()
    if filters.sort == "reviewed_at":
        # Two reviews in the same clock tick (SQLite keeps milliseconds) are ordered as the log recorded them.
        order = review.c.seq.desc() if filters.descending else review.c.seq.asc()
        query = query.order_by(key.nulls_last(), order.nulls_last(), tiebreak)
    else:
        query = query.order_by(key.nulls_last(), tiebreak)
    if filters.limit is not None:
        query = query.limit(filters.limit)
    return query


def row_to_record(row: Any) -> dict[str, Any]:
    """The public record (``item_to_record`` fields) plus ``effective_decision`` and ``review``."""
    record = {name: row[name] for name in RECORD_FIELDS if name != "created_at"}
    record["created_at"] = row["created_at"].isoformat()
    record["effective_decision"] = row["effective_decision"]
    record["review"] = None
    if row["review_kind"] is not None:
        record["review"] = {
            "state": row["effective_decision"],
            "reviewer": row["review_by"],
            "reason_code": row["review_reason_code"],
            "text": row["review_text"],
            "at": row["review_at"].isoformat(),
            "seq": row["review_seq"],
        }
    return record


def iter_records(
    store: Any, filters: QueryFilters, batch: int = 500, conn: Connection | None = None
) -> Iterator[dict[str, Any]]:
    """Stream the records matching ``filters``; raises ``QueryError`` for bad filters before yielding.
    ``conn``: read on it (e.g. a ``store.snapshot()``) instead of a connection of its own."""
    with contextlib.nullcontext(conn) if conn is not None else store.engine.connect() as conn:
        _check(filters, conn)
        query = select_records(filters, store.dialect)
        result = conn.execution_options(stream_results=True, yield_per=batch).execute(query)
        for row in result.mappings():
            yield row_to_record(row)


# --- export of approved images -----------------------------------------------------------------------------

#: Columns shared with results.parquet (same types), in export order; image columns are never null here.
_EXPORT_RESULT_COLUMNS = (
    "item_id", "job", "prompt_id", "prompt", "negative_prompt", "sample_index", "seed", "model", "model_revision",
    "lora", "sampler", "steps", "guidance_scale", "width", "height", "campaign", "sku", "locale", "tags",
    "image_uri", "image_sha256", "scores",
)  # fmt: skip
EXPORT_SCHEMA = pa.schema(
    [
        RESULTS_SCHEMA.field(name).with_nullable(False) if name.startswith("image_") else RESULTS_SCHEMA.field(name)
        for name in _EXPORT_RESULT_COLUMNS
    ]
    + [
        pa.field("effective_decision", pa.string(), nullable=False),  # pass (auto) | approved (by a reviewer)
        pa.field("review_reviewer", pa.string()),
        pa.field("review_at", pa.timestamp("us", tz="UTC")),
        RESULTS_SCHEMA.field("created_at"),
    ]
)


def export_approved(store: Any, out: str, job: str | None = None) -> int:
    """Write the publishable manifest — generated images that passed the policy with no later reject or
    escalation, or that a reviewer approved — to ``out`` (Parquet, fsspec URL); returns the row count.

    The file's metadata records the chain head at export time (``genpipe.chain_head``), so a published
    manifest can be traced to the exact audit state it came from.
    """
    filters = QueryFilters(jobs=[job] if job else [], statuses=["generated"], decisions=list(PUBLISHABLE))
    with store.snapshot() as conn:  # the head and the rows from one state: no review can fall between them
        head = chain_head(conn)
        meta = {b"genpipe.chain_head": canonical_json({"seq": head[0], "hash": head[1]} if head else None).encode()}
        schema = EXPORT_SCHEMA.with_metadata(meta)

        def rows() -> Iterator[dict[str, Any]]:
            for record in iter_records(store, filters, conn=conn):
                if record["image_uri"] and record["image_sha256"]:
                    yield {name: record.get(name) for name in (*RESULTS_SCHEMA.names, "effective_decision", "review")}

        with open_output(out, binary=True) as f:
            return write_parquet(rows(), f, schema=schema)
