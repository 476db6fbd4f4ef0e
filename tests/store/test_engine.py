"""Engine creation and database errors: unsupported URLs are refused up front, a full disk
refuses new work without losing accepted tasks, and an unreachable server is ``Unavailable``."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gpufleet.errors import InvalidInput, StorageFull, Unavailable
from gpufleet.queue import TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore, create_engine, current_revision, upgrade
from tests.helpers import FakeClock, count_tasks


@pytest.mark.parametrize(
    "url",
    [
        "mysql://x",
        "mysql+pymysql://user@host/db",
        "oracle://scott@host/orcl",
        "sqlite://",
        "sqlite:///:memory:",
        "garbage",
        "",
        "://",
    ],
)
def test_unsupported_url_is_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        create_engine(url)
    err = info.value
    assert err.code == "invalid_input"
    assert err.http_status == 422
    assert err.details.get("field") == "database_url"
    assert str(err).startswith("invalid_input: ")


def test_unsupported_backend_is_named_in_the_message() -> None:
    with pytest.raises(InvalidInput, match="mysql"):
        create_engine("mysql://x")


def test_sqlite_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "gpufleet.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        upgrade(engine)
        assert path.is_file()
        with engine.connect() as conn:
            # WAL: readers (the API) do not block the writer (a worker completing a batch).
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            # FULL: an accepted task survives power loss (synchronous=2).
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    finally:
        engine.dispose()


def test_postgresql_url_without_driver_uses_psycopg() -> None:
    engine = create_engine("postgresql://u@127.0.0.1:1/db")
    assert engine.dialect.name == "postgresql"
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


def test_unreachable_postgresql_is_unavailable(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    engine = create_engine("postgresql://u@127.0.0.1:1/db")
    queue = TaskQueue(engine, LocalBlobStore(tmp_path / "blobs"))
    try:
        for call in (
            lambda: current_revision(engine),
            lambda: queue.submit(TaskSpec("m", "1", {"x": 1})),
            lambda: queue.stats(),
        ):
            with pytest.raises(Unavailable) as info:
                call()
            assert info.value.code == "unavailable"
            assert info.value.http_status == 503
            assert "\n" not in str(info.value)
    finally:
        queue.close()
        engine.dispose()


def test_non_durable_writes_leave_connections_durable(tmp_path: Path) -> None:
    """Claims and heartbeats commit without a disk flush; the next submit on the same pooled
    connection must still be fully durable."""
    engine = create_engine(f"sqlite:///{tmp_path / 'gpufleet.db'}")
    upgrade(engine)
    queue = TaskQueue(engine, LocalBlobStore(tmp_path / "blobs"), clock=FakeClock())
    try:
        queue.submit(TaskSpec("m", "1", {"x": 1}))
        (task,) = queue.claim("m", "1", "w1")
        queue.heartbeat("w1", [task.id])
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        queue.close()
        engine.dispose()


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def sqlite_queue(tmp_path: Path) -> Iterator[TaskQueue]:
    engine = create_engine(f"sqlite:///{tmp_path / 'gpufleet.db'}")
    upgrade(engine)
    queue = TaskQueue(engine, LocalBlobStore(tmp_path / "blobs"), clock=FakeClock())
    yield queue
    queue.close()
    engine.dispose()


def _page_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())


def _cap_database(engine: Engine, max_pages: int) -> Any:
    """Make every new connection see a database that cannot grow past ``max_pages``."""

    def cap(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {max_pages}")

    sa.event.listen(engine, "connect", cap)
    engine.dispose()  # pooled connections were opened without the cap
    return cap


def test_full_sqlite_database_refuses_new_tasks_and_keeps_the_accepted_ones(
    sqlite_queue: TaskQueue,
) -> None:
    queue, engine = sqlite_queue, sqlite_queue.engine
    accepted = {queue.submit(TaskSpec("m", "1", {"n": i})).task.id: {"n": i} for i in range(5)}
    cap = _cap_database(engine, _page_count(engine) + 16)

    big = "x" * 8000  # inline (under the 64 KiB limit), a couple of pages per task
    with pytest.raises(StorageFull) as info:
        for i in range(1000):
            spec = TaskSpec("m", "1", {"n": i, "pad": big})
            accepted[queue.submit(spec).task.id] = spec.input
    err = info.value
    assert (err.code, err.http_status) == ("storage_full", 507)
    assert isinstance(err, Unavailable)
    assert str(err).startswith("storage_full: ")
    assert len(accepted) > 5  # the cap left room for some before it filled

    # Nothing accepted is lost and the refused submit left no row.
    assert count_tasks(engine) == len(accepted)
    for task_id, task_input in accepted.items():
        task = queue.get(task_id)
        assert task.status == TaskStatus.QUEUED
        assert task.input == task_input
    # The queue still works for everything that does not need more space.
    (claimed,) = queue.claim("m", "1", "w1")
    assert claimed.id == min(accepted)

    # Once there is room again, new work is accepted.
    sa.event.remove(engine, "connect", cap)
    engine.dispose()
    queue.submit(TaskSpec("m", "1", {"n": "after"}))
    assert count_tasks(engine) == len(accepted) + 1


def test_full_database_rejects_a_whole_batch(sqlite_queue: TaskQueue) -> None:
    queue, engine = sqlite_queue, sqlite_queue.engine
    queue.submit(TaskSpec("m", "1", {"n": 0}))
    _cap_database(engine, _page_count(engine) + 4)
    batch = [TaskSpec("m", "1", {"n": i, "pad": "y" * 8000}) for i in range(20)]
    with pytest.raises(StorageFull):
        queue.submit_many(batch)
    assert count_tasks(engine) == 1
