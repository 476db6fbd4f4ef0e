"""Standby workers: real processes that start before their model is known, and a supervisor
that hands a restarting worker's model to one of them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.queue import TaskQueue, TaskSpec
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from gpufleet.worker.standby import Assignment, BadAssignment
from gpufleet.worker.supervisor import Deployment, Slot, Supervisor

pytestmark = pytest.mark.slow

DIGITS = {"prompt": "a 3", "seed": 1, "steps": 4}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    engine = create_engine(f"sqlite:///{tmp_path / 'gpufleet.db'}")
    upgrade(engine)
    engine.dispose()
    return tmp_path


@pytest.fixture
def queue(data_dir: Path) -> Iterator[TaskQueue]:
    q = TaskQueue(create_engine(f"sqlite:///{data_dir / 'gpufleet.db'}"),
                  LocalBlobStore(data_dir / "blobs"))  # fmt: skip
    yield q
    q.close()


def _env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "GPUFLEET_DATA_DIR": str(data_dir), "GPUFLEET_LEASE_S": "5"}
    env.pop("GPUFLEET_DATABASE_URL", None)
    return env


def _standby(data_dir: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "gpufleet.worker.process", "--standby", "--device", "cpu"]
    return subprocess.Popen(
        cmd, env=_env(data_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_succeeded(queue: TaskQueue, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(t.status.value == "succeeded" for t in queue.get_many(ids).values()):
            return
        time.sleep(0.1)
    raise AssertionError({i: t.status.value for i, t in queue.get_many(ids).items()})


def test_assignment_round_trips_and_rejects_bad_lines() -> None:
    a = Assignment("builtin:digits", "host/digits@1/cpu0.0/1", ("interactive",), 12.5)
    assert Assignment.from_line(a.to_line()) == a
    with pytest.raises(BadAssignment, match="not JSON"):
        Assignment.from_line("digits please\n")
    with pytest.raises(BadAssignment, match="model must be a non-empty string"):
        Assignment.from_line('{"worker_id": "w"}')
    with pytest.raises(BadAssignment, match="lanes must be a list"):
        Assignment.from_line('{"model": "m", "worker_id": "w", "lanes": "batch"}')
    with pytest.raises(BadAssignment, match="grace_s must be a number"):
        Assignment.from_line('{"model": "m", "worker_id": "w", "grace_s": -1}')


def test_a_standby_waits_then_serves_what_it_is_given(data_dir: Path, queue: TaskQueue) -> None:
    [sub] = queue.submit_many([TaskSpec("digits", "1", DIGITS)])
    proc = _standby(data_dir)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "standby"
        time.sleep(0.5)
        assert queue.get(sub.task.id).status.value == "queued"  # no model yet: nothing taken
        proc.stdin.write(Assignment("builtin:digits", "w-standby", ("interactive", "batch"),
                                    5.0).to_line())  # fmt: skip
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "ready"
        _wait_succeeded(queue, [sub.task.id])
        assert queue.get(sub.task.id).lease_owner in (None, "w-standby")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_a_standby_exits_cleanly_when_not_needed_and_refuses_garbage(data_dir: Path) -> None:
    unused = _standby(data_dir)
    assert unused.stdout is not None and unused.stdin is not None
    assert unused.stdout.readline().strip() == "standby"
    unused.send_signal(signal.SIGINT)  # Ctrl-C in the terminal: the supervisor decides
    time.sleep(0.3)
    assert unused.poll() is None
    unused.stdin.close()
    assert unused.wait(30) == 0
    assert unused.stderr is not None and "Traceback" not in unused.stderr.read()

    bad = _standby(data_dir)
    _, err = bad.communicate("not an assignment\n", timeout=60)
    assert bad.returncode == 2
    assert err.strip().splitlines() == ["error: assignment is not JSON: Expecting value"]


def test_a_killed_worker_is_replaced_by_the_standby(data_dir: Path, queue: TaskQueue) -> None:
    slot = Slot("cpu0", "cpu")
    sup = Supervisor([Deployment("builtin:digits", "digits", "1")], [slot],
                     env=_env(data_dir), grace_s=5, poll_s=0.05, standby_per_slot=1)  # fmt: skip
    sup.start()
    try:
        assert sup.wait_ready(60)
        _wait_for(lambda: [s["state"] for s in sup.status()] == ["ready", "standby"])
        worker_pid = sup.workers[0].pid
        standby_pid = sup.standbys[0].proc.pid
        assert worker_pid is not None
        os.kill(worker_pid, signal.SIGKILL)
        # After the backoff the standby's process becomes the worker; a new standby starts.
        _wait_for(lambda: sup.workers[0].pid == standby_pid and sup.ready_count("digits") == 1)
        _wait_for(lambda: len(sup.standbys) == 1 and sup.standbys[0].proc.pid != standby_pid)
        assert sup.workers[0].restarts == 1
        ids = [s.task.id for s in queue.submit_many([TaskSpec("digits", "1", DIGITS)] * 3)]
        _wait_succeeded(queue, ids)
        procs = [sup.workers[0].proc, sup.standbys[0].proc]
    finally:
        sup.stop(grace_s=5)
    assert all(p is not None and p.poll() is not None for p in procs)
    assert sup.standbys == []


def test_once_stopping_a_worker_that_exits_is_not_restarted(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ctrl-C reaches the workers with the server: they drain and exit before the server
    gets to ``stop``. Once the server said it is stopping, that is not a crash to restart."""
    sup = Supervisor([Deployment("builtin:digits", "digits", "1")], [Slot("cpu0", "cpu")],
                     env=_env(data_dir), grace_s=5, poll_s=0.05)  # fmt: skip
    sup.start()
    try:
        assert sup.wait_ready(60)
        proc = sup.workers[0].proc
        assert proc is not None
        with caplog.at_level(logging.INFO, logger="gpufleet.worker.supervisor"):
            sup.stopping()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0  # drained
            time.sleep(1.5)  # past the first restart's backoff
        assert sup.workers[0].proc is proc and sup.workers[0].restarts == 0
        assert "restarting" not in caplog.text
    finally:
        sup.stop(grace_s=5)


def test_a_standby_that_dies_is_replaced(data_dir: Path) -> None:
    sup = Supervisor([], [Slot("cpu0", "cpu")], env=_env(data_dir), poll_s=0.05,
                     standby_per_slot=1)  # fmt: skip
    sup.start()
    try:
        _wait_for(lambda: [s["state"] for s in sup.status()] == ["standby"])
        first = sup.standbys[0].proc.pid
        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: len(sup.standbys) == 1 and sup.standbys[0].proc.pid != first)
    finally:
        sup.stop(grace_s=5)


def _wait_for(check: object, timeout: float = 60) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
