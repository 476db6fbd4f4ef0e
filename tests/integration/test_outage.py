"""A database outage does not fail healthy workers: lease recovery waits for them to renew."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.errors import Unavailable
from gpufleet.queue import LeaseReaper, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from gpufleet.testing import PostgresServer


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.mark.postgres
@pytest.mark.slow
def test_reaper_waits_a_lease_after_an_outage(own_pg: PostgresServer, tmp_path: Path) -> None:
    engine = create_engine(own_pg.create_database("outage"))
    upgrade(engine)
    queue = TaskQueue(engine, LocalBlobStore(tmp_path), lease_s=1.5)
    tid = queue.submit(TaskSpec("m", "1", 1)).task.id
    queue.claim("m", "1", "w1")
    reaper = LeaseReaper(queue, interval_s=0.1, grace_s=3.0)

    own_pg.pause()  # the worker cannot heartbeat, the reaper cannot recover
    assert reaper.tick() is None
    with pytest.raises(Unavailable):
        queue.heartbeat("w1", [tid])
    time.sleep(2.0)  # the lease lapses during the outage
    own_pg.resume()
    for _ in range(50):  # the pool discards broken connections on first use
        try:
            queue.stats()
            break
        except Unavailable:
            time.sleep(0.1)

    report = reaper.tick()  # database back: grace starts, nothing recovered
    assert report is not None and report.total == 0
    assert queue.heartbeat("w1", [tid]).held == {tid}  # the healthy worker renews in time
    queue.complete(tid, "w1", "done")
    assert queue.get(tid).status == TaskStatus.SUCCEEDED
    queue.close()
    engine.dispose()
