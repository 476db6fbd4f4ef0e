"""TaskWatcher: waiters get their task when it ends, from the wake-up itself when its result is
small, with one read otherwise, and from the safety look when a wake-up never came."""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa

from gpufleet.queue import TaskQueue, TaskSpec, TaskStatus
from gpufleet.queue.watch import TaskWatcher
from gpufleet.store.engine import write_tx
from gpufleet.store.schema import tasks


def _watcher(queue: TaskQueue, poll_s: float = 5.0) -> TaskWatcher:
    w = TaskWatcher(queue, poll_s=poll_s)
    w.start()
    return w


def test_an_outcome_waiter_is_answered_from_the_wake_up(queue: TaskQueue) -> None:
    w = _watcher(queue)
    try:
        task = queue.submit(TaskSpec("m", "1", {"n": 1})).task

        async def go() -> object:
            waiting = asyncio.create_task(w.wait(task, 10))
            await asyncio.sleep(0.05)
            [claimed] = await asyncio.to_thread(queue.claim, "m", "1", "w")
            await asyncio.to_thread(queue.complete, claimed.id, "w", {"out": 2})
            return await waiting

        ended = asyncio.run(go())
    finally:
        w.stop()
    assert ended.status == TaskStatus.SUCCEEDED  # type: ignore[attr-defined]
    assert ended.result == {"out": 2}  # type: ignore[attr-defined]
    assert w.reads == 0  # nothing was read back from the database


def test_a_large_result_is_read_once(queue: TaskQueue) -> None:
    w = _watcher(queue)
    big = {"text": "x" * 5000}
    try:
        task = queue.submit(TaskSpec("m", "1", 1)).task

        async def go() -> object:
            waiting = asyncio.create_task(w.wait(task, 10))
            await asyncio.sleep(0.05)
            [claimed] = await asyncio.to_thread(queue.claim, "m", "1", "w")
            await asyncio.to_thread(queue.complete, claimed.id, "w", big)
            return await waiting

        ended = asyncio.run(go())
    finally:
        w.stop()
    assert ended.result == big  # type: ignore[attr-defined]
    assert w.reads == 1


def test_a_waiter_that_registers_after_the_end_still_gets_it(queue: TaskQueue) -> None:
    """The task ended between the submit's answer and the waiter's registration."""
    w = _watcher(queue)
    try:
        task = queue.submit(TaskSpec("m", "1", 1)).task  # as the submitter last saw it: queued
        [claimed] = queue.claim("m", "1", "w")
        queue.complete(claimed.id, "w", "done")
        time.sleep(0.3)  # the watcher has taken the wake-up before anybody waits
        ended = asyncio.run(w.wait(task, 5))
    finally:
        w.stop()
    assert ended.status == TaskStatus.SUCCEEDED and ended.result == "done"


def test_a_missing_wake_up_is_caught_by_the_safety_look(queue: TaskQueue) -> None:
    w = _watcher(queue, poll_s=0.2)
    try:
        task = queue.submit(TaskSpec("m", "1", 1)).task

        async def go() -> object:
            waiting = asyncio.create_task(w.wait(task, 10))
            await asyncio.sleep(0.05)
            # Ended behind the queue's back: no wake-up is sent.
            with write_tx(queue.engine) as conn:
                conn.execute(
                    sa.update(tasks)
                    .where(tasks.c.id == task.id)
                    .values(
                        status="failed",
                        error_code="x",
                        error_message="y",
                        finished_at=queue.clock(),
                    )
                )
            return await waiting

        t0 = time.monotonic()
        ended = asyncio.run(go())
    finally:
        w.stop()
    assert ended.status == TaskStatus.FAILED  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 5


def test_the_safety_look_reads_no_row_for_an_outcome_waiter_until_its_task_ends(
    queue: TaskQueue,
) -> None:
    """A task that only started running is no news to ``wait``: the look reads nothing for
    it (at 256 clients it read each waiter's whole row, input and all, twice a second); once
    the task ends behind the queue's back, the look reads its outcome, once."""
    w = _watcher(queue, poll_s=0.1)
    try:
        task = queue.submit(TaskSpec("m", "1", {"n": 1})).task

        async def go() -> object:
            waiting = asyncio.create_task(w.wait(task, 10))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(queue.claim, "m", "1", "w")  # running: no wake-up says so
            await asyncio.sleep(0.5)  # several looks
            assert w.reads == 0 and not waiting.done()
            with write_tx(queue.engine) as conn:  # ended behind the queue's back
                conn.execute(
                    sa.update(tasks).where(tasks.c.id == task.id)
                    .values(status="succeeded", result={"out": 1}, finished_at=queue.clock())
                )  # fmt: skip
            return await waiting

        ended = asyncio.run(go())
    finally:
        w.stop()
    assert ended.status == TaskStatus.SUCCEEDED  # type: ignore[attr-defined]
    assert ended.result == {"out": 1}  # type: ignore[attr-defined]
    assert w.reads == 1


def test_a_full_waiter_sees_every_field(queue: TaskQueue) -> None:
    """Event streams need the whole task (attempts, times): they are read, not synthesised."""
    w = _watcher(queue)
    try:
        task = queue.submit(TaskSpec("m", "1", 1)).task

        async def go() -> object:
            async with w.watch(task) as updates:
                [claimed] = await asyncio.to_thread(queue.claim, "m", "1", "w")
                await asyncio.to_thread(queue.complete, claimed.id, "w", 3)
                while True:
                    t = await asyncio.wait_for(updates.get(), 10)
                    if t.is_finished:
                        return t

        ended = asyncio.run(go())
    finally:
        w.stop()
    assert ended.attempts == 1 and ended.started_at is not None  # type: ignore[attr-defined]
    assert ended.result == 3  # type: ignore[attr-defined]
