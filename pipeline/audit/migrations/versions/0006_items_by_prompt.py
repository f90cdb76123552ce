"""An index on items (job, prompt_id): the planner looks up a prompt's earlier records to supersede them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

A rerun whose settings changed plans a prompt's samples under new item ids; their earlier records (found by
job and prompt id, a chunk of the manifest at a time) become ``superseded``.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_items_job_prompt_id", "items", ["job", "prompt_id"])


def downgrade() -> None:
    op.drop_index("ix_items_job_prompt_id", table_name="items")
