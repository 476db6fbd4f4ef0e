"""Bad input to every queue operation: a typed error with a stable code, and nothing written.

Each refusal must name the field and the value, start ``code: `` when printed (the CLI shows
``str(err)``), and leave the task table and the blob directory exactly as they were. The queue
here sends every input above 64 bytes to the blob store, so a check that ran after the blob
write would leave a file behind and fail these tests.

Refusals made before any database access run on SQLite only (``sqlite_only``); those that
depend on the database (conflicts, rollbacks, lookups) run on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from gpufleet.errors import (
    GpufleetError,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from gpufleet.queue import Limits, Task, TaskError, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore
from tests.helpers import FakeClock, count_tasks

INLINE_LIMIT = 64
MAX_INPUT = 4096
BIG_INPUT = {"prompt": "x" * 200}  # over INLINE_LIMIT: accepted, it would go to the blob store
NO_VALUE = object()  # the case has no single value the message could quote

# Override conftest's db_url parameters: the check happens before the database is touched.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

GOOD = TaskSpec("sd-xl", "1.0", BIG_INPUT, tenant="acme")


@pytest.fixture
def q(engine: Engine, blob_dir: Path, clock: FakeClock) -> Iterator[TaskQueue]:
    queue = TaskQueue(
        engine,
        LocalBlobStore(blob_dir),
        limits=Limits(inline_input_limit=INLINE_LIMIT, max_input_bytes=MAX_INPUT),
        clock=clock,
    )
    yield queue
    queue.close()


def blob_files(blob_dir: Path) -> list[Path]:
    return sorted(p for p in blob_dir.rglob("*") if p.is_file()) if blob_dir.exists() else []


@contextmanager
def refused(
    exc_type: type[GpufleetError], code: str, field: str | None, value: Any = NO_VALUE
) -> Iterator[list[GpufleetError]]:
    """Expect ``exc_type`` with ``code``; its details and message name ``field`` and ``value``."""
    caught: list[GpufleetError] = []
    with pytest.raises(exc_type) as info:
        yield caught
    err = info.value
    caught.append(err)
    assert type(err) is exc_type
    assert err.code == code
    assert str(err).startswith(f"{code}: ")
    assert err.to_dict()["code"] == code
    if field is not None:
        assert err.details.get("field") == field
        assert field in err.message or field.replace("_", " ") in err.message, err.message
    if value is not NO_VALUE:
        assert repr(value)[:30] in err.message, err.message


@pytest.fixture
def unchanged(engine: Engine, blob_dir: Path) -> Callable[[], None]:
    """Call once before the bad call (it snapshots) and once after (it compares)."""
    before: list[tuple[int, list[Path]]] = []

    def check() -> None:
        now = (count_tasks(engine), blob_files(blob_dir))
        if not before:
            before.append(now)
        else:
            assert now == before[0], "a refused call wrote something"

    return check


def test_an_accepted_big_input_does_write_a_blob(q: TaskQueue, blob_dir: Path) -> None:
    """The control for every test below: the blob-dir check can fail."""
    task = q.submit(GOOD).task
    assert task.input_ref is not None
    assert len(blob_files(blob_dir)) == 1


# -- submit ------------------------------------------------------------------------------

SUBMIT_CASES = [
    ("lane", "fast"),
    ("lane", 1),
    ("lane", None),
    ("priority", -101),
    ("priority", 101),
    ("priority", "high!"),
    ("priority", True),
    ("priority", 1.5),
    ("model", ""),
    ("model", "sd xl"),
    ("model", "m" * 129),
    ("model", "-sd"),
    ("version", ""),
    ("version", "1 0"),
    ("version", "v" * 65),
    ("version", "-1"),
    ("tenant", ""),
    ("tenant", "ac me"),
    ("tenant", "t" * 129),
    ("tenant", "-acme"),
    ("max_attempts", 0),
    ("max_attempts", 101),
    ("idempotency_key", ""),
    ("idempotency_key", "k" * 257),
]


def _case_id(case: tuple[str, Any]) -> str:
    field, value = case
    text = repr(value)
    return f"{field}={text[:12]}{'...' if len(text) > 12 else ''}"


@sqlite_only
@pytest.mark.parametrize("case", SUBMIT_CASES, ids=_case_id)
def test_submit_refuses_bad_field(
    q: TaskQueue, unchanged: Callable[[], None], case: tuple[str, Any]
) -> None:
    field, value = case
    q.submit(GOOD)  # something already there, so "unchanged" means more than "empty"
    unchanged()
    with refused(InvalidInput, "invalid_input", field, value):
        q.submit(replace(GOOD, **{field: value}))
    unchanged()


@sqlite_only
@pytest.mark.parametrize("value", [object(), float("nan")], ids=["object", "nan"])
def test_submit_refuses_input_that_is_not_json(
    q: TaskQueue, unchanged: Callable[[], None], value: Any
) -> None:
    unchanged()
    with refused(InvalidInput, "invalid_input", "input"):
        q.submit(replace(GOOD, input={"prompt": "x" * 200, "bad": value}))
    unchanged()


@sqlite_only
def test_non_json_input_message_names_the_value(q: TaskQueue) -> None:
    with pytest.raises(InvalidInput) as info:
        q.submit(replace(GOOD, input={"x": float("nan")}))
    assert "nan" in info.value.message.lower()


@sqlite_only
def test_submit_refuses_oversize_input(
    engine: Engine, q: TaskQueue, unchanged: Callable[[], None]
) -> None:
    unchanged()
    with refused(PayloadTooLarge, "payload_too_large", "input") as caught:
        q.submit(replace(GOOD, input="x" * MAX_INPUT))
    err = caught[0]
    assert isinstance(err, InvalidInput)  # an API mapping InvalidInput still gets a 4xx
    assert err.http_status == 413
    assert err.details["limit"] == MAX_INPUT
    assert err.details["size"] == MAX_INPUT + 2  # the JSON string's quotes
    assert f"{MAX_INPUT:,} bytes" in err.message and f"{MAX_INPUT + 2:,} bytes" in err.message
    unchanged()
    # One byte under the limit is accepted.
    q.submit(replace(GOOD, input="x" * (MAX_INPUT - 2)))
    assert count_tasks(engine) == 1


def test_reused_idempotency_key_with_another_request_is_a_conflict(
    engine: Engine, q: TaskQueue, unchanged: Callable[[], None]
) -> None:
    first = q.submit(TaskSpec("sd-xl", "1.0", {"n": 1}, idempotency_key="order-7")).task
    unchanged()
    with refused(IdempotencyConflict, "idempotency_conflict", "idempotency_key", "order-7") as c:
        q.submit(TaskSpec("sd-xl", "1.0", {"n": 2}, idempotency_key="order-7"))
    assert c[0].http_status == 409
    assert c[0].details["task_id"] == first.id
    assert first.id in c[0].message
    unchanged()
    assert q.get(first.id) == first
    assert count_tasks(engine) == 1


def test_any_difference_in_the_request_is_a_conflict(q: TaskQueue, engine: Engine) -> None:
    differences: list[dict[str, Any]] = [
        {"input": {"n": 1, "m": 2}},
        {"version": "2.0"},
        {"lane": "batch"},
        {"priority": 5},
        {"max_attempts": 7},
        {"model": "llm"},
    ]
    for i, other in enumerate(differences):
        spec = TaskSpec("sd-xl", "1.0", {"n": 1}, idempotency_key=f"k{i}")
        first = q.submit(spec).task
        with pytest.raises(IdempotencyConflict):
            q.submit(replace(spec, **other))
        assert q.get(first.id) == first, other
    assert count_tasks(engine) == len(differences)


def test_idempotency_conflict_with_big_input_writes_no_blob(
    q: TaskQueue, unchanged: Callable[[], None]
) -> None:
    """A refused request must not leave behind a blob that no task references."""
    q.submit(replace(GOOD, idempotency_key="k"))
    unchanged()
    with pytest.raises(IdempotencyConflict):
        q.submit(replace(GOOD, input={"prompt": "y" * 200}, idempotency_key="k"))
    unchanged()


@sqlite_only
@pytest.mark.parametrize(
    "last",
    [
        replace(GOOD, priority=101),
        replace(GOOD, input="x" * MAX_INPUT),
        replace(GOOD, input={"x": object()}),
    ],
    ids=["priority", "oversize", "not-json"],
)
def test_submit_many_with_a_bad_last_spec_writes_none(
    q: TaskQueue, unchanged: Callable[[], None], last: TaskSpec
) -> None:
    unchanged()
    good = [replace(GOOD, input={"prompt": f"{i}" * 100}) for i in range(3)]
    with pytest.raises(InvalidInput):
        q.submit_many([*good, last])
    unchanged()


def test_submit_many_conflicting_last_spec_rolls_back_the_rest(
    q: TaskQueue, engine: Engine, unchanged: Callable[[], None]
) -> None:
    """The conflict is only found inside the transaction, after the others were inserted."""
    q.submit(TaskSpec("sd-xl", "1.0", {"n": 1}, idempotency_key="k"))
    unchanged()
    batch = [
        TaskSpec("sd-xl", "1.0", {"n": 10}),
        TaskSpec("sd-xl", "1.0", {"n": 11}, idempotency_key="fresh"),
        TaskSpec("sd-xl", "1.0", {"n": 2}, idempotency_key="k"),
    ]
    with pytest.raises(IdempotencyConflict):
        q.submit_many(batch)
    unchanged()
    # The fresh key was not consumed by the rolled-back batch.
    assert q.submit(batch[1]).created


# -- the worker's side -------------------------------------------------------------------


def _running(q: TaskQueue, n: int = 1) -> list[Task]:
    q.submit_many([TaskSpec("sd-xl", "1.0", {"n": i}) for i in range(n)])
    tasks = q.claim("sd-xl", "1.0", "w1", max_n=n)
    assert len(tasks) == n
    return tasks


def _assert_still_held(q: TaskQueue, before: Task) -> None:
    now = q.get(before.id)
    assert now.status == TaskStatus.RUNNING
    assert (now.lease_owner, now.lease_expires_at) == ("w1", before.lease_expires_at)
    assert (now.attempts, now.result, now.error) == (before.attempts, None, None)


CLAIM_CASES = [
    ("max_n", {"max_n": 0}, "max_n", 0),
    ("max_n", {"max_n": 1001}, "max_n", 1001),
    ("max_n", {"max_n": True}, "max_n", True),
    ("lanes", {"lanes": []}, "lanes", NO_VALUE),
    ("lanes", {"lanes": ["fast"]}, "lane", "fast"),
    ("worker_id", {"worker_id": ""}, "worker_id", ""),
    ("worker_id", {"worker_id": "   "}, "worker_id", "   "),
    ("worker_id", {"worker_id": "gpu 0"}, "worker_id", "gpu 0"),
    ("model", {"model": "-x"}, "model", "-x"),
]


@sqlite_only
@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [c[1:] for c in CLAIM_CASES],
    ids=[f"{c[0]}={c[1][c[0]]!r}" for c in CLAIM_CASES],
)
def test_claim_refuses_bad_arguments(
    q: TaskQueue, kwargs: dict[str, Any], field: str, value: Any
) -> None:
    queued = q.submit(replace(GOOD, input={"n": 1})).task
    args: dict[str, Any] = {"model": "sd-xl", "version": "1.0", "worker_id": "w1"} | kwargs
    with refused(InvalidInput, "invalid_input", field, value):
        q.claim(**args)
    assert q.get(queued.id) == queued  # still queued, no lease, no attempt counted


BAD_WORKERS = ["", "\t", "w 1", "w" * 129]


@sqlite_only
@pytest.mark.parametrize(
    "op", ["heartbeat", "complete", "fail", "acknowledge_cancel", "release", "complete_many"]
)
@pytest.mark.parametrize("worker", BAD_WORKERS, ids=repr)
def test_worker_calls_refuse_bad_worker_id(q: TaskQueue, op: str, worker: str) -> None:
    (task,) = _running(q)
    calls: dict[str, Callable[[], object]] = {
        "heartbeat": lambda: q.heartbeat(worker, [task.id], lease_s=600),
        "complete": lambda: q.complete(task.id, worker, {"ok": True}),
        "fail": lambda: q.fail(task.id, worker, TaskError("oom", "out of memory"), retryable=True),
        "acknowledge_cancel": lambda: q.acknowledge_cancel(task.id, worker),
        "release": lambda: q.release(worker, [task.id]),
        "complete_many": lambda: q.complete_many(worker, [(task.id, 1)]),
    }
    with refused(InvalidInput, "invalid_input", "worker_id", worker):
        calls[op]()
    _assert_still_held(q, task)


@sqlite_only
def test_fail_refuses_a_bad_error_code(q: TaskQueue) -> None:
    (task,) = _running(q)
    with refused(InvalidInput, "invalid_input", "error.code", ""):
        q.fail(task.id, "w1", TaskError("", "boom"), retryable=False)
    _assert_still_held(q, task)


@sqlite_only
def test_complete_many_with_a_non_json_result_writes_nothing(
    q: TaskQueue, blob_dir: Path, unchanged: Callable[[], None]
) -> None:
    a, b = _running(q, 2)
    unchanged()
    with refused(InvalidInput, "invalid_input", None) as caught:
        q.complete_many("w1", [(a.id, {"image": "x" * 200}), (b.id, {"bad": object()})])
    assert "result" in caught[0].message and b.id in caught[0].message
    unchanged()  # not even a's big result reached the blob store
    _assert_still_held(q, a)
    _assert_still_held(q, b)


@sqlite_only
def test_complete_many_refuses_the_same_task_twice(q: TaskQueue) -> None:
    (task,) = _running(q)
    with refused(InvalidInput, "invalid_input", None) as caught:
        q.complete_many("w1", [(task.id, 1), (task.id, 2)])
    assert caught[0].details["field"] == "results"
    _assert_still_held(q, task)


def test_complete_many_with_an_unknown_task_records_none(q: TaskQueue) -> None:
    (task,) = _running(q)
    with refused(NotFound, "not_found", None):
        q.complete_many("w1", [(task.id, 1), ("0190a000-0000-7000-8000-000000000000", 2)])
    _assert_still_held(q, task)


# -- reading and cancelling --------------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"status": "done"}, "status", "done"),
        ({"status": "QUEUED"}, "status", "QUEUED"),
        ({"limit": 0}, "limit", 0),
        ({"limit": 1001}, "limit", 1001),
        ({"limit": True}, "limit", True),
        ({"model": "a b"}, "model", "a b"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else next(iter(v)),
)
def test_list_tasks_refuses_bad_filters(
    q: TaskQueue, kwargs: dict[str, Any], field: str, value: Any
) -> None:
    with refused(InvalidInput, "invalid_input", field, value):
        q.list_tasks(**kwargs)


UNKNOWN_IDS = ["0190a000-0000-7000-8000-000000000000", "", "x" * 500]


def test_unknown_task_is_not_found(q: TaskQueue, unchanged: Callable[[], None]) -> None:
    existing = q.submit(replace(GOOD, input={"n": 1})).task
    unchanged()
    calls: dict[str, Callable[[str], object]] = {
        "get": q.get,
        "cancel": q.cancel,
        "fail": lambda i: q.fail(i, "w1", TaskError("oom", "x"), retryable=True),
        "acknowledge_cancel": lambda i: q.acknowledge_cancel(i, "w1"),
        "complete": lambda i: q.complete(i, "w1", {"ok": True}),
    }
    for task_id in UNKNOWN_IDS:
        for op, call in calls.items():
            with refused(NotFound, "not_found", None) as caught:
                call(task_id)
            assert caught[0].http_status == 404
            assert task_id[:36] in caught[0].message, (op, caught[0].message)
    unchanged()
    assert q.get(existing.id) == existing


def test_another_tenants_task_is_not_found(q: TaskQueue) -> None:
    task = q.submit(replace(GOOD, input={"n": 1})).task
    for call in (lambda: q.get(task.id, tenant="rival"), lambda: q.cancel(task.id, "rival")):
        with refused(NotFound, "not_found", None):
            call()
    assert q.get(task.id) == task
