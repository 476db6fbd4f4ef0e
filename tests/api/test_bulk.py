"""Bulk submit (``POST /v1/tasks/batch``), lookup (``POST /v1/tasks/lookup``) and
``Client.submit_many`` / ``get_many`` against the real app on loopback, with a real worker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from gpufleet.client import AsyncClient, Client
from gpufleet.errors import InvalidInput
from gpufleet.queue import TaskStatus
from tests.api.conftest import LiveApi

ENDED = {"succeeded", "failed", "cancelled"}


def _wait_all(c: Client, ids: list[str], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = {v.id: v for v in c.get_many(ids)}
        if len(views) == len(ids) and all(v.status in ENDED for v in views.values()):
            return views
        time.sleep(0.05)
    raise AssertionError("tasks did not end in time")


def test_bulk_submit_accepts_every_good_task_in_order(live_api: LiveApi) -> None:
    tasks = [{"model": "echo", "input": {"text": str(i)}} for i in range(50)]
    r = httpx.post(f"{live_api.url}/v1/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["refused"]) == (50, 0)
    assert [t["index"] for t in body["tasks"]] == list(range(50))
    ids = [t["id"] for t in body["tasks"]]
    assert len(set(ids)) == 50
    with Client(live_api.url) as c:
        _wait_all(c, ids)
        assert [c.result(tid).result for tid in ids] == [{"echo": str(i)} for i in range(50)]


def test_a_bad_task_is_refused_alone(live_api: LiveApi) -> None:
    """An unknown model, a bad priority and a reused idempotency key each refuse their own
    task; the others of the request are accepted."""
    httpx.post(f"{live_api.url}/v1/tasks", json={
        "model": "idle", "input": {"text": "a"}, "idempotency_key": "bulk-k1"})  # fmt: skip
    tasks = [
        {"model": "echo", "input": {"text": "ok-1"}},
        {"model": "nope", "input": {}},
        {"model": "idle", "input": {"text": "other"}, "idempotency_key": "bulk-k1"},
        {"model": "echo", "input": {"text": "ok-2"}},
    ]
    body = httpx.post(f"{live_api.url}/v1/tasks/batch", json={"tasks": tasks}).json()
    assert (body["accepted"], body["refused"]) == (2, 2)
    codes = [t["error"]["code"] if t["error"] else None for t in body["tasks"]]
    assert codes == [None, "not_found", "idempotency_conflict", None]
    assert body["tasks"][0]["status"] == "queued" and body["tasks"][3]["id"]


def test_a_bulk_request_is_one_transaction(live_api: LiveApi) -> None:
    """All of one request's accepted tasks exist together: none is visible half-written."""
    tasks = [{"model": "idle", "input": {"text": str(i)}} for i in range(300)]
    body = httpx.post(f"{live_api.url}/v1/tasks/batch", json={"tasks": tasks}).json()
    ids = [t["id"] for t in body["tasks"]]
    found = live_api.queue.get_many(ids)
    assert len(found) == 300
    assert {t.status for t in found.values()} == {TaskStatus.QUEUED}
    assert len({t.created_at for t in found.values()}) == 1  # one commit, one clock reading


def test_lookup_returns_known_tasks_in_order_and_skips_unknown(live_api: LiveApi) -> None:
    with Client(live_api.url) as c:
        a = c.submit("idle", {"text": "a"})
        b = c.submit("idle", {"text": "b"})
        views = c.get_many([b.id, "no-such-task", a.id, b.id])
    assert [v.id for v in views] == [b.id, a.id]


def test_client_submit_many_splits_large_submissions(live_api: LiveApi) -> None:
    with Client(live_api.url) as c:
        items = c.submit_many({"model": "echo", "input": {"text": str(i)}} for i in range(2100))
        assert [it.index for it in items] == list(range(2100))
        assert all(it.id and it.error is None for it in items)
        views = _wait_all(c, [it.id for it in items if it.id], timeout=120)
    assert {v.status for v in views.values()} == {"succeeded"}


def test_client_submit_many_checks_each_task_before_sending(live_api: LiveApi) -> None:
    with Client(live_api.url) as c, pytest.raises(InvalidInput, match="model"):
        c.submit_many([{"input": 1}])
    with Client(live_api.url) as c, pytest.raises(InvalidInput, match="unknown task field"):
        c.submit_many([{"model": "echo", "input": 1, "colour": "red"}])


def test_async_client_submit_many(live_api: LiveApi) -> None:
    async def go() -> list[Any]:
        async with AsyncClient(live_api.url) as c:
            items = await c.submit_many([{"model": "echo", "input": {"text": "x"}}] * 3)
            return await c.get_many([it.id for it in items if it.id])

    views = asyncio.run(go())
    assert len(views) == 3


def test_default_api_workers_follow_the_cores() -> None:
    from gpufleet.api.process import default_api_workers

    assert [default_api_workers(n) for n in (1, 2, 4, 7, 8, 16, 32, 64)] == [1, 1, 1, 1, 2, 4, 8, 8]
