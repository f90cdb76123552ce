"""Baseline: jobs, runs and items, as the audit store created them before migrations existed.

Revision ID: 0001
Revises:
Create Date: 2026-11-30

A database created by that earlier ``create_all`` has these tables and no version table; the store stamps
it at this revision and upgrades it from here (see ``pipeline.audit.migrate``).
"""

import sqlalchemy as sa
from alembic import op

from pipeline.audit.schema import UTCDateTime, utcnow

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", UTCDateTime(), server_default=utcnow(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), server_default=utcnow(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=True),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(64), sa.ForeignKey("jobs.name"), nullable=False),
        sa.Column("started_at", UTCDateTime(), server_default=utcnow(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("model_info", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
    )
    op.create_index("ix_runs_job", "runs", ["job"])
    op.create_table(
        "items",
        sa.Column("item_id", sa.String(32), primary_key=True),
        sa.Column("job", sa.String(64), sa.ForeignKey("jobs.name"), nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("prompt_id", sa.String(), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("row_number", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("seed_source", sa.String(16), nullable=True),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_revision", sa.String(), nullable=True),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("sampler", sa.String(64), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("guidance_scale", sa.Float(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("campaign", sa.String(), nullable=True),
        sa.Column("sku", sa.String(), nullable=True),
        sa.Column("locale", sa.String(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("image_uri", sa.Text(), nullable=True),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), server_default=utcnow(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), server_default=utcnow(), nullable=False),
    )
    op.create_index("ix_items_campaign", "items", ["campaign"])
    op.create_index("ix_items_status", "items", ["status"])
    op.create_index("ix_items_job_status", "items", ["job", "status"])
    op.create_index("ix_items_job_item_id", "items", ["job", "item_id"])


def downgrade() -> None:
    raise NotImplementedError("the audit log is never migrated down; restore a backup instead")
