"""Where an interactive request's time goes while a batch-lane backlog drains.

Starts ``gpufleet serve`` (one model, SQLite), queues a batch-lane backlog in bulk, sends
interactive ``infer`` requests one at a time, and, on an idle server first, the same. For
each request it reads the task's row afterwards and splits its latency: before the claim
(created -> started), in the worker (started -> finished) and the rest (HTTP, submit commit,
wake-ups). Prints the medians and p95s side by side and writes them as JSON.

    python bench/backlog_trace.py [--model digits] [--device cpu|cuda] [--backlog 3000]
        [--samples 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_bench import Gpufleet, bulk_submit, one_by_one, pct  # noqa: E402


def _ts(v: str | None) -> float:
    if v is None:
        return float("nan")
    return datetime.fromisoformat(v).timestamp()


async def _requests(server: Gpufleet, name: str, n: int, backlog: int) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.key}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        if backlog:
            await bulk_submit(s, server, name, backlog)
        done = await one_by_one(s, server, name, n)
    return [{"id": tid, "sent": sent, "answered": answered} for tid, sent, answered in done]


def _split(db: Path, reqs: list[dict[str, Any]]) -> dict[str, list[float]]:
    conn = sqlite3.connect(db)
    parts: dict[str, list[float]] = {"total": [], "queued": [], "worker": [], "rest": []}
    for r in reqs:
        created, started, finished = conn.execute(
            "SELECT created_at, started_at, finished_at FROM tasks WHERE id = ?", (r["id"],)
        ).fetchone()
        c, s, f = _ts(created), _ts(started), _ts(finished)
        total = (r["answered"] - r["sent"]) * 1000
        parts["total"].append(total)
        parts["queued"].append((s - c) * 1000)
        parts["worker"].append((f - s) * 1000)
        parts["rest"].append(total - (f - c) * 1000)
    conn.close()
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="digits")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--backlog", type=int, default=3000)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpufleet-backlog-trace-"))
    server = Gpufleet(args.model, args.device, work, None, None)
    result: dict[str, Any] = {}
    try:
        server.wait_ready()
        db = work / f"gpufleet-{args.model}-sqlite" / "gpufleet.db"
        for phase, backlog in (("idle", 0), ("backlog", args.backlog)):
            reqs = asyncio.run(_requests(server, args.model, args.samples, backlog))
            parts = _split(db, reqs)
            result[phase] = {k: {"p50": pct(v, 50), "p95": pct(v, 95)} for k, v in parts.items()}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.model} on {args.device}, backlog {args.backlog}: ms p50 / p95")
    print(f"{'part':<10}{'idle':>18}{'under backlog':>18}")
    for k in ("total", "queued", "worker", "rest"):
        i, b = result["idle"][k], result["backlog"][k]
        print(f"{k:<10}{i['p50']:>9.1f}/{i['p95']:>7.1f}{b['p50']:>10.1f}/{b['p95']:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
