"""The background completer: results commit in order, batches that queue up share one commit,
a bad batch fails alone, outages are retried, and nothing pending is dropped on close."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from gpufleet.errors import NotFound, Unavailable
from gpufleet.queue import Completer, Completion, TaskQueue, TaskSpec, TaskStatus


def _claimed(q: TaskQueue, n: int) -> list[str]:
    for i in range(n):
        q.submit(TaskSpec("m", "1", i))
    return [t.id for t in q.claim("m", "1", "w", max_n=n)]


class Spy:
    """Wraps the queue's real ``complete_many``: records each call's size and can hold the
    first call until released, or fail the first ``fail_times`` calls with ``Unavailable``."""

    def __init__(self, q: TaskQueue, *, hold_first: bool = False, fail_times: int = 0) -> None:
        self.real: Callable[[str, Sequence[tuple[str, Any]]], Completion] = q.complete_many
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_times = fail_times
        q.complete_many = self  # type: ignore[method-assign]

    def __call__(self, worker_id: str, results: Sequence[tuple[str, Any]]) -> Completion:
        self.sizes.append(len(results))
        self.entered.set()
        assert self.release.wait(10)
        if self.fail_times:
            self.fail_times -= 1
            raise Unavailable("the task database is unavailable: test outage")
        return self.real(worker_id, results)


def test_results_of_every_batch_are_recorded(queue: TaskQueue) -> None:
    ids = _claimed(queue, 6)
    with Completer(queue, "w") as completer:
        futures = [completer.submit([(tid, {"n": i})]) for i, tid in enumerate(ids)]
        assert completer.flush(10)
    for i, (tid, fut) in enumerate(zip(ids, futures, strict=True)):
        assert fut.result().accepted == (tid,)
        task = queue.get(tid)
        assert task.status == TaskStatus.SUCCEEDED
        assert queue.load_result(task) == {"n": i}


def test_batches_waiting_on_a_commit_share_the_next_one(queue: TaskQueue) -> None:
    ids = _claimed(queue, 7)
    spy = Spy(queue, hold_first=True)
    with Completer(queue, "w") as completer:
        first = completer.submit([(ids[0], 0)])
        assert spy.entered.wait(10)  # the first commit is in flight
        rest = [completer.submit([(ids[i], i), (ids[i + 1], i + 1)]) for i in (1, 3, 5)]
        spy.release.set()
        assert completer.flush(10)
    assert spy.sizes == [1, 6]  # one commit for the three batches that queued up
    assert first.result().accepted == (ids[0],)
    assert [f.result().accepted for f in rest] == [
        (ids[1], ids[2]),
        (ids[3], ids[4]),
        (ids[5], ids[6]),
    ]


def test_a_batch_naming_an_unknown_task_fails_alone(queue: TaskQueue) -> None:
    ids = _claimed(queue, 3)
    spy = Spy(queue, hold_first=True)
    with Completer(queue, "w") as completer:
        completer.submit([(ids[0], 0)])
        assert spy.entered.wait(10)
        good = completer.submit([(ids[1], 1)])
        bad = completer.submit([(ids[2], 2), ("no-such-task", 3)])
        spy.release.set()
        assert completer.flush(10)
    assert good.result().accepted == (ids[1],)
    with pytest.raises(NotFound):
        bad.result()
    assert queue.get(ids[1]).status == TaskStatus.SUCCEEDED
    assert queue.get(ids[2]).status == TaskStatus.RUNNING  # nothing of the bad batch written


def test_tasks_finished_elsewhere_are_reported_per_batch(queue: TaskQueue) -> None:
    ids = _claimed(queue, 2)
    queue.complete(ids[0], "w", "first")
    with Completer(queue, "w") as completer:
        fut = completer.submit([(ids[0], "late"), (ids[1], "ok")])
    report = fut.result()
    assert report.accepted == (ids[1],)
    assert report.rejected == {ids[0]: TaskStatus.SUCCEEDED}
    assert queue.load_result(queue.get(ids[0])) == "first"


def test_an_outage_is_retried_until_the_results_are_durable(queue: TaskQueue) -> None:
    ids = _claimed(queue, 1)
    spy = Spy(queue, fail_times=2)
    with Completer(queue, "w", retry_for_s=10) as completer:
        fut = completer.submit([(ids[0], "r")])
    assert fut.result().accepted == (ids[0],)
    assert spy.sizes == [1, 1, 1]
    assert queue.get(ids[0]).status == TaskStatus.SUCCEEDED


def test_an_outage_longer_than_the_retry_period_reaches_the_worker(queue: TaskQueue) -> None:
    ids = _claimed(queue, 1)
    Spy(queue, fail_times=100)
    with Completer(queue, "w", retry_for_s=0.2) as completer:
        fut = completer.submit([(ids[0], "r")])
    with pytest.raises(Unavailable):
        fut.result()
    assert queue.get(ids[0]).status == TaskStatus.RUNNING


def test_a_worker_faster_than_its_database_is_held_back(queue: TaskQueue) -> None:
    ids = _claimed(queue, 4)
    spy = Spy(queue, hold_first=True)
    completer = Completer(queue, "w", max_pending=2)
    completer.submit([(ids[0], 0)])
    assert spy.entered.wait(10)
    completer.submit([(ids[1], 1)])
    completer.submit([(ids[2], 2)])
    blocked = threading.Thread(target=completer.submit, args=([(ids[3], 3)],))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # two batches wait already
    assert completer.pending == 3
    spy.release.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert completer.close(10)
    assert all(queue.get(tid).status == TaskStatus.SUCCEEDED for tid in ids)


def test_close_commits_what_is_pending_and_refuses_more(queue: TaskQueue) -> None:
    ids = _claimed(queue, 3)
    completer = Completer(queue, "w")
    for tid in ids:
        completer.submit([(tid, None)])
    assert completer.close(10)
    assert all(queue.get(tid).status == TaskStatus.SUCCEEDED for tid in ids)
    with pytest.raises(RuntimeError, match="closed"):
        completer.submit([(ids[0], None)])


def test_an_inline_submit_commits_in_the_callers_thread(queue: TaskQueue) -> None:
    """An idle worker's results: committed before submit returns, by the caller itself."""
    [tid] = _claimed(queue, 1)
    threads: list[str] = []
    spy = Spy(queue)
    real = spy.real
    spy.real = lambda w, r: (threads.append(threading.current_thread().name), real(w, r))[1]
    with Completer(queue, "w") as completer:
        future = completer.submit([(tid, "r")], inline=True)
        assert future.done() and future.result().accepted == (tid,)
    assert threads == [threading.current_thread().name]
    assert queue.get(tid).status == TaskStatus.SUCCEEDED


def test_an_inline_submit_queues_behind_pending_batches(queue: TaskQueue) -> None:
    """Order is kept: with a batch still being committed, an inline submit waits its turn
    in the background like any other."""
    first, second = _claimed(queue, 2)
    spy = Spy(queue, hold_first=True)
    with Completer(queue, "w") as completer:
        f1 = completer.submit([(first, 1)])
        assert spy.entered.wait(5)
        f2 = completer.submit([(second, 2)], inline=True)
        assert not f2.done()
        spy.release.set()
        assert f1.result(10).accepted == (first,) and f2.result(10).accepted == (second,)
