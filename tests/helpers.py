"""Small helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gpufleet.store.schema import tasks

# What a benchmark's smoke run (tests/bench) may take: on a loaded 2-core machine under xdist a
# run took up to four times its time alone. Below pytest-timeout's 300 s, so a run that hangs
# fails with its own output.
BENCH_TIMEOUT_S = 280


class FakeClock:
    """A clock the test moves by hand, so leases expire and backoffs pass without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def count_tasks(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one())
