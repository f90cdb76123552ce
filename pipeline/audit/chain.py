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

import functools
import hashlib
import json
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, func, select, text

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
_INSERT_SQL = f"INSERT INTO events ({', '.join(_INSERT_COLUMNS)}) VALUES ({{}})"
#: The events insert by DB-API placeholder style (SQLite's qmark; psycopg takes %s whatever its paramstyle).
_INSERTS = {
    "qmark": _INSERT_SQL.format(", ".join(["?"] * len(_INSERT_COLUMNS))),
    "other": _INSERT_SQL.format(", ".join(["%s"] * len(_INSERT_COLUMNS))),
}
_insert_values = operator.itemgetter(*_INSERT_COLUMNS)
#: The head and the database clock in one read (``database_clock`` says why each backend's clock).
_HEAD_AND_CLOCK = {
    "postgresql": "SELECT seq, hash, clock_timestamp() FROM events ORDER BY seq DESC LIMIT 1",
    "sqlite": "SELECT seq, hash, strftime('%Y-%m-%d %H:%M:%f', 'now') FROM events ORDER BY seq DESC LIMIT 1",
}


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


def json_encoder(separators: tuple[str, str], sort_keys: bool) -> Callable[[Any], str]:
    """``json.dumps(obj, separators=, sort_keys=, ensure_ascii=False, allow_nan=False, default=json_default)``:
    the same text, without building a ``JSONEncoder`` (and its keyword checks) on every call, which costs as much
    as encoding one of a record's small fields. Falls back to ``json.dumps`` where the C encoder is missing or
    its signature differs (checked once, here)."""
    item_sep, key_sep = separators
    options = {"ensure_ascii": False, "allow_nan": False, "default": json_default}
    reference = functools.partial(json.dumps, separators=separators, sort_keys=sort_keys, **options)
    make = getattr(json.encoder, "c_make_encoder", None)
    encode_str = json.encoder.encode_basestring  # what json.dumps uses with ensure_ascii=False

    def dumps(obj: Any) -> str:
        if isinstance(obj, str):
            return encode_str(obj)
        # Exactly JSONEncoder.iterencode's one-shot C encoder, with a fresh circular-reference marker dict per call.
        return "".join(make({}, json_default, encode_str, None, key_sep, item_sep, sort_keys, False, False)(obj, 0))

    probe = {"b": [1, 2.5, None, True, 'é"\n'], "a": {"z": np.float32(0.25), "y": {3}}, "c": 10**20}
    try:
        if make is not None and dumps(probe) == reference(probe):
            return dumps
    except (TypeError, ValueError):
        pass
    return reference


_canonical_dumps = json_encoder((",", ":"), sort_keys=True)


def canonical_json(obj: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no whitespace, floats by ``repr``, no NaN."""
    try:
        return _canonical_dumps(obj)
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


_encode_str = json.encoder.encode_basestring


def _scalar_json(value: Any) -> str | None:
    """A str, int or None exactly as ``canonical_json`` writes it; None for any other value."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    return None


#: ``canonical_json`` of the envelope (see the module docstring), keys in its sorted order, for the common case
#: where every value is a str, int or None: created_at, then _ENVELOPE_FIELDS. tests/test_audit_chain.py checks it
#: against ``event_hash``.
_ENVELOPE_FIELDS = tuple(sorted(set(HASHED_COLUMNS) - {"created_at"}))
_ENVELOPE = (
    '{"created_at":%s,"item_id":%s,"job":%s,"kind":%s,"payload":%s,"prev_hash":%s,"reason_code":%s,'
    '"reviewer_id":%s,"run_id":%s,"seq":%s,"supersedes":%s,"text":%s,"v":' + str(HASH_VERSION) + "}"
)


def _row_hash(row: dict[str, Any], stamp: str) -> str:
    """``event_hash(row)``, with ``stamp`` = ``format_time(row["created_at"])`` computed once per append."""
    parts = tuple(_scalar_json(row[name]) for name in _ENVELOPE_FIELDS)
    if None in parts:  # a value canonical_json converts (a numpy int, say): the general path
        return event_hash(row)
    return hashlib.sha256((_ENVELOPE % (_encode_str(stamp), *parts)).encode("utf-8")).hexdigest()


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


def head_and_clock(conn: Connection) -> tuple[int, str, datetime]:
    """``chain_head`` (seq 0 and the genesis hash for an empty chain) and ``database_clock``, in one read.

    A writer that stamps its rows with the time of their events reads this once, under the chain lock, and
    passes it to ``append_events`` / ``append_rows`` (``head``), so a row's timestamp is its event's, exactly."""
    row = conn.exec_driver_sql(_HEAD_AND_CLOCK[conn.dialect.name]).first()
    if row is None:
        return 0, GENESIS_HASH, database_clock(conn)
    seq, digest, now = row
    if isinstance(now, str):  # SQLite's strftime text
        now = datetime.fromisoformat(now).replace(tzinfo=UTC)
    return int(seq), digest, now.astimezone(UTC)


def append_events(
    conn: Connection, events: list[NewEvent], *, locked: bool = False, head: tuple[int, str, datetime] | None = None
) -> list[int]:
    """Append ``events`` in order, inside the caller's write transaction; returns their ``seq`` numbers.

    ``locked``: the caller already took the chain lock in this transaction (``AuditStore._write`` does), which
    saves a round trip on PostgreSQL. ``head``: ``head_and_clock`` as the caller read it after taking the lock
    (nothing appended since); the events get its clock.
    """
    rows = [
        (ev.kind, ev.job, ev.item_id, ev.run_id, ev.reviewer_id, ev.reason_code, ev.text, ev.supersedes,
         ev.payload_text if ev.payload_text is not None else canonical_json(ev.payload))
        for ev in events
    ]  # fmt: skip
    return append_rows(conn, rows, locked=locked, head=head)


#: An event to append as (kind, job, item_id, run_id, reviewer_id, reason_code, text, supersedes, payload_text).
EventTuple = tuple[str, str | None, str | None, int | None, int | None, str | None, str | None, int | None, str]


def append_rows(
    conn: Connection,
    events: Iterable[EventTuple],
    *,
    locked: bool = False,
    head: tuple[int, str, datetime] | None = None,
) -> list[int]:
    """``append_events`` for events given as ``EventTuple``s: no ``NewEvent`` per item on the hot path of
    ``AuditStore.write_items``.

    Straight to the DB-API ``executemany``: every value is already a plain str / int / None, and the timestamp
    they share is bind-processed once; SQLAlchemy's per-row processing would cost more than the insert itself.
    """
    events = list(events)
    if not events:
        return []
    for ev in events:
        if ev[0] not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {ev[0]!r}")
    if not locked:
        lock_chain(conn)
    seq, prev, now = head if head is not None else head_and_clock(conn)
    stamp = format_time(now)
    to_stored = _events.c.created_at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    stored_now = to_stored(now) if to_stored else now
    params = []
    for kind, job, item_id, run_id, reviewer_id, reason_code, note, supersedes, payload in events:
        seq += 1
        row = {
            "seq": seq,
            "prev_hash": prev,
            "kind": kind,
            "job": job,
            "item_id": item_id,
            "run_id": run_id,
            "reviewer_id": reviewer_id,
            "reason_code": reason_code,
            "text": note,
            "supersedes": supersedes,
            "created_at": now,
            "payload": payload,
        }
        prev = row["hash"] = _row_hash(row, stamp)
        row["created_at"] = stored_now
        params.append(_insert_values(row))
    conn.exec_driver_sql(_INSERTS["qmark" if conn.dialect.paramstyle == "qmark" else "other"], params)
    return [p[0] for p in params]  # seq is the first of _INSERT_COLUMNS
