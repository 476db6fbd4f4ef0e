"""Model-based property test of the task state machine, on SQLite and PostgreSQL.

Hypothesis interleaves submit / claim / heartbeat / complete / fail / cancel / release / time
passing + lease recovery across three workers. A plain-Python model predicts the outcome of
every step and the database must agree, which checks the invariants:

- no task is lost: every submitted task exists and, in teardown, ends finished;
- no task is handed to a second claimer while a lease on it is live;
- a task ends exactly once, and a finished task never changes again;
- a claim takes every ready task it is allowed to, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from gpufleet.errors import LeaseLost, TaskFinished
from gpufleet.queue import TaskError, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store.schema import tasks
from tests.helpers import FakeClock

WORKERS = ("w0", "w1", "w2")
LANES = ("interactive", "batch")
LEASE_S = 30.0
FINISHED = {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}


@dataclass
class Expected:
    lane: str
    max_attempts: int
    status: TaskStatus = TaskStatus.QUEUED
    attempts: int = 0
    owner: str | None = None
    lease_until: datetime | None = None
    not_before: datetime | None = None
    cancel_requested: bool = False
    endings: int = 0  # terminal transitions seen; must never exceed 1


def make_machine(queue: TaskQueue, clock: FakeClock) -> type[RuleBasedStateMachine]:
    class QueueMachine(RuleBasedStateMachine):
        ids = Bundle("ids")

        def __init__(self) -> None:
            super().__init__()
            with queue.engine.begin() as conn:
                conn.execute(sa.delete(tasks))
            self.model: dict[str, Expected] = {}

        # -- helpers ---------------------------------------------------------------------

        def _end(self, tid: str, status: TaskStatus) -> None:
            e = self.model[tid]
            assert e.status not in FINISHED, f"{tid} ended twice"
            e.status, e.owner, e.lease_until = status, None, None
            e.endings += 1

        def _requeue(self, tid: str) -> None:
            e = self.model[tid]
            e.status, e.owner, e.lease_until = TaskStatus.QUEUED, None, None
            e.not_before = clock.now + queue.backoff(e.attempts)

        def _ready(self, lanes: set[str]) -> set[str]:
            return {
                tid
                for tid, e in self.model.items()
                if e.status == TaskStatus.QUEUED
                and e.lane in lanes
                and (e.not_before is None or e.not_before <= clock.now)
            }

        # -- rules -----------------------------------------------------------------------

        @rule(
            target=ids,
            lane=st.sampled_from(LANES),
            priority=st.integers(-2, 2),
            max_attempts=st.integers(1, 3),
        )
        def submit(self, lane: str, priority: int, max_attempts: int) -> str:
            spec = TaskSpec("m", "1", None, lane=lane, priority=priority, max_attempts=max_attempts)
            tid = queue.submit(spec).task.id
            self.model[tid] = Expected(lane, max_attempts)
            return tid

        @rule(
            worker=st.sampled_from(WORKERS),
            max_n=st.integers(1, 4),
            lanes=st.sampled_from([("interactive",), ("batch",), LANES]),
        )
        def claim(self, worker: str, max_n: int, lanes: tuple[str, ...]) -> None:
            ready = self._ready(set(lanes))
            claimed = queue.claim("m", "1", worker, lanes=lanes, max_n=max_n)
            got = {t.id for t in claimed}
            assert len(got) == len(claimed)
            assert got <= ready, f"claimed tasks that were not ready: {got - ready}"
            assert len(got) == min(max_n, len(ready)), "a claim left ready work behind"
            for t in claimed:
                e = self.model[t.id]
                # The task must not be under a live lease: by construction it was queued.
                assert e.owner is None
                e.status, e.owner = TaskStatus.RUNNING, worker
                e.lease_until = clock.now + timedelta(seconds=LEASE_S)
                e.attempts += 1
                assert t.attempts == e.attempts <= e.max_attempts

        @rule(worker=st.sampled_from(WORKERS), data=st.data())
        def heartbeat(self, worker: str, data: st.DataObject) -> None:
            mine = {t for t, e in self.model.items() if e.owner == worker}
            known = list(self.model)  # insertion order: deterministic for a given run
            picks = data.draw(st.sets(st.integers(0, 7), max_size=3))
            others = {known[i % len(known)] for i in picks} if known else set()
            hb = queue.heartbeat(worker, sorted(mine | others))
            assert hb.held == mine
            assert hb.lost == (others - mine)
            assert hb.cancel_requested == {t for t in mine if self.model[t].cancel_requested}
            for t in mine:
                self.model[t].lease_until = clock.now + timedelta(seconds=LEASE_S)

        @rule(worker=st.sampled_from(WORKERS), tid=ids)
        def complete(self, worker: str, tid: str) -> None:
            e = self.model[tid]
            report = queue.complete_many(worker, [(tid, {"by": worker})])
            if e.status in FINISHED:
                assert report.rejected == {tid: e.status}
                return
            assert report.accepted == (tid,)
            self._end(tid, TaskStatus.CANCELLED if e.cancel_requested else TaskStatus.SUCCEEDED)

        @rule(worker=st.sampled_from(WORKERS), tid=ids, retryable=st.booleans())
        def fail(self, worker: str, tid: str, retryable: bool) -> None:
            e = self.model[tid]
            try:
                task = queue.fail(tid, worker, TaskError("boom", "x"), retryable=retryable)
            except TaskFinished:
                assert e.status in FINISHED
                return
            except LeaseLost:
                assert e.status not in FINISHED and e.owner != worker
                return
            assert e.owner == worker
            if e.cancel_requested:
                self._end(tid, TaskStatus.CANCELLED)
            elif retryable and e.attempts < e.max_attempts:
                self._requeue(tid)
            else:
                self._end(tid, TaskStatus.FAILED)
            assert task.status == e.status

        @rule(tid=ids)
        def cancel(self, tid: str) -> None:
            e = self.model[tid]
            try:
                task = queue.cancel(tid)
            except TaskFinished:
                assert e.status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED)
                return
            if e.status == TaskStatus.QUEUED:
                self._end(tid, TaskStatus.CANCELLED)
            if e.status == TaskStatus.RUNNING:
                e.cancel_requested = True
            assert task.status == e.status

        @rule(worker=st.sampled_from(WORKERS))
        def release(self, worker: str) -> None:
            mine = sorted(t for t, e in self.model.items() if e.owner == worker)
            assert sorted(queue.release(worker, mine)) == mine
            for t in mine:
                e = self.model[t]
                e.attempts -= 1  # a released task was never started: no attempt spent
                if e.cancel_requested:
                    self._end(t, TaskStatus.CANCELLED)
                else:
                    e.status, e.owner, e.lease_until = TaskStatus.QUEUED, None, None
                    e.not_before = clock.now

        @rule(seconds=st.sampled_from([0.5, 5, 29, 31, 61]))
        def time_passes(self, seconds: float) -> None:
            clock.advance(seconds)
            expired = {
                t
                for t, e in self.model.items()
                if e.status == TaskStatus.RUNNING
                and e.lease_until is not None
                and e.lease_until < clock.now
            }
            report = queue.recover_expired()
            got = set(report.requeued) | set(report.failed) | set(report.cancelled)
            assert got == expired, "recovered a live lease, or missed an expired one"
            for t in sorted(expired):
                e = self.model[t]
                if e.cancel_requested:
                    assert t in report.cancelled
                    self._end(t, TaskStatus.CANCELLED)
                elif e.attempts < e.max_attempts:
                    assert t in report.requeued
                    self._requeue(t)
                else:
                    assert t in report.failed
                    self._end(t, TaskStatus.FAILED)

        # -- invariants ------------------------------------------------------------------

        @invariant()
        def database_matches_the_model(self) -> None:
            with queue.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(tasks.c.id, tasks.c.status, tasks.c.lease_owner, tasks.c.attempts)
                ).all()
            actual = {r.id: (r.status, r.lease_owner, r.attempts) for r in rows}
            expected = {t: (e.status.value, e.owner, e.attempts) for t, e in self.model.items()}
            assert actual == expected
            assert all(e.endings <= 1 for e in self.model.values())

        def teardown(self) -> None:
            # Drive everything to an end: nothing accepted may be stuck or lost.
            for _ in range(10):
                clock.advance(3600)
                queue.recover_expired()
                while batch := queue.claim("m", "1", "finisher", max_n=50):
                    queue.complete_many("finisher", [(t.id, None) for t in batch])
            with queue.engine.connect() as conn:
                statuses = conn.execute(sa.select(tasks.c.status)).scalars().all()
            assert len(statuses) == len(self.model)
            assert set(statuses) <= {s.value for s in FINISHED}

    return QueueMachine


@pytest.mark.slow
def test_queue_state_machine(queue: TaskQueue, clock: FakeClock) -> None:
    run_state_machine_as_test(
        make_machine(queue, clock),
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
