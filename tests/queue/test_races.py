"""Finishing races with real threads: whatever the interleaving, a task ends exactly once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet.errors import Conflict, GpufleetError
from gpufleet.queue import Limits, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore
from tests.helpers import FakeClock


def _race(fns: list[Callable[[], object]]) -> list[object]:
    barrier = threading.Barrier(len(fns))
    out: list[object] = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fns[i]()
        except GpufleetError as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return out


def test_racing_completions_record_one_result(queue: TaskQueue) -> None:
    for _ in range(5):
        tid = queue.submit(TaskSpec("m", "1", 0)).task.id
        queue.claim("m", "1", "w0")
        reports = _race(
            [lambda i=i, t=tid: queue.complete_many(f"w{i}", [(t, f"r{i}")]) for i in range(6)]
        )
        accepted = [r for r in reports if getattr(r, "accepted", ())]
        assert len(accepted) == 1
        assert queue.get(tid).result == f"r{reports.index(accepted[0])}"


def test_cancel_racing_completion_ends_the_task_once(queue: TaskQueue) -> None:
    for _ in range(5):
        tid = queue.submit(TaskSpec("m", "1", 0)).task.id
        queue.claim("m", "1", "w0")
        _race(
            [
                lambda t=tid: queue.cancel(t),
                lambda t=tid: queue.complete_many("w0", [(t, "r")]),
            ]
        )
        task = queue.get(tid)
        # Either the result came first (succeeded; the cancel found it finished) or the
        # cancel request did (the result is dropped and the task ends cancelled).
        assert task.status in (TaskStatus.SUCCEEDED, TaskStatus.CANCELLED)
        assert (task.result == "r") == (task.status == TaskStatus.SUCCEEDED)


def test_heartbeat_after_expiry_but_before_recovery_keeps_the_task(
    queue: TaskQueue, clock: FakeClock
) -> None:
    tid = queue.submit(TaskSpec("m", "1", 0)).task.id
    queue.claim("m", "1", "w1")
    clock.advance(40)  # lease lapsed, nobody recovered it yet
    assert queue.heartbeat("w1", [tid]).held == {tid}
    assert queue.recover_expired().total == 0


def test_acknowledging_a_cancel_nobody_asked_for_is_refused(queue: TaskQueue) -> None:
    tid = queue.submit(TaskSpec("m", "1", 0)).task.id
    queue.claim("m", "1", "w1")
    with pytest.raises(Conflict):
        queue.acknowledge_cancel(tid, "w1")
    assert queue.get(tid).status == TaskStatus.RUNNING


def test_a_claimed_task_whose_input_blob_is_gone_fails_alone(
    engine: object, blob_dir: Path, clock: FakeClock
) -> None:
    q = TaskQueue(
        engine,  # type: ignore[arg-type]
        LocalBlobStore(blob_dir),
        limits=Limits(inline_input_limit=1024),
        clock=clock,
    )
    try:
        lost = q.submit(TaskSpec("m", "1", "x" * 5000)).task
        kept = q.submit(TaskSpec("m", "1", "small")).task
        assert lost.input_ref is not None
        q.blobs.delete(lost.input_ref)
        claimed = q.claim("m", "1", "w1", max_n=5)
        assert [t.id for t in claimed] == [kept.id]
        task = q.get(lost.id)
        assert task.status == TaskStatus.FAILED
        assert task.error is not None and task.error.code == "input_missing"
    finally:
        q.close()


def test_submit_succeeds_when_wake_ups_cannot_be_sent(queue: TaskQueue, db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("wake-ups on PostgreSQL travel inside the transaction")
    wake_dir = queue.notifier.dir  # type: ignore[attr-defined]
    wake_dir.parent.mkdir(parents=True, exist_ok=True)
    wake_dir.write_text("not a directory")  # listdir fails with NotADirectoryError
    task = queue.submit(TaskSpec("m", "1", 0)).task
    assert queue.get(task.id).status == TaskStatus.QUEUED
