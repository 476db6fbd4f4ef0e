"""Heartbeats, completion, failure and retry, cancellation, lease recovery, release."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from gpufleet.errors import LeaseLost, NotFound, TaskFinished
from gpufleet.queue import Limits, TaskError, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore
from tests.helpers import FakeClock

BOOM = TaskError("model_error", "CUDA error: out of memory")


def _running(q: TaskQueue, worker: str = "w1", **spec: object) -> str:
    task_id = q.submit(TaskSpec("m", "1", spec.pop("input", 1), **spec)).task.id  # type: ignore[arg-type]
    [claimed] = q.claim("m", "1", worker)
    assert claimed.id == task_id
    return task_id


def test_heartbeat_extends_the_lease(queue: TaskQueue, clock: FakeClock) -> None:
    tid = _running(queue)
    clock.advance(25)
    hb = queue.heartbeat("w1", [tid])
    assert hb.held == {tid} and not hb.lost and not hb.cancel_requested
    clock.advance(25)  # 50 s after the claim, but 25 s after the heartbeat
    assert queue.recover_expired().total == 0
    assert queue.get(tid).status == TaskStatus.RUNNING


def test_heartbeat_reports_tasks_this_worker_lost(queue: TaskQueue, clock: FakeClock) -> None:
    tid = _running(queue)
    clock.advance(31)
    assert queue.recover_expired().requeued == (tid,)
    clock.advance(10)
    queue.claim("m", "1", "w2")
    hb = queue.heartbeat("w1", [tid])
    assert hb.lost == {tid} and not hb.held
    assert queue.get(tid).lease_owner == "w2"


def test_complete_records_the_result_once(queue: TaskQueue, clock: FakeClock) -> None:
    tid = _running(queue)
    clock.advance(2)
    queue.complete(tid, "w1", {"image": "png..."})
    task = queue.get(tid)
    assert task.status == TaskStatus.SUCCEEDED
    assert queue.load_result(task) == {"image": "png..."}
    assert task.finished_at == clock.now
    assert task.lease_owner is None
    with pytest.raises(TaskFinished) as err:
        queue.complete(tid, "w1", {"image": "other"})
    assert err.value.code == "task_finished"
    assert queue.load_result(queue.get(tid)) == {"image": "png..."}


def test_first_completion_wins_after_a_lease_is_lost(queue: TaskQueue, clock: FakeClock) -> None:
    tid = _running(queue, "slow")
    clock.advance(31)
    queue.recover_expired()
    clock.advance(5)
    [again] = queue.claim("m", "1", "fast")
    assert again.id == tid and again.attempts == 2
    # The slow worker finishes first: its result stands; the second completion is refused.
    report = queue.complete_many("slow", [(tid, "slow result")])
    assert report.accepted == (tid,)
    second = queue.complete_many("fast", [(tid, "fast result")])
    assert second.rejected == {tid: TaskStatus.SUCCEEDED} and not second.accepted
    assert queue.get(tid).result == "slow result"
    assert queue.heartbeat("fast", [tid]).lost == {tid}


def test_complete_many_reports_each_task(queue: TaskQueue) -> None:
    ids = [queue.submit(TaskSpec("m", "1", i)).task.id for i in range(4)]
    queue.claim("m", "1", "w1", max_n=4)
    queue.complete(ids[0], "w1", "early")
    report = queue.complete_many("w1", [(tid, f"r{i}") for i, tid in enumerate(ids)])
    assert report.accepted == tuple(ids[1:])
    assert report.rejected == {ids[0]: TaskStatus.SUCCEEDED}
    assert [queue.get(t).result for t in ids] == ["early", "r1", "r2", "r3"]
    with pytest.raises(NotFound):
        queue.complete_many("w1", [("no-such-task", 1)])


def test_large_results_go_to_the_blob_store(engine: Engine, blob_dir: Path) -> None:
    q = TaskQueue(engine, LocalBlobStore(blob_dir), limits=Limits(inline_input_limit=1024))
    try:
        tid = _running(q)
        q.complete(tid, "w1", ["pixel"] * 1000)
        task = q.get(tid)
        assert task.result is None and task.result_ref is not None
        assert q.load_result(task) == ["pixel"] * 1000
    finally:
        q.close()


def test_retryable_failure_backs_off_exponentially(queue: TaskQueue, clock: FakeClock) -> None:
    tid = _running(queue, max_attempts=3)
    task = queue.fail(tid, "w1", BOOM, retryable=True)
    assert task.status == TaskStatus.QUEUED and task.error == BOOM
    assert task.not_before == clock.now + timedelta(seconds=1)
    assert queue.claim("m", "1", "w1") == []  # still backing off
    clock.advance(1)
    [again] = queue.claim("m", "1", "w1")
    assert again.attempts == 2
    task = queue.fail(tid, "w1", BOOM, retryable=True)
    assert task.not_before == clock.now + timedelta(seconds=2)
    clock.advance(2)
    queue.claim("m", "1", "w1")
    task = queue.fail(tid, "w1", BOOM, retryable=True)  # third attempt was the last
    assert task.status == TaskStatus.FAILED and task.error == BOOM
    assert task.finished_at == clock.now and task.attempts == 3


def test_non_retryable_failure_ends_the_task(queue: TaskQueue) -> None:
    tid = _running(queue)
    task = queue.fail(tid, "w1", TaskError("bad_input", "prompt is empty"), retryable=False)
    assert task.status == TaskStatus.FAILED
    assert task.error == TaskError("bad_input", "prompt is empty")
    with pytest.raises(TaskFinished):
        queue.fail(tid, "w1", BOOM, retryable=True)


def test_failure_from_a_worker_that_lost_the_lease_changes_nothing(
    queue: TaskQueue, clock: FakeClock
) -> None:
    tid = _running(queue, "w1")
    clock.advance(31)
    queue.recover_expired()
    clock.advance(5)
    queue.claim("m", "1", "w2")
    with pytest.raises(LeaseLost) as err:
        queue.fail(tid, "w1", BOOM, retryable=False)
    assert err.value.code == "lease_lost"
    task = queue.get(tid)
    assert task.status == TaskStatus.RUNNING and task.lease_owner == "w2"


def test_cancel_a_queued_task_at_once(queue: TaskQueue) -> None:
    tid = queue.submit(TaskSpec("m", "1", 1, tenant="a")).task.id
    task = queue.cancel(tid, tenant="a")
    assert task.status == TaskStatus.CANCELLED and task.finished_at is not None
    assert queue.claim("m", "1", "w1") == []
    assert queue.cancel(tid, tenant="a").status == TaskStatus.CANCELLED  # idempotent


def test_cancel_a_running_task_reaches_its_worker(queue: TaskQueue) -> None:
    tid = _running(queue)
    task = queue.cancel(tid)
    assert task.status == TaskStatus.RUNNING and task.cancel_requested
    hb = queue.heartbeat("w1", [tid])
    assert hb.cancel_requested == {tid}
    task = queue.acknowledge_cancel(tid, "w1")
    assert task.status == TaskStatus.CANCELLED and task.finished_at is not None


def test_a_result_after_a_cancel_request_ends_cancelled(queue: TaskQueue) -> None:
    tid = _running(queue)
    queue.cancel(tid)
    report = queue.complete_many("w1", [(tid, "too late")])
    assert report.accepted == (tid,)
    task = queue.get(tid)
    assert task.status == TaskStatus.CANCELLED and task.result is None


def test_cancel_is_scoped_to_the_tenant_and_to_unfinished_tasks(queue: TaskQueue) -> None:
    tid = _running(queue, tenant="a")
    with pytest.raises(NotFound):
        queue.cancel(tid, tenant="b")
    assert not queue.get(tid).cancel_requested
    queue.complete(tid, "w1", 1)
    with pytest.raises(TaskFinished):
        queue.cancel(tid, tenant="a")


def test_expired_lease_requeues_then_fails_when_out_of_attempts(
    queue: TaskQueue, clock: FakeClock
) -> None:
    tid = _running(queue, "dead1", max_attempts=2)
    clock.advance(30.5)
    report = queue.recover_expired()
    assert report.requeued == (tid,)
    task = queue.get(tid)
    assert task.status == TaskStatus.QUEUED and task.lease_owner is None
    assert task.error is not None and task.error.code == "lease_expired"
    assert "dead1" in task.error.message
    clock.advance(1)  # backoff after the first attempt
    [again] = queue.claim("m", "1", "dead2")
    assert again.attempts == 2
    clock.advance(31)
    assert queue.recover_expired().failed == (tid,)
    task = queue.get(tid)
    assert task.status == TaskStatus.FAILED and task.error is not None
    assert task.error.code == "lease_expired"


def test_expired_lease_of_a_cancelled_task_ends_it(queue: TaskQueue, clock: FakeClock) -> None:
    tid = _running(queue)
    queue.cancel(tid)
    clock.advance(31)
    assert queue.recover_expired().cancelled == (tid,)
    assert queue.get(tid).status == TaskStatus.CANCELLED


def test_release_hands_tasks_back_without_spending_an_attempt(queue: TaskQueue) -> None:
    ids = [queue.submit(TaskSpec("m", "1", i)).task.id for i in range(3)]
    queue.claim("m", "1", "w1", max_n=3)
    queue.cancel(ids[2])
    assert sorted(queue.release("w1", ids)) == sorted(ids)
    assert [queue.get(t).status for t in ids] == [
        TaskStatus.QUEUED,
        TaskStatus.QUEUED,
        TaskStatus.CANCELLED,
    ]
    assert queue.get(ids[0]).attempts == 0
    assert queue.release("w2", ids) == []
    assert [t.id for t in queue.claim("m", "1", "w2", max_n=5)] == ids[:2]


def test_purge_finished_keeps_live_and_recent_tasks(queue: TaskQueue, clock: FakeClock) -> None:
    old = _running(queue)
    queue.complete(old, "w1", 1)
    clock.advance(3600)
    recent = queue.submit(TaskSpec("m", "1", 2)).task.id
    queue.cancel(recent)
    live = queue.submit(TaskSpec("m", "1", 3)).task.id
    assert queue.purge_finished(timedelta(minutes=30)) == 1
    with pytest.raises(NotFound):
        queue.get(old)
    assert queue.get(recent).status == TaskStatus.CANCELLED
    assert queue.get(live).status == TaskStatus.QUEUED


def test_stats_count_live_tasks_per_model_and_lane(queue: TaskQueue, clock: FakeClock) -> None:
    queue.submit_many([TaskSpec("m", "1", i) for i in range(3)])
    queue.submit_many([TaskSpec("m", "1", i, lane="batch") for i in range(2)])
    queue.submit(TaskSpec("n", "1", 0))
    clock.advance(10)
    queue.claim("m", "1", "w1", max_n=2, lanes=["interactive"])
    stats = queue.stats()
    rows = {(r.model, r.lane.value, r.status.value): r for r in stats.depth}
    assert {k: r.count for k, r in rows.items()} == {
        ("m", "interactive", "queued"): 1,
        ("m", "interactive", "running"): 2,
        ("m", "batch", "queued"): 2,
        ("n", "interactive", "queued"): 1,
    }
    assert rows[("m", "batch", "queued")].oldest_age_s == pytest.approx(10)
    assert stats.count(model="m", status=TaskStatus.QUEUED) == 3


def test_a_dead_workers_tasks_are_recovered_at_once(queue: TaskQueue, clock: FakeClock) -> None:
    """The supervisor saw the process exit: no wait for the lease, an attempt counted, the
    reason kept; another worker's task and a cancelled one are handled as such."""
    again = _running(queue, "dead")
    last = _running(queue, "dead", max_attempts=1)
    other = _running(queue, "alive")
    cancel = _running(queue, "dead")
    queue.cancel(cancel)
    report = queue.recover_worker("dead", "worker dead exited with 134: a kernel faulted")
    assert report.requeued == (again,) and report.failed == (last,)
    assert report.cancelled == (cancel,)
    failed = queue.get(last)
    assert failed.status == TaskStatus.FAILED and failed.error is not None
    assert failed.error.code == "worker_died"
    assert failed.error.message == (
        "worker dead exited with 134: a kernel faulted (attempt 1 of 1)"
    )
    requeued = queue.get(again)
    assert requeued.status == TaskStatus.QUEUED and requeued.lease_owner is None
    assert queue.get(other).status == TaskStatus.RUNNING
    assert queue.recover_worker("dead", "again").total == 0
