"""Group commit of submits: concurrent submits share a transaction, and one bad submit in a
group fails alone."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest

from gpufleet.errors import IdempotencyConflict, InvalidInput
from gpufleet.queue import Submission, TaskQueue, TaskSpec, TaskStatus
from gpufleet.queue.batcher import SubmitBatcher
from gpufleet.queue.validation import PreparedTask


def test_concurrent_submits_share_commits_and_each_gets_its_task(queue: TaskQueue) -> None:
    sizes: list[int] = []
    real = queue.submit_prepared
    gate = threading.Event()

    def spy(specs: Sequence[PreparedTask]) -> list[Submission]:
        sizes.append(len(specs))
        gate.wait(10)  # the first commit is slow: the others queue up behind it
        return real(specs)

    queue.submit_prepared = spy  # type: ignore[method-assign]
    batcher = SubmitBatcher(queue)
    out: dict[int, Any] = {}

    def one(i: int) -> None:
        out[i] = batcher.submit(TaskSpec("m", "1", {"i": i}))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    threads[0].start()
    while not sizes:
        pass
    for th in threads[1:]:
        th.start()
    while sum(1 for th in threads if th.is_alive()) and len(batcher._pending) < 19:
        pass
    gate.set()
    for th in threads:
        th.join(10)
    batcher.close()
    assert sizes == [1, 19]
    for i, sub in out.items():
        assert sub.created
        assert queue.get(sub.task.id).input == {"i": i}
        assert sub.task.status == TaskStatus.QUEUED


def test_a_failing_submit_fails_alone(queue: TaskQueue) -> None:
    queue.submit(TaskSpec("m", "1", 1, idempotency_key="k"))
    batcher = SubmitBatcher(queue)
    errors: dict[str, BaseException] = {}
    oks: list[Submission] = []

    def run(name: str, spec: TaskSpec) -> None:
        try:
            oks.append(batcher.submit(spec))
        except Exception as e:
            errors[name] = e

    specs = {
        "conflict": TaskSpec("m", "1", 2, idempotency_key="k"),
        "bad": TaskSpec("m", "1", 3, lane="express"),
        "good": TaskSpec("m", "1", 4),
    }
    threads = [threading.Thread(target=run, args=item) for item in specs.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    batcher.close()
    assert isinstance(errors["conflict"], IdempotencyConflict)
    assert isinstance(errors["bad"], InvalidInput)
    [good] = oks
    assert queue.get(good.task.id).input == 4


def test_a_closed_batcher_refuses(queue: TaskQueue) -> None:
    batcher = SubmitBatcher(queue)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(TaskSpec("m", "1", 1))


def test_an_outage_fails_the_whole_group_at_once(queue: TaskQueue) -> None:
    from gpufleet.errors import Unavailable

    calls: list[int] = []

    def down(specs: Sequence[PreparedTask]) -> list[Submission]:
        calls.append(len(specs))
        raise Unavailable("the task database is unavailable: test outage")

    queue.submit_prepared = down  # type: ignore[method-assign]
    batcher = SubmitBatcher(queue)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            batcher.submit(TaskSpec("m", "1", 1))
        except Unavailable as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    batcher.close()
    assert len(errors) == 10
    assert sum(calls) == 10  # never retried one by one
