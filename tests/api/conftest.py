"""``live_api``: the real app under uvicorn on a free loopback port, with a real worker.

One server per test module (module scope, so module-scoped fixtures such as schemathesis's can
use it). It deploys three models on a SQLite queue in a temp dir:

* ``echo``: served by a real ``Worker`` thread running ``Echo`` (below);
* ``idle``: no worker, so its tasks stay queued (cancel, ``task_not_finished``, timeouts);
* ``manual``: no worker either; a test claims and completes its tasks through ``queue`` to
  step a task through its states at its own pace.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from gpufleet.api.app import ApiContext, DeployedModel, create_app
from gpufleet.models import Batching, ItemError, ModelInfo
from gpufleet.queue import TaskQueue
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from gpufleet.worker import Worker, WorkerConfig

# A 1x1 transparent PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
# What Echo takes, as its published schema (checked at submit): the object form's keys, or
# any other JSON value (echoed back as it is).
INPUT_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "fail": {"type": "string"},
                "sleep_s": {"type": "number", "minimum": 0},
                "png": {"type": "boolean"},
            },
        },
        {"not": {"type": "object"}},
    ]
}


class Echo:
    """A real (tiny) model. ``{"text": T}`` gives ``{"echo": T}``; ``{"fail": M}`` fails that
    item (``bad_input``); ``{"png": true}`` gives ``{"png_base64": ...}`` of a 1x1 PNG;
    ``{"sleep_s": S}`` holds the batch for S seconds first."""

    def __init__(self) -> None:
        self.info = ModelInfo("echo", "1", input_schema=INPUT_SCHEMA, example_input={"text": "hi"})
        self.batching = Batching(4, 0)

    def load(self, device: str) -> None:
        pass

    def warmup(self) -> None:
        pass

    def predict(self, inputs: list[Any]) -> list[Any]:
        out: list[Any] = []
        for x in inputs:
            if not isinstance(x, dict):
                out.append({"echo": x})
                continue
            if "sleep_s" in x:
                time.sleep(float(x["sleep_s"]))
            if "fail" in x:
                out.append(ItemError("bad_input", str(x["fail"])))
            elif x.get("png"):
                out.append({"png_base64": base64.b64encode(PNG).decode()})
            else:
                out.append({"echo": x.get("text")})
        return out


@dataclass
class LiveApi:
    url: str
    queue: TaskQueue
    data_dir: Path


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    data_dir = tmp_path_factory.mktemp("live_api")
    engine = create_engine(f"sqlite:///{data_dir / 'gpufleet.db'}")
    upgrade(engine)
    queue = TaskQueue(engine, LocalBlobStore(data_dir / "blobs"), lease_s=30)
    echo = Echo()
    models = [
        DeployedModel(echo.info, echo.batching),
        DeployedModel(ModelInfo("idle", "1", example_input={"text": "x"}), Batching(1, 0)),
        DeployedModel(ModelInfo("manual", "1", example_input={"text": "x"}), Batching(1, 0)),
    ]
    app = create_app(
        ApiContext(queue=queue, models=models, insecure_no_auth=True, watch_poll_s=0.1)
    )

    worker_ready = threading.Event()
    worker_stop = threading.Event()
    worker = Worker(
        queue, echo, WorkerConfig("echo", "1", "live-api-w1", idle_poll_s=0.2),
        on_ready=worker_ready.set,
    )  # fmt: skip
    worker_thread = threading.Thread(target=worker.run, args=(worker_stop,), daemon=True)
    worker_thread.start()
    assert worker_ready.wait(10), "the echo worker did not start"

    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    server_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    server_thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert server_thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield LiveApi(url=f"http://127.0.0.1:{port}", queue=queue, data_dir=data_dir)
    finally:
        server.should_exit = True
        server_thread.join(10)
        worker_stop.set()
        worker_thread.join(20)
        sock.close()
        queue.close()
        engine.dispose()
