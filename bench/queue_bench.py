"""Queue benchmark: submit and claim-complete throughput, and idle wake-up latency.

Runs gpufleet's queue on SQLite and on PostgreSQL with 1, 4 and 16 claimer *processes* (how
workers run in production), claiming in batches of 10 and completing each batch in one
transaction. In the same run and on the same PostgreSQL server it measures pgqueuer (batched
dequeue) and procrastinate doing the same work: enqueue N no-op jobs, then process them all.

    python bench/queue_bench.py [--quick] [--tasks N] [--json PATH]

PostgreSQL is a throwaway server from the host's packages with its default, durable settings
(fsync on, synchronous_commit on); SQLite runs with gpufleet's defaults (WAL, synchronous=FULL).
Wake-up latency is the time from a submit committing to an idle claimer (blocked in
``wait_for_work``, in another process) holding the task.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import bench_pgqueuer, bench_procrastinate
from _report import pct, report, result

from gpufleet.queue import Completer, TaskQueue, TaskSpec
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from gpufleet.testing import PostgresServer

CLAIM_BATCH = 10
ctx = mp.get_context("spawn")


def _open(url: str, blobs: str) -> TaskQueue:
    return TaskQueue(create_engine(url), LocalBlobStore(Path(blobs)))


# -- claim-complete throughput ------------------------------------------------------------


def _claimer(url: str, blobs: str, name: str, ready: Any, go: Any, out: Any) -> None:
    q = _open(url, blobs)
    q.claim("warm", "1", name)  # connect and prepare before the clock starts
    ready.put(name)
    go.wait()
    done = 0
    # As a worker runs: results commit in the background (group commit) while it claims and
    # runs the next batch; the clock stops when the last result is durable.
    with Completer(q, name) as completer:
        while batch := q.claim("m", "1", name, max_n=CLAIM_BATCH):
            completer.submit([(t.id, None) for t in batch])
            done += len(batch)
    out.put((done, time.monotonic()))


def claim_complete(url: str, blobs: str, n: int, claimers: int) -> dict[str, float]:
    q = _open(url, blobs)
    t0 = time.perf_counter()
    for i in range(0, n, 500):
        q.submit_many([TaskSpec("m", "1", None) for _ in range(min(500, n - i))])
    submit_s = time.perf_counter() - t0
    # As the peers do (bench/_peers.py): fresh statistics, which autovacuum keeps in a live system.
    with q.engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_claimer, args=(url, blobs, f"c{i}", ready, go, out))
        for i in range(claimers)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every claimer has imported, connected and prepared its statements
        ready.get(timeout=120)
    time.sleep(0.2)
    start = time.monotonic()
    go.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    total = sum(r[0] for r in results)
    if total != n:
        raise RuntimeError(f"claimers completed {total} of {n} tasks")
    if q.stats().count() != 0:
        raise RuntimeError("tasks left in the queue after the run")
    elapsed = max(r[1] for r in results) - start
    q.close()
    return {"claim_complete_per_s": n / elapsed, "submit_batch_per_s": n / submit_s}


def submit_single(url: str, blobs: str, n: int) -> float:
    q = _open(url, blobs)
    t0 = time.perf_counter()
    for i in range(n):
        q.submit(TaskSpec("s", "1", {"i": i}))
    rate = n / (time.perf_counter() - t0)
    q.close()
    return rate


# -- idle wake-up latency -----------------------------------------------------------------
# From the submit call to the idle claimer holding the task: an upper bound on the wake-up's
# own latency, which includes the submit's durable commit. Timed from submit's return instead,
# a claimer woken by the commit's wake-up could hold the task before submit returned to its
# caller on a loaded machine: negative latencies, and a median that read 0 or less.


def _waiter(url: str, blobs: str, n: int, ready: Any, out: Any) -> None:
    q = _open(url, blobs)
    q.wait_for_work("lat", "1", 0)  # subscribe
    ready.set()
    got = 0
    while got < n:
        batch = q.claim("lat", "1", "waiter")
        if not batch:
            q.wait_for_work("lat", "1", 5.0)
            continue
        t = time.monotonic()
        out.put((batch[0].input["i"], t))
        q.complete_many("waiter", [(x.id, None) for x in batch])
        got += len(batch)


def wakeup_latency(url: str, blobs: str, n: int) -> list[float]:
    q = _open(url, blobs)
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_waiter, args=(url, blobs, n, ready, out))
    proc.start()
    if not ready.wait(60):
        raise RuntimeError("waiter did not start")
    time.sleep(0.3)
    lat: list[float] = []
    for i in range(n):
        sent = time.monotonic()
        q.submit(TaskSpec("lat", "1", {"i": i}))
        idx, claimed = out.get(timeout=30)
        assert idx == i
        lat.append((claimed - sent) * 1000)
        time.sleep(0.02)  # the claimer is idle again before the next task
    proc.join(30)
    q.close()
    return lat


# -- the run ------------------------------------------------------------------------------


def run(quick: bool, tasks: int | None = None) -> dict[str, Any]:
    n = tasks or (2_000 if quick else 20_000)
    # The other sizes keep their ratio to n (--tasks shrinks the whole run, for the tests).
    n_submit = max(n // 10, 10)
    n_lat = 30 if quick else 200
    concurrency = [1, 4] if quick else [1, 4, 16]
    n_proc = n * 3 // 10 if quick else n // 5
    metrics: dict[str, float] = {}
    rows: list[tuple[str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    db_no = iter(range(1, 1000))

    with PostgresServer() as pg:

        def fresh(kind: str) -> str:
            i = next(db_no)
            if kind == "sqlite":
                url = f"sqlite:///{tmp / f'q{i}.db'}"
            else:
                url = pg.create_database(f"q{i}")
            upgrade(create_engine(url))
            return url

        for kind, prefix in (("sqlite", "sqlite"), ("postgresql", "pg")):
            blobs = str(tmp / "blobs")
            rate = submit_single(fresh(kind), blobs, n_submit)
            metrics[f"{prefix}_submit_per_s"] = rate
            rows.append((f"{kind}: submit, 1 client, 1 task/txn", f"{rate:,.0f} tasks/s", ""))
            for c in concurrency:
                r = claim_complete(fresh(kind), blobs, n, c)
                metrics[f"{prefix}_claim_complete_per_s_c{c}"] = r["claim_complete_per_s"]
                metrics[f"{prefix}_submit_batch_per_s"] = r["submit_batch_per_s"]
                rows.append(
                    (
                        f"{kind}: claim-complete, {c} claimers, batch {CLAIM_BATCH}",
                        f"{r['claim_complete_per_s']:,.0f} tasks/s",
                        "",
                    )
                )
            best = max(metrics[f"{prefix}_claim_complete_per_s_c{c}"] for c in concurrency)
            metrics[f"{prefix}_claim_complete_per_s"] = best
            lat = wakeup_latency(fresh(kind), blobs, n_lat)
            metrics[f"{prefix}_wakeup_p50_ms"] = statistics.median(lat)
            metrics[f"{prefix}_wakeup_p99_ms"] = pct(lat, 99)
            rows.append(
                (
                    f"{kind}: idle wake-up, submit call -> claimed",
                    f"p50 {statistics.median(lat):.2f} ms, p99 {pct(lat, 99):.2f} ms",
                    "p50 <= 5 ms",
                )
            )

        peers: dict[str, Callable[[str, int], dict[str, float]]] = {}
        for c in concurrency:
            peers[f"pgqueuer_per_s_c{c}"] = lambda dsn, k, c=c: bench_pgqueuer(dsn, k, c, 10)
        for c in concurrency[:2]:
            peers[f"procrastinate_per_s_c{c}"] = lambda dsn, k, c=c: bench_procrastinate(dsn, k, c)
        for name, fn in peers.items():
            i = next(db_no)
            pg.create_database(f"peer{i}")
            k = n if name.startswith("pgqueuer") else n_proc
            r = fn(pg.dsn(f"peer{i}"), k)
            metrics[name] = r["process_per_s"]
            label = name.replace("_per_s_c", ", ").replace("_", " ")
            rows.append((f"peer {label} consumers", f"{r['process_per_s']:,.0f} jobs/s", ""))

    pgq = max(v for k, v in metrics.items() if k.startswith("pgqueuer_per_s"))
    proc = max(v for k, v in metrics.items() if k.startswith("procrastinate_per_s"))
    metrics["pgqueuer_per_s"] = pgq
    metrics["procrastinate_per_s"] = proc
    metrics["ratio_vs_pgqueuer"] = metrics["pg_claim_complete_per_s"] / pgq
    metrics["ratio_vs_procrastinate"] = metrics["pg_claim_complete_per_s"] / proc
    for c in concurrency:
        metrics[f"ratio_vs_pgqueuer_c{c}"] = (
            metrics[f"pg_claim_complete_per_s_c{c}"] / metrics[f"pgqueuer_per_s_c{c}"]
        )
        rows.append(
            (
                f"ratio vs pgqueuer at {c} claimers/consumers",
                f"{metrics[f'ratio_vs_pgqueuer_c{c}']:.2f}",
                "",
            )
        )
    targets = {
        "ratio_vs_pgqueuer": (">=", 1.0),
        "ratio_vs_procrastinate": (">=", 5.0),
        "pg_wakeup_p50_ms": ("<=", 5.0),
        "sqlite_wakeup_p50_ms": ("<=", 5.0),
    }
    return {**result("queue_bench", metrics, targets, quick=quick, tasks=n), "_rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--tasks", type=int, help="tasks per claim-complete run (20,000; quick 2,000)")
    args = ap.parse_args()
    outcome = run(args.quick, args.tasks)
    rows = outcome.pop("_rows")
    report(outcome, rows, args.json)


if __name__ == "__main__":
    main()
