"""``gpufleet.Client`` and ``AsyncClient`` against the real app on loopback, with a real worker:
submit, wait on the event stream, results, infer, cancel, paging, and error mapping."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest

import gpufleet
from gpufleet.api.schemas import ResultView, Submitted, TaskView
from gpufleet.client import (
    ApiError,
    AsyncClient,
    Client,
    TaskCancelled,
    TaskFailed,
    WaitTimeout,
    error_from_response,
)
from gpufleet.errors import (
    InvalidInput,
    NotFound,
    TaskFinished,
    TaskNotFinished,
    Unavailable,
)
from gpufleet.queue import TaskStatus
from tests.api.conftest import INPUT_SCHEMA, LiveApi
from tests.integration.serve_helpers import free_port


@pytest.fixture
def client(live_api: LiveApi) -> Any:
    with Client(live_api.url, key="test-key-not-shown") as c:
        yield c


def test_submit_wait_and_result(client: Client) -> None:
    sub = client.submit("echo", {"text": "hello"})
    assert isinstance(sub, Submitted)
    assert (sub.status, sub.model, sub.version, sub.created) == ("queued", "echo", "1", True)
    done = client.wait(sub.id, timeout=20)
    assert done == ResultView(id=sub.id, status="succeeded", result={"echo": "hello"})
    assert client.result(sub.id) == done
    view = client.get(sub.id)
    assert view.status == "succeeded" and view.attempts == 1
    assert view.result_url == f"/v1/tasks/{sub.id}/result"


def test_run_returns_the_value_or_raises_the_failure(client: Client) -> None:
    assert client.run("echo", {"text": "hi"}, timeout=20) == {"echo": "hi"}
    with pytest.raises(TaskFailed) as info:
        client.run("echo", {"fail": "no cats"}, timeout=20, max_attempts=1)
    err = info.value
    assert err.code == "task_failed"
    assert err.details["error"] == {"code": "bad_input", "message": "no cats"}
    assert "bad_input: no cats" in str(err)


def test_a_repeated_idempotency_key_returns_the_first_task(client: Client) -> None:
    first = client.submit("idle", {"text": "a"}, idempotency_key="same-key-1")
    again = client.submit("idle", {"text": "a"}, idempotency_key="same-key-1")
    assert again.id == first.id and not again.created


def test_infer_waits_for_the_result_or_hands_back_the_task(client: Client) -> None:
    done = client.infer("echo", {"text": "now"}, wait=20)
    assert isinstance(done, ResultView)
    assert (done.status, done.result) == ("succeeded", {"echo": "now"})
    later = client.infer("idle", {"text": "later"}, wait=0.2, priority=5)
    assert isinstance(later, Submitted) and later.status == "queued"
    assert client.get(later.id).priority == 5


def test_cancel_a_queued_task(client: Client) -> None:
    sub = client.submit("idle", {"text": "never"})
    view = client.cancel(sub.id)
    assert isinstance(view, TaskView) and view.status == "cancelled"
    assert client.cancel(sub.id).status == "cancelled"  # again: a no-op
    outcome = client.result(sub.id)
    assert outcome.status == "cancelled" and outcome.result is None


def test_cancelling_a_finished_task_is_a_conflict(client: Client) -> None:
    sub = client.submit("echo", {"text": "done"})
    client.wait(sub.id, timeout=20)
    with pytest.raises(TaskFinished) as info:
        client.cancel(sub.id)
    assert info.value.details["http_status"] == 409


def test_run_raises_task_cancelled_when_the_task_is_cancelled(
    client: Client, live_api: LiveApi
) -> None:
    def cancel_it() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            page = live_api.queue.list_tasks(model="idle", status="queued", limit=100)
            mine = [t for t in page.items if t.input == {"text": "to cancel"}]
            if mine:
                live_api.queue.cancel(mine[0].id)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=cancel_it)
    thread.start()
    with pytest.raises(TaskCancelled) as info:
        client.run("idle", {"text": "to cancel"}, timeout=20)
    thread.join()
    assert info.value.code == "task_cancelled"


def test_wait_gives_up_after_its_timeout(client: Client) -> None:
    sub = client.submit("idle", {"text": "slow"})
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as info:
        client.wait(sub.id, timeout=0.6)
    took = time.monotonic() - started
    assert 0.5 < took < 3, took
    assert isinstance(info.value, TimeoutError)
    assert info.value.details == {"task_id": sub.id, "status": "queued"}


def test_list_pages_follow_the_cursor(client: Client) -> None:
    ids = [client.submit("idle", {"n": i}).id for i in range(5)]
    everything = [t.id for t in client.tasks(model="idle", limit=1000).tasks]
    assert everything[:5] == ids[::-1]  # newest first
    first = client.tasks(model="idle", limit=2)
    assert len(first.tasks) == 2 and first.next_cursor
    second = client.tasks(model="idle", limit=2, cursor=first.next_cursor)
    assert [t.id for t in first.tasks + second.tasks] == everything[:4]
    paged = [t.id for t in client.iter_tasks(model="idle", page_size=2)]
    assert paged == everything
    cancelled = client.tasks(status="cancelled", limit=1000).tasks
    assert all(t.status == "cancelled" for t in cancelled)


def test_events_follow_the_task_through_its_states(client: Client, live_api: LiveApi) -> None:
    """The ``manual`` model has no worker: the test claims and completes the task itself, after
    seeing each state on the stream."""
    sub = client.submit("manual", {"text": "step"})
    seen: list[str] = []
    for view in client.events(sub.id):
        seen.append(view.status)
        if view.status == "queued":
            claimed = live_api.queue.claim("manual", "1", "test-worker")
            assert [t.id for t in claimed] == [sub.id]
        elif view.status == "running":
            live_api.queue.complete(sub.id, "test-worker", {"done": True})
    assert seen == ["queued", "running", "succeeded"]
    assert client.result(sub.id).result == {"done": True}


def test_events_of_a_finished_task_end_after_one_event(client: Client) -> None:
    sub = client.submit("echo", {"text": "x"})
    client.wait(sub.id, timeout=20)
    assert [v.status for v in client.events(sub.id)] == ["succeeded"]


def test_errors_map_to_their_classes(client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        client.get("t_does_not_exist")
    assert missing.value.code == "not_found"
    assert missing.value.details["http_status"] == 404

    with pytest.raises(NotFound) as no_model:
        client.submit("no-such-model", {})
    assert no_model.value.details["model"] == "no-such-model"
    assert "echo" in no_model.value.message  # the message lists what is deployed

    with pytest.raises(InvalidInput) as invalid:
        client.submit("echo", {"text": "x"}, priority=1000, lane="sideways")
    fields = {f["field"] for f in invalid.value.details["fields"]}
    assert fields == {"body.priority", "body.lane"}
    assert invalid.value.details["http_status"] == 422

    queued = client.submit("idle", {"text": "waiting"})
    with pytest.raises(TaskNotFinished) as unfinished:
        client.result(queued.id)
    assert unfinished.value.code == "task_not_finished"
    assert unfinished.value.details["http_status"] == 409
    assert unfinished.value.details["status"] == "queued"
    assert str(unfinished.value).startswith("task_not_finished: ")

    with pytest.raises(NotFound):
        list(client.events("t_does_not_exist"))


def test_an_unknown_error_code_is_an_api_error(live_api: LiveApi) -> None:
    response = httpx.put(f"{live_api.url}/v1/tasks")
    err = error_from_response(response)
    assert isinstance(err, ApiError)
    assert (err.code, err.http_status) == ("method_not_allowed", 405)
    assert err.details["http_status"] == 405
    assert str(err).startswith("method_not_allowed: ")


def test_an_error_page_without_our_body_maps_by_status() -> None:
    page = httpx.Response(502, text="<html>bad gateway</html>")
    err = error_from_response(page)
    assert isinstance(err, Unavailable)
    assert "502" in err.message and "bad gateway" in err.message
    odd = error_from_response(httpx.Response(418, text="teapot"))
    assert isinstance(odd, ApiError) and odd.code == "http_418"


def test_a_server_that_is_not_there_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=2) as c:
        with pytest.raises(Unavailable) as info:
            c.get("t_x")
        assert url in str(info.value) and info.value.code == "unavailable"
        with pytest.raises(Unavailable):
            c.wait("t_x", timeout=2)
        with pytest.raises(Unavailable):
            c.submit("echo", {"text": "x"})


def test_models_and_health(client: Client) -> None:
    models = {m.name: m for m in client.models().models}
    assert set(models) == {"echo", "idle", "manual"}
    assert models["echo"].example_input == {"text": "hi"}
    assert models["echo"].input_schema == INPUT_SCHEMA
    assert client.health().status == "ok"


def test_the_key_is_sent_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUFLEET_URL", "http://example.invalid:9/")
    monkeypatch.setenv("GPUFLEET_API_KEY", "gfk_secret")
    c = Client()
    assert c.url == "http://example.invalid:9"
    assert c._http.headers["authorization"] == "Bearer gfk_secret"
    assert "gfk_secret" not in repr(c)
    c.close()


def test_the_package_exports_the_clients_lazily() -> None:
    assert gpufleet.Client is Client and gpufleet.AsyncClient is AsyncClient
    with pytest.raises(AttributeError):
        _ = gpufleet.NoSuchThing  # type: ignore[attr-defined]


def test_async_client(live_api: LiveApi) -> None:
    async def scenario() -> None:
        async with AsyncClient(live_api.url) as c:
            sub = await c.submit("echo", {"text": "async"})
            statuses = [v.status async for v in c.events(sub.id)]
            assert statuses[-1] == "succeeded"
            assert (await c.wait(sub.id, timeout=20)).result == {"echo": "async"}
            assert (await c.result(sub.id)).status == "succeeded"
            assert await c.run("echo", {"text": "r"}, timeout=20) == {"echo": "r"}
            done = await c.infer("echo", {"text": "i"}, wait=20)
            assert isinstance(done, ResultView) and done.result == {"echo": "i"}
            with pytest.raises(TaskFailed):
                await c.run("echo", {"fail": "x"}, timeout=20)

            idle = await c.submit("idle", {"text": "a"})
            with pytest.raises(WaitTimeout):
                await c.wait(idle.id, timeout=0.3)
            assert (await c.cancel(idle.id)).status == "cancelled"
            assert (await c.get(idle.id)).status == "cancelled"
            with pytest.raises(TaskNotFinished):
                await c.result((await c.submit("idle", {"text": "b"})).id)
            with pytest.raises(NotFound):
                await c.get("t_nope")
            listed = [t.id async for t in c.iter_tasks(model="idle", page_size=1)]
            assert listed == [t.id for t in (await c.tasks(model="idle", limit=1000)).tasks]
            assert "echo" in {m.name for m in (await c.models()).models}
            assert (await c.health()).status == "ok"

        async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=2) as gone:
            with pytest.raises(Unavailable):
                await gone.get("t_x")

    asyncio.run(scenario())


def test_a_worker_result_arrives_while_waiting(client: Client, live_api: LiveApi) -> None:
    """The wait starts before the worker has run the task (it sleeps first)."""
    sub = client.submit("echo", {"text": "slow", "sleep_s": 0.5})
    updates: list[str] = []
    done = client.wait(sub.id, timeout=20, on_update=lambda v: updates.append(v.status))
    assert done.status == "succeeded"
    assert updates[-1] == "succeeded"
    assert live_api.queue.get(sub.id).status == TaskStatus.SUCCEEDED
