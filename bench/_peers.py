"""Throughput of two existing PostgreSQL job queues, pgqueuer and procrastinate, on no-op jobs.

Each ``bench_*`` function gets an empty database, installs the library's schema, times a batched
enqueue of ``n_jobs`` no-op jobs, then times ``concurrency`` consumers draining the queue, and
checks in the library's own tables (and by the consumers' own counts) that every job ran once.

Concurrency, the same for both: one consumer is one OS process (multiprocessing "spawn") running
the library's worker on its own event loop and connection, as both are scaled out in production
(one ``pgq run`` / ``procrastinate worker`` per process or container); it also keeps a single
interpreter from capping the rate. pgqueuer's processes run on uvloop, as ``pgq run`` does;
procrastinate's on plain asyncio, as ``procrastinate worker`` does.

Timing: the processes import, connect and register the task first. The clock is the database
server's: it starts at ``clock_timestamp()`` just before all consumers are released at once and
stops at the last completion the library recorded (``pgqueuer_log.created`` of the last
'successful' row, ``procrastinate_events.at`` of the last 'succeeded' event), not when the
consumers exit: a pgqueuer worker in drain mode idles up to ``dequeue_timeout`` before it sees
that the others hold the last jobs (a 3 s tail in 11 s at 16 processes with 1 s), which a
long-running worker never pays. The start does include one pgqueuer artefact: with 1-2 workers
on psycopg, the first completion write waits ~1 s for the driver's NOTIFY reader, which holds the
connection until a notification or its 1 s timeout (dequeues notify nobody). Use >= 20,000 jobs.

Both use psycopg 3 (asyncpg is not installed; pgqueuer's docs say its asyncpg driver is faster)
and the libraries' defaults for durability (all tables logged) and job retention.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from procrastinate import App

TIMEOUT_S = 300.0  # per phase: schema + enqueue, processing (then the consumers are killed)
SETUP_TIMEOUT_S = 60.0  # for the consumer processes to start, import and connect
ENQUEUE_CHUNK = 1000  # jobs per batch-enqueue call, each one INSERT
TASK = "noop"

# ANALYZE after the enqueue (untimed) gives the planner the statistics that autovacuum keeps current
# in a long-running system. Without them procrastinate plans its fetch for a tiny table and sorts
# every queued job on each fetch, so its rate falls as n_jobs grows (measured: 3 ms per fetch
# with 2,000 queued, 0.2 ms after ANALYZE; 73 jobs/s at 4,000 jobs). pgqueuer's plan is the same.
ANALYZE = "ANALYZE"

_Msg = tuple[str, int, str]  # ("ready" | "done" | "error", jobs this consumer ran, error text)
_Ready = Callable[[], Awaitable[bool]]
_Consume = Callable[..., Coroutine[Any, Any, int]]
T = TypeVar("T")


def _arun(coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
    try:
        return asyncio.run(asyncio.wait_for(coro, timeout))
    except TimeoutError:
        raise TimeoutError(f"{what} took over {timeout} s") from None


# -- consumer processes -----------------------------------------------------------------------


def _consumer_main(
    consume: _Consume, args: tuple[Any, ...], use_uvloop: bool, q: Queue[_Msg], go: Event
) -> None:
    """Process entry point: run ``consume(*args, ready)`` and report how it went on ``q``."""

    async def ready() -> bool:
        q.put(("ready", 0, ""))
        return await asyncio.to_thread(go.wait, SETUP_TIMEOUT_S)

    try:
        run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
        if use_uvloop:
            import uvloop

            run = uvloop.run
        q.put(("done", run(consume(*args, ready)), ""))
    except BaseException:
        q.put(("error", 0, traceback.format_exc()))


def _collect(q: Queue[_Msg], procs: list[BaseProcess], kind: str, deadline: float) -> list[_Msg]:
    """Wait for one ``kind`` message per process; raise on a consumer error or the deadline."""
    got: list[_Msg] = []
    while len(got) < len(procs):
        try:
            msg = q.get(timeout=0.2)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)}/{len(procs)} consumers {kind}") from None
            # A consumer that died without a word (killed, crashed interpreter) never reports.
            if dead := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                raise RuntimeError(f"consumer process exited with {dead[0]}") from None
            continue
        if msg[0] == "error":
            raise RuntimeError(f"consumer failed:\n{msg[2]}")
        got.append(msg)
    return got


def _run_consumers(
    dsn: str, consume: _Consume, args: tuple[Any, ...], uvloop: bool, n: int, timeout: float
) -> tuple[datetime, int]:
    """Run ``n`` consumers to the end; return (server time when released, jobs they ran)."""
    import psycopg

    ctx = mp.get_context("spawn")
    q: Queue[_Msg] = ctx.Queue()
    go = ctx.Event()
    procs: list[BaseProcess] = [
        ctx.Process(target=_consumer_main, args=(consume, args, uvloop, q, go), daemon=True)
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            _collect(q, procs, "ready", time.monotonic() + SETUP_TIMEOUT_S)
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            go.set()
        done = _collect(q, procs, "done", time.monotonic() + timeout)
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert row is not None
    return row[0], sum(m[1] for m in done)


def _bench(
    name: str,
    dsn: str,
    n_jobs: int,
    timeout: float,
    setup: Callable[[str, int], Coroutine[Any, Any, float]],
    consumers: tuple[_Consume, tuple[Any, ...], bool, int],  # consume, args, uvloop, how many
    verify: Callable[[str, int], Coroutine[Any, Any, datetime]],
) -> dict[str, float]:
    enqueue_s = _arun(setup(dsn, n_jobs), timeout, f"{name} setup")
    start, ran = _run_consumers(dsn, *consumers, timeout)
    end = _arun(verify(dsn, n_jobs), timeout, f"{name} check")
    if ran != n_jobs:
        raise RuntimeError(f"{name}: the consumers ran {ran} jobs, expected {n_jobs}")
    seconds = (end - start).total_seconds()
    return {
        "enqueue_per_s": n_jobs / enqueue_s,
        "process_per_s": n_jobs / seconds,
        "seconds": seconds,
    }


# -- pgqueuer ---------------------------------------------------------------------------------


async def _pgq_consume(dsn: str, batch_size: int, ready: _Ready) -> int:
    import psycopg
    from pgqueuer import Job, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    done = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        qm = QueueManager(Queries.from_psycopg_connection(conn))

        @qm.entrypoint(TASK)
        async def noop(job: Job) -> None:
            nonlocal done
            done += 1

        if not await ready():
            return 0
        # drain: return once the queue is empty and this worker's jobs are done. Completions go
        # through pgqueuer's log buffer (flushed every batch_size jobs or 0.1 s), written before
        # run() returns. dequeue_timeout (default 30 s) only bounds the idle wait for a NOTIFY,
        # so it decides how soon a worker exits once the others hold the last jobs.
        await qm.run(
            batch_size=batch_size,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(seconds=0.1),
        )
    return done


async def _pgq_setup(dsn: str, n_jobs: int) -> float:
    import psycopg
    from pgqueuer import Queries

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        queries = Queries.from_psycopg_connection(conn)
        await queries.install()
        t0 = time.perf_counter()
        for start in range(0, n_jobs, ENQUEUE_CHUNK):
            k = min(ENQUEUE_CHUNK, n_jobs - start)
            await queries.enqueue([TASK] * k, [None] * k, [0] * k)  # lists: a batch enqueue
        seconds = time.perf_counter() - t0
        await conn.execute(ANALYZE)
    return seconds


async def _pgq_verify(dsn: str, n_jobs: int) -> datetime:
    """Check that every job left the queue logged 'successful'; return the last one's time."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM pgqueuer), count(*), max(created)"
            " FROM pgqueuer_log WHERE status = 'successful'"
        )
        row = await cur.fetchone()
    assert row is not None
    if (row[0], row[1]) != (0, n_jobs):
        raise RuntimeError(f"pgqueuer: {row[0]} jobs left, {row[1]}/{n_jobs} logged successful")
    end: datetime = row[2]
    return end


def bench_pgqueuer(
    dsn: str, n_jobs: int, concurrency: int, batch_size: int = 10, *, timeout: float = TIMEOUT_S
) -> dict[str, float]:
    """pgqueuer 1.x: ``concurrency`` worker processes, each one ``QueueManager`` in drain mode.

    Each dequeue claims up to ``batch_size`` jobs; a worker runs the jobs it claimed as asyncio
    tasks (no ``max_concurrent_tasks`` cap) and batches their completion writes.
    """
    consumers = (_pgq_consume, (dsn, batch_size), True, concurrency)
    return _bench("pgqueuer", dsn, n_jobs, timeout, _pgq_setup, consumers, _pgq_verify)


# -- procrastinate ----------------------------------------------------------------------------


def _proc_app(dsn: str, pool_size: int) -> App:
    from procrastinate import App, PsycopgConnector

    # The pool opens min_size connections up front (psycopg_pool's default: 4 per process).
    return App(connector=PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size))


async def _proc_consume(dsn: str, ready: _Ready) -> int:
    app = _proc_app(dsn, pool_size=2)  # the job in flight, plus the worker's heartbeat
    done = 0

    @app.task(name=TASK)
    async def noop() -> None:
        nonlocal done
        done += 1

    async with app.open_async():
        if not await ready():
            return 0
        # wait=False: stop when a fetch finds the queue empty (it was filled before the start),
        # so the worker never waits for a NOTIFY or a poll (fetch_job_polling_interval) and
        # listen_notify=False spares a connection. concurrency=1: one job in flight per process,
        # the processes being the concurrency.
        await app.run_worker_async(
            concurrency=1, wait=False, listen_notify=False, install_signal_handlers=False
        )
    return done


async def _proc_setup(dsn: str, n_jobs: int) -> float:
    app = _proc_app(dsn, pool_size=1)

    @app.task(name=TASK)
    async def noop() -> None:
        pass

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        t0 = time.perf_counter()
        for start in range(0, n_jobs, ENQUEUE_CHUNK):
            await noop.batch_defer_async(*({} for _ in range(min(ENQUEUE_CHUNK, n_jobs - start))))
        seconds = time.perf_counter() - t0
        await app.connector.execute_query_async(ANALYZE)
    return seconds


async def _proc_verify(dsn: str, n_jobs: int) -> datetime:
    """Check that every job succeeded; return the time of the last success."""
    async with _proc_app(dsn, pool_size=1).open_async() as app:
        rows = list(await app.job_manager.list_queues_async())
        last = await app.connector.execute_query_one_async(
            "SELECT max(at) AS at FROM procrastinate_events WHERE type = 'succeeded'"
        )
    succeeded = sum(r["succeeded"] for r in rows)
    total = sum(r["jobs_count"] for r in rows)
    if (succeeded, total) != (n_jobs, n_jobs):
        raise RuntimeError(f"procrastinate: {succeeded}/{n_jobs} succeeded, {total} jobs in all")
    end: datetime = last["at"]
    return end


def bench_procrastinate(
    dsn: str, n_jobs: int, concurrency: int, *, timeout: float = TIMEOUT_S
) -> dict[str, float]:
    """procrastinate 3.x: ``concurrency`` worker processes, each ``run_worker_async(wait=False)``.

    Each job is fetched, then finished, by its own transaction (procrastinate has no batched
    fetch).
    """
    consumers = (_proc_consume, (dsn,), False, concurrency)
    return _bench("procrastinate", dsn, n_jobs, timeout, _proc_setup, consumers, _proc_verify)


# -- by hand ----------------------------------------------------------------------------------


def main() -> None:
    from gpufleet.testing.postgres import PostgresServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=10, help="pgqueuer's dequeue batch")
    args = parser.parse_args()
    # procrastinate warns about an App built in __main__ (its workers could not import the
    # tasks); here each worker process registers the task itself.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    with PostgresServer() as pg:
        pg.create_database("pgqueuer")
        r = bench_pgqueuer(pg.dsn("pgqueuer"), args.jobs, args.concurrency, args.batch_size)
        print("pgqueuer     ", {k: round(v, 2) for k, v in r.items()})
        pg.create_database("procrastinate")
        r = bench_procrastinate(pg.dsn("procrastinate"), args.jobs, args.concurrency)
        print("procrastinate", {k: round(v, 2) for k, v in r.items()})


if __name__ == "__main__":
    main()
