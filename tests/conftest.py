"""Shared fixtures: every queue test runs on SQLite and on a real PostgreSQL server.

PostgreSQL comes from Debian's packages (``make test`` installs them) and runs for the whole
session on a free loopback port; each test gets a fresh database cloned from a migrated
template. Durability settings are relaxed for speed: these tests are about logic, not disks.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from gpufleet.queue import TaskQueue
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from gpufleet.testing import PostgresServer
from tests.helpers import FakeClock

# pytest-xdist starts its workers with COLUMNS=80. The CLI's Rich consoles are made at import
# and take a COLUMNS set then as their width for good, so under xdist every table the CLI tests
# print was 80 columns wide (its columns squeezed to nothing), whatever COLUMNS a test gave its
# invocation. Unset, the consoles read COLUMNS at each print.
os.environ.pop("COLUMNS", None)

TEMPLATE = "gpufleet_template"
_db_names = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist (``make test`` runs ``--dist loadgroup``), the tests of a module that share a
    module-scoped fixture (a ``gpufleet serve`` with its workers, OCI registries, model
    directories built once) run on one worker, so that fixture is made once, not on each."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or not isinstance(item, pytest.Function):
            continue
        for name in item.fixturenames:
            defs = info.name2fixturedefs.get(name)
            if defs and defs[-1].scope == "module":
                item.add_marker(pytest.mark.xdist_group(item.module.__name__))
                break


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer(
        settings={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    )
    server.start()
    try:
        template = create_engine(server.create_database(TEMPLATE))
        upgrade(template)
        template.dispose()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gpufleet.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database(f"test_{next(_db_names)}", template=TEMPLATE)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture
def queue(engine: Engine, blob_dir: Path, clock: FakeClock) -> Iterator[TaskQueue]:
    q = TaskQueue(
        engine,
        LocalBlobStore(blob_dir),
        lease_s=30,
        retry_backoff_s=1,
        retry_backoff_max_s=60,
        batch_lane_every=4,
        clock=clock,
    )
    yield q
    q.close()
