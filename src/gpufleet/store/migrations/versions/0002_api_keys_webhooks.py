"""API keys, task webhooks, and the per-tenant queue-depth index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from gpufleet.store.types import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("webhook_url", sa.Text, nullable=True))
        batch.add_column(sa.Column("webhook_state", sa.String(16), nullable=True))
        batch.add_column(
            sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("webhook_next_at", UtcDateTime, nullable=True))
    queued = sa.text("status = 'queued'")
    op.create_index(
        "ix_tasks_tenant_queued", "tasks", ["tenant"], postgresql_where=queued, sqlite_where=queued
    )
    pending = sa.text("webhook_state = 'pending'")
    op.create_index(
        "ix_tasks_webhook_due",
        "tasks",
        ["webhook_next_at"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("revoked_at", UtcDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_tasks_webhook_due", "tasks")
    op.drop_index("ix_tasks_tenant_queued", "tasks")
    with op.batch_alter_table("tasks") as batch:
        for column in ("webhook_next_at", "webhook_attempts", "webhook_state", "webhook_url"):
            batch.drop_column(column)
