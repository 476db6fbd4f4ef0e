"""Every route's error cases, in-process through the ASGI app (Starlette's ``TestClient``): the
status, the stable code and the message of each refusal, and that a refusal writes nothing.
A last test lists the app's routes and fails for one that no case reaches. A real uvicorn is
left to the end-to-end tests (``live_api``, ``tests/integration``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match, Mount, Route
from starlette.testclient import TestClient

from gpufleet.api.app import ApiContext, DeployedModel, create_app
from gpufleet.api.fastpath import InferFastPath
from gpufleet.api.keys import KeyStore
from gpufleet.models import Batching, ModelInfo
from gpufleet.queue import TaskQueue, TaskSpec
from gpufleet.store import LocalBlobStore, create_engine, upgrade

MAX_BODY = 64 * 1024  # room for a bulk of 1,001 small tasks
SCHEMA = {"type": "object", "properties": {"steps": {"type": "integer", "maximum": 100}}}
UNAUTHORIZED = "send an API key as 'Authorization: Bearer KEY' (gpufleet keys create)"
BAD_KEY = "the API key is not valid (unknown, malformed or revoked)"
TOO_LARGE = (
    "request body is over the limit of 64 KiB (65,536 bytes) (an input may be up to "
    "GPUFLEET_MAX_INPUT_BYTES as JSON, plus 1 MiB for the rest)"
)
NO_MODEL = "model 'nope' is not deployed here; deployed: m"
NOT_ALLOWED = "Method Not Allowed"
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Case:
    """One refused request. ``path`` may name the fixture's tasks: ``{queued}`` (the caller's,
    still queued), ``{globex}`` (another tenant's). ``key``: ``acme`` (a valid key), ``none``
    (no Authorization header), ``bad`` (a well-formed key that does not exist), ``basic``
    (the wrong scheme)."""

    method: str
    path: str
    status: int
    code: str
    message: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)
    key: str = "acme"

    def __str__(self) -> str:
        params = "&".join(f"{k}={v}" for k, v in self.params.items())
        query = f"?{params}" if params else ""
        return f"{self.method} {self.path}{query} {self.status} {self.code}"


CASES = [
    # POST /v1/tasks
    Case("POST", "/v1/tasks", 401, "unauthorized", UNAUTHORIZED,
         json={"model": "m", "input": {}}, key="none"),
    Case("POST", "/v1/tasks", 401, "unauthorized", UNAUTHORIZED,
         json={"model": "m", "input": {}}, key="basic"),
    Case("POST", "/v1/tasks", 401, "unauthorized", BAD_KEY,
         json={"model": "m", "input": {}}, key="bad"),
    Case("POST", "/v1/tasks", 422, "invalid_input",
         "body: the body is not valid JSON: Expecting value (at character 10)",
         content=b'{"model": '),
    Case("POST", "/v1/tasks", 422, "invalid_input", "body.model: Field required",
         json={"input": {}}),
    Case("POST", "/v1/tasks", 422, "invalid_input",
         "body.priority: Input should be a valid integer, unable to parse string as an integer",
         json={"model": "m", "input": {}, "priority": "high!"}),
    Case("POST", "/v1/tasks", 422, "invalid_input",
         "body.lane: Input should be 'interactive' or 'batch'",
         json={"model": "m", "input": {}, "lane": "fast"}),
    Case("POST", "/v1/tasks", 422, "invalid_input", "body.extra: Extra inputs are not permitted",
         json={"model": "m", "input": {}, "extra": 1}),
    Case("POST", "/v1/tasks", 422, "invalid_input",
         "input.steps: 200 is greater than the maximum of 100 (the input_schema of model m, "
         "in GET /v1/models)",
         json={"model": "m", "input": {"steps": 200}}),
    Case("POST", "/v1/tasks", 404, "not_found", NO_MODEL, json={"model": "nope", "input": {}}),
    Case("POST", "/v1/tasks", 404, "not_found", "model m has no version '9' deployed; deployed: 1",
         json={"model": "m", "version": "9", "input": {}}),
    Case("POST", "/v1/tasks", 409, "idempotency_conflict",
         "idempotency key 'order-17' was already used for a different request (task {keyed}); "
         "use a new key for a new request",
         json={"model": "m", "input": {"steps": 2}, "idempotency_key": "order-17"}),
    Case("POST", "/v1/tasks", 413, "payload_too_large", TOO_LARGE,
         json={"model": "m", "input": "x" * MAX_BODY}),
    Case("PUT", "/v1/tasks", 405, "method_not_allowed", NOT_ALLOWED, json={}),
    # POST /v1/tasks/batch
    Case("POST", "/v1/tasks/batch", 401, "unauthorized", UNAUTHORIZED,
         json={"tasks": [{"model": "m", "input": {}}]}, key="none"),
    Case("POST", "/v1/tasks/batch", 422, "invalid_input",
         "body: the body is not valid JSON: expected ident at line 1 column 2", content=b"nope"),
    Case("POST", "/v1/tasks/batch", 422, "invalid_input",
         "body.tasks: Input should be a valid array", json={"tasks": "x"}),
    Case("POST", "/v1/tasks/batch", 422, "invalid_input",
         "body.tasks: List should have at least 1 item after validation, not 0",
         json={"tasks": []}),
    Case("POST", "/v1/tasks/batch", 422, "invalid_input",
         "body.tasks: List should have at most 1000 items after validation, not 1001",
         json={"tasks": [{"model": "m", "input": 0}] * 1001}),
    Case("POST", "/v1/tasks/batch", 422, "invalid_input",
         "body.tasks.0.priority: Input should be less than or equal to 100",
         json={"tasks": [{"model": "m", "input": {}, "priority": 500}]}),
    Case("POST", "/v1/tasks/batch", 413, "payload_too_large", TOO_LARGE,
         json={"tasks": [{"model": "m", "input": "x" * MAX_BODY}]}),
    Case("GET", "/v1/tasks/batch", 404, "not_found", "task batch not found"),
    # GET /v1/tasks
    Case("GET", "/v1/tasks", 401, "unauthorized", UNAUTHORIZED, key="none"),
    Case("GET", "/v1/tasks", 422, "invalid_input",
         "query.status: String should match pattern "
         "'^(queued|running|succeeded|failed|cancelled)$'", params={"status": "done"}),
    Case("GET", "/v1/tasks", 422, "invalid_input",
         "query.limit: Input should be greater than or equal to 1", params={"limit": "0"}),
    Case("GET", "/v1/tasks", 422, "invalid_input",
         "query.limit: Input should be less than or equal to 1000", params={"limit": "1001"}),
    Case("GET", "/v1/tasks", 422, "invalid_input",
         "query.limit: Input should be a valid integer, unable to parse string as an integer",
         params={"limit": "many"}),
    Case("GET", "/v1/tasks", 422, "invalid_input",
         "query.model: String should have at most 128 characters", params={"model": "m" * 129}),
    Case("GET", "/v1/tasks", 422, "invalid_input",
         "query.cursor: String should have at most 64 characters", params={"cursor": "c" * 65}),
    # POST /v1/tasks/lookup
    Case("POST", "/v1/tasks/lookup", 401, "unauthorized", BAD_KEY, json={"ids": ["x"]},
         key="bad"),
    Case("POST", "/v1/tasks/lookup", 422, "invalid_input", "body.ids: Input should be a valid list",
         json={"ids": "x"}),
    Case("POST", "/v1/tasks/lookup", 422, "invalid_input",
         "body.ids: List should have at least 1 item after validation, not 0", json={"ids": []}),
    Case("POST", "/v1/tasks/lookup", 413, "payload_too_large", TOO_LARGE,
         json={"ids": ["x" * MAX_BODY]}),
    # GET and DELETE /v1/tasks/{task_id}
    Case("GET", "/v1/tasks/{queued}", 401, "unauthorized", UNAUTHORIZED, key="none"),
    Case("GET", "/v1/tasks/nope", 404, "not_found", "task nope not found"),
    Case("GET", "/v1/tasks/{globex}", 404, "not_found", "task {globex} not found"),
    Case("DELETE", "/v1/tasks/{queued}", 401, "unauthorized", BAD_KEY, key="bad"),
    Case("DELETE", "/v1/tasks/nope", 404, "not_found", "task nope not found"),
    Case("DELETE", "/v1/tasks/{globex}", 404, "not_found", "task {globex} not found"),
    Case("PATCH", "/v1/tasks/{queued}", 405, "method_not_allowed", NOT_ALLOWED, json={}),
    # GET /v1/tasks/{task_id}/result
    Case("GET", "/v1/tasks/{queued}/result", 401, "unauthorized", UNAUTHORIZED, key="none"),
    Case("GET", "/v1/tasks/nope/result", 404, "not_found", "task nope not found"),
    Case("GET", "/v1/tasks/{globex}/result", 404, "not_found", "task {globex} not found"),
    Case("GET", "/v1/tasks/{queued}/result", 409, "task_not_finished",
         "task {queued} is queued; its result is not ready yet"),
    Case("DELETE", "/v1/tasks/{queued}/result", 405, "method_not_allowed", NOT_ALLOWED),
    # GET /v1/tasks/{task_id}/events
    Case("GET", "/v1/tasks/{queued}/events", 401, "unauthorized", UNAUTHORIZED, key="none"),
    Case("GET", "/v1/tasks/nope/events", 404, "not_found", "task nope not found"),
    Case("GET", "/v1/tasks/{globex}/events", 404, "not_found", "task {globex} not found"),
    Case("POST", "/v1/tasks/{queued}/events", 405, "method_not_allowed", NOT_ALLOWED),
    # POST /v1/models/{name}/infer
    Case("POST", "/v1/models/m/infer", 401, "unauthorized", UNAUTHORIZED, json={"input": {}},
         key="none"),
    Case("POST", "/v1/models/nope/infer", 404, "not_found", NO_MODEL, json={"input": {}}),
    Case("POST", "/v1/models/m/infer", 404, "not_found",
         "model m has no version '9' deployed; deployed: 1",
         json={"input": {}, "version": "9"}),
    Case("POST", "/v1/models/m/infer", 422, "invalid_input",
         "body: the body is not valid JSON: EOF while parsing a value at line 1 column 3",
         content=b"[1,"),
    Case("POST", "/v1/models/m/infer", 422, "invalid_input",
         "body.input: Field required (and 1 more)", json={"inputs": {}}),
    Case("POST", "/v1/models/m/infer", 422, "invalid_input",
         "input: 1 is not of type 'object' (the input_schema of model m, in GET /v1/models)",
         json={"input": 1}),
    Case("POST", "/v1/models/m/infer", 422, "invalid_input",
         "query.wait: Input should be greater than or equal to 0", json={"input": {}},
         params={"wait": "-1"}),
    Case("POST", "/v1/models/m/infer", 422, "invalid_input",
         "query.wait: Input should be less than or equal to 60", json={"input": {}},
         params={"wait": "61"}),
    Case("POST", "/v1/models/m/infer", 422, "invalid_input",
         "query.wait: Input should be a valid number, unable to parse string as a number",
         json={"input": {}}, params={"wait": "soon"}),
    Case("POST", "/v1/models/m/infer", 413, "payload_too_large", TOO_LARGE,
         json={"input": "x" * MAX_BODY}),
    Case("GET", "/v1/models/m/infer", 405, "method_not_allowed", NOT_ALLOWED),
    # GET /v1/models
    Case("GET", "/v1/models", 401, "unauthorized", UNAUTHORIZED, key="none"),
    Case("GET", "/v1/models", 401, "unauthorized", BAD_KEY, key="bad"),
    Case("POST", "/v1/models", 405, "method_not_allowed", NOT_ALLOWED, json={}),
    # GET /v1/queue
    Case("GET", "/v1/queue", 401, "unauthorized", UNAUTHORIZED, key="none"),
    Case("GET", "/v1/queue", 401, "unauthorized", BAD_KEY, key="bad"),
    Case("DELETE", "/v1/queue", 405, "method_not_allowed", NOT_ALLOWED),
    # Health, metrics and docs read nothing from a request: a wrong method is their error.
    Case("POST", "/livez", 405, "method_not_allowed", NOT_ALLOWED),
    Case("POST", "/healthz", 405, "method_not_allowed", NOT_ALLOWED),
    Case("POST", "/metrics", 405, "method_not_allowed", NOT_ALLOWED),
    Case("DELETE", "/metrics", 405, "method_not_allowed", NOT_ALLOWED),
    Case("POST", "/docs", 405, "method_not_allowed", NOT_ALLOWED),
    Case("POST", "/openapi.json", 405, "method_not_allowed", NOT_ALLOWED),
    Case("GET", "/docs/static/nope.js", 404, "not_found", "Not Found"),
    Case("POST", "/docs/static/swagger-ui.css", 405, "method_not_allowed", NOT_ALLOWED),
    # No route at all.
    Case("GET", "/v2/tasks", 404, "not_found", "Not Found"),
    Case("GET", "/metrics/extra", 404, "not_found", "Not Found"),
]  # fmt: skip


@dataclass
class Routes:
    app: FastAPI
    client: TestClient
    queue: TaskQueue
    ids: dict[str, str]
    keys: dict[str, str]
    plain: TestClient  # the same app without InferFastPath: infer through FastAPI's route


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routes]:
    data_dir: Path = tmp_path_factory.mktemp("routes")
    engine = create_engine(f"sqlite:///{data_dir / 'gpufleet.db'}")
    upgrade(engine)
    queue = TaskQueue(engine, LocalBlobStore(data_dir / "blobs"))
    store = KeyStore(engine)
    _, acme = store.create("acme")
    store.create("globex")
    keys = {"acme": f"Bearer {acme}", "bad": f"Bearer gfk_{'0' * 12}_{'A' * 43}",
            "basic": f"Basic {acme}"}  # fmt: skip
    ids = {
        "queued": queue.submit(TaskSpec("m", "1", {"steps": 1}, tenant="acme")).task.id,
        "globex": queue.submit(TaskSpec("m", "1", {"steps": 1}, tenant="globex")).task.id,
        "keyed": queue.submit(
            TaskSpec("m", "1", {"steps": 1}, tenant="acme", idempotency_key="order-17")
        ).task.id,
    }
    ctx = ApiContext(
        queue=queue,
        models=[DeployedModel(ModelInfo("m", "1", input_schema=SCHEMA), Batching(1, 0))],
        keys=store,
        max_body_bytes=MAX_BODY,
        workers=lambda name: (0, 1),  # one local worker, not ready: /healthz is 503
    )
    app = create_app(ctx)
    plain = create_app(ctx)
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not InferFastPath]
    with (
        TestClient(app, raise_server_exceptions=False) as client,
        TestClient(plain, raise_server_exceptions=False) as plain_client,
    ):
        yield Routes(app, client, queue, ids, keys, plain_client)
    queue.close()
    engine.dispose()


def _send(routes: Routes, case: Case, client: TestClient | None = None) -> Any:
    headers = dict(JSON)
    if case.key != "none":
        headers["Authorization"] = routes.keys[case.key]
    return (client or routes.client).request(
        case.method,
        case.path.format(**routes.ids),
        params=case.params,
        json=case.json,
        content=case.content,
        headers=headers,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_refused_request_gets_its_status_code_and_message(routes: Routes, case: Case) -> None:
    before = routes.queue.list_tasks(limit=1000).items
    r = _send(routes, case)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    [error] = r.json().values()
    assert error["code"] == case.code
    assert error["message"] == case.message.format(**routes.ids)
    assert routes.queue.list_tasks(limit=1000).items == before  # nothing written


INFER_CASES = [c for c in CASES if c.path.endswith("/infer")] + [
    Case("PUT", "/v1/models/m/infer", 405, "method_not_allowed", NOT_ALLOWED, json={}),
    Case("POST", "/v1/models/m/x/infer", 404, "not_found", "Not Found", json={"input": {}}),
]  # fmt: skip


@pytest.mark.parametrize("case", INFER_CASES, ids=str)
def test_infer_refuses_alike_through_the_fast_path_and_fastapi(routes: Routes, case: Case) -> None:
    """``InferFastPath`` answers infer before FastAPI does; FastAPI's route is what it
    replaces. Both refuse each bad request with the same status, headers and body."""
    fast, plain = _send(routes, case), _send(routes, case, routes.plain)
    assert (fast.status_code, fast.json()) == (plain.status_code, plain.json())
    assert fast.status_code == case.status
    assert fast.headers.get("content-type") == plain.headers.get("content-type")


def test_infer_answers_alike_through_the_fast_path_and_fastapi(routes: Routes) -> None:
    """Accepted: 202 with the task's id and Location when ``wait`` runs out (no worker
    here), and the request counted under its route for /metrics."""
    auth = {"Authorization": routes.keys["acme"]}
    answers = []
    for client in (routes.client, routes.plain):
        r = client.post("/v1/models/m/infer?wait=0", headers=auth, json={"input": {"steps": 2}})
        assert r.status_code == 202, r.text
        body = r.json()
        assert r.headers["location"] == f"/v1/tasks/{body['id']}"
        assert routes.queue.get(body["id"]).input == {"steps": 2}
        answers.append({k: v for k, v in body.items() if k != "id"})
        routes.queue.cancel(body["id"])
    assert answers[0] == answers[1] == {
        "status": "queued", "model": "m", "version": "1", "created": True,
    }  # fmt: skip
    text = routes.client.get("/metrics").text
    assert 'route="/v1/models/{name}/infer",status="202"' in text.replace('method="POST",', "")


def test_a_bulk_refuses_a_bad_item_alone(routes: Routes) -> None:
    r = routes.client.post("/v1/tasks/batch", headers={"Authorization": routes.keys["acme"]},
                           json={"tasks": [{"model": "nope", "input": {}},
                                           {"model": "m", "input": {"steps": 300}}]})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 0 and r.json()["refused"] == 2
    first, second = (item["error"] for item in r.json()["tasks"])
    assert (first["code"], first["message"]) == ("not_found", NO_MODEL)
    assert second["code"] == "invalid_input"
    assert second["message"].startswith("input.steps: 300 is greater than the maximum of 100")


def test_healthz_is_503_while_a_model_has_no_ready_worker(routes: Routes) -> None:
    r = routes.client.get("/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable",
                        "checks": {"database": "ok", "workers:m": "0/1 ready"}}  # fmt: skip


def _reads_nothing(route: Any) -> bool:
    """True for a route that takes no parameters, body or key (health, metrics, docs): a
    wrong method is the only way to get it wrong."""
    if isinstance(route, APIRoute):
        d = route.dependant
        return not (d.path_params or d.query_params or d.header_params or d.cookie_params
                    or d.body_params or d.dependencies)  # fmt: skip
    return isinstance(route, Route)  # FastAPI's own /openapi.json


def test_every_route_has_an_error_case(routes: Routes) -> None:
    """A route added to the app fails here until ``CASES`` refuses a request to it. A case
    reaches a route when the route would serve it (``Match.FULL``); for a route that reads
    nothing from the request, a case with the wrong method (``Match.PARTIAL``) is enough."""
    missing = []
    for route in routes.app.routes:
        assert isinstance(route, Route | Mount), route
        matches = set()
        for case in CASES:
            scope = {"type": "http", "method": case.method, "root_path": "",
                     "path": case.path.format(**routes.ids)}  # fmt: skip
            matches.add(route.matches(scope)[0])
        needed = {Match.FULL, Match.PARTIAL} if _reads_nothing(route) else {Match.FULL}
        if not matches & needed:
            missing.append(getattr(route, "path", route))
    assert missing == []
    # The rule above is not vacuous: the routes that take input are not the reads-nothing kind.
    takes_input = {r.path for r in routes.app.routes if not _reads_nothing(r)}
    assert {"/v1/tasks", "/v1/tasks/{task_id}", "/v1/models/{name}/infer"} <= takes_input
    assert "/docs/static" in takes_input
