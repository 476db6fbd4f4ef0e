"""The tables, as SQLAlchemy Core. Migrations in ``store/migrations`` create exactly these.

Each index says which query it serves; an index nobody's query uses is a write cost for nothing.
"""

from __future__ import annotations

import sqlalchemy as sa

from gpufleet.store.types import Json, UtcDateTime

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)

tasks = sa.Table(
    "tasks",
    metadata,
    # UUIDv7 text: sorts by creation time, so ORDER BY id is "oldest first".
    sa.Column("id", sa.String(36), primary_key=True),
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
    # sha256 of the request an idempotency key was first used with, to refuse a reuse that
    # asks for something else.
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    # Called once when the task ends (migration 0002). webhook_state is 'pending' from submit
    # until delivered ('delivered') or given up ('failed'); NULL without a webhook.
    sa.Column("webhook_url", sa.Text, nullable=True),
    sa.Column("webhook_state", sa.String(16), nullable=True),
    sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("webhook_next_at", UtcDateTime, nullable=True),
    sa.CheckConstraint("lane IN ('interactive', 'batch')", name="lane"),
    sa.CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"
    ),
    # A NULL key never collides (both databases treat NULLs as distinct), so keyless
    # submissions are unconstrained.
    sa.UniqueConstraint("tenant", "idempotency_key"),
)

# claim: the next queued tasks of one model version and lane, best priority then oldest. Partial
# on status so the index holds only the backlog, not the ever-growing history.
sa.Index(
    "ix_tasks_claim",
    tasks.c.model,
    tasks.c.model_version,
    tasks.c.lane,
    tasks.c.priority.desc(),
    tasks.c.id,
    postgresql_where=tasks.c.status == "queued",
    sqlite_where=tasks.c.status == "queued",
)
# recover_expired and heartbeat: running tasks by lease expiry.
sa.Index(
    "ix_tasks_lease",
    tasks.c.lease_expires_at,
    postgresql_where=tasks.c.status == "running",
    sqlite_where=tasks.c.status == "running",
)
# list: a tenant's tasks, newest first (id is time-ordered).
sa.Index("ix_tasks_tenant_id", tasks.c.tenant, tasks.c.id)
# quota: how many tasks a tenant has waiting in the queue.
sa.Index(
    "ix_tasks_tenant_queued",
    tasks.c.tenant,
    postgresql_where=tasks.c.status == "queued",
    sqlite_where=tasks.c.status == "queued",
)
# webhooks: deliveries still owed, by when the next attempt is due.
sa.Index(
    "ix_tasks_webhook_due",
    tasks.c.webhook_next_at,
    postgresql_where=tasks.c.webhook_state == "pending",
    sqlite_where=tasks.c.webhook_state == "pending",
)

# API keys (migration 0002). A key is "gfk_<id>_<secret>": ``id`` finds the row, the secret
# is checked against its SHA-256 (keys are 256-bit random, so a slow hash adds nothing) with a
# constant-time comparison. The secret itself is never stored.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("name", sa.String(128), nullable=True),
    sa.Column("admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
)
