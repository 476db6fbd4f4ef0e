"""Wake-ups: an idle claimer is woken by new work, in this process or another, not by polling."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gpufleet.queue import TaskError, TaskQueue, TaskSpec
from gpufleet.queue.notify import FinishedInbox, finished_topics


def _waiter(q: TaskQueue, model: str, timeout: float, out: list[tuple[bool, float]]) -> None:
    q.wait_for_work(model, "1", 0)  # the first wait subscribes and returns at once
    ready.set()
    t0 = time.monotonic()
    woken = q.wait_for_work(model, "1", timeout)
    out.append((woken, time.monotonic() - t0))


ready = threading.Event()


def test_submit_wakes_a_waiting_claimer(queue: TaskQueue) -> None:
    ready.clear()
    out: list[tuple[bool, float]] = []
    th = threading.Thread(target=_waiter, args=(queue, "m", 10.0, out))
    th.start()
    assert ready.wait(5)
    time.sleep(0.2)
    queue.submit(TaskSpec("m", "1", 1))
    th.join(10)
    [(woken, waited)] = out
    assert woken
    assert 0.15 < waited < 2.0  # woken by the submit, long before the 10 s timeout
    assert queue.claim("m", "1", "w1")


def test_one_submit_of_several_models_wakes_each_models_claimer(queue: TaskQueue) -> None:
    ready.clear()
    outs: dict[str, list[tuple[bool, float]]] = {"a": [], "b": []}
    threads = [threading.Thread(target=_waiter, args=(queue, m, 10.0, outs[m])) for m in outs]
    for th in threads:
        th.start()
        assert ready.wait(5)
        ready.clear()
    queue.submit_many([TaskSpec("a", "1", 1), TaskSpec("b", "1", 2), TaskSpec("a", "1", 3)])
    for th in threads:
        th.join(10)
    assert all(out and out[0][0] and out[0][1] < 2.0 for out in outs.values())


def test_other_models_work_does_not_wake(queue: TaskQueue) -> None:
    ready.clear()
    out: list[tuple[bool, float]] = []
    th = threading.Thread(target=_waiter, args=(queue, "m", 0.8, out))
    th.start()
    assert ready.wait(5)
    queue.submit(TaskSpec("other", "1", 1))
    th.join(10)
    [(woken, waited)] = out
    assert not woken and waited >= 0.75


def test_a_task_in_backoff_wakes_its_claimer_when_due(queue: TaskQueue) -> None:
    queue.submit(TaskSpec("m", "1", 1))
    [task] = queue.claim("m", "1", "w1")
    queue.fail(task.id, "w1", TaskError("flaky", "try again"), retryable=True)  # due in 1 s
    queue.wait_for_work("m", "1", 0)
    t0 = time.monotonic()
    assert queue.wait_for_work("m", "1", 10.0)
    assert time.monotonic() - t0 < 3.0


WAITER = textwrap.dedent(
    """
    import sys, time
    from gpufleet.queue import TaskQueue
    from gpufleet.store import LocalBlobStore, create_engine
    q = TaskQueue(create_engine(sys.argv[1]), LocalBlobStore(sys.argv[2]))
    q.wait_for_work("m", "1", 0)
    print("ready", flush=True)
    t0 = time.monotonic()
    woken = q.wait_for_work("m", "1", 20.0)
    print(woken, time.monotonic() - t0, flush=True)
    """
)


def test_submit_wakes_a_claimer_in_another_process(
    queue: TaskQueue, db_url: str, blob_dir: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WAITER, db_url, str(blob_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        queue.submit(TaskSpec("m", "1", 1))
        woken, waited = proc.stdout.readline().split()
        assert woken == "True"
        assert float(waited) < 5.0
    finally:
        proc.kill()
        proc.wait()


def test_an_idle_wait_does_not_spin(queue: TaskQueue) -> None:
    queue.wait_for_work("m", "1", 0)
    cpu0, t0 = time.process_time(), time.monotonic()
    assert not queue.wait_for_work("m", "1", 1.5)
    assert time.monotonic() - t0 >= 1.45
    assert time.process_time() - cpu0 < 0.1  # blocked in select/poll, not polling the database


def _finish_waiter(q: TaskQueue, timeout: float, out: list[set[str]]) -> None:
    q.notifier.wait_finished(0)  # subscribe
    ready_finished.set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = q.notifier.wait_finished(deadline - time.monotonic())
        if ended.ids:
            out.append(ended.ids)
            return


ready_finished = threading.Event()


@pytest.mark.parametrize("how", ["complete", "fail", "cancel_queued"])
def test_a_task_ending_wakes_result_waiters(queue: TaskQueue, how: str) -> None:
    """The API's result waits and event streams are woken by a task ending, however it ends,
    and the wake-up says which task ended (so a waiter reads only its own)."""
    ready_finished.clear()
    task = queue.submit(TaskSpec("m", "1", 1)).task
    if how != "cancel_queued":
        queue.claim("m", "1", "w")
    out: list[set[str]] = []
    th = threading.Thread(target=_finish_waiter, args=(queue, 10.0, out))
    th.start()
    assert ready_finished.wait(5)
    time.sleep(0.1)
    t0 = time.monotonic()
    if how == "complete":
        queue.complete(task.id, "w", "r")
    elif how == "fail":
        queue.fail(task.id, "w", TaskError("boom", "x"), retryable=False)
    else:
        queue.cancel(task.id)
    th.join(10)
    assert out == [{task.id}]
    assert time.monotonic() - t0 < 2.0


def test_finished_wake_ups_carry_every_id_in_chunks(queue: TaskQueue) -> None:
    """A batch of many results says each id, in payloads small enough for NOTIFY."""
    specs = [TaskSpec("m", "1", i) for i in range(250)]
    ids = {s.task.id for s in queue.submit_many(specs)}
    claimed = queue.claim("m", "1", "w", max_n=250)
    assert len(claimed) == 250
    queue.notifier.wait_finished(0)
    queue.complete_many("w", [(t.id, 1) for t in claimed])
    got: set[str] = set()
    outcomes: dict[str, Any] = {}
    deadline = time.monotonic() + 5
    while got != ids and time.monotonic() < deadline:
        ended = queue.notifier.wait_finished(deadline - time.monotonic())
        got |= ended.ids
        outcomes |= ended.outcomes
    assert got == ids
    # Small results ride on the wake-up, so a waiter needs no read to answer.
    assert outcomes == {tid: ("succeeded", 1) for tid in ids}
    assert all(len(topic) < 8000 for topic in finished_topics(ids))


def test_large_results_are_not_carried_by_wake_ups() -> None:
    big = b'"' + b"x" * 5000 + b'"'
    [topic] = finished_topics(["a", "b"], {"a": ("succeeded", big), "b": ("succeeded", b"2")})
    inbox = FinishedInbox()
    inbox.add(topic)
    ended = inbox.take(0)
    assert ended.ids == {"a", "b"} and ended.outcomes == {"b": ("succeeded", 2)}
    assert not ended.unknown
    inbox.add("*finished")  # a sender that did not say which: look at everything
    assert inbox.take(0).unknown


def test_each_wake_up_goes_only_to_the_sockets_that_wait_for_its_kind(tmp_path: Path) -> None:
    """A submit's wake-up reaches the processes waiting for work, not the API's inbox of tasks
    that ended; a result's reaches that inbox, not the workers' wait sockets; a socket of an
    older gpufleet (no role in its name) gets both."""
    import socket

    from gpufleet.queue.notify import SocketNotifier

    n = SocketNotifier(tmp_path / "q.db")
    n.dir.mkdir(mode=0o700)
    socks = {}
    for name in ("w-1-1-aa", "f-1-2-bb", "1-3-cc"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(n.dir / name))
        s.setblocking(False)
        socks[name] = s
    try:
        n.after_commit(["m"])
        n.after_commit(finished_topics(["t1"]))

        def received(s: socket.socket) -> list[bytes]:
            out = []
            while True:
                try:
                    out.append(s.recv(65536))
                except BlockingIOError:
                    return out

        assert received(socks["w-1-1-aa"]) == [b"m"]
        assert received(socks["f-1-2-bb"]) == [b"*finished:t1"]
        assert received(socks["1-3-cc"]) == [b"m", b"*finished:t1"]
    finally:
        for s in socks.values():
            s.close()
        n.close()


def test_a_finished_wake_up_waits_for_room_in_a_full_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full receiver (10 datagrams queued) drops work wake-ups, which one queued one says
    already; a finished one, which names tasks no other says, waits for the drain."""
    import socket

    from gpufleet.queue import notify
    from gpufleet.queue.notify import SocketNotifier

    monkeypatch.setattr(notify, "FULL_WAIT_S", 1.0)  # however slow this machine is today

    n = SocketNotifier(tmp_path / "q.db")
    n.dir.mkdir(mode=0o700)
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(str(n.dir / "f-1-1-aa"))
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        queued = 0
        with contextlib.suppress(BlockingIOError):
            while queued < 10_000:
                filler.sendto(b"*finished:old", str(n.dir / "f-1-1-aa"))
                queued += 1
        got: list[bytes] = []

        def drain() -> None:
            time.sleep(0.003)  # the send below finds the inbox full
            inbox.settimeout(2)
            with contextlib.suppress(OSError):
                while not got or got[-1] != b"*finished:new":
                    got.append(inbox.recv(65536))

        th = threading.Thread(target=drain)
        th.start()
        n.after_commit(finished_topics(["new"]))
        th.join(10)
        assert got[-1] == b"*finished:new" and len(got) == queued + 1
    finally:
        inbox.close()
        filler.close()
        n.close()
