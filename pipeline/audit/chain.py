"""The tamper-evident event chain: canonical JSON, the hash of an event, and appending events under a lock.

Every change to the audit log is also an ``events`` row. Event ``seq`` (1, 2, 3, ... with no gaps) has

    hash = sha256( canonical_json({
        "v": 1, "seq": ..., "prev_hash": <hash of seq - 1, or 64 zeros for seq 1>, "kind": ..., "job": ...,
        "item_id": ..., "run_id": ..., "reviewer_id": ..., "reason_code": ..., "text": ..., "supersedes": ...,
        "created_at": "YYYY-MM-DDTHH:MM:SS.ffffffZ", "payload": <the stored payload text, as a JSON string>,
    }) ).hexdigest()

where ``canonical_json`` is JSON with sorted keys, no whitespace, non-ASCII characters as themselves, UTF-8,
and floats in their shortest round-trip form (Python's ``repr``); NaN and Infinity are refused. The envelope
itself holds only strings, integers and nulls (the payload is embedded as a string, exactly as stored), so
any language can recompute it. ``created_at`` is the database clock read inside the appending transaction
(after the chain lock, so it never goes backwards along the chain while the clock does not) and is hashed:
editing when something happened is as visible as editing what happened.

Appends are serialised: SQLite's writers already hold the database write lock (BEGIN IMMEDIATE); on
PostgreSQL the transaction takes ``pg_advisory_xact_lock(CHAIN_LOCK_ID)`` before reading the head.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, func, insert, select, text

from pipeline.audit.schema import EventRow
from schemas.record import Item

GENESIS_HASH = "0" * 64
HASH_VERSION = 1
CHAIN_LOCK_ID = 0x67656E63  # "genc": PostgreSQL advisory lock serialising chain appends

#: Kinds of event, and what their payload holds.
ITEM_RECORDED = "item_recorded"  # the item's full persisted record (``items`` columns) plus its run_id
RUN_STARTED = "run_started"  # {"run": the runs row, "spec": the job spec it ran}
RUN_ENDED = "run_ended"  # {"run": the runs row}
REVIEWER_ADDED = "reviewer_added"  # {"reviewer": {"id", "name", "role", "disabled"}}
REVIEWER_UPDATED = "reviewer_updated"  # same shape, after the change
REVIEW_KINDS = ("review_approve", "review_reject", "review_escalate", "review_comment")
DECISION_KINDS = REVIEW_KINDS[:3]  # the review events that change an item's decision; comments do not
CHAIN_STARTED = "chain_started"  # seq 1, written by the migration that created the table
EVENT_KINDS = (ITEM_RECORDED, RUN_STARTED, RUN_ENDED, REVIEWER_ADDED, REVIEWER_UPDATED, *REVIEW_KINDS, CHAIN_STARTED)

HASHED_COLUMNS = (
    "seq", "prev_hash", "kind", "job", "item_id", "run_id", "reviewer_id", "reason_code", "text", "supersedes",
    "created_at", "payload",
)  # fmt: skip

#: Every persisted ``Item`` field; the ``items`` table has a column of the same name for each.
ITEM_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclass_fields(Item) if f.name != "pixels")
RUN_FIELDS = ("id", "job", "status", "versions", "model_info", "counts", "summary", "host")
REVIEWER_FIELDS = ("id", "name", "role", "disabled")

_events = EventRow.__table__
_INSERT_COLUMNS = (*HASHED_COLUMNS, "hash")
_PG_INSERT = f"INSERT INTO events ({', '.join(_INSERT_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_INSERT_COLUMNS))})"


def item_payload(row: Any) -> dict[str, Any]:
    """What an ``item_recorded`` event holds: the ``items`` row minus its DB timestamps."""
    return {**{name: row[name] for name in ITEM_FIELDS}, "run_id": row["run_id"]}


def run_payload(row: Any) -> dict[str, Any]:
    """The ``runs`` row minus its DB timestamps (the events carry those)."""
    return {name: row[name] for name in RUN_FIELDS}


def reviewer_payload(row: Any) -> dict[str, Any]:
    """The ``reviewers`` row minus its secrets: neither password nor token hashes ever enter the log."""
    return {name: row[name] for name in REVIEWER_FIELDS}


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for values a record may carry that JSON does not know."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()  # numpy scalars/arrays from scorers become plain numbers/lists
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    return str(obj)  # same fallback as the Ray transport (Item.to_row)


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, floats by ``repr``, no NaN."""
    try:
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=json_default
        )
    except ValueError:
        shown = json.dumps(obj, ensure_ascii=False, default=json_default)[:200]
        raise ValueError(f"NaN or Infinity in a JSON field of an audit record: {shown}") from None


def format_time(ts: datetime) -> str:
    """A timestamp as hashed: UTC, microseconds, ``Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(row: Any) -> str:
    """The hash of an event from its stored columns (a mapping with every name in ``HASHED_COLUMNS``)."""
    envelope = {name: row[name] for name in HASHED_COLUMNS}
    envelope["created_at"] = format_time(row["created_at"])
    envelope["v"] = HASH_VERSION
    return hashlib.sha256(canonical_json(envelope).encode("utf-8")).hexdigest()


@dataclass
class NewEvent:
    """An event to append; ``payload`` is serialised canonically by ``append_events``."""

    kind: str
    payload: Any
    job: str | None = None
    item_id: str | None = None
    run_id: int | None = None
    reviewer_id: int | None = None
    reason_code: str | None = None
    text: str | None = None
    supersedes: int | None = None
    payload_text: str | None = field(default=None, repr=False)  # already canonical (computed outside the tx)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")


def database_clock(conn: Connection) -> datetime:
    """Now, by the database's clock, in UTC with the backend's precision (µs on PostgreSQL, ms on SQLite)."""
    if conn.dialect.name == "postgresql":
        return conn.execute(select(func.clock_timestamp())).scalar_one().astimezone(UTC)
    value = conn.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def lock_chain(conn: Connection) -> None:
    """Serialise appenders for the rest of this transaction (a no-op on SQLite, whose writers already are)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK_ID)))


def chain_head(conn: Connection) -> tuple[int, str] | None:
    """(seq, hash) of the last event, or None for an empty chain."""
    row = conn.execute(select(_events.c.seq, _events.c.hash).order_by(_events.c.seq.desc()).limit(1)).first()
    return (int(row.seq), row.hash) if row else None


def append_events(conn: Connection, events: list[NewEvent]) -> list[int]:
    """Append ``events`` in order, inside the caller's write transaction; returns their ``seq`` numbers."""
    if not events:
        return []
    lock_chain(conn)
    seq, prev = chain_head(conn) or (0, GENESIS_HASH)
    now = database_clock(conn)
    rows = []
    for ev in events:
        seq += 1
        row = {
            "seq": seq,
            "prev_hash": prev,
            "kind": ev.kind,
            "job": ev.job,
            "item_id": ev.item_id,
            "run_id": ev.run_id,
            "reviewer_id": ev.reviewer_id,
            "reason_code": ev.reason_code,
            "text": ev.text,
            "supersedes": ev.supersedes,
            "created_at": now,
            "payload": ev.payload_text if ev.payload_text is not None else canonical_json(ev.payload),
        }
        row["hash"] = prev = event_hash(row)
        rows.append(row)
    if conn.dialect.name == "postgresql":
        # Straight to psycopg's executemany (pipelined): every value is already a plain str / int / None or an
        # aware datetime, and SQLAlchemy's per-row processing would cost more than the insert itself.
        conn.exec_driver_sql(_PG_INSERT, [tuple(r[c] for c in _INSERT_COLUMNS) for r in rows])
    else:
        conn.execute(insert(_events), rows)
    return [r["seq"] for r in rows]
