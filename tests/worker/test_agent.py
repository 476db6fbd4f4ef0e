"""The worker's queue agent: claims and result commits in a child process, on both databases.
It answers as the queue itself does (tasks, reports and errors), a worker whose agent dies gives
its tasks back and stops, and the agent never outlives its worker."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.errors import AgentLost, InvalidInput, NotFound
from gpufleet.queue import TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore, create_engine
from gpufleet.worker.agent import QueueAgent
from tests.integration.serve_helpers import gone
from tests.worker.test_loop import Running, Slow, _backlog, _wait_batches

ROOT = Path(__file__).resolve().parents[2]


def open_queue(url: str, blobs: str) -> TaskQueue:
    """The agent's factory: the same database and blob store as the test's queue."""
    return TaskQueue(create_engine(url), LocalBlobStore(Path(blobs)), lease_s=30)


@pytest.fixture
def q(db_url: str, engine: object, blob_dir: Path) -> Iterator[TaskQueue]:
    queue = open_queue(db_url, str(blob_dir))
    yield queue
    queue.close()


@pytest.fixture
def agent(db_url: str, engine: object, blob_dir: Path) -> Iterator[QueueAgent]:
    a = QueueAgent(functools.partial(open_queue, db_url, str(blob_dir)), lease_s=30)
    yield a
    a.close()


def test_claims_and_results_go_through_as_the_queue_has_them(
    q: TaskQueue, agent: QueueAgent
) -> None:
    ids = [s.task.id for s in q.submit_many([TaskSpec("m", "1", {"n": i}) for i in range(3)])]
    claimed = agent.claim("m", "1", "w1", max_n=2)
    assert sorted(t.input["n"] for t in claimed) == [0, 1]
    for t in claimed:
        stored = q.get(t.id)
        assert stored.status == TaskStatus.RUNNING and stored.lease_owner == "w1"
    report = agent.complete_many("w1", [(t.id, {"out": t.input["n"] * 2}) for t in claimed])
    assert sorted(report.accepted) == sorted(t.id for t in claimed)
    assert q.get(claimed[0].id).result == {"out": claimed[0].input["n"] * 2}
    again = agent.complete_many("w1", [(claimed[0].id, {"out": -1})])  # first one wins
    assert again.accepted == () and again.rejected == {claimed[0].id: TaskStatus.SUCCEEDED}
    with pytest.raises(NotFound):  # the queue's own error, through the pipe
        agent.complete_many("w1", [("t_does_not_exist", 1)])
    with pytest.raises(InvalidInput) as e:
        agent.claim("m", "1", "w1", max_n=0)
    assert e.value.details["field"] == "max_n"
    [left] = set(ids) - {t.id for t in claimed}
    assert q.get(left).status == TaskStatus.QUEUED


def test_an_agent_that_cannot_open_its_queue_says_why(tmp_path: Path) -> None:
    a = QueueAgent(functools.partial(open_queue, "mysql://nowhere/db", str(tmp_path)), lease_s=30)
    try:
        with pytest.raises(InvalidInput, match="unsupported database"):
            a.wait_ready()
    finally:
        a.close()


def test_a_worker_whose_agent_dies_gives_its_tasks_back_and_stops(
    q: TaskQueue, agent: QueueAgent
) -> None:
    ids = _backlog(q, 12)
    model = Slow(0.2, max_batch=2)
    running = Running(q, model)
    running.worker.ops = agent  # claims ahead through the agent while work is deep
    with running:
        _wait_batches(model, 3)
        assert agent.pid is not None
        os.kill(agent.pid, signal.SIGKILL)
        running.thread.join(20)
        assert not running.thread.is_alive()  # it stopped by itself
    assert isinstance(running.worker.agent_lost, AgentLost)
    for t in q.get_many(ids).values():  # done, or back in the queue: none left leased
        assert t.status in (TaskStatus.SUCCEEDED, TaskStatus.QUEUED), t.status
        assert t.lease_owner is None
    with pytest.raises(AgentLost, match="exited"):
        agent.claim("double", "1", "w1")


def test_the_agent_does_not_outlive_its_worker(db_url: str, engine: object, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import functools, sys, time
        from gpufleet.worker.agent import QueueAgent
        from tests.worker.test_agent import open_queue
        a = QueueAgent(functools.partial(open_queue, {db_url!r}, {str(tmp_path)!r}), lease_s=30)
        a.wait_ready()
        print(a.pid, flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        assert worker.stdout is not None
        pid = int(worker.stdout.readline())
        assert not gone(pid)
        worker.kill()  # SIGKILL: no atexit, no clean-up in the worker
        worker.wait(10)
        deadline = time.monotonic() + 10
        while not gone(pid):
            assert time.monotonic() < deadline, "the agent outlived its worker"
            time.sleep(0.02)
    finally:
        worker.kill()
        worker.wait(10)
