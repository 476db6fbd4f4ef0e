"""``GET /v1/queue`` (what ``gpufleet watch`` reads) and a queued task's place in its lane in
``GET /v1/tasks/{id}`` and its event stream, against the real app on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet.client import Client
from tests.api.conftest import LiveApi


@pytest.fixture
def client(live_api: LiveApi) -> Iterator[Client]:
    with Client(live_api.url) as c:
        yield c


def wait_until(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)
    return value


def test_queue_shows_live_tasks_and_counts_finished_ones(client: Client) -> None:
    before = client.queue()
    waiting = [client.submit("manual", {"n": i}, lane="batch").id for i in range(3)]
    assert client.run("echo", {"text": "one"}) == {"echo": "one"}

    now = client.queue()
    rows = {(r.model, r.lane, r.status): r for r in now.depth}
    manual = rows[("manual", "batch", "queued")]
    assert manual.count >= 3 and manual.oldest_age_s is not None and manual.oldest_age_s >= 0
    assert now.workers is None  # this app runs no local workers
    # The worker counts the task right after it commits the result: look until it has.
    done = before.finished.get("echo", 0) + 1
    wait_until(lambda: client.queue().finished.get("echo", 0) == done)
    for task_id in waiting:
        client.cancel(task_id)


def test_a_queued_task_has_its_place_in_the_lane(client: Client) -> None:
    ids = [client.submit("idle", {}, lane="batch", priority=90).id for _ in range(3)]
    views = [client.get(i) for i in ids]
    total = views[0].queue_length
    assert [(v.queue_position, v.queue_length) for v in views] == [(1, total), (2, total),
                                                                   (3, total)]  # fmt: skip
    assert total is not None and total >= 3
    assert all(v.queue_capped is False for v in views)  # exact: far below the count's cap
    # A task that is not queued has none; nor has a listed one (a count for each is too dear).
    client.cancel(ids[0])
    assert (client.get(ids[0]).queue_position, client.get(ids[1]).queue_position) == (None, 1)
    listed = client.get_many(ids) + client.tasks(model="idle").tasks
    assert all(v.queue_position is None for v in listed)
    for task_id in ids[1:]:
        client.cancel(task_id)


def test_the_event_stream_sends_the_place_as_it_moves(client: Client) -> None:
    first, second = (client.submit("idle", {}, lane="batch", priority=95).id for _ in range(2))
    events = client.events(second)
    assert next(events).queue_position == 2
    client.cancel(first)
    moved = next(events)  # no state change: the stream looks again every second
    assert (moved.status, moved.queue_position) == ("queued", 1)
    client.cancel(second)
    assert next(events).status == "cancelled"
