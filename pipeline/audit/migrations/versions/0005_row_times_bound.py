"""Row timestamps bound to the chain: the times ``audit query`` shows and filters on become tamper-evident.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

From this revision on, writers stamp an item's ``created_at`` (and ``updated_at``) and a run's ``started_at`` /
``ended_at`` with the clock their events get, so ``verify`` can require them to be equal. Rows written before
took the database clock a moment apart from their events (items from before revision 0002 got their first
event only when the chain was back-filled), so they are left as they are and not checked. Where the check
starts is recorded in the new ``audit_settings`` table (``row_times_from_seq``: the chain head now), which the
application role may read but not write: an event it appended could not move the boundary.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ROW_TIMES_FROM_SEQ = "row_times_from_seq"


def upgrade() -> None:
    settings = op.create_table(
        "audit_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    head = op.get_bind().scalar(sa.select(sa.func.coalesce(sa.func.max(sa.column("seq")), 0)).select_from(
        sa.table("events", sa.column("seq"))))  # fmt: skip
    op.bulk_insert(settings, [{"name": ROW_TIMES_FROM_SEQ, "value": str(int(head))}])


def downgrade() -> None:
    op.drop_table("audit_settings")
