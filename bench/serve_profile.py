"""Where the serve path spends its time under load: py-spy on the API processes and the worker.

Starts ``gpufleet serve`` (as ``serve_bench`` does), drives N closed-loop aiohttp clients at
``infer?wait``, and while they run records each API process and the worker with py-spy (raw
collapsed stacks, every thread). Prints, per process, the share of samples in each part of
the path (HTTP, routing and validation, submit commit, wake-ups, watcher, claim, predict,
results, idle) and the throughput of the run; writes the stacks and the table as JSON.

    python bench/serve_profile.py [--model noop] [--clients 256] [--device cpu|cuda]
        [--api-workers N] [--seconds 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _load import closed_loop  # noqa: E402
from serve_bench import SERVED_NAME, Gpufleet, _ok, model_input  # noqa: E402

RATE = 250  # py-spy samples a second

# The first rule whose substring is found in a sample's stack (leaf first) names its part.
PARTS = [
    ("idle", ("select.select", "epoll", "_wait_for_tstate_lock", "Condition.wait", "sleep")),
    ("predict", ("predict (",)),
    ("submit commit", ("SubmitBatcher", "submit_prepared", "submit_many")),
    ("results commit", ("complete_many", "Completer")),
    ("claim", ("WorkerOps.claim", "_gather", "wait_for_work")),
    ("watcher", ("TaskWatcher", "get_many", "task_states")),
    ("wake-ups", ("SocketNotifier", "PostgresNotifier", "FinishedInbox", "finished_topics")),
    ("auth", ("authenticator", "KeyStore")),
    ("validation", ("pydantic", "_validate", "serialize_response", "jsonable_encoder")),
    ("routing/ASGI", ("starlette", "fastapi", "_CountRequests", "BodySizeLimit")),
    ("HTTP", ("uvicorn", "httptools", "h11")),
    ("metrics", ("prometheus_client",)),
    ("event loop", ("asyncio", "uvloop")),
]


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack[-3:]):  # the leaf frames say whether the thread waits
        if any(k in frame for k in PARTS[0][1]):
            return "idle"
    for name, keys in PARTS[1:]:
        if any(k in f for f in stack for k in keys):
            return name
    return "other"


def breakdown(raw: Path, seconds: float, rate: int) -> dict[str, float]:
    """Per part, busy samples as a share of one core (100 = one core all the time)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[part_of(stack.split(";"))] += int(n)
    counts.pop("idle", None)
    return {k: 100 * v / (seconds * rate) for k, v in counts.most_common()}


def task_timeline(database: Path) -> dict[str, float]:
    """From the tasks table: claim sizes (tasks one claim took share its ``started_at``),
    attempts, the time in the queue and from claim to result, over the middle half."""
    import sqlite3
    from datetime import datetime

    with sqlite3.connect(database) as db:
        rows = db.execute(
            "SELECT created_at, started_at, finished_at, attempts FROM tasks "
            "WHERE finished_at IS NOT NULL ORDER BY id"
        ).fetchall()
    rows = rows[len(rows) // 4 : 3 * len(rows) // 4]
    if not rows:
        return {}

    def ms(x: str) -> float:
        return datetime.fromisoformat(x).timestamp() * 1000

    claims = collections.Counter(r[1] for r in rows)
    sizes = sorted(claims.values())
    queue = sorted(ms(r[1]) - ms(r[0]) for r in rows)
    run = sorted(ms(r[2]) - ms(r[1]) for r in rows)
    return {
        "claim_size_mean": sum(sizes) / len(sizes),
        "claim_size_p50": sizes[len(sizes) // 2],
        "retried_share": sum(1 for r in rows if r[3] > 1) / len(rows),
        "queue_wait_p50_ms": queue[len(queue) // 2],
        "queue_wait_p95_ms": queue[int(len(queue) * 0.95)],
        "claim_to_result_p50_ms": run[len(run) // 2],
        "claim_to_result_p95_ms": run[int(len(run) * 0.95)],
    }


def pids(root: int) -> tuple[list[int], list[int]]:
    """(API processes, worker processes) under ``serve``'s pid."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    children: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    for line in out.splitlines()[1:]:
        pid, ppid, args = line.split(None, 2)
        children[int(ppid)].append((int(pid), args))
    api, workers = [], []
    stack = [root]
    while stack:
        p = stack.pop()
        for c, args in children.get(p, []):
            stack.append(c)
            if "gpufleet.api.process" in args:
                api.append(c)
            elif "gpufleet.worker.process" in args:
                workers.append(c)
    return (api or [root]), workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="noop")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--api-workers", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as serve_bench: numpy models on CPU
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy not found (pip install py-spy)")
    work = Path(tempfile.mkdtemp(prefix="gpufleet-serve-profile-"))
    out = args.out or work
    out.mkdir(parents=True, exist_ok=True)
    server = Gpufleet(args.model, args.device, work, None, args.api_workers)
    server.wait_ready()
    try:
        api, workers = pids(server.proc.pid)
        url = f"{server.url}/v1/models/{SERVED_NAME[args.model]}/infer?wait=60"
        headers = {"Authorization": f"Bearer {server.key}"}
        record_s = max(2, int(args.seconds) - 2)
        procs: list[tuple[str, subprocess.Popen[bytes]]] = []

        def record() -> None:
            time.sleep(1.5)  # past the warm-up
            for role, pid in [("api", api[0]), *[("worker", w) for w in workers[:1]]]:
                raw = out / f"{role}-{pid}.txt"
                cmd = [spy, "record", "-p", str(pid), "-d", str(record_s), "-r", str(RATE),
                       "-f", "raw", "-o", str(raw), "--nonblocking", "-t"]  # fmt: skip
                procs.append((role, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)))  # fmt: skip

        th = threading.Thread(target=record)
        th.start()
        load = asyncio.run(
            closed_loop(
                url,
                {"input": model_input(args.model)},
                clients=args.clients,
                seconds=args.seconds,
                warmup_s=1.0,
                headers=headers,
                check=_ok,
            )
        )
        th.join()
        for _, p in procs:
            p.wait(30)
    finally:
        server.stop()
    timeline = task_timeline(server.log.parent / "gpufleet.db")
    report: dict[str, object] = {"model": args.model, "clients": args.clients,
                                 "api_workers": args.api_workers, **load.summary()}  # fmt: skip
    summary = load.summary()
    print(f"{args.model}, {args.clients} clients: {load.per_s:,.0f}/s, "
          f"p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms")  # fmt: skip
    report["timeline"] = timeline
    for k, v in timeline.items():
        print(f"  {k:24s} {v:8.2f}")
    for raw in sorted(out.glob("*-*.txt")):
        parts = breakdown(raw, record_s, RATE)
        report[raw.stem] = parts
        print(f"\n{raw.stem}: {sum(parts.values()):.0f}% of a core busy, by part")
        for name, share in parts.items():
            print(f"  {name:16s} {share:5.1f}%")
    (out / "profile.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
