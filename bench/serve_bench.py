"""Serve benchmark: does ``gpufleet serve`` keep up with the model? A concurrency sweep.

For each model (a no-op model, ``builtin:digits``, ``builtin:tiny-lm``; on request the slow
``bench/models/fixed_cost`` and ``bench/models/sleep``, a device-bound stand-in that waits 14 ms
a batch with the CPU free, for a machine without a GPU), side by side in one run:

- bare: the runner in a bare loop in this process, ``predict`` on full batches (the ceiling
  the GPU or CPU gives), and one item alone (the model's own latency);
- gpufleet: ``gpufleet serve`` (SQLite, or PostgreSQL with ``--database postgres``, one
  worker), N closed-loop aiohttp clients calling ``POST /v1/models/M/infer?wait=60``;
- litserve: LitServe serving the same runner (same batch size, a 5 ms window), same clients;
- echo: a bare FastAPI endpoint (``bench/_serve_peers.py``), the floor of any Python HTTP
  server here, which also shows the load generator is not the ceiling.

Then, on digits (else the first model): bulk submits (``POST /v1/tasks/batch``, 1,000 a
request) of a 10,000-task batch-lane backlog, and the interactive lane's p95 while that
backlog drains against its p95 idle. ``bulk_submit_per_s`` is the same bulk submit on the
no-op model's server when it runs (its worker takes the tasks at no cost, so the figure is
the submit path's, not a CPU model's competing for the same cores), else the main model's.

    python bench/serve_bench.py [--device cpu|cuda] [--models noop,digits,tiny-lm]
        [--clients 1,16,64,256] [--database sqlite|postgres|both] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _load import Load, closed_loop, pct  # noqa: E402
from _report import report, result  # noqa: E402

KEY_RE = re.compile(r"admin key\s+(gfk_[A-Za-z0-9_\-]+)")
MODELS = {
    "noop": str(HERE / "models" / "noop"),
    "digits": "builtin:digits",
    "tiny-lm": "builtin:tiny-lm",
    "fixed-cost": str(HERE / "models" / "fixed_cost"),
    "sleep": str(HERE / "models" / "sleep"),
}
SERVED_NAME = {k: k for k in MODELS} | {"digits": "digits", "tiny-lm": "tiny-lm"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_input(name: str) -> Any:
    if name == "tiny-lm":
        return {"prompt": "Once upon a time", "max_new_tokens": 64, "seed": 1}
    if name == "digits":
        return {"prompt": "a handwritten 7", "seed": 42, "steps": 20}
    return {"n": 1}


def _ok(status: int, body: Any) -> bool:
    return status == 200 and isinstance(body, dict) and body.get("status") == "succeeded"


# -- bare ---------------------------------------------------------------------------------


def bare(name: str, device: str, seconds: float) -> dict[str, float]:
    """The runner in a bare loop: full batches for ``seconds``, then one item at a time."""
    from gpufleet.models.loader import open_model

    runner = open_model(MODELS[name])
    runner.load("cuda:0" if device == "cuda" else "cpu")
    runner.warmup()
    batch_size = runner.batching.max_batch_size
    batch = [model_input(name) for _ in range(batch_size)]
    runner.predict(batch)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner.predict(batch)
        done += batch_size
    per_s = done / (time.perf_counter() - t0)
    one = []
    for _ in range(20):
        s = time.perf_counter()
        runner.predict([model_input(name)])
        one.append((time.perf_counter() - s) * 1000)
    with contextlib.suppress(Exception):
        from gpufleet.models.runtime import unload

        unload(runner)
    del runner
    gc.collect()
    if device == "cuda":
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
    return {"per_s": per_s, "one_ms": statistics.median(one), "batch": float(batch_size)}


# -- servers ------------------------------------------------------------------------------


class Proc:
    """A server process on a free loopback port, its output in a log file."""

    health = "/health"

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.key = ""
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def ready(self) -> bool:
        return httpx.get(self.url + self.health, timeout=2).status_code == 200

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.ready():
                    return
            time.sleep(0.2)
        raise TimeoutError(f"not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


class Gpufleet(Proc):
    health = "/healthz"

    def __init__(self, name: str, device: str, work: Path, database: str | None,
                 api_workers: int | None) -> None:  # fmt: skip
        data = work / f"gpufleet-{name}-{'pg' if database else 'sqlite'}"
        data.mkdir(parents=True)
        env = {**os.environ, "GPUFLEET_DATA_DIR": str(data), "GPUFLEET_LOG_LEVEL": "WARNING"}
        env.pop("GPUFLEET_DATABASE_URL", None)
        if database:
            env["GPUFLEET_DATABASE_URL"] = database
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "gpufleet", "serve", "--model", MODELS[name],
               "--port", "{port}", "--cpu-slots", "1", "--log-level", "warning"]  # fmt: skip
        if api_workers:
            cmd += ["--api-workers", str(api_workers)]
        super().__init__(cmd, env, data / "serve.log")

    def ready(self) -> bool:
        if not self.key and (m := KEY_RE.search(self.log.read_text())):
            self.key = m.group(1)
        return bool(self.key) and super().ready()


def peer(kind: str, name: str, device: str, work: Path, api: int) -> Proc:
    env = {**os.environ, "PEER_MODEL": MODELS.get(name, "")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(HERE / "_serve_peers.py"), kind, "--port", "{port}",
           "--api", str(api), "--device", device, "--model", MODELS.get(name, "")]  # fmt: skip
    return Proc(cmd, env, work / f"{kind}-{name}.log")


# -- measuring ----------------------------------------------------------------------------


def sweep(url: str, body: Any, clients: list[int], seconds: float,
          headers: dict[str, str] | None = None) -> dict[int, Load]:  # fmt: skip
    out = {}
    for c in clients:
        out[c] = asyncio.run(
            closed_loop(
                url,
                body,
                clients=c,
                seconds=seconds,
                warmup_s=min(1.0, seconds / 3),
                headers=headers,
                check=_ok,
            )
        )
        if out[c].done == 0:
            raise RuntimeError(f"{url} at {c} clients: no request succeeded: {out[c].first_error}")
    return out


async def bulk_submit(s: aiohttp.ClientSession, server: Gpufleet, name: str, n: int) -> float:
    """Tasks a second accepted: ``n`` batch-lane tasks in bulk requests (2 clients, 1,000 a
    request), while the server's worker takes them."""
    task = {"model": SERVED_NAME[name], "input": model_input(name), "lane": "batch"}
    chunks = [min(1000, n - i) for i in range(0, n, 1000)]

    async def sender(mine: list[int]) -> None:
        for size in mine:
            async with s.post(server.url + "/v1/tasks/batch",
                              json={"tasks": [task] * size}) as r:  # fmt: skip
                body = await r.json()
                if r.status != 200 or body["refused"]:
                    raise RuntimeError(f"bulk submit: {r.status} {str(body)[:300]}")

    t0 = time.perf_counter()
    await asyncio.gather(sender(chunks[0::2]), sender(chunks[1::2]))
    return n / (time.perf_counter() - t0)


async def bulk_only(server: Gpufleet, name: str, n: int) -> float:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {server.key}"}) as s:
        return await bulk_submit(s, server, name, n)


async def bulk_and_backlog(server: Gpufleet, name: str, n: int, samples: int) -> dict[str, float]:
    """Submit ``n`` batch-lane tasks in bulk, then time interactive requests one at a time
    while the backlog drains."""
    headers = {"Authorization": f"Bearer {server.key}"}
    out: dict[str, float] = {}
    async with aiohttp.ClientSession(headers=headers) as s:
        out["bulk_submit_per_s"] = await bulk_submit(s, server, name, n)
        out["backlog_queued_before"] = await _queued(s, server.url, name)
        lat = [(done - sent) * 1000 for _, sent, done in await one_by_one(s, server, name, samples)]
        out["backlog_left_after"] = await _queued(s, server.url, name)
        out["backlog_interactive_p50_ms"] = pct(lat, 50)
        out["backlog_interactive_p95_ms"] = pct(lat, 95)
    return out


async def one_by_one(
    s: aiohttp.ClientSession, server: Gpufleet, name: str, n: int
) -> list[tuple[str, float, float]]:
    """``n`` interactive infer requests one at a time: (task id, sent, answered), wall-clock
    seconds (``time.time``, comparable with the task rows' timestamps)."""
    url = f"{server.url}/v1/models/{SERVED_NAME[name]}/infer?wait=60"
    out = []
    for _ in range(n):
        sent = time.time()
        async with s.post(url, json={"input": model_input(name)}) as r:
            body = await r.json()
            if not _ok(r.status, body):
                raise RuntimeError(f"interactive request: {r.status} {str(body)[:300]}")
        out.append((body["id"], sent, time.time()))
    return out


async def _queued(s: aiohttp.ClientSession, url: str, name: str) -> float:
    async with s.get(url + "/v1/models") as r:
        models = (await r.json())["models"]
    [m] = [m for m in models if m["name"] == SERVED_NAME[name]]
    return float(sum(v for k, v in m["queue"].items() if k.startswith("queued")))


async def idle_interactive(server: Gpufleet, name: str, samples: int) -> list[float]:
    headers = {"Authorization": f"Bearer {server.key}"}
    url = f"{server.url}/v1/models/{SERVED_NAME[name]}/infer?wait=60"
    lat = []
    async with aiohttp.ClientSession(headers=headers) as s:
        for _ in range(samples):
            t = time.perf_counter()
            async with s.post(url, json={"input": model_input(name)}) as r:
                await r.read()
            lat.append((time.perf_counter() - t) * 1000)
    return lat


# -- the run ------------------------------------------------------------------------------


def main_model(models: list[str]) -> str:
    """The model the headline figures, the backlog and PostgreSQL are measured on."""
    return "digits" if "digits" in models else models[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    models = args.models.split(",")
    main = main_model(models)
    clients = [int(c) for c in args.clients.split(",")]
    # --seconds wins over --quick's 2 s (the tests' smoke run measures for less).
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    work = Path(tempfile.mkdtemp(prefix="gpufleet-serve-bench-"))
    databases: list[tuple[str, str | None]] = []
    pg = None
    if args.database in ("sqlite", "both"):
        databases.append(("sqlite", None))
    if args.database in ("postgres", "both"):
        from gpufleet.testing.postgres import PostgresServer

        pg = PostgresServer(settings={"max_connections": "400"}).start()
        pg.create_database("bench")
        databases.append(("postgres", pg.url("bench")))
    api = args.api_workers
    peer_api = api or 1
    m: dict[str, float] = {}
    tables: dict[str, dict[str, dict[int, Load]]] = {}
    try:
        echo = peer("echo", "echo", args.device, work, peer_api)
        echo.wait_ready()
        try:
            tables["echo"] = {"echo": sweep(echo.url + "/echo", {"input": {"n": 1}}, clients,
                                            seconds)}  # fmt: skip
        finally:
            echo.stop()
        for name in models:
            b = bare(name, args.device, args.seconds or (2.0 if args.quick else 4.0))
            for k, v in b.items():
                m[f"{name}_bare_{k}"] = v
            body = {"input": model_input(name)}
            row: dict[str, dict[int, Load]] = {}
            if "litserve" in args.peers:
                lit = peer("litserve", name, args.device, work, peer_api)
                lit.wait_ready()
                try:
                    row["litserve"] = sweep(lit.url + "/predict", body, clients, seconds)
                finally:
                    lit.stop()
            for db_name, url in databases:
                if db_name == "postgres" and name != main:
                    continue  # PostgreSQL: the main model is enough for its ratios
                server = Gpufleet(name, args.device, work, url, api)
                server.wait_ready()
                try:
                    headers = {"Authorization": f"Bearer {server.key}"}
                    infer = f"{server.url}/v1/models/{SERVED_NAME[name]}/infer?wait=60"
                    row[f"gpufleet-{db_name}"] = sweep(infer, body, clients, seconds, headers)
                    if name == main:
                        idle = asyncio.run(idle_interactive(server, name, 20 if args.quick else 60))
                        m[f"{db_name}_idle_interactive_p95_ms"] = pct(idle, 95)
                        bb = asyncio.run(bulk_and_backlog(server, name,
                                                          1000 if args.quick else args.backlog,
                                                          20 if args.quick else 60))  # fmt: skip
                        for k, v in bb.items():
                            m[f"{db_name}_{k}"] = v
                    elif name == "noop":  # the platform's own bulk rate: a worker that costs 0
                        m[f"{db_name}_noop_bulk_submit_per_s"] = asyncio.run(
                            bulk_only(server, name, 1000 if args.quick else args.backlog)
                        )
                finally:
                    server.stop()
            tables[name] = row
    finally:
        if pg is not None:
            pg.stop()
    return summarise(args, models, clients, m, tables)


def summarise(args: argparse.Namespace, models: list[str], clients: list[int],
              m: dict[str, float], tables: dict[str, dict[str, dict[int, Load]]]
              ) -> dict[str, Any]:  # fmt: skip
    rows: list[tuple[str, str, str]] = []
    for name, row in tables.items():
        for system, loads in row.items():
            for c, load in loads.items():
                s = load.summary()
                for k, v in s.items():
                    m[f"{name}_{system}_c{c}_{k}"] = v
            cells = " / ".join(f"{loads[c].per_s:,.0f}" for c in clients)
            rows.append((f"{name}: {system} (items/s)", cells, ""))
            p50 = " / ".join(f"{loads[c].summary()['p50_ms']:.1f}" for c in clients)
            rows.append((f"{name}: {system} p50 ms", p50, ""))
    main = first = main_model(models)
    served = "gpufleet-sqlite" if "gpufleet-sqlite" in tables[main] else "gpufleet-postgres"
    targets: dict[str, tuple[str, float]] = {}

    def per_s(name: str, system: str, c: int) -> float:
        return tables[name][system][c].per_s

    top = max(clients)
    if main == "digits":  # the served-vs-bare targets are the GPU model's; no-op's bare is free
        for c in (64, 256):
            if c in clients:
                m[f"served_vs_bare_c{c}"] = per_s(main, served, c) / m[f"{main}_bare_per_s"]
                targets[f"served_vs_bare_c{c}"] = (">=", 0.8)
    if "litserve" in tables[main]:
        for name in models:
            if "litserve" in tables[name] and served in tables[name]:
                m[f"{name}_served_vs_litserve_min"] = min(
                    per_s(name, served, c) / per_s(name, "litserve", c) for c in clients
                )
        m["served_vs_litserve_min"] = m[f"{main}_served_vs_litserve_min"]
        targets["served_vs_litserve_min"] = (">=", 1.0)
    if 64 in clients and 256 in clients:
        m["no_collapse_c256_vs_c64"] = per_s(main, served, 256) / per_s(main, served, 64)
        targets["no_collapse_c256_vs_c64"] = (">=", 1.0)
    s_top = tables[main][served][top].summary()
    m[f"p99_over_p50_c{top}"] = s_top["p99_ms"] / s_top["p50_ms"]
    targets[f"p99_over_p50_c{top}"] = ("<=", 2.0)
    if "noop" in tables and 1 in clients:
        m["noop_p50_ms"] = tables["noop"][served][1].summary()["p50_ms"]
        targets["noop_p50_ms"] = ("<=", 3.0)
    if 1 in clients and f"{main}_bare_one_ms" in m:
        m["added_latency_p50_ms"] = (
            tables[main][served][1].summary()["p50_ms"] - m[f"{main}_bare_one_ms"]
        )
        targets["added_latency_p50_ms"] = ("<=", 5.0)
    if "tiny-lm" in tables and 16 in clients:
        m["tinylm_served_vs_bare_c16"] = per_s("tiny-lm", served, 16) / m["tiny-lm_bare_per_s"]
        targets["tinylm_served_vs_bare_c16"] = (">=", 0.9)
    db = "sqlite" if served.endswith("sqlite") else "postgres"
    if f"{db}_backlog_interactive_p95_ms" in m:
        m["interactive_p95_ratio_under_backlog"] = (
            m[f"{db}_backlog_interactive_p95_ms"] / m[f"{db}_idle_interactive_p95_ms"]
        )
        targets["interactive_p95_ratio_under_backlog"] = ("<=", 1.5)
        # Measured on the no-op model's server where there is one: a model that takes the
        # machine's cores (digits on a 2-core VM) would measure itself, not the submit path.
        m["bulk_submit_per_s"] = m.get(f"{db}_noop_bulk_submit_per_s",
                                       m[f"{db}_bulk_submit_per_s"])  # fmt: skip
        targets["bulk_submit_per_s"] = (">=", 10_000.0)
    if "gpufleet-postgres" in tables[first] and "gpufleet-sqlite" in tables[first]:
        m["postgres_vs_sqlite_min"] = min(
            per_s(first, "gpufleet-postgres", c) / per_s(first, "gpufleet-sqlite", c)
            for c in clients
        )
        targets["postgres_vs_sqlite_min"] = (">=", 0.8)
        if "postgres_bulk_submit_per_s" in m:
            m["postgres_vs_sqlite_bulk"] = (
                m["postgres_bulk_submit_per_s"] / m["sqlite_bulk_submit_per_s"]
            )
            targets["postgres_vs_sqlite_bulk"] = (">=", 0.8)
    for name in models:
        if f"{name}_bare_per_s" in m:
            rows.append((f"{name}: bare loop, batch {m[f'{name}_bare_batch']:.0f}",
                         f"{m[f'{name}_bare_per_s']:,.0f} items/s; one item "
                         f"{m[f'{name}_bare_one_ms']:.1f} ms", ""))  # fmt: skip
    out = result("serve_bench", m, targets, quick=args.quick, device=args.device,
                 clients=clients, models=models, database=args.database,
                 api_workers=args.api_workers)  # fmt: skip
    return {**out, "_rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 s a point, 1,000-task backlog")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--models", default="noop,digits,tiny-lm",
                    help=f"comma-separated, of {', '.join(MODELS)}; digits (else the first) "
                    "also gets the backlog, bulk and PostgreSQL measurements")  # fmt: skip
    ap.add_argument("--clients", default="1,16,64,256")
    ap.add_argument("--seconds", type=float, help="measured seconds a point (5; quick 2)")
    ap.add_argument("--database", choices=["sqlite", "postgres", "both"], default="sqlite")
    ap.add_argument("--peers", default="litserve,echo")
    ap.add_argument("--backlog", type=int, default=10_000)
    ap.add_argument("--api-workers", type=int, default=None,
                    help="gpufleet's --api-workers (and the peers' API processes)")  # fmt: skip
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    outcome = run(args)
    rows = outcome.pop("_rows")
    report(outcome, rows, args.json)


if __name__ == "__main__":
    main()
