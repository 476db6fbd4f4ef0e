"""``TaskQueue``: every state transition of a task, each in one transaction.

It owns no threads and no HTTP; the API and workers call it. Time comes from an injectable
clock (UTC) so tests can expire leases without sleeping. Lease expiry compares the clocks of the
worker that set the lease and the process that recovers it: keep hosts on NTP.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from gpufleet.errors import IdempotencyConflict, InvalidInput, LeaseLost, NotFound, TaskFinished
from gpufleet.queue import sql
from gpufleet.queue.ids import new_task_id
from gpufleet.queue.notify import Notifier, notifier_for
from gpufleet.queue.tasks import (
    Completion,
    DepthRow,
    Heartbeat,
    Lane,
    QueueStats,
    Recovery,
    Submission,
    Task,
    TaskError,
    TaskPage,
    TaskSpec,
    TaskStatus,
)
from gpufleet.queue.validation import (
    Limits,
    PreparedTask,
    check_error,
    check_int,
    check_lane,
    check_name,
    check_status,
    check_worker_id,
    encode_json,
    prepare,
)
from gpufleet.store.blobs import BlobStore
from gpufleet.store.engine import autocommit, read_tx, relaxed_engine, write_tx
from gpufleet.store.schema import tasks

t = tasks.c
Clock = Callable[[], datetime]
MAX_CLAIM = 1000
MAX_PAGE = 1000


def utcnow() -> datetime:
    return datetime.now(UTC)


class TaskQueue:
    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        limits: Limits | None = None,
        lease_s: float = 30.0,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 300.0,
        batch_lane_every: int = 4,
        clock: Clock = utcnow,
        notifier: Notifier | None = None,
    ) -> None:
        self.engine = engine
        self.blobs = blobs
        self.limits = limits or Limits()
        self.lease_s = lease_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.batch_lane_every = batch_lane_every
        self.clock = clock
        self.notifier = notifier or notifier_for(engine)
        self._claims = itertools.count(1)
        self._relaxed = relaxed_engine(engine)

    def close(self) -> None:
        self.notifier.close()
        if self._relaxed is not None:
            self._relaxed.dispose()

    def _relaxed_tx(self) -> AbstractContextManager[Connection]:
        """For claims and heartbeats: a claim lost in a database crash leaves its tasks queued,
        as if the lease had expired, and a lost heartbeat only shortens a lease; so these
        commits need not wait for the disk."""
        if self._relaxed is not None:
            return autocommit(self._relaxed)
        return write_tx(self.engine, durable=False)

    # -- submitting and reading ------------------------------------------------------------

    def submit(self, spec: TaskSpec) -> Submission:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[TaskSpec]) -> list[Submission]:
        """Submit several tasks in one transaction: all are accepted, or none is."""
        prepared = [prepare(s, self.limits) for s in specs]  # every check before any write
        self._refuse_reused_keys(prepared)
        now = self.clock()
        # Large inputs go to the blob store first: a crash between the two leaves an orphan
        # blob, never a task whose input is missing.
        rows = [self._row(p, now) for p in prepared]
        out: list[Submission] = []
        with write_tx(self.engine) as conn:
            keyless = [r for r in rows if r["idempotency_key"] is None]
            if keyless:
                conn.execute(tasks.insert(), keyless)
            for row, p in zip(rows, prepared, strict=True):
                if row["idempotency_key"] is None:
                    out.append(Submission(self._task_from_insert(row), created=True))
                else:
                    out.append(self._insert_keyed(conn, row, p))
            created = {s.task.model for s in out if s.created}
            self.notifier.in_transaction(conn, created)
        self.notifier.after_commit(created)
        return out

    def _refuse_reused_keys(self, prepared: list[PreparedTask]) -> None:
        """Refuse a reused idempotency key before large inputs reach the blob store. The
        insert re-checks under the unique constraint; this only spares the store a blob that
        nothing would reference."""
        keyed = [
            p
            for p in prepared
            if p.spec.idempotency_key is not None
            and len(p.encoded_input) > self.limits.inline_input_limit
        ]
        if not keyed:
            return
        with read_tx(self.engine) as conn:
            for p in keyed:
                row = conn.execute(
                    sa.select(t.id, t.request_hash).where(
                        t.tenant == p.spec.tenant, t.idempotency_key == p.spec.idempotency_key
                    )
                ).first()
                if row is not None and row.request_hash != p.request_hash:
                    raise _key_conflict(p.spec.idempotency_key, row.id)

    def _row(self, p: PreparedTask, now: datetime) -> dict[str, Any]:
        inline = len(p.encoded_input) <= self.limits.inline_input_limit
        return {
            "id": new_task_id(),
            "tenant": p.spec.tenant,
            "model": p.spec.model,
            "model_version": p.spec.version,
            "lane": p.lane.value,
            "priority": p.spec.priority,
            "input": p.spec.input if inline else None,
            "input_ref": None if inline else self.blobs.put(p.encoded_input),
            "status": TaskStatus.QUEUED.value,
            "attempts": 0,
            "max_attempts": p.max_attempts,
            "not_before": now,
            "cancel_requested": False,
            "idempotency_key": p.spec.idempotency_key,
            "request_hash": p.request_hash if p.spec.idempotency_key is not None else None,
            "created_at": now,
        }

    @staticmethod
    def _task_from_insert(row: dict[str, Any]) -> Task:
        full = {c.name: row.get(c.name) for c in tasks.c}
        return Task.from_row(full)  # type: ignore[arg-type]

    def _insert_keyed(self, conn: Connection, row: dict[str, Any], p: PreparedTask) -> Submission:
        # ON CONFLICT DO NOTHING: two racing submitters with one key both end up with the row
        # that committed first (PostgreSQL waits for it), never with an integrity error.
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(tasks)
            .values(row)
            .on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"])
            .returning(*tasks.c)
        )
        inserted = conn.execute(stmt).mappings().first()
        if inserted is not None:
            return Submission(Task.from_row(inserted), created=True)
        existing = (
            conn.execute(
                sa.select(tasks).where(
                    t.tenant == row["tenant"], t.idempotency_key == row["idempotency_key"]
                )
            )
            .mappings()
            .one()
        )
        if existing["request_hash"] != p.request_hash:
            raise _key_conflict(row["idempotency_key"], existing["id"])
        return Submission(Task.from_row(existing), created=False)

    def get(self, task_id: str, tenant: str | None = None) -> Task:
        """The task; ``NotFound`` when it does not exist or belongs to another tenant."""
        query = sa.select(tasks).where(t.id == str(task_id)[:64])
        if tenant is not None:
            query = query.where(t.tenant == tenant)
        with read_tx(self.engine) as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            raise NotFound(f"task {task_id!s:.64} not found", task_id=str(task_id)[:64])
        return Task.from_row(row)

    def load_input(self, task: Task) -> Any:
        return task.input if task.input_ref is None else json.loads(self.blobs.get(task.input_ref))

    def load_result(self, task: Task) -> Any:
        if task.result_ref is None:
            return task.result
        return json.loads(self.blobs.get(task.result_ref))

    def list_tasks(
        self,
        *,
        tenant: str | None = None,
        status: str | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Tasks newest first; pass the page's ``next_cursor`` back to get the next page."""
        check_int(limit, "limit", 1, MAX_PAGE)
        query = sa.select(tasks).order_by(t.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(t.tenant == tenant)
        if status is not None:
            query = query.where(t.status == check_status(status).value)
        if model is not None:
            query = query.where(t.model == check_name(model, "model"))
        if cursor is not None:
            query = query.where(t.id < str(cursor)[:64])
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).mappings().all()
        items = [Task.from_row(r) for r in rows[:limit]]
        return TaskPage(items, items[-1].id if len(rows) > limit else None)

    def cancel(self, task_id: str, tenant: str | None = None) -> Task:
        """Cancel: a queued task ends at once; a running one is flagged for its worker to stop.

        Cancelling a cancelled task is a no-op; a succeeded or failed one raises TaskFinished.
        """
        now = self.clock()
        with write_tx(self.engine) as conn:
            query = sa.select(t.status).where(t.id == str(task_id)[:64])
            if tenant is not None:
                query = query.where(t.tenant == tenant)
            status = conn.execute(query.with_for_update()).scalar()
            if status is None:
                raise NotFound(f"task {task_id!s:.64} not found", task_id=str(task_id)[:64])
            if status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED):
                raise TaskFinished(f"task {task_id} already {status}", status=status)
            values: dict[str, Any] = {"cancel_requested": True}
            if status == TaskStatus.QUEUED:
                values |= {"status": TaskStatus.CANCELLED.value, "finished_at": now}
            if status != TaskStatus.CANCELLED:
                conn.execute(sa.update(tasks).where(t.id == task_id).values(values))
            row = conn.execute(sa.select(tasks).where(t.id == task_id)).mappings().one()
        return Task.from_row(row)

    # -- the worker's side -----------------------------------------------------------------

    def claim(
        self,
        model: str,
        version: str,
        worker_id: str,
        *,
        lanes: Iterable[str] = (Lane.INTERACTIVE, Lane.BATCH),
        max_n: int = 1,
        lease_s: float | None = None,
    ) -> list[Task]:
        """Atomically take up to ``max_n`` queued tasks and lease them to ``worker_id``.

        The interactive lane goes first, except that one claim in ``batch_lane_every`` puts
        the batch lane first, so a busy interactive lane cannot starve batch work. Inputs held
        in the blob store are loaded into ``Task.input``.
        """
        check_name(model, "model")
        check_worker_id(worker_id)
        check_int(max_n, "max_n", 1, MAX_CLAIM)
        order = self._lane_order([check_lane(lane) for lane in lanes])
        now = self.clock()
        until = now + timedelta(seconds=lease_s or self.lease_s)
        claimed: list[Task] = []
        # On PostgreSQL each lane's claim is its own atomic statement (see _relaxed_tx).
        with self._relaxed_tx() as conn:
            for lane in order:
                want = max_n - len(claimed)
                if want <= 0:
                    break
                params = {
                    "p_model": model,
                    "p_version": version,
                    "p_lane": lane.value,
                    "p_limit": want,
                    "p_worker": worker_id,
                    "p_now": now,
                    "p_until": until,
                }
                batch = [Task.from_row(r) for r in conn.execute(sql.CLAIM, params).mappings()]
                claimed.extend(sorted(batch, key=lambda x: (-x.priority, x.id)))
        return [
            dataclasses.replace(x, input=self.load_input(x)) if x.input_ref else x for x in claimed
        ]

    def _lane_order(self, lanes: list[Lane]) -> list[Lane]:
        if not lanes:
            raise InvalidInput("lanes must name at least one lane", field="lanes")
        order = sorted(set(lanes), key=[Lane.INTERACTIVE, Lane.BATCH].index)
        if len(order) == 2 and next(self._claims) % self.batch_lane_every == 0:
            order.reverse()
        return order

    def heartbeat(
        self, worker_id: str, task_ids: Sequence[str], lease_s: float | None = None
    ) -> Heartbeat:
        """Extend the leases this worker still holds; report lost ones and cancel requests."""
        check_worker_id(worker_id)
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return Heartbeat(frozenset(), frozenset(), frozenset())
        until = self.clock() + timedelta(seconds=lease_s or self.lease_s)
        with self._relaxed_tx() as conn:
            rows = conn.execute(
                sql.EXTEND_LEASES, {"p_ids": ids, "p_worker": worker_id, "p_until": until}
            ).all()
        held = frozenset(r[0] for r in rows)
        return Heartbeat(
            held=held,
            lost=frozenset(ids) - held,
            cancel_requested=frozenset(r[0] for r in rows if r[1]),
        )

    def complete(self, task_id: str, worker_id: str, result: Any) -> None:
        """Record a task's result. Raises ``TaskFinished`` if another completion came first."""
        report = self.complete_many(worker_id, [(task_id, result)])
        if task_id in report.rejected:
            status = report.rejected[task_id]
            raise TaskFinished(f"task {task_id} already {status}", status=status)

    def complete_many(self, worker_id: str, results: Sequence[tuple[str, Any]]) -> Completion:
        """Record results of a batch in one transaction.

        The first completion of a task wins, even from a worker whose lease expired, since its
        result is as good as any; later ones are reported in ``rejected`` and change nothing.
        A task whose cancellation was requested ends ``cancelled`` and its result is dropped.
        An unknown id raises ``NotFound`` and nothing of the batch is recorded.
        """
        check_worker_id(worker_id)
        encoded = {tid: encode_json(res, f"result of task {tid}") for tid, res in results}
        if len(encoded) != len(results):
            raise InvalidInput("a task appears twice in one completion", field="results")
        now = self.clock()
        params: list[dict[str, Any]] = []
        for tid, res in results:
            inline = len(encoded[tid]) <= self.limits.inline_input_limit
            params.append(
                {
                    "b_id": tid,
                    "b_result": res if inline else None,
                    "b_ref": None if inline else self.blobs.put(encoded[tid]),
                }
            )
        if self.engine.dialect.name == "postgresql":
            with autocommit(self.engine) as conn:  # one statement, one durable commit
                return self._complete_batch_pg(conn, now, params)
        with write_tx(self.engine) as conn:
            found = {r.id: r for r in conn.execute(sql.LOCK_FOR_FINISH, {"p_ids": list(encoded)})}
            _raise_missing(set(encoded) - set(found))
            rejected = {
                tid: TaskStatus(r.status)
                for tid, r in found.items()
                if TaskStatus(r.status).is_finished
            }
            done = [p for p in params if p["b_id"] in found and p["b_id"] not in rejected]
            for p in done:
                p["p_now"] = now
                cancelled = found[p["b_id"]].cancel_requested
                p["b_status"] = (TaskStatus.CANCELLED if cancelled else TaskStatus.SUCCEEDED).value
                if cancelled:
                    p["b_result"] = p["b_ref"] = None
            if done:
                conn.execute(sql.FINISH_WITH_RESULT, done)
        return Completion(tuple(p["b_id"] for p in done), rejected)

    @staticmethod
    def _complete_batch_pg(
        conn: Connection, now: datetime, params: list[dict[str, Any]]
    ) -> Completion:
        rows = [
            {"id": p["b_id"], "result": p["b_result"], "result_ref": p["b_ref"]} for p in params
        ]
        done = conn.execute(
            sql.PG_COMPLETE_BATCH, {"p_now": now, "p_rows": json.dumps(rows)}
        ).scalars()
        accepted = set(done)
        rest = [p["b_id"] for p in params if p["b_id"] not in accepted]
        rejected: dict[str, TaskStatus] = {}
        if rest:  # rare: someone else finished them first, or they do not exist
            rejected = {
                r.id: TaskStatus(r.status)
                for r in conn.execute(sql.FINISHED_STATUS, {"p_ids": rest})
            }
            _raise_missing(set(rest) - set(rejected))
        return Completion(tuple(p["b_id"] for p in params if p["b_id"] in accepted), rejected)

    def fail(self, task_id: str, worker_id: str, error: TaskError, *, retryable: bool) -> Task:
        """Report a failed attempt. Retryable failures go back to the queue with exponential
        backoff while attempts remain; otherwise the task ends ``failed`` with ``error``.
        Raises ``LeaseLost`` when the task is no longer this worker's (nothing changes)."""
        error = check_error(error)
        now = self.clock()
        with write_tx(self.engine) as conn:
            row = self._lock_held(conn, task_id, worker_id)
            if row["cancel_requested"]:
                values = self._cancelled(now)
            elif retryable and row["attempts"] < row["max_attempts"]:
                values = self._requeued(now, row["attempts"], error)
            else:
                values = self._failed(now, error)
            updated = conn.execute(
                sa.update(tasks).where(t.id == task_id).values(values).returning(*tasks.c)
            )
            task = Task.from_row(updated.mappings().one())
            requeued = [task.model] if task.status == TaskStatus.QUEUED else []
            self.notifier.in_transaction(conn, requeued)
        self.notifier.after_commit(requeued)
        return task

    def acknowledge_cancel(self, task_id: str, worker_id: str) -> Task:
        """The worker stopped a task whose cancellation was requested: it ends ``cancelled``."""
        now = self.clock()
        with write_tx(self.engine) as conn:
            self._lock_held(conn, task_id, worker_id)
            updated = conn.execute(
                sa.update(tasks)
                .where(t.id == task_id)
                .values(self._cancelled(now))
                .returning(*tasks.c)
            )
            return Task.from_row(updated.mappings().one())

    def release(self, worker_id: str, task_ids: Sequence[str]) -> list[str]:
        """Hand held tasks back unstarted (a draining worker): queued again, attempt not
        counted. Returns the ids released; tasks no longer held are skipped."""
        check_worker_id(worker_id)
        now = self.clock()
        with write_tx(self.engine) as conn:
            rows = conn.execute(
                sa.update(tasks)
                .where(
                    t.id.in_(list(task_ids)),
                    t.lease_owner == worker_id,
                    t.status == TaskStatus.RUNNING.value,
                )
                .values(
                    status=sa.case(
                        (t.cancel_requested, TaskStatus.CANCELLED.value),
                        else_=TaskStatus.QUEUED.value,
                    ),
                    finished_at=sa.case((t.cancel_requested, now), else_=None),
                    attempts=t.attempts - 1,
                    not_before=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .returning(t.id, t.model)
            ).all()
            models = {r.model for r in rows}
            self.notifier.in_transaction(conn, models)
        self.notifier.after_commit(models)
        return [r.id for r in rows]

    def _lock_held(self, conn: Connection, task_id: str, worker_id: str) -> sa.RowMapping:
        check_worker_id(worker_id)
        row = conn.execute(sql.LOCK_FOR_FINISH, {"p_ids": [task_id]}).mappings().first()
        if row is None:
            raise NotFound(f"task {task_id!s:.64} not found", task_id=str(task_id)[:64])
        if TaskStatus(row["status"]).is_finished:
            raise TaskFinished(f"task {task_id} already {row['status']}", status=row["status"])
        if row["status"] != TaskStatus.RUNNING or row["lease_owner"] != worker_id:
            raise LeaseLost(
                f"worker {worker_id} no longer holds task {task_id}: its lease expired and the "
                "task was handed on",
                task_id=task_id,
            )
        full = conn.execute(sa.select(tasks).where(t.id == task_id)).mappings().one()
        return full

    # -- transitions shared by fail / recover / cancel --------------------------------------

    def backoff(self, attempts: int) -> timedelta:
        """Delay before attempt ``attempts + 1``: base * 2^(attempts-1), capped."""
        seconds = self.retry_backoff_s * 2 ** max(0, attempts - 1)
        return timedelta(seconds=min(seconds, self.retry_backoff_max_s))

    def _requeued(self, now: datetime, attempts: int, error: TaskError) -> dict[str, Any]:
        return {
            "status": TaskStatus.QUEUED.value,
            "not_before": now + self.backoff(attempts),
            "lease_owner": None,
            "lease_expires_at": None,
            "error_code": error.code,
            "error_message": error.message,
        }

    @staticmethod
    def _failed(now: datetime, error: TaskError) -> dict[str, Any]:
        return {
            "status": TaskStatus.FAILED.value,
            "finished_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
            "error_code": error.code,
            "error_message": error.message,
        }

    @staticmethod
    def _cancelled(now: datetime) -> dict[str, Any]:
        return {
            "status": TaskStatus.CANCELLED.value,
            "finished_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }

    # -- housekeeping ----------------------------------------------------------------------

    def recover_expired(self, limit: int = 1000) -> Recovery:
        """Tasks whose worker stopped heartbeating go back to the queue (with backoff) or, out
        of attempts, end ``failed`` with ``lease_expired``. Safe to run from many processes."""
        now = self.clock()
        requeued: list[str] = []
        failed: list[str] = []
        cancelled: list[str] = []
        models: set[str] = set()
        with write_tx(self.engine) as conn:
            expired = conn.execute(sql.EXPIRED_LEASES, {"p_now": now, "p_limit": limit})
            for row in expired.mappings().all():
                error = TaskError(
                    "lease_expired",
                    f"worker {row['lease_owner']} stopped heartbeating (attempt "
                    f"{row['attempts']} of {row['max_attempts']}); its lease expired",
                )
                if row["cancel_requested"]:
                    values, bucket = self._cancelled(now), cancelled
                elif row["attempts"] < row["max_attempts"]:
                    values, bucket = self._requeued(now, row["attempts"], error), requeued
                    models.add(row["model"])
                else:
                    values, bucket = self._failed(now, error), failed
                conn.execute(sa.update(tasks).where(t.id == row["id"]).values(values))
                bucket.append(row["id"])
            self.notifier.in_transaction(conn, models)
        self.notifier.after_commit(models)
        return Recovery(tuple(requeued), tuple(failed), tuple(cancelled))

    def wait_for_work(
        self,
        model: str,
        version: str,
        timeout: float,
        lanes: Iterable[str] = (Lane.INTERACTIVE, Lane.BATCH),
    ) -> bool:
        """Block until work for this model may be claimable (a wake-up, or a task in backoff
        becoming due) or ``timeout`` seconds pass. Call it after a claim came back empty."""
        lane_list = [check_lane(lane) for lane in lanes]
        with read_tx(self.engine) as conn:
            due = conn.execute(
                sql.NEXT_DUE,
                {"p_model": model, "p_version": version, "p_lanes": [x.value for x in lane_list]},
            ).scalar()
        if due is not None:
            until_due = (due - self.clock()).total_seconds()
            if until_due <= 0:
                return True
            if until_due < timeout:
                return self.notifier.wait(model, until_due) or True
        return self.notifier.wait(model, timeout)

    def stats(self) -> QueueStats:
        now = self.clock()
        with read_tx(self.engine) as conn:
            rows = conn.execute(sql.DEPTH).all()
        return QueueStats(
            [
                DepthRow(
                    model=r[0],
                    lane=Lane(r[1]),
                    status=TaskStatus(r[2]),
                    count=int(r[3]),
                    oldest_age_s=_age(now, r[4]),
                )
                for r in rows
            ]
        )

    def purge_finished(self, older_than: timedelta) -> int:
        """Delete tasks that finished more than ``older_than`` ago; returns how many."""
        cutoff = self.clock() - older_than
        with write_tx(self.engine) as conn:
            result = conn.execute(
                sa.delete(tasks).where(
                    t.status.in_([s.value for s in TaskStatus if s.is_finished]),
                    t.finished_at < cutoff,
                )
            )
        return int(result.rowcount or 0)


def _raise_missing(missing: set[str]) -> None:
    if missing:
        ids = sorted(missing)
        raise NotFound(
            f"no such task: {ids[0]}; no result of this batch was recorded", task_ids=ids
        )


def _key_conflict(key: str | None, task_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used for a different request (task {task_id}); "
        "use a new key for a new request",
        field="idempotency_key",
        task_id=task_id,
    )


def _age(now: datetime, then: datetime | None) -> float | None:
    if then is None:
        return None
    return max(0.0, (now - then).total_seconds())
