"""A queued task's place in its lane: the claim's order (priority, then age), counted in one
statement up to a cap, on SQLite and PostgreSQL; no place once it left the queue."""

from __future__ import annotations

import pytest

from gpufleet.queue import TaskQueue, TaskSpec


def _submit(q: TaskQueue, n: int, *, lane: str = "interactive", priority: int = 0,
            model: str = "m") -> list[str]:  # fmt: skip
    return [
        q.submit(TaskSpec(model, "1", i, lane=lane, priority=priority)).task.id for i in range(n)
    ]


def place(q: TaskQueue, task_id: str) -> tuple[int, int] | None:
    p = q.queue_position(q.get(task_id))
    assert p is None or not p.capped
    return None if p is None else (p.position, p.length)


def test_the_place_follows_the_claim_order(queue: TaskQueue) -> None:
    low = _submit(queue, 3)
    high = _submit(queue, 2, priority=5)
    # Other lanes, models and versions are other queues.
    _submit(queue, 4, lane="batch")
    _submit(queue, 4, model="other")
    queue.submit(TaskSpec("m", "2", {}))

    order = high + low
    assert [place(queue, i) for i in order] == [(n, 5) for n in range(1, 6)]
    # The claim takes them in exactly that order, and each claim moves the rest up.
    (first,) = queue.claim("m", "1", "w1", max_n=1, lanes=["interactive"])
    assert first.id == order[0]
    assert place(queue, order[0]) is None  # running: no place
    assert [place(queue, i) for i in order[1:]] == [(n, 4) for n in range(1, 5)]


def test_no_place_once_it_ended_or_was_cancelled(queue: TaskQueue) -> None:
    a, b = _submit(queue, 2)
    queue.cancel(a)
    assert place(queue, a) is None
    assert place(queue, b) == (1, 1)


def test_a_stale_read_of_a_claimed_task_has_no_place(queue: TaskQueue) -> None:
    (task_id,) = _submit(queue, 1)
    seen_queued = queue.get(task_id)
    queue.claim("m", "1", "w1")
    assert queue.queue_position(seen_queued) is None


def test_past_the_cap_both_figures_read_more_than_it(
    queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted up to POSITION_CAP (a count over a deep backlog on every GET cost 20 ms at
    100,000 tasks): beyond it a figure reads POSITION_CAP + 1 and ``capped`` says so."""
    monkeypatch.setattr("gpufleet.queue.manager.POSITION_CAP", 3)
    low = _submit(queue, 3)
    high = _submit(queue, 3, priority=5)
    places = [queue.queue_position(queue.get(i)) for i in high + low]
    assert [(p.position, p.length, p.capped) for p in places if p] == [
        (1, 4, True), (2, 4, True), (3, 4, True), (4, 4, True), (4, 4, True), (4, 4, True)
    ]  # fmt: skip
    for _ in range(3):  # down to three queued: exact again
        queue.claim("m", "1", "w1", max_n=1, lanes=["interactive"])
    assert [place(queue, i) for i in low] == [(1, 3), (2, 3), (3, 3)]
