"""The HTTP load generator every serve benchmark uses: N closed-loop aiohttp clients.

``httpx.AsyncClient`` is no load generator: against a hello-world endpoint it fell from ~690
requests/s at 1 client to ~120/s at 64 on the 2-core VM, where aiohttp held 1,700-2,500/s on
the same endpoint. So every figure here comes through aiohttp, one connection per client
(keep-alive), and ``check_generator`` measures the generator itself against a bare endpoint in
the same run, so a table shows when the generator, not the server, is the ceiling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@dataclass
class Load:
    clients: int
    seconds: float
    done: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def per_s(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float]:
        lat = self.latencies_ms
        return {
            "per_s": self.per_s,
            "p50_ms": pct(lat, 50),
            "p95_ms": pct(lat, 95),
            "p99_ms": pct(lat, 99),
            "errors": float(self.errors),
        }


Check = Callable[[int, Any], bool]  # (status, parsed JSON body) -> the request succeeded


def _ok(status: int, body: Any) -> bool:
    return status == 200


async def closed_loop(
    url: str,
    body: Any,
    *,
    clients: int,
    seconds: float,
    warmup_s: float = 1.0,
    headers: dict[str, str] | None = None,
    check: Check = _ok,
    items_per_request: int = 1,
) -> Load:
    """``clients`` clients, each POSTing ``body`` to ``url`` and waiting for the answer before
    the next. What counts is every answer that arrives inside the window (``warmup_s`` after
    the start, for ``seconds``), whenever its request was sent: counting only requests both
    sent and answered inside it would leave out a latency's worth of answers at its start and
    understate the throughput of a server whose answers take a second by a fifth of a
    5-second window. Bounded in time: clients stop sending at the window's end, and a
    request still open then is abandoned after 60 s more."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60 + seconds + warmup_s)
    load = Load(clients, seconds)
    start = time.perf_counter() + warmup_s
    stop = start + seconds
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=headers or {}) as session:  # fmt: skip

        async def client() -> None:
            while (now := time.perf_counter()) < stop:
                t0 = now
                try:
                    async with session.post(url, json=body) as r:
                        payload = await r.json(content_type=None)
                        good = check(r.status, payload)
                        if not good and not load.first_error:
                            load.first_error = f"{r.status} {str(payload)[:200]}"
                except (TimeoutError, aiohttp.ClientError) as e:
                    good = False
                    if not load.first_error:
                        load.first_error = repr(e)[:200]
                t1 = time.perf_counter()
                if start <= t1 <= stop:
                    if good:
                        load.done += items_per_request
                        load.latencies_ms.append((t1 - t0) * 1000)
                    else:
                        load.errors += 1
                if not good:
                    await asyncio.sleep(0.05)  # a failing server is not hammered

        await asyncio.gather(*(client() for _ in range(clients)))
    return load


def run_load(url: str, body: Any, **kw: Any) -> Load:
    return asyncio.run(closed_loop(url, body, **kw))
