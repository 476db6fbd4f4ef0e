"""Submitting, reading and listing tasks."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from gpufleet.errors import InvalidInput, NotFound, QuotaExceeded
from gpufleet.queue import Lane, Limits, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore
from tests.helpers import FakeClock, count_tasks


def test_submit_records_a_queued_task(queue: TaskQueue, clock: FakeClock) -> None:
    sub = queue.submit(
        TaskSpec("sd", "1.0", {"prompt": "a cat"}, tenant="acme", lane="batch", priority=7)
    )
    assert sub.created
    task = queue.get(sub.task.id)
    assert task.status == TaskStatus.QUEUED
    assert (task.tenant, task.model, task.model_version) == ("acme", "sd", "1.0")
    assert (task.lane, task.priority) == (Lane.BATCH, 7)
    assert task.input == {"prompt": "a cat"}
    assert (task.attempts, task.max_attempts) == (0, 3)
    assert task.created_at == clock.now
    assert task.result is None and task.error is None and task.finished_at is None


def test_ids_are_time_ordered(queue: TaskQueue) -> None:
    ids = [queue.submit(TaskSpec("m", "1", i)).task.id for i in range(20)]
    assert ids == sorted(ids)


def test_get_hides_other_tenants_tasks(queue: TaskQueue) -> None:
    task = queue.submit(TaskSpec("m", "1", 1, tenant="a")).task
    assert queue.get(task.id, tenant="a").id == task.id
    with pytest.raises(NotFound):
        queue.get(task.id, tenant="b")


def test_idempotent_resubmission_returns_the_same_task(queue: TaskQueue, engine: Engine) -> None:
    first = queue.submit(TaskSpec("m", "1", {"x": 1}, idempotency_key="k1"))
    again = queue.submit(TaskSpec("m", "1", {"x": 1}, idempotency_key="k1"))
    assert first.created and not again.created
    assert again.task.id == first.task.id
    # The key is per tenant: another tenant's identical key is a new task.
    other = queue.submit(TaskSpec("m", "1", {"x": 1}, idempotency_key="k1", tenant="t2"))
    assert other.created and other.task.id != first.task.id
    assert count_tasks(engine) == 2


def test_concurrent_idempotent_submissions_make_one_task(queue: TaskQueue, engine: Engine) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        try:
            ids.append(queue.submit(TaskSpec("m", "1", {"x": 1}, idempotency_key="race")).task.id)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(set(ids)) == 1
    assert count_tasks(engine) == 1


def test_submit_many_is_one_transaction(queue: TaskQueue, engine: Engine) -> None:
    subs = queue.submit_many(
        [TaskSpec("m", "1", i, idempotency_key=f"k{i}" if i % 2 else None) for i in range(10)]
    )
    assert [s.task.input for s in subs] == list(range(10))
    assert count_tasks(engine) == 10


def test_large_input_goes_to_the_blob_store(engine: Engine, blob_dir: Path) -> None:
    q = TaskQueue(engine, LocalBlobStore(blob_dir), limits=Limits(inline_input_limit=1024))
    try:
        payload = {"prompt": "x" * 5000}
        task = q.submit(TaskSpec("m", "1", payload)).task
        assert task.input is None and task.input_ref is not None
        assert q.load_input(q.get(task.id)) == payload
        [claimed] = q.claim("m", "1", "w1")
        assert claimed.input == payload
    finally:
        q.close()


def test_a_bulk_submit_stores_every_task_as_given(engine: Engine, blob_dir: Path) -> None:
    """Many tasks in one submit (one statement on PostgreSQL): each comes back as it was
    given, inline or from the blob store, with its own tenant, lane, priority and webhook."""
    q = TaskQueue(engine, LocalBlobStore(blob_dir), limits=Limits(inline_input_limit=1024))
    inputs = [None, 0, "", "naïve ☃ \"quoted\"", [1, [2, {"a": None}]], {"x": 1.5, "y": True},
              {"prompt": "x" * 5000}]  # fmt: skip
    specs = [
        TaskSpec("m", "1", x, tenant=f"t{i % 2}", lane="batch" if i % 3 else "interactive",
                 priority=i, webhook_url="https://example.com/hook" if i == 2 else None)
        for i, x in enumerate(inputs)
    ]  # fmt: skip
    try:
        subs = q.submit_many(specs)
        stored = q.get_many([s.task.id for s in subs])
        for spec, sub in zip(specs, subs, strict=True):
            task = stored[sub.task.id]
            assert sub.created and task.status == TaskStatus.QUEUED
            assert q.load_input(task) == spec.input
            assert (task.tenant, task.lane.value, task.priority) == (
                spec.tenant, spec.lane, spec.priority)  # fmt: skip
            assert task.webhook_url == spec.webhook_url
            assert task.created_at == sub.task.created_at
        assert stored[subs[-1].task.id].input_ref is not None  # the large one went to the store
        claimed = {c.id: c.input for c in q.claim("m", "1", "w1", max_n=10)}
        assert claimed == {sub.task.id: spec.input for spec, sub in zip(specs, subs, strict=True)}
    finally:
        q.close()


def test_list_filters_and_paginates_newest_first(queue: TaskQueue) -> None:
    ids = [queue.submit(TaskSpec("m", "1", i, tenant="a")).task.id for i in range(7)]
    queue.submit(TaskSpec("other", "1", 0, tenant="a"))
    queue.submit(TaskSpec("m", "1", 0, tenant="b"))
    seen: list[str] = []
    cursor = None
    while True:
        page = queue.list_tasks(tenant="a", model="m", limit=3, cursor=cursor)
        seen += [t.id for t in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == list(reversed(ids))
    queue.cancel(ids[0])
    cancelled = queue.list_tasks(tenant="a", status="cancelled")
    assert [t.id for t in cancelled.items] == [ids[0]]
    assert len(queue.list_tasks().items) == 9


def test_a_tenant_past_its_queued_limit_is_refused_and_nothing_is_written(
    engine: Engine, blob_dir: Path, clock: FakeClock
) -> None:
    q = TaskQueue(
        engine, LocalBlobStore(blob_dir), limits=Limits(max_queued_per_tenant=2), clock=clock
    )
    q.submit_many([TaskSpec("m", "1", i, tenant="a") for i in range(2)])
    with pytest.raises(QuotaExceeded) as e:
        q.submit(TaskSpec("m", "1", 3, tenant="a"))
    assert e.value.details["limit"] == 2
    assert e.value.details["retry_after_s"] > 0
    q.submit(TaskSpec("m", "1", 3, tenant="b"))  # other tenants are not affected
    q.claim("m", "1", "w")  # running tasks no longer count
    q.submit(TaskSpec("m", "1", 4, tenant="a"))
    assert count_tasks(engine) == 4
    q.close()


@pytest.mark.parametrize(
    "url", ["ftp://x/y", "http://", "not a url", "https://h:99999/", "/relative", "x" * 3000]
)
def test_webhook_url_must_be_absolute_http(queue: TaskQueue, url: str) -> None:
    with pytest.raises(InvalidInput, match="webhook_url"):
        queue.submit(TaskSpec("m", "1", None, webhook_url=url))


def test_webhook_url_is_stored_and_pending(queue: TaskQueue) -> None:
    task = queue.submit(TaskSpec("m", "1", None, webhook_url="http://127.0.0.1:9/hook")).task
    stored = queue.get(task.id)
    assert stored.webhook_url == "http://127.0.0.1:9/hook"
    assert stored.webhook_state == "pending"


@pytest.mark.parametrize("how", ["complete", "fail", "cancel_queued", "cancel_running"])
def test_a_webhook_becomes_due_when_the_task_ends(
    queue: TaskQueue, engine: Engine, clock: FakeClock, how: str
) -> None:
    import sqlalchemy as sa

    from gpufleet.queue import TaskError
    from gpufleet.store import tasks

    def due(tid: str) -> object:
        with engine.connect() as conn:
            return conn.execute(
                sa.select(tasks.c.webhook_next_at).where(tasks.c.id == tid)
            ).scalar_one()

    tid = queue.submit(TaskSpec("m", "1", None, webhook_url="http://127.0.0.1:9/h")).task.id
    assert due(tid) is None  # nothing to deliver while it runs
    if how != "cancel_queued":
        queue.claim("m", "1", "w")
        assert due(tid) is None
    if how == "complete":
        queue.complete(tid, "w", 1)
    elif how == "fail":
        queue.fail(tid, "w", TaskError("boom", "x"), retryable=False)
    elif how == "cancel_queued":
        queue.cancel(tid)
    else:
        queue.cancel(tid)
        queue.acknowledge_cancel(tid, "w")
    assert due(tid) == clock.now
