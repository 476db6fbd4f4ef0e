"""Webhook delivery to a real HTTP receiver on loopback, on both databases: bodies and headers,
retries with backoff, giving up, and no double delivery between concurrent dispatchers."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import gpufleet
from gpufleet.api.webhooks import WebhookDispatcher
from gpufleet.queue import Limits, TaskError, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore, create_engine, tasks
from tests.helpers import FakeClock


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """Records every POST; answers ``fail_status`` to the first ``fail_first`` of them."""

    url: str
    requests: list[Received] = field(default_factory=list)
    fail_first: int = 0
    fail_status: int = 500
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, task_id: str) -> list[dict[str, Any]]:
        return [r.body for r in self.requests if r.body["id"] == task_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(state.delay_s)
            with state.lock:
                state.requests.append(Received(self.path, dict(self.headers), body))
                failing = len(state.requests) <= state.fail_first
            self.send_response(state.fail_status if failing else 204)
            if failing and 300 <= state.fail_status < 400:
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def dispatcher(queue: TaskQueue) -> Iterator[WebhookDispatcher]:
    d = WebhookDispatcher(queue, timeout_s=2, max_attempts=4, batch=8)
    yield d
    d.close()


def webhook_row(engine: Engine, task_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        query = sa.select(tasks.c.webhook_state, tasks.c.webhook_attempts, tasks.c.webhook_next_at)
        return dict(conn.execute(query.where(tasks.c.id == task_id)).mappings().one())


def submit(queue: TaskQueue, url: str, input: Any = 1) -> str:
    return queue.submit(TaskSpec("m", "1", input, webhook_url=url)).task.id


def run_one(queue: TaskQueue, url: str, input: Any = 1) -> str:
    """A task that has been claimed; the caller finishes it."""
    task_id = submit(queue, url, input)
    [claimed] = queue.claim("m", "1", "w1")
    assert claimed.id == task_id
    return task_id


def test_finished_tasks_are_delivered_once_with_their_outcome(
    queue: TaskQueue, dispatcher: WebhookDispatcher, receiver: Receiver, clock: FakeClock
) -> None:
    ok = run_one(queue, receiver.url + "/hook?t=1", {"text": "hi"})
    queue.complete(ok, "w1", {"echo": "hi"})
    bad = run_one(queue, receiver.url + "/hook")
    queue.fail(bad, "w1", TaskError("bad_input", "no text"), retryable=False)
    gone = submit(queue, receiver.url + "/hook")
    queue.cancel(gone)
    running = run_one(queue, receiver.url + "/hook")
    submit(queue, receiver.url + "/hook")  # still queued

    assert dispatcher.deliver_due() == 3
    assert dispatcher.deliver_due() == 0
    assert sorted(r.body["id"] for r in receiver.requests) == sorted([ok, bad, gone])

    [got] = receiver.bodies(ok)
    finished_at = queue.get(ok).finished_at
    assert finished_at is not None
    assert got == {
        "id": ok,
        "status": "succeeded",
        "model": "m",
        "version": "1",
        "result": {"echo": "hi"},
        "error": None,
        "finished_at": finished_at.isoformat(),
    }
    [failed] = receiver.bodies(bad)
    assert failed["status"] == "failed" and failed["result"] is None
    assert failed["error"] == {"code": "bad_input", "message": "no text"}
    [cancelled] = receiver.bodies(gone)
    assert cancelled["status"] == "cancelled" and cancelled["error"] is None

    request = next(r for r in receiver.requests if r.body["id"] == ok)
    assert request.path == "/hook?t=1"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == f"gpufleet/{gpufleet.__version__}"
    assert request.headers["X-Gpufleet-Task-Id"] == ok
    assert request.headers["X-Gpufleet-Delivery"] == "1"
    for tid in (ok, bad, gone):
        assert queue.get(tid).webhook_state == "delivered"
        assert webhook_row(queue.engine, tid)["webhook_attempts"] == 1
    assert queue.get(running).webhook_state == "pending"

    # The running one ends later and is delivered then.
    clock.advance(1)
    queue.complete(running, "w1", 5)
    assert dispatcher.deliver_due() == 1
    assert receiver.bodies(running)[0]["result"] == 5


def test_tasks_without_a_webhook_are_ignored(
    queue: TaskQueue, dispatcher: WebhookDispatcher
) -> None:
    task_id = queue.submit(TaskSpec("m", "1", 1)).task.id
    queue.claim("m", "1", "w1")
    queue.complete(task_id, "w1", 2)
    assert dispatcher.deliver_due() == 0
    assert queue.get(task_id).webhook_state is None


def test_a_result_in_the_blob_store_is_loaded(
    engine: Engine, blob_dir: Path, clock: FakeClock, receiver: Receiver
) -> None:
    queue = TaskQueue(
        engine, LocalBlobStore(blob_dir), limits=Limits(inline_input_limit=16), clock=clock
    )
    try:
        big = {"text": "x" * 1000}
        task_id = run_one(queue, receiver.url, big)
        queue.complete(task_id, "w1", big)
        assert queue.get(task_id).result_ref is not None
        dispatcher = WebhookDispatcher(queue)
        try:
            assert dispatcher.deliver_due() == 1
        finally:
            dispatcher.close()
        assert receiver.bodies(task_id)[0]["result"] == big
    finally:
        queue.close()


def test_failures_are_retried_with_backoff(
    queue: TaskQueue, dispatcher: WebhookDispatcher, receiver: Receiver, clock: FakeClock
) -> None:
    receiver.fail_first = 2
    task_id = run_one(queue, receiver.url)
    queue.complete(task_id, "w1", 1)

    assert dispatcher.deliver_due() == 1  # attempt 1: 500
    row = webhook_row(queue.engine, task_id)
    assert (row["webhook_state"], row["webhook_attempts"]) == ("pending", 1)
    assert row["webhook_next_at"] == clock.now + dispatcher.backoff(1)
    assert dispatcher.deliver_due() == 0  # not due yet
    clock.advance(1)
    assert dispatcher.deliver_due() == 1  # attempt 2: 500, next in 2 s
    clock.advance(1.5)
    assert dispatcher.deliver_due() == 0
    clock.advance(0.5)
    assert dispatcher.deliver_due() == 1  # attempt 3: delivered
    assert dispatcher.deliver_due() == 0

    assert [r.headers["X-Gpufleet-Delivery"] for r in receiver.requests] == ["1", "2", "3"]
    assert queue.get(task_id).webhook_state == "delivered"
    assert webhook_row(queue.engine, task_id)["webhook_next_at"] is None


def test_backoff_doubles_up_to_the_cap(queue: TaskQueue) -> None:
    d = WebhookDispatcher(queue)
    try:
        assert [d.backoff(n).total_seconds() for n in (1, 2, 3, 8, 9, 20)] == [
            1, 2, 4, 128, 256, 300,
        ]  # fmt: skip
    finally:
        d.close()


def test_gives_up_after_max_attempts(
    queue: TaskQueue,
    dispatcher: WebhookDispatcher,
    receiver: Receiver,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.fail_first = 100
    task_id = run_one(queue, receiver.url + "/hook?token=s3cret")
    queue.complete(task_id, "w1", 1)
    with caplog.at_level(logging.INFO, logger="gpufleet.api.webhooks"):
        for _ in range(4):
            assert dispatcher.deliver_due() == 1
            clock.advance(600)
        assert dispatcher.deliver_due() == 0
    assert len(receiver.requests) == 4
    row = webhook_row(queue.engine, task_id)
    assert (row["webhook_state"], row["webhook_attempts"], row["webhook_next_at"]) == (
        "failed", 4, None,
    )  # fmt: skip
    assert queue.get(task_id).status == TaskStatus.SUCCEEDED  # the task itself is unaffected
    gave_up = [r for r in caplog.records if "giving up" in r.getMessage()]
    assert len(gave_up) == 1 and task_id in gave_up[0].getMessage()
    assert "HTTP 500" in gave_up[0].getMessage()
    assert "s3cret" not in caplog.text and receiver.url not in caplog.text


@pytest.mark.parametrize("problem", ["refused", "redirect", "timeout"])
def test_connection_errors_redirects_and_timeouts_are_retried(
    queue: TaskQueue, receiver: Receiver, clock: FakeClock, problem: str
) -> None:
    url = receiver.url + "/hook"
    if problem == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/hook"  # closed: nothing listens
    elif problem == "redirect":
        receiver.fail_first, receiver.fail_status = 1, 302
    else:
        receiver.delay_s = 0.5
    dispatcher = WebhookDispatcher(queue, timeout_s=0.2)
    try:
        task_id = run_one(queue, url)
        queue.complete(task_id, "w1", 1)
        assert dispatcher.deliver_due() == 1
        row = webhook_row(queue.engine, task_id)
        assert (row["webhook_state"], row["webhook_attempts"]) == ("pending", 1)
        assert row["webhook_next_at"] == clock.now + timedelta(seconds=1)
        if problem == "redirect":  # not followed: the next attempt goes to the same URL
            receiver.fail_first = 0
            clock.advance(1)
            assert dispatcher.deliver_due() == 1
            assert [r.path for r in receiver.requests] == ["/hook", "/hook"]
            assert queue.get(task_id).webhook_state == "delivered"
    finally:
        dispatcher.close()


def test_a_claimed_delivery_is_leased(
    queue: TaskQueue, dispatcher: WebhookDispatcher, receiver: Receiver, clock: FakeClock
) -> None:
    """A dispatcher that died mid-send leaves the task pending; it is sent again (at least
    once) when the lease lapses, as the next attempt."""
    task_id = run_one(queue, receiver.url)
    queue.complete(task_id, "w1", 1)
    [attempt] = dispatcher.claim_due(8)  # claimed, then "crashed" before sending
    assert attempt.number == 1
    assert dispatcher.deliver_due() == 0  # leased
    clock.advance(dispatcher.lease.total_seconds())
    assert dispatcher.deliver_due() == 1
    assert [r.headers["X-Gpufleet-Delivery"] for r in receiver.requests] == ["2"]
    assert queue.get(task_id).webhook_state == "delivered"


def test_concurrent_dispatchers_never_send_a_task_twice(
    queue: TaskQueue, db_url: str, receiver: Receiver, clock: FakeClock
) -> None:
    receiver.delay_s = 0.05  # keep sends in flight while the other dispatcher claims
    ids = []
    for i in range(24):
        ids.append(run_one(queue, receiver.url, i))
        queue.complete(ids[-1], "w1", i)
    other_engine = create_engine(db_url)  # a second process, as far as the database can tell
    other_queue = TaskQueue(other_engine, queue.blobs, clock=clock)
    dispatchers = [
        WebhookDispatcher(queue, batch=4),
        WebhookDispatcher(other_queue, batch=4),
    ]
    start = threading.Barrier(2)
    sent = [0, 0]

    def drain(n: int) -> None:
        start.wait()
        while (got := dispatchers[n].deliver_due()) > 0:
            sent[n] += got

    try:
        threads = [threading.Thread(target=drain, args=(n,)) for n in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
    finally:
        for d in dispatchers:
            d.close()
        other_queue.close()
        other_engine.dispose()
    assert sum(sent) == 24 and all(sent), sent
    assert sorted(r.body["id"] for r in receiver.requests) == sorted(ids)
    assert {queue.get(t).webhook_state for t in ids} == {"delivered"}


def test_run_survives_errors_and_stops(
    queue: TaskQueue, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = WebhookDispatcher(queue)
    calls = 0
    deliver = dispatcher.deliver_due

    def flaky(limit: int | None = None) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return deliver(limit)

    dispatcher.deliver_due = flaky  # type: ignore[method-assign]
    task_id = run_one(queue, receiver.url)
    queue.complete(task_id, "w1", 1)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.02))
    thread.start()
    deadline = time.monotonic() + 10
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert len(receiver.requests) == 1
    assert "webhook delivery round failed" in caplog.text
