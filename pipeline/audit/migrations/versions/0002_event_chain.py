"""The hash-chained event log and reviewers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Seq 1 of every chain is a ``chain_started`` event. A database that already holds runs and items (created
before this revision) gets one ``run_started`` event per run and one ``item_recorded`` event per item right
after it, so that its current rows verify from here on; the chain_started payload says how many were
back-filled, which is all the chain can vouch for about them.
"""

import sqlalchemy as sa
from alembic import op

from pipeline.audit.chain import (
    CHAIN_STARTED,
    ITEM_RECORDED,
    RUN_STARTED,
    NewEvent,
    append_events,
    item_payload,
    run_payload,
)
from pipeline.audit.schema import SEQ_TYPE, UTCDateTime, utcnow

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BACKFILL_PAGE = 1000


def upgrade() -> None:
    op.create_table(
        "reviewers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=True, unique=True),
        sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=utcnow(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("seq", SEQ_TYPE, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("job", sa.String(64), sa.ForeignKey("jobs.name"), nullable=True),
        sa.Column("item_id", sa.String(32), sa.ForeignKey("items.item_id"), nullable=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("reviewer_id", sa.Integer(), sa.ForeignKey("reviewers.id"), nullable=True),
        sa.Column("reason_code", sa.String(64), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("supersedes", SEQ_TYPE, sa.ForeignKey("events.seq"), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_events_item_id_seq", "events", ["item_id", "seq"])
    op.create_index("ix_events_kind_item_id_seq", "events", ["kind", "item_id", "seq"])
    _start_chain(op.get_bind())


def _start_chain(conn: sa.Connection) -> None:
    meta = sa.MetaData()
    jobs = sa.Table("jobs", meta, autoload_with=conn)
    runs = sa.Table("runs", meta, autoload_with=conn)
    items = sa.Table("items", meta, autoload_with=conn)
    n_runs = conn.scalar(sa.select(sa.func.count()).select_from(runs))
    n_items = conn.scalar(sa.select(sa.func.count()).select_from(items))
    append_events(
        conn,
        [NewEvent(CHAIN_STARTED, {"schema_revision": revision, "backfilled": {"runs": n_runs, "items": n_items}})],
    )
    if n_runs:
        latest = dict(conn.execute(sa.select(runs.c.job, sa.func.max(runs.c.id)).group_by(runs.c.job)).all())
        specs = dict(conn.execute(sa.select(jobs.c.name, jobs.c.spec)).all())
        events = []
        for r in conn.execute(sa.select(runs).order_by(runs.c.id)).mappings():
            spec = specs.get(r["job"]) if latest[r["job"]] == r["id"] else None  # jobs.spec is the latest run's
            events.append(NewEvent(RUN_STARTED, {"run": run_payload(r), "spec": spec}, job=r["job"], run_id=r["id"]))
        append_events(conn, events)
    last = None
    while n_items:
        query = sa.select(items).order_by(items.c.item_id).limit(_BACKFILL_PAGE)
        if last is not None:
            query = query.where(items.c.item_id > last)
        rows = conn.execute(query).mappings().all()
        if not rows:
            break
        events = [
            NewEvent(ITEM_RECORDED, item_payload(r), job=r["job"], item_id=r["item_id"], run_id=r["run_id"])
            for r in rows
        ]
        append_events(conn, events)
        last = rows[-1]["item_id"]


def downgrade() -> None:
    raise NotImplementedError("the audit log is never migrated down; restore a backup instead")
