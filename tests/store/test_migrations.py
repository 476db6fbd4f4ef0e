"""Migrations: an empty database reaches head, re-running is harmless, the result is exactly the
schema the code declares, and several processes upgrading at once (every ``serve`` replica and
worker on start) all succeed."""

from __future__ import annotations

import itertools
import multiprocessing
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

from gpufleet.store import create_engine, current_revision, head_revision, metadata, upgrade
from gpufleet.store.schema import tasks

_fresh_names = itertools.count(1)


@pytest.fixture
def fresh_url(db_url: str, request: pytest.FixtureRequest) -> str:
    """A URL of an empty database (conftest's PostgreSQL databases come from a migrated
    template, so PostgreSQL gets a new one without a template)."""
    if db_url.startswith("sqlite"):
        return db_url
    server = request.getfixturevalue("pg_server")
    return str(server.create_database(f"fresh_{next(_fresh_names)}_{uuid.uuid4().hex[:8]}"))


@pytest.fixture
def fresh(fresh_url: str) -> Iterator[Engine]:
    engine = create_engine(fresh_url)
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def user_tables(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_brings_an_empty_database_to_head(fresh: Engine) -> None:
    assert current_revision(fresh) is None
    assert user_tables(fresh) == set()
    assert upgrade(fresh) == head_revision()
    assert current_revision(fresh) == head_revision()
    assert user_tables(fresh) == set(metadata.tables)
    # Exactly the declared schema: columns, types, nullability, indexes, constraints.
    assert schema_diff(fresh) == []


def test_upgrade_is_idempotent_and_keeps_data(fresh: Engine) -> None:
    upgrade(fresh)
    now = datetime.now(UTC)
    with fresh.begin() as conn:
        conn.execute(
            tasks.insert().values(
                id="0190a000-0000-7000-8000-000000000001",
                tenant="acme",
                model="m",
                model_version="1",
                lane="interactive",
                input={"x": 1},
                status="queued",
                max_attempts=3,
                not_before=now,
                created_at=now,
            )
        )
    for _ in range(2):
        assert upgrade(fresh) == head_revision()
    assert current_revision(fresh) == head_revision()
    assert schema_diff(fresh) == []
    with fresh.connect() as conn:
        row = conn.execute(sa.select(tasks)).mappings().one()
    assert row["input"] == {"x": 1}
    # The server defaults the schema declares were applied by the migration.
    assert (row["priority"], row["attempts"], bool(row["cancel_requested"])) == (0, 0, False)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_schema_diff_sees_a_drifted_database(fresh: Engine) -> None:
    """The control for the schema checks above: compare_metadata does notice a difference."""
    upgrade(fresh)
    with fresh.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_tasks_tenant_id"))
    assert schema_diff(fresh) != []


def _upgrade_in_child(url: str, barrier: Any, results: Any) -> None:
    engine = create_engine(url)
    barrier.wait(timeout=60)  # every process is imported and ready: start together
    try:
        results.put(("ok", upgrade(engine)))
    except BaseException as e:
        results.put(("error", f"{type(e).__name__}: {e}"))
        raise
    finally:
        engine.dispose()


def test_concurrent_upgrades_from_several_processes_all_succeed(
    fresh_url: str, fresh: Engine
) -> None:
    n = 4
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_upgrade_in_child, args=(fresh_url, barrier, results)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(n)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert outcomes == [("ok", head_revision())] * n
    assert [p.exitcode for p in procs] == [0] * n
    assert current_revision(fresh) == head_revision()
    assert schema_diff(fresh) == []
