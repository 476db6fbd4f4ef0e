"""Serve benchmark: ``gpufleet serve`` against the same model called in a bare loop.

The model (``bench/models/fixed_cost``) does a fixed amount of numpy work per predict call
(calibrated once, here, and handed to the worker), so any difference is the platform's:

- throughput: N concurrent clients calling ``POST /v1/models/fixed-cost/infer?wait=30``
  against the bare loop calling ``predict`` on full batches, same batch size, same run;
- added latency: one client at a time; the request's latency minus the model's own time (the
  worker's inference-stage histogram from ``/metrics`` over the same requests);
- the interactive lane's p95 while a batch backlog (10,000 tasks) drains, against its p95
  on an idle server.

    python bench/serve_bench.py [--quick] [--json PATH] [--device cpu|cuda]

The server runs on SQLite with one worker (one CPU slot, or the first GPU with --device cuda).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

import httpx

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "models" / "fixed_cost"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(MODEL_DIR))
from _report import pct, report, result  # noqa: E402

KEY_RE = re.compile(r"admin key\s+(gfk_[A-Za-z0-9_\-]+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the bare loop ------------------------------------------------------------------------


def bare(seconds: float) -> tuple[dict[str, float], int]:
    from runner import FixedCost

    model = FixedCost()
    model.load("cpu")
    model.warmup()
    batch = [{"n": i} for i in range(model.batching.max_batch_size)]
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.predict(batch)
        done += len(batch)
    per_s = done / (time.perf_counter() - t0)
    single = []
    for _ in range(20):
        s = time.perf_counter()
        model.predict([{"n": 0}])
        single.append((time.perf_counter() - s) * 1000)
    return {"bare_per_s": per_s, "model_ms_batch1": statistics.median(single)}, model.rounds


# -- the server ---------------------------------------------------------------------------


class Server:
    def __init__(self, data_dir: Path, rounds: int, device: str) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "serve.log"
        env = {
            **os.environ,
            "GPUFLEET_DATA_DIR": str(data_dir),
            "FIXED_COST_ROUNDS": str(rounds),
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "GPUFLEET_LOG_LEVEL": "WARNING",
        }
        env.pop("GPUFLEET_DATABASE_URL", None)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "gpufleet", "serve", "--model", str(MODEL_DIR),
               "--port", str(self.port), "--cpu-slots", "1", "--log-level", "warning"]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.key = ""

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited:\n{self.log.read_text()}")
            if not self.key and (m := KEY_RE.search(self.log.read_text())):
                self.key = m.group(1)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 and self.key:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"serve not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _infer(c: httpx.AsyncClient, lane: str = "interactive") -> float:
    t0 = time.perf_counter()
    r = await c.post("/v1/models/fixed-cost/infer", params={"wait": 30},
                     json={"input": {"n": 1}, "lane": lane})  # fmt: skip
    if r.status_code != 200 or r.json()["status"] != "succeeded":
        raise RuntimeError(f"infer failed: {r.status_code} {r.text[:200]}")
    return (time.perf_counter() - t0) * 1000


async def sequential(c: httpx.AsyncClient, n: int) -> list[float]:
    return [await _infer(c) for _ in range(n)]


async def throughput(c: httpx.AsyncClient, clients: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await _infer(c)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


def backlog(data_dir: Path, n: int) -> float:
    """Put ``n`` batch-lane tasks in the queue at once, straight through the queue's own
    ``submit_many`` (the API's submit path, less HTTP): through HTTP this 2-core machine
    submits only about as fast as the worker drains, so no backlog would build up."""
    from gpufleet.queue import TaskQueue, TaskSpec
    from gpufleet.store import LocalBlobStore, create_engine

    q = TaskQueue(create_engine(f"sqlite:///{data_dir / 'gpufleet.db'}"),
                  LocalBlobStore(data_dir / "blobs"))  # fmt: skip
    t0 = time.perf_counter()
    for i in range(0, n, 500):
        q.submit_many([TaskSpec("fixed-cost", "1", {"n": 0}, tenant="default", lane="batch")
                       for _ in range(min(500, n - i))])  # fmt: skip
    rate = n / (time.perf_counter() - t0)
    q.close()
    return rate


async def inference_seconds(c: httpx.AsyncClient) -> tuple[float, float]:
    """(sum, count) of the worker's inference-stage histogram, from /metrics."""
    text = (await c.get("/metrics")).text
    total = count = 0.0
    for line in text.splitlines():
        if 'stage="inference"' in line and 'model="fixed-cost"' in line:
            if line.startswith("gpufleet_task_seconds_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith("gpufleet_task_seconds_count"):
                count = float(line.rsplit(" ", 1)[1])
    return total, count


async def queued(c: httpx.AsyncClient) -> int:
    [m] = (await c.get("/v1/models")).json()["models"]
    return int(sum(v for k, v in m["queue"].items() if k.startswith("queued")))


async def measure(
    url: str, key: str, data_dir: Path, quick: bool
) -> tuple[dict[str, float], list[float]]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    headers = {"Authorization": f"Bearer {key}"}
    out: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120,
                                 limits=limits) as c:  # fmt: skip
        await sequential(c, 5)  # warm the path
        before = await inference_seconds(c)
        idle = await sequential(c, 20 if quick else 60)
        after = await inference_seconds(c)
        # The model's own time per request, as the worker measured it around predict.
        out["model_ms_in_worker"] = (after[0] - before[0]) / (after[1] - before[1]) * 1000
        out["idle_interactive_p50_ms"] = pct(idle, 50)
        out["idle_interactive_p95_ms"] = pct(idle, 95)
        out["platform_per_s"] = await throughput(c, 48, 6 if quick else 20)
        n_backlog = 1_000 if quick else 10_000
        out["backlog_submit_per_s"] = await asyncio.to_thread(backlog, data_dir, n_backlog)
        out["backlog_queued_before"] = await queued(c)
        under = await sequential(c, 20 if quick else 60)
        out["backlog_left_after"] = await queued(c)
        out["backlog_interactive_p95_ms"] = pct(under, 95)
        out["backlog_interactive_p50_ms"] = pct(under, 50)
    return out, idle


def run(quick: bool, device: str) -> dict[str, Any]:
    bare_metrics, rounds = bare(3 if quick else 10)
    tmp = Path(tempfile.mkdtemp(prefix="gpufleet-serve-bench-"))
    server = Server(tmp, rounds, device)
    try:
        server.wait_ready()
        m, idle = asyncio.run(measure(server.url, server.key, tmp, quick))
    finally:
        server.stop()
    added = [x - m["model_ms_in_worker"] for x in idle]
    metrics = {**bare_metrics, **m}
    metrics["throughput_ratio_vs_bare"] = metrics["platform_per_s"] / metrics["bare_per_s"]
    metrics["added_latency_p50_ms"] = pct(added, 50)
    metrics["added_latency_p95_ms"] = pct(added, 95)
    metrics["added_latency_p99_ms"] = pct(added, 99)
    metrics["interactive_p95_ratio_under_backlog"] = (
        metrics["backlog_interactive_p95_ms"] / metrics["idle_interactive_p95_ms"]
    )
    targets = {
        "throughput_ratio_vs_bare": (">=", 0.9),
        "interactive_p95_ratio_under_backlog": ("<=", 2.0),
    }
    rows = [
        ("bare loop, batch 16", f"{metrics['bare_per_s']:,.0f} items/s", ""),
        (
            "model time, batch of 1: bare loop / in the worker",
            f"{metrics['model_ms_batch1']:.1f} / {metrics['model_ms_in_worker']:.1f} ms",
            "",
        ),
        ("serve, 48 clients, infer?wait", f"{metrics['platform_per_s']:,.0f} items/s", ""),
        ("throughput ratio vs bare", f"{metrics['throughput_ratio_vs_bare']:.2f}", ">= 0.9"),
        (
            "added latency p50 / p95 / p99",
            f"{metrics['added_latency_p50_ms']:.1f} / {metrics['added_latency_p95_ms']:.1f} / "
            f"{metrics['added_latency_p99_ms']:.1f} ms",
            "",
        ),
        (
            "interactive p50 / p95, idle",
            f"{metrics['idle_interactive_p50_ms']:.0f} / "
            f"{metrics['idle_interactive_p95_ms']:.0f} ms",
            "",
        ),
        (
            "interactive p50 / p95, batch backlog draining",
            f"{metrics['backlog_interactive_p50_ms']:.0f} / "
            f"{metrics['backlog_interactive_p95_ms']:.0f} ms "
            f"({metrics['backlog_queued_before']:,.0f} batch tasks queued before, "
            f"{metrics['backlog_left_after']:,.0f} after)",
            "",
        ),
        (
            "interactive p95 ratio under backlog",
            f"{metrics['interactive_p95_ratio_under_backlog']:.2f}",
            "<= 2.0",
        ),
        ("backlog submit rate", f"{metrics['backlog_submit_per_s']:,.0f} tasks/s", ""),
    ]
    return {**result("serve_bench", metrics, targets, quick=quick, device=device), "_rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    outcome = run(args.quick, args.device)
    rows = outcome.pop("_rows")
    report(outcome, rows, args.json)


if __name__ == "__main__":
    main()
