"""The worker's side of the queue: claim, heartbeat, complete, fail, acknowledge a cancel,
release. Claims and heartbeats commit without waiting for the disk (see ``_relaxed_tx``);
results, failures and cancellations are durable."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gpufleet.errors import (
    Conflict,
    GpufleetError,
    InvalidInput,
    LeaseLost,
    NotFound,
    TaskFinished,
)
from gpufleet.queue import sql
from gpufleet.queue.core import QueueCore, webhook_due
from gpufleet.queue.notify import CHANNEL, finished_topics
from gpufleet.queue.tasks import Completion, Heartbeat, Lane, Task, TaskError, TaskStatus
from gpufleet.queue.validation import (
    check_error,
    check_int,
    check_lane,
    check_lease,
    check_name,
    check_task_ids,
    check_version,
    check_worker_id,
    encode_json,
)
from gpufleet.store.engine import autocommit, read_tx, write_tx
from gpufleet.store.schema import tasks

t = tasks.c
MAX_CLAIM = 1000
log = logging.getLogger(__name__)


class WorkerOps(QueueCore):
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

        The interactive lane goes first, and a busy interactive lane cannot starve batch work:
        a claim of ``max_n >= batch_lane_every`` keeps one slot in ``batch_lane_every`` for
        the batch lane (when it has work; otherwise interactive takes them), so interactive
        tasks never wait a whole extra batch; smaller claims put the batch lane first once in
        ``batch_lane_every`` claims. Inputs held in the blob store are loaded into
        ``Task.input``.
        """
        check_name(model, "model")
        check_version(version)
        check_worker_id(worker_id)
        check_int(max_n, "max_n", 1, MAX_CLAIM)
        lease = self.lease_s if lease_s is None else check_lease(lease_s)
        first, quota, second = self._lane_plan(
            model, version, [check_lane(lane) for lane in lanes], max_n
        )
        now = self.clock()
        until = now + timedelta(seconds=lease)
        params: dict[str, object] = {
            "p_model": model,
            "p_version": version,
            "p_limit": max_n,
            "p_worker": worker_id,
            "p_now": now,
            "p_until": until,
        }
        if second is None:
            statement = sql.CLAIM
            params["p_lane"] = first.value
        else:  # one statement for both lanes (sql.py)
            statement = sql.CLAIM_TWO_LANES
            params.update(p_first=first.value, p_quota=quota, p_second=second.value)
        with self._relaxed_tx() as conn:
            rows = conn.execute(statement, params).mappings().all()
        claimed = [
            Task.from_claim(r, model=model, version=version, worker_id=worker_id, lease_until=until)
            for r in rows
        ]
        # Interactive first, then best priority, then oldest (RETURNING has no order).
        claimed.sort(key=lambda x: (x.lane != Lane.INTERACTIVE, -x.priority, x.id))
        return self._with_inputs(worker_id, claimed)

    def _with_inputs(self, worker_id: str, claimed: list[Task]) -> list[Task]:
        """Load inputs held in the blob store. A task whose input is gone fails alone
        (``input_missing``); any other error hands every claimed task back before raising,
        so nothing stays leased to a worker that never received it."""
        out: list[Task] = []
        try:
            for task in claimed:
                if task.input_ref is None:
                    out.append(task)
                    continue
                try:
                    out.append(dataclasses.replace(task, input=self.load_input(task)))
                except NotFound:
                    error = TaskError("input_missing", f"input blob {task.input_ref} is missing")
                    self.fail(task.id, worker_id, error, retryable=False)
        except BaseException:
            self.release(worker_id, [t.id for t in claimed])
            raise
        return out

    def _lane_plan(
        self, model: str, version: str, lanes: list[Lane], max_n: int
    ) -> tuple[Lane, int, Lane | None]:
        """The lane to claim from first and at most how many from it before the second lane
        (if any) gets a turn; the first lane then takes what the second lacked."""
        if not lanes:
            raise InvalidInput("lanes must name at least one lane", field="lanes")
        order = sorted(set(lanes), key=[Lane.INTERACTIVE, Lane.BATCH].index)
        if len(order) == 1:
            return order[0], max_n, None
        if max_n >= self.batch_lane_every:  # one slot in batch_lane_every for the batch lane
            return Lane.INTERACTIVE, max_n - max_n // self.batch_lane_every, Lane.BATCH
        count = self._claims.setdefault((model, version), itertools.count(1))
        if next(count) % self.batch_lane_every == 0:
            order.reverse()
        return order[0], max_n, order[1]

    def heartbeat(
        self, worker_id: str, task_ids: Sequence[str], lease_s: float | None = None
    ) -> Heartbeat:
        """Extend the leases this worker still holds; report lost ones and cancel requests."""
        check_worker_id(worker_id)
        ids = check_task_ids(task_ids)
        lease = self.lease_s if lease_s is None else check_lease(lease_s)
        if not ids:
            return Heartbeat(frozenset(), frozenset(), frozenset())
        until = self.clock() + timedelta(seconds=lease)
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
        # Results need valid JSON, not canonical JSON (nothing hashes them): sorting the keys
        # of every result cost the worker CPU that its next batch's kernel launches wanted.
        encoded = {
            tid: encode_json(res, f"result of task {tid}", canonical=False) for tid, res in results
        }
        if len(encoded) != len(results):
            raise InvalidInput("a task appears twice in one completion", field="results")
        now = self.clock()
        big = [tid for tid in encoded if len(encoded[tid]) > self.limits.inline_input_limit]
        if big:  # refuse unknown ids before any result reaches the blob store
            with read_tx(self.engine) as conn:
                known = set(conn.execute(sql.FINISHED_STATUS, {"p_ids": list(encoded)}).scalars())
            _raise_missing(set(encoded) - known)
        refs = {tid: self.blobs.put(encoded[tid]) for tid in big}
        if self.engine.dialect.name == "postgresql":
            with autocommit(self.engine) as conn:  # one statement, one durable commit
                report, statuses = self._complete_batch_pg(conn, now, encoded, refs)
            if report.accepted:
                self._notify_finished_pg(report.accepted, _outcomes(statuses, encoded, refs))
            return report
        params: list[dict[str, Any]] = [
            {
                "b_id": tid,
                "b_result": None if tid in refs else encoded[tid].decode(),
                "b_ref": refs.get(tid),
            }
            for tid, _ in results
        ]
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
        if done:
            statuses = {p["b_id"]: p["b_status"] for p in done}
            ended = finished_topics(statuses, _outcomes(statuses, encoded, refs))
            self.notifier.after_commit(ended)
        return Completion(tuple(p["b_id"] for p in done), rejected)

    @staticmethod
    def _complete_batch_pg(
        conn: Connection, now: datetime, encoded: dict[str, bytes], refs: dict[str, str]
    ) -> tuple[Completion, dict[str, str]]:
        # The rows as one JSON document, from the results' canonical JSON text as it stands:
        # encoding them a second time cost the worker a tenth of its CPU per task.
        rows = ",".join(
            f'{{"id":{json.dumps(tid)},"result_ref":{json.dumps(refs[tid])}}}'
            if tid in refs
            else f'{{"id":{json.dumps(tid)},"result":{doc.decode()}}}'
            for tid, doc in encoded.items()
        )
        params = {"p_now": now, "p_rows": f"[{rows}]"}
        statuses = {r.id: r.status for r in conn.execute(sql.PG_COMPLETE_BATCH, params)}
        accepted = set(statuses)
        rest = [tid for tid in encoded if tid not in accepted]
        rejected: dict[str, TaskStatus] = {}
        if rest:  # rare: someone else finished them first, or they do not exist
            rejected = {
                r.id: TaskStatus(r.status)
                for r in conn.execute(sql.FINISHED_STATUS, {"p_ids": rest})
            }
            _raise_missing(set(rest) - set(rejected))
        return Completion(tuple(tid for tid in encoded if tid in accepted), rejected), statuses

    def _notify_finished_pg(
        self, task_ids: Sequence[str], outcomes: dict[str, tuple[str, bytes | None]]
    ) -> None:
        """Wake result waiters after the results' commit, in a transaction of its own that does
        not wait for the disk. Inside the durable commit, NOTIFY would serialise every
        worker's completions behind one lock held through each disk flush (PostgreSQL takes it
        at commit for transactions that notify): 16 claimers lost a third of their throughput.
        If this process dies in between, waiters find the results at their next poll."""
        try:
            with self._relaxed_tx() as conn:
                for topic in finished_topics(task_ids, outcomes):
                    conn.exec_driver_sql(
                        "SELECT pg_notify(%(ch)s, %(topic)s)", {"ch": CHANNEL, "topic": topic}
                    )
        except GpufleetError as e:  # the results are committed: never fail the caller
            log.warning("could not send the 'finished' wake-up: %s", e)

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
            woken = [task.model] if task.status == TaskStatus.QUEUED else finished_topics([task.id])
            self.notifier.in_transaction(conn, woken)
        self.notifier.after_commit(woken)
        return task

    def acknowledge_cancel(self, task_id: str, worker_id: str) -> Task:
        """The worker stopped a task whose cancellation was requested: it ends ``cancelled``.
        Raises ``Conflict`` if no cancellation was requested (use ``fail`` or ``release``)."""
        now = self.clock()
        with write_tx(self.engine) as conn:
            row = self._lock_held(conn, task_id, worker_id)
            if not row["cancel_requested"]:
                raise Conflict(
                    f"task {task_id} has no cancellation request to acknowledge; "
                    "use fail() or release() to give it up",
                    task_id=task_id,
                )
            updated = conn.execute(
                sa.update(tasks)
                .where(t.id == task_id)
                .values(self._cancelled(now))
                .returning(*tasks.c)
            )
            task = Task.from_row(updated.mappings().one())
            woken = finished_topics([task_id])
            self.notifier.in_transaction(conn, woken)
        self.notifier.after_commit(woken)
        return task

    def release(self, worker_id: str, task_ids: Sequence[str]) -> list[str]:
        """Hand held tasks back unstarted (a draining worker): queued again, attempt not
        counted. Returns the ids released; tasks no longer held are skipped."""
        check_worker_id(worker_id)
        ids = check_task_ids(task_ids)
        now = self.clock()
        with write_tx(self.engine) as conn:
            rows = conn.execute(
                sa.update(tasks)
                .where(
                    t.id.in_(ids),
                    t.lease_owner == worker_id,
                    t.status == TaskStatus.RUNNING.value,
                )
                .values(
                    status=sa.case(
                        (t.cancel_requested, TaskStatus.CANCELLED.value),
                        else_=TaskStatus.QUEUED.value,
                    ),
                    finished_at=sa.case((t.cancel_requested, now), else_=None),
                    webhook_next_at=sa.case(
                        (t.cancel_requested, webhook_due(now)), else_=t.webhook_next_at
                    ),
                    attempts=t.attempts - 1,
                    not_before=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .returning(t.id, t.model, t.status)
            ).all()
            ended = [r.id for r in rows if r.status == TaskStatus.CANCELLED.value]
            woken = {r.model for r in rows if r.status == TaskStatus.QUEUED.value}
            woken.update(finished_topics(ended))
            self.notifier.in_transaction(conn, woken)
        self.notifier.after_commit(woken)
        return [r.id for r in rows]

    def _lock_held(self, conn: Connection, task_id: str, worker_id: str) -> sa.RowMapping:
        check_worker_id(worker_id)
        row = conn.execute(sql.LOCK_TASK, {"p_id": task_id}).mappings().first()
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
        return row


def _outcomes(
    statuses: dict[str, str], encoded: dict[str, bytes], refs: dict[str, str]
) -> dict[str, tuple[str, bytes | None]]:
    """What the finished wake-ups may carry: each task's status and its result's JSON (none
    for a cancelled task's dropped result, nor for one in the blob store)."""
    return {
        tid: (status, encoded[tid] if status == TaskStatus.SUCCEEDED else None)
        for tid, status in statuses.items()
        if tid not in refs
    }


def _raise_missing(missing: set[str]) -> None:
    if missing:
        ids = sorted(missing)
        raise NotFound(
            f"no such task: {ids[0]}; no result of this batch was recorded", task_ids=ids
        )
