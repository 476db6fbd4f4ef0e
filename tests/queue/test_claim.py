"""Claiming: lanes, priorities, fairness, versions, and no task given to two claimers."""

from __future__ import annotations

import threading

from sqlalchemy.engine import Engine

from gpufleet.queue import Lane, TaskQueue, TaskSpec, TaskStatus
from tests.helpers import FakeClock


def _submit(q: TaskQueue, n: int, *, lane: str = "interactive", priority: int = 0) -> list[str]:
    return [q.submit(TaskSpec("m", "1", i, lane=lane, priority=priority)).task.id for i in range(n)]


def test_claim_leases_tasks_to_the_worker(queue: TaskQueue, clock: FakeClock) -> None:
    ids = _submit(queue, 3)
    claimed = queue.claim("m", "1", "w1", max_n=2)
    assert [t.id for t in claimed] == ids[:2]
    for t in claimed:
        assert t.status == TaskStatus.RUNNING
        assert t.lease_owner == "w1"
        assert t.attempts == 1
        assert t.started_at == clock.now
        assert (t.lease_expires_at - clock.now).total_seconds() == 30  # type: ignore[operator]
    assert queue.get(ids[2]).status == TaskStatus.QUEUED


def test_interactive_before_batch_then_priority_then_age(queue: TaskQueue) -> None:
    batch = _submit(queue, 2, lane="batch", priority=100)
    low = _submit(queue, 2, priority=-5)
    high = _submit(queue, 2, priority=5)
    claimed = [t.id for t in queue.claim("m", "1", "w", max_n=6)]
    assert claimed == high + low + batch


def test_batch_lane_gets_a_guaranteed_share(queue: TaskQueue) -> None:
    _submit(queue, 40)
    _submit(queue, 10, lane="batch")
    lanes = [queue.claim("m", "1", "w")[0].lane for _ in range(20)]
    # batch_lane_every=4: one claim in four serves the batch lane despite the interactive backlog.
    assert lanes.count(Lane.BATCH) == 5
    assert lanes[3] == lanes[7] == Lane.BATCH


def test_a_worker_pool_can_be_dedicated_to_one_lane(queue: TaskQueue) -> None:
    _submit(queue, 3)
    batch = _submit(queue, 2, lane="batch")
    claimed = queue.claim("m", "1", "w", lanes=["batch"], max_n=10)
    assert [t.id for t in claimed] == batch


def test_claims_only_its_model_version(queue: TaskQueue) -> None:
    v1 = queue.submit(TaskSpec("m", "1", 0)).task.id
    v2 = queue.submit(TaskSpec("m", "2", 0)).task.id
    queue.submit(TaskSpec("n", "1", 0))
    assert [t.id for t in queue.claim("m", "2", "w", max_n=10)] == [v2]
    assert [t.id for t in queue.claim("m", "1", "w", max_n=10)] == [v1]
    assert queue.claim("m", "1", "w") == []


def test_concurrent_claimers_never_share_a_task(queue: TaskQueue, engine: Engine) -> None:
    n = 300
    queue.submit_many([TaskSpec("m", "1", i) for i in range(n)])
    got: dict[str, list[str]] = {}
    barrier = threading.Barrier(8)

    def claimer(name: str) -> None:
        mine: list[str] = []
        barrier.wait()
        while batch := queue.claim("m", "1", name, max_n=7):
            mine += [t.id for t in batch]
        got[name] = mine

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    everything = [tid for ids in got.values() for tid in ids]
    assert len(everything) == n
    assert len(set(everything)) == n
    for name, ids in got.items():
        for tid in ids[:5]:
            assert queue.get(tid).lease_owner == name


def test_a_batched_claim_keeps_slots_for_the_batch_lane(queue: TaskQueue) -> None:
    inter = _submit(queue, 20)
    batch = _submit(queue, 20, lane="batch")
    claimed = [t.id for t in queue.claim("m", "1", "w", max_n=8)]
    # batch_lane_every=4: two of eight slots go to the batch lane; interactive first in the list
    assert claimed == inter[:6] + batch[:2]


def test_slots_the_batch_lane_cannot_fill_go_to_interactive(queue: TaskQueue) -> None:
    inter = _submit(queue, 20)
    batch = _submit(queue, 1, lane="batch")
    claimed = [t.id for t in queue.claim("m", "1", "w", max_n=8)]
    assert claimed == inter[:7] + batch
    assert [t.id for t in queue.claim("m", "1", "w", max_n=8)] == inter[7:15]


def test_a_batched_claim_without_interactive_work_fills_from_batch(queue: TaskQueue) -> None:
    batch = _submit(queue, 10, lane="batch")
    assert [t.id for t in queue.claim("m", "1", "w", max_n=8)] == batch[:8]
