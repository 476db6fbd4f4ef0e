"""The API's limits: request body size (413) and the per-tenant queue limit (429 with
Retry-After), each with the standard error body and nothing written. In-process through the
ASGI app, but for the body size, which is checked on a real server on loopback: a chunked body
arrives there in pieces, as it does from a client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.testclient import TestClient

from gpufleet.api.app import ApiContext, DeployedModel, create_app
from gpufleet.api.keys import KeyStore
from gpufleet.models import Batching, ModelInfo
from gpufleet.queue import Limits, TaskQueue
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from tests.api.conftest import _free_socket

MAX_BODY = 4096

Small = tuple[Any, TaskQueue, dict[str, str]]


def _small_app(tmp_path: Path) -> tuple[FastAPI, TaskQueue, dict[str, str]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    queue = TaskQueue(
        engine, LocalBlobStore(tmp_path / "blobs"), limits=Limits(max_queued_per_tenant=3)
    )
    keys = KeyStore(engine)
    _, key_a = keys.create("acme")
    _, key_b = keys.create("globex")
    app = create_app(
        ApiContext(
            queue=queue,
            models=[DeployedModel(ModelInfo("m", "1"), Batching(1, 0))],
            keys=keys,
            max_body_bytes=MAX_BODY,
        )
    )
    return app, queue, {"a": key_a, "b": key_b}


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Small]:
    """The app in-process: ``TestClient`` (an httpx client) at ``http://testserver``."""
    app, queue, keys = _small_app(tmp_path)
    with TestClient(app) as client:
        yield client, queue, keys
    queue.close()


@pytest.fixture
def small_live(tmp_path: Path) -> Iterator[Small]:
    """The same app under uvicorn on a free loopback port, with an httpx client to it."""
    app, queue, keys = _small_app(tmp_path)
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as client:
            yield client, queue, keys
    finally:
        server.should_exit = True
        thread.join(10)
        queue.close()


def _post(client: Any, key: str, **kw: Any) -> httpx.Response:
    response: httpx.Response = client.post(
        "/v1/tasks", headers={"Authorization": f"Bearer {key}"}, **kw
    )
    return response


def test_a_body_over_the_limit_is_refused_with_413(small_live: Small) -> None:
    client, queue, keys = small_live
    r = _post(client, keys["a"], json={"model": "m", "input": "x" * (MAX_BODY * 2)})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert "over the limit of 4 KiB (4,096 bytes)" in r.json()["error"]["message"]
    # Without a Content-Length (chunked), the limit holds while the body streams in.
    chunks = (b'{"model": "m", "input": "' + b"x" * 1000 for _ in range(10))
    r = _post(client, keys["a"], content=chunks)
    assert r.status_code == 413
    assert queue.list_tasks().items == []


@pytest.mark.parametrize("path", ["/v1/tasks", "/v1/models/m/infer", "/v1/tasks/batch"])
def test_a_body_that_is_not_json_says_so(small: Small, path: str) -> None:
    client, queue, keys = small
    r = client.post(path, headers={"Authorization": f"Bearer {keys['a']}",
                    "Content-Type": "application/json"}, content=b'{"model": "m",, }')  # fmt: skip
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input"
    assert err["message"].startswith("body: the body is not valid JSON: "), err
    assert "decode error" not in err["message"]
    assert queue.list_tasks().items == []


def test_a_tenant_over_its_queue_limit_gets_429_with_retry_after(small: Small) -> None:
    client, queue, keys = small
    for _ in range(3):
        assert _post(client, keys["a"], json={"model": "m", "input": 1}).status_code == 202
    r = _post(client, keys["a"], json={"model": "m", "input": 1})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "quota_exceeded"
    assert int(r.headers["retry-after"]) > 0
    assert _post(client, keys["b"], json={"model": "m", "input": 1}).status_code == 202
    assert len(queue.list_tasks(tenant="acme").items) == 3


def test_validation_errors_list_every_field(small: Small) -> None:
    client, _, keys = small
    r = _post(client, keys["a"], json={"model": "m", "input": 1, "priority": 1000, "lane": "x"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_input"
    fields = {f["field"] for f in err["details"]["fields"]}
    assert fields == {"body.priority", "body.lane"}
