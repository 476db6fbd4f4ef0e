"""The task queue table and its indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from gpufleet.store.types import Json, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("lane", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("input", Json, nullable=True),
        sa.Column("input_ref", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", UtcDateTime, nullable=True),
        sa.Column("not_before", UtcDateTime, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("result", Json, nullable=True),
        sa.Column("result_ref", sa.String(128), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("idempotency_key", sa.String(256), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("started_at", UtcDateTime, nullable=True),
        sa.Column("finished_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.CheckConstraint("lane IN ('interactive', 'batch')", name="ck_tasks_lane"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')",
            name="ck_tasks_status",
        ),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_tasks_tenant_idempotency_key"),
    )
    queued = sa.text("status = 'queued'")
    op.create_index(
        "ix_tasks_claim",
        "tasks",
        ["model", "model_version", "lane", sa.text("priority DESC"), "id"],
        postgresql_where=queued,
        sqlite_where=queued,
    )
    running = sa.text("status = 'running'")
    op.create_index(
        "ix_tasks_lease",
        "tasks",
        ["lease_expires_at"],
        postgresql_where=running,
        sqlite_where=running,
    )
    op.create_index("ix_tasks_tenant_id", "tasks", ["tenant", "id"])


def downgrade() -> None:
    op.drop_table("tasks")
