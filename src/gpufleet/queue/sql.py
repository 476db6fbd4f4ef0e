"""The queue's hot statements, built once with bind parameters, for both dialects.

SQLAlchemy renders them for SQLite and PostgreSQL; where the two differ it is noted. Each says
which index in ``store/schema.py`` it relies on. Building a statement costs far more than
running it (about 2 ms against 0.3 ms for a claim), so they are module constants.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gpufleet.queue.tasks import TaskStatus
from gpufleet.store.schema import tasks
from gpufleet.store.types import UtcDateTime

t = tasks.c
QUEUED, RUNNING = TaskStatus.QUEUED.value, TaskStatus.RUNNING.value
# In WHERE clauses the status is an SQL literal, not a bind parameter: PostgreSQL can use a
# partial index (WHERE status = 'queued') only when it can prove the query's condition implies
# the index's, which a parameter of a prepared, generic plan does not. With a parameter every
# claim was planned afresh (0.8 ms) to reach ix_tasks_claim.
IS_QUEUED = t.status == sa.literal_column("'queued'")
IS_RUNNING = t.status == sa.literal_column("'running'")
# Bind parameters are named p_*: SQLAlchemy reserves column names in UPDATE statements.
_now = sa.bindparam("p_now", type_=UtcDateTime())
_until = sa.bindparam("p_until", type_=UtcDateTime())
_ids: sa.BindParameter[list[str]] = sa.bindparam("p_ids", expanding=True)


# Take up to :limit ready tasks of one lane: best priority first, then oldest.
#
# PostgreSQL: FOR UPDATE SKIP LOCKED lets concurrent claimers pass over each other's rows
# instead of queueing behind them; the CTE is evaluated once, so the LIMIT holds. SQLite ignores
# the locking clause: the caller's BEGIN IMMEDIATE already serialises claimers.
# Uses ix_tasks_claim (model, model_version, lane, priority DESC, id) WHERE queued.
def _ready(lane: str, name: str) -> sa.CTE:
    return (
        sa.select(t.id, t.priority)
        .where(
            IS_QUEUED,
            t.model == sa.bindparam("p_model"),
            t.model_version == sa.bindparam("p_version"),
            t.lane == sa.bindparam(lane),
            t.not_before <= _now,
        )
        .order_by(t.priority.desc(), t.id)
        .limit(sa.bindparam("p_limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
        .cte(name)
    )


def _claim(picked: sa.Select[Any]) -> sa.Update:
    return (
        sa.update(tasks)
        .where(t.id.in_(picked))
        .values(
            status=RUNNING,
            attempts=t.attempts + 1,
            lease_owner=sa.bindparam("p_worker"),
            lease_expires_at=_until,
            started_at=sa.func.coalesce(t.started_at, _now),
        )
        # Only what a worker needs (Task.from_claim fills in what the claim itself decided):
        # returning all 24 columns cost the claimer a third more CPU per task.
        .returning(
            t.id,
            t.tenant,
            t.lane,
            t.priority,
            t.input,
            t.input_ref,
            t.attempts,
            t.max_attempts,
            t.created_at,
            t.not_before,
            t.started_at,
        )
    )


_picked = _ready("p_lane", "picked")
CLAIM = _claim(sa.select(_picked.c.id))

# Two lanes in one statement, as the lane plan orders them: up to :quota of the first lane,
# then the second lane, then the first lane again for what the second lacked; :limit in all.
# One statement instead of three (a plan that reserves a batch slot used to run the first lane,
# the empty second, then the first again): at 4 claimers on the 2-core VM, claim-complete went
# from 2,500 to 4,850 tasks/s. Each lane's CTE locks up to :limit rows (SKIP LOCKED); those not
# picked are unlocked when the statement commits.
_first = _ready("p_first", "first_lane")
_second = _ready("p_second", "second_lane")
_rank_first = sa.func.row_number().over(order_by=(_first.c.priority.desc(), _first.c.id))
_rank_second = sa.func.row_number().over(order_by=(_second.c.priority.desc(), _second.c.id))
_ranked = sa.union_all(
    sa.select(
        _first.c.id,
        sa.case((_rank_first <= sa.bindparam("p_quota", type_=sa.Integer), 0), else_=2).label(
            "step"
        ),
        _rank_first.label("r"),
    ),
    sa.select(_second.c.id, sa.literal(1).label("step"), _rank_second.label("r")),
).cte("ranked")
CLAIM_TWO_LANES = _claim(
    sa.select(_ranked.c.id)
    .order_by(_ranked.c.step, _ranked.c.r)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
)

# Heartbeat: extend only the rows this worker still holds. Primary-key lookups.
EXTEND_LEASES = (
    sa.update(tasks)
    .where(t.id.in_(_ids), t.lease_owner == sa.bindparam("p_worker"), IS_RUNNING)
    .values(lease_expires_at=_until)
    .returning(t.id, t.cancel_requested)
)

# Lock rows about to end, so two finishers of one task serialise and the second sees the first's
# outcome (READ COMMITTED re-reads the row after the wait). Primary-key lookups.
LOCK_FOR_FINISH = (
    sa.select(t.id, t.status, t.lease_owner, t.cancel_requested)
    .where(t.id.in_(_ids))
    .with_for_update()
)

# The whole row of one task, locked: fail / acknowledge_cancel check it, then change it.
LOCK_TASK = sa.select(tasks).where(t.id == sa.bindparam("p_id")).with_for_update()

# Record results of a batch (SQLite; PostgreSQL has PG_COMPLETE_BATCH): executed once per row
# with executemany. The result is bound as the JSON text the worker encoded already (SQLite
# keeps JSON as text): through the column's JSON type every result was encoded a second time.
FINISH_WITH_RESULT = (
    sa.update(tasks)
    .where(t.id == sa.bindparam("b_id"))
    .values(
        status=sa.bindparam("b_status"),
        result=sa.bindparam("b_result", type_=sa.Text()),
        result_ref=sa.bindparam("b_ref"),
        finished_at=_now,
        webhook_next_at=sa.case((t.webhook_state == "pending", _now), else_=t.webhook_next_at),
        lease_owner=None,
        lease_expires_at=None,
        error_code=None,
        error_message=None,
    )
)

# Running tasks whose lease ran out. Uses ix_tasks_lease WHERE running.
EXPIRED_LEASES = (
    sa.select(t.id, t.model, t.lease_owner, t.attempts, t.max_attempts, t.cancel_requested)
    .where(IS_RUNNING, t.lease_expires_at < _now)
    .order_by(t.lease_expires_at)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)

# The tasks a worker that died was holding (the supervisor saw it exit): recovered at once,
# without waiting for their leases to run out.
HELD_BY_WORKER = (
    sa.select(t.id, t.model, t.lease_owner, t.attempts, t.max_attempts, t.cancel_requested)
    .where(IS_RUNNING, t.lease_owner == sa.bindparam("p_owner"))
    .with_for_update()
)

# When the earliest queued task (e.g. one in retry backoff) becomes claimable.
NEXT_DUE = sa.select(sa.func.min(t.not_before, type_=UtcDateTime())).where(
    IS_QUEUED,
    t.model == sa.bindparam("p_model"),
    t.model_version == sa.bindparam("p_version"),
    t.lane.in_(sa.bindparam("p_lanes", expanding=True)),
)


# Live tasks per model / lane / status: one query per status so that each matches its partial
# index (ix_tasks_claim for queued, ix_tasks_lease for running); history is never scanned.
def _depth(status: str, condition: sa.ColumnElement[bool]) -> sa.Select[Any]:
    return (
        sa.select(
            t.model,
            t.lane,
            sa.literal_column(f"'{status}'").label("status"),
            sa.func.count().label("count"),
            sa.func.min(t.created_at, type_=UtcDateTime()).label("oldest"),
        )
        .where(condition)
        .group_by(t.model, t.lane)
    )


DEPTH = sa.union_all(_depth(QUEUED, IS_QUEUED), _depth(RUNNING, IS_RUNNING))

# PostgreSQL: a whole batch of results in one statement and one round trip. The row lock the
# UPDATE takes serialises racing finishers; under READ COMMITTED the second re-checks the status
# condition against the first's committed row and skips it, so the first completion wins.
# A task whose cancellation was requested ends cancelled and its result is dropped. If any id
# does not exist the NOT EXISTS guard makes the statement write nothing (bad input is refused
# whole); the caller then finds out which.
PG_COMPLETE_BATCH = sa.text(
    """
    WITH v AS (
        SELECT * FROM jsonb_to_recordset(CAST(:p_rows AS jsonb))
            AS x(id text, result jsonb, result_ref text)
    ), done AS (
    UPDATE tasks SET
        status = CASE WHEN tasks.cancel_requested THEN 'cancelled' ELSE 'succeeded' END,
        result = CASE WHEN tasks.cancel_requested THEN NULL ELSE v.result END,
        result_ref = CASE WHEN tasks.cancel_requested THEN NULL ELSE v.result_ref END,
        finished_at = :p_now,
        webhook_next_at = CASE WHEN tasks.webhook_state = 'pending' THEN :p_now
                               ELSE tasks.webhook_next_at END,
        lease_owner = NULL,
        lease_expires_at = NULL,
        error_code = NULL,
        error_message = NULL
    FROM v
    WHERE tasks.id = v.id AND tasks.status IN ('queued', 'running')
      AND NOT EXISTS (SELECT 1 FROM v LEFT JOIN tasks t2 ON t2.id = v.id WHERE t2.id IS NULL)
    RETURNING tasks.id, tasks.status
    )
    SELECT done.id, done.status FROM done
    """
).bindparams(sa.bindparam("p_now", type_=UtcDateTime()))

FINISHED_STATUS = sa.select(t.id, t.status).where(t.id.in_(_ids))

# A queued task's place in its lane, in the claim's order (priority DESC, then id): how many
# queued tasks of its model version and lane come before it, and how many there are, each
# counted up to :p_cap (a count over the whole backlog cost 20 ms at 100,000 queued tasks on
# SQLite, on every GET of a task and every second of its event stream). Three ranges of
# ix_tasks_claim WHERE queued, each stopping at :p_cap rows: higher priority; the same priority
# and older; the lane. Tasks in retry backoff count: they are claimed when due.
_p_priority = sa.bindparam("p_priority", type_=sa.Integer)
_p_id: sa.BindParameter[str] = sa.bindparam("p_id")
_p_cap = sa.bindparam("p_cap", type_=sa.Integer)
_in_lane = (
    IS_QUEUED,
    t.model == sa.bindparam("p_model"),
    t.model_version == sa.bindparam("p_version"),
    t.lane == sa.bindparam("p_lane"),
)


def _count_upto(*where: sa.ColumnElement[bool]) -> sa.ScalarSelect[int]:
    rows = sa.select(t.id).where(*_in_lane, *where).limit(_p_cap).subquery()
    return sa.select(sa.func.count()).select_from(rows).scalar_subquery()


QUEUE_POSITION = sa.select(
    _count_upto(t.priority > _p_priority),
    _count_upto(t.priority == _p_priority, t.id < _p_id),
    _count_upto(),
    # Whether the task itself is still there (not claimed since it was read).
    sa.exists().where(*_in_lane, t.id == _p_id),
)

# Quota: a tenant's queued tasks. Uses ix_tasks_tenant_queued (tenant) WHERE queued.
QUEUED_OF_TENANT = sa.select(sa.func.count()).where(IS_QUEUED, t.tenant == sa.bindparam("p_tenant"))

# PostgreSQL: many new tasks (no idempotency key) as one statement whose one parameter is the
# rows as a JSON document. psycopg's executemany pipelines one INSERT a row, which took a bulk
# submit of 1,000 tasks twice as long as SQLite's; a multi-row VALUES with 17,000 parameters
# took longer still.
_PG_INSERT = """
    INSERT INTO tasks (id, tenant, model, model_version, lane, priority, input, input_ref,
                       status, attempts, max_attempts, not_before, cancel_requested,
                       created_at, webhook_url, webhook_state, webhook_attempts)
    SELECT x.id, x.tenant, x.model, x.model_version, x.lane, x.priority, x.input, x.input_ref,
           'queued', 0, x.max_attempts, :p_now, false, :p_now, x.webhook_url, x.webhook_state, 0
    FROM jsonb_to_recordset(CAST(:p_rows AS jsonb))
        AS x(id text, tenant text, model text, model_version text, lane text, priority int,
             input jsonb, input_ref text, max_attempts int, webhook_url text,
             webhook_state text)
"""
PG_INSERT_BATCH = sa.text(_PG_INSERT).bindparams(sa.bindparam("p_now", type_=UtcDateTime()))
# The same with the submit's wake-ups (one per model), as one statement that commits alone.
PG_INSERT_BATCH_NOTIFY = sa.text(
    f"""
    WITH ins AS ({_PG_INSERT} RETURNING model)
    SELECT pg_notify(:p_channel, m.model) FROM (SELECT DISTINCT model FROM ins) AS m
    """
).bindparams(sa.bindparam("p_now", type_=UtcDateTime()))
