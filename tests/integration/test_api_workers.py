"""``gpufleet serve --api-workers N``: N API processes on one port and one queue, each with its
own group commit and its own watcher; readiness published by serve; one that dies comes back;
SIGTERM stops them all and drains the workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gpufleet.gpu.ledger import process_children
from tests.integration.serve_helpers import Serve, serving

pytestmark = pytest.mark.slow

ECHO = """
from gpufleet.models import Batching, ModelInfo


class Echo:
    def __init__(self, model_dir=None):
        self.info = ModelInfo("echo", "1", example_input={"n": 1})
        self.batching = Batching(16, 5)

    def load(self, device):
        pass

    def warmup(self):
        pass

    def predict(self, inputs):
        return [{"echo": x} for x in inputs]
"""


def _echo_model(root: Path) -> Path:
    d = root / "echo-model"
    d.mkdir(parents=True)
    (d / "runner.py").write_text(ECHO)
    (d / "model.yaml").write_text(
        "model:\n  name: echo\n  version: '1'\n  format: python\n"
        "  runtime: 'python:runner.py:Echo'\n  resources:\n    gpu: {mode: none}\n"
    )
    return d


def api_processes(serve: Serve) -> list[int]:
    assert serve.proc is not None
    kids = process_children().get(serve.proc.pid, [])
    out = []
    for pid in kids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gpufleet.api.process" in cmd:
            out.append(pid)
    return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    model = _echo_model(tmp_path)
    with serving(tmp_path / "data", "--model", str(model), "--api-workers", "2") as s:
        yield s


async def _many(serve: Serve, n: int, clients: int) -> list[dict[str, object]]:
    headers = {"Authorization": f"Bearer {serve.key}"}
    out: list[dict[str, object]] = []
    async with aiohttp.ClientSession(headers=headers) as s:

        async def client(k: int) -> None:
            for i in range(n // clients):
                async with s.post(f"{serve.url}/v1/models/echo/infer?wait=30",
                                  json={"input": {"k": k, "i": i}}) as r:  # fmt: skip
                    out.append(await r.json())

        await asyncio.gather(*(client(k) for k in range(clients)))
    return out


def test_two_api_processes_serve_one_queue(served: Serve) -> None:
    assert len(api_processes(served)) == 2
    assert "2 API processes" in served.output()
    with served.client() as c:
        health = c.get("/healthz").json()
        assert health["checks"]["workers:echo"] == "1/1 ready"
        [model] = c.get("/v1/models").json()["models"]
        assert model["workers"] == {"ready": 1, "total": 1}
    results = asyncio.run(_many(served, 200, 20))
    assert len(results) == 200
    assert all(r["status"] == "succeeded" for r in results)
    assert sorted((r["result"]["echo"]["k"], r["result"]["echo"]["i"]) for r in results) == sorted(  # type: ignore[index]
        (k, i) for k in range(20) for i in range(10)
    )


def test_a_killed_api_process_is_replaced(served: Serve) -> None:
    first = api_processes(served)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = api_processes(served)
        if len(now) == 2 and first[0] not in now:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no new API process: {api_processes(served)}")
    results = asyncio.run(_many(served, 40, 4))
    assert all(r["status"] == "succeeded" for r in results)


def test_sigterm_stops_every_api_process_and_the_workers(served: Serve) -> None:
    procs = api_processes(served)
    assert served.proc is not None
    kids = process_children().get(served.proc.pid, [])
    assert served.stop(signal.SIGTERM) == 0
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes()
    assert procs


def test_a_busy_port_is_one_error_line(served: Serve, tmp_path: Path) -> None:
    model = _echo_model(tmp_path / "other")
    other = Serve(tmp_path / "data2", "--model", str(model), "--api-workers", "2",
                  "--port", str(served.port))  # fmt: skip
    # The helper's own --port comes first; the later one (the busy port) wins.
    with pytest.raises(RuntimeError, match="cannot listen on"):
        other.start(timeout=60)
    assert "Traceback" not in other.output()
    assert "invalid_input: cannot listen on" in other.output()
