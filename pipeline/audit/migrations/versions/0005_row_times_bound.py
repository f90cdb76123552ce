"""Row timestamps bound to the chain: the times ``audit query`` shows and filters on become tamper-evident.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

From this revision on, writers stamp an item's ``created_at`` (and ``updated_at``) and a run's ``started_at`` /
``ended_at`` with the clock their events get, so ``verify`` can require them to be equal. Rows written before
took the database clock a moment apart from their events (items from before revision 0002 got their first
event only when the chain was back-filled), so they are left as they are and not checked: in a database that
already holds history, the ``row_times_bound`` event this revision appends marks where the check starts. A new
database (only ``chain_started`` so far) gets no marker: every row of it is checked. No schema change.
"""

import sqlalchemy as sa
from alembic import op

from pipeline.audit.chain import CHAIN_STARTED, ROW_TIMES_BOUND, NewEvent, append_events

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    if not conn.scalar(sa.select(sa.func.count()).select_from(sa.table("events", sa.column("kind"))).where(
            sa.column("kind") != CHAIN_STARTED)):  # fmt: skip
        return  # nothing written yet: every row to come is stamped with its event's time
    note = ("from here on, items.created_at is the time of the item's first item_recorded event, and runs.started_at"
            " / ended_at the time of the run's run_started / run_ended event")  # fmt: skip
    append_events(conn, [NewEvent(ROW_TIMES_BOUND, {"note": note})])


def downgrade() -> None:
    pass  # the marker stays in the chain (events are never deleted); older code does not read it
