"""The FastAPI application: ``create_app(ApiContext(...))``.

The API holds no task state: every request goes through the ``TaskService`` (submit, wait,
read) to the queue, so any number of API processes can serve one database. What it keeps in
memory is only who is waiting for what (the service's watcher) and the deployed models'
descriptions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet import __version__
from gpufleet.api.auth import Principal, authenticator, header_authenticator
from gpufleet.api.errors import BodySizeLimit, install_error_handlers
from gpufleet.api.fastpath import InferFastPath, wait_parser
from gpufleet.api.schemas import (
    BatchingView,
    BulkSubmitRequest,
    BulkSubmitted,
    ErrorBody,
    Health,
    InferRequest,
    LookupRequest,
    ModelList,
    ModelView,
    QueueView,
    ResultView,
    SubmitRequest,
    Submitted,
    TaskList,
    TaskOptions,
    TaskView,
    WorkerCounts,
    depth_views,
    task_view,
)
from gpufleet.errors import GpufleetError, NotFound, TaskNotFinished
from gpufleet.models.input_check import input_check
from gpufleet.models.runtime import Batching, ModelInfo
from gpufleet.monitor import metrics
from gpufleet.queue import Submission, Task, TaskQueue, TaskSpec, TaskStatus
from gpufleet.queue.service import TaskService

log = logging.getLogger(__name__)

MAX_WAIT_S = 60.0
DEFAULT_WAIT_S = 30.0
SSE_KEEPALIVE_S = 15.0
POSITION_POLL_S = 1.0


@dataclass(frozen=True)
class DeployedModel:
    info: ModelInfo
    batching: Batching


@dataclass
class ApiContext:
    queue: TaskQueue
    models: list[DeployedModel]
    keys: Any = None  # api.keys.KeyStore; None only with insecure_no_auth
    insecure_no_auth: bool = False
    max_body_bytes: int = 20 * 1024 * 1024
    # (model name) -> (ready, total) local workers; None when workers run elsewhere.
    workers: Callable[[str], tuple[int, int]] | None = None
    # (model name) -> workers that refused to load it and are not restarted (see the log).
    refused: Callable[[str], int] | None = None
    background: list[Callable[[threading.Event], None]] = field(default_factory=list)
    watch_poll_s: float = 0.5


async def _caller(request: Request) -> Principal:
    principal: Principal = await request.app.state.authenticate(request)
    return principal


Caller = Annotated[Principal, Depends(_caller)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def create_app(ctx: ApiContext) -> FastAPI:
    if ctx.keys is None and not ctx.insecure_no_auth:
        raise ValueError("an API needs a key store, or insecure_no_auth=True said explicitly")
    queue = ctx.queue
    checks = {m.info.name: input_check(m.info.name, m.info.input_schema) for m in ctx.models}
    service = TaskService(queue, watch_poll_s=ctx.watch_poll_s, input_checks=checks)
    models = {m.info.name: m for m in ctx.models}
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        threads = [threading.Thread(target=fn, args=(stop,), daemon=True) for fn in ctx.background]
        for th in threads:
            th.start()
        try:
            yield
        finally:
            stop.set()
            service.close()
            for th in threads:
                th.join(5)

    app = FastAPI(
        title="gpufleet",
        version=__version__,
        description="Asynchronous inference on shared GPUs: submit tasks, wait for results.",
        lifespan=lifespan,
        responses=_ERRORS,
        docs_url=None,  # served below from files in the package, not a CDN
        redoc_url=None,
    )
    _offline_docs(app)
    install_error_handlers(app)
    app.add_middleware(_CountRequests)
    app.add_middleware(BodySizeLimit, max_bytes=ctx.max_body_bytes)
    app.state.authenticate = authenticator(ctx.keys, insecure=ctx.insecure_no_auth)
    app.state.service = service

    # -- helpers -----------------------------------------------------------------------------

    def deployed(name: str, version: str | None) -> DeployedModel:
        m = models.get(name)
        if m is None:
            known = ", ".join(sorted(models)) or "none"
            raise NotFound(f"model {name!r:.80} is not deployed here; deployed: {known}",
                           model=name[:80])  # fmt: skip
        if version is not None and version != m.info.version:
            raise NotFound(
                f"model {name} has no version {version!r:.40} deployed; deployed: {m.info.version}",
                model=name,
                version=version[:40],
            )
        return m

    def spec(caller: Principal, name: str, opts: TaskOptions, value: Any) -> TaskSpec:
        m = deployed(name, opts.version)
        return TaskSpec(
            model=m.info.name,
            version=m.info.version,
            input=value,
            tenant=caller.tenant,
            lane=opts.lane,
            priority=opts.priority,
            idempotency_key=opts.idempotency_key,
            max_attempts=opts.max_attempts,
            webhook_url=opts.webhook_url,
        )

    def submitted(sub: Submission) -> Submitted:
        t = sub.task
        return Submitted(
            id=t.id, status=t.status.value, model=t.model, version=t.model_version,
            created=sub.created,
        )  # fmt: skip

    def visible(caller: Principal) -> str | None:
        return None if caller.admin else caller.tenant

    async def result_body(t: Task) -> dict[str, Any]:
        error = None
        if t.error is not None and t.status != TaskStatus.SUCCEEDED:
            error = {"code": t.error.code, "message": t.error.message}
        result = await service.result(t) if t.status == TaskStatus.SUCCEEDED else None
        return {"id": t.id, "status": t.status.value, "result": result, "error": error}

    # -- tasks -------------------------------------------------------------------------------

    @app.post("/v1/tasks", status_code=202, response_model=Submitted, tags=["tasks"])
    async def submit_task(body: SubmitRequest, caller: Caller, response: Response) -> Submitted:
        """Queue a task; poll it, stream its events, or get a webhook when it ends."""
        out = submitted(await service.submit(spec(caller, body.model, body, body.input)))
        response.headers["Location"] = f"/v1/tasks/{out.id}"
        return out

    @app.post(
        "/v1/tasks/batch",
        status_code=200,
        response_model=BulkSubmitted,
        tags=["tasks"],
        openapi_extra=_json_body(BulkSubmitRequest),
    )
    async def submit_tasks(request: Request, caller: Caller) -> Any:
        """Queue up to 1,000 tasks in one durable commit. One entry per task, in order: its
        id, or the error that refused it alone (the others are still accepted)."""
        # Parsed from the bytes by pydantic-core and answered as plain JSON: validating 1,000
        # items in Python on the way in and again on the way out was most of the route's CPU.
        body = await _parse_body(request, BulkSubmitRequest)
        specs: list[TaskSpec | GpufleetError] = []
        for item in body.tasks:
            try:
                specs.append(spec(caller, item.model, item, item.input))
            except GpufleetError as e:
                specs.append(e)
        good = [s for s in specs if isinstance(s, TaskSpec)]
        outcomes = iter(await service.submit_many(good) if good else [])
        items: list[dict[str, Any]] = []
        refused = 0
        for i, s in enumerate(specs):
            out = s if isinstance(s, GpufleetError) else next(outcomes)
            if isinstance(out, GpufleetError):
                refused += 1
                items.append({"index": i, "error": out.to_dict()})
                continue
            t = out.task
            items.append({
                "index": i, "id": t.id, "status": t.status.value, "model": t.model,
                "version": t.model_version, "created": out.created, "error": None,
            })  # fmt: skip
        return JSONResponse({"accepted": len(items) - refused, "refused": refused, "tasks": items})

    @app.get("/v1/tasks", response_model=TaskList, tags=["tasks"])
    def list_tasks(
        caller: Caller,
        status: Annotated[
            str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
        ] = None,
        model: Annotated[str | None, Query(max_length=128)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> TaskList:
        """Your tasks, newest first."""
        page = queue.list_tasks(
            tenant=visible(caller), status=status, model=model, limit=limit, cursor=cursor
        )
        return TaskList(tasks=[task_view(t) for t in page.items], next_cursor=page.next_cursor)

    @app.post("/v1/tasks/lookup", response_model=TaskList, tags=["tasks"])
    def lookup_tasks(body: LookupRequest, caller: Caller) -> TaskList:
        """Up to 1,000 tasks by id in one request (ids that do not exist, or are another
        tenant's, are left out): how a client follows a bulk submit."""
        tenant = visible(caller)
        found = queue.get_many(body.ids)
        ordered = [found[i] for i in dict.fromkeys(body.ids) if i in found]
        return TaskList(tasks=[task_view(t) for t in ordered if tenant in (None, t.tenant)])

    @app.get("/v1/tasks/{task_id}", response_model=TaskView, tags=["tasks"])
    def get_task(task_id: str, caller: Caller) -> TaskView:
        """A task; while it is queued, also its place in its lane (``queue_position``)."""
        t = queue.get(task_id, tenant=visible(caller))
        return task_view(t, queue.queue_position(t))

    @app.get("/v1/tasks/{task_id}/result", response_model=ResultView, tags=["tasks"])
    async def get_result(task_id: str, caller: Caller) -> ResultView:
        """The result of a succeeded task. 409 ``task_not_finished`` while it is queued or
        running; a failed or cancelled task's error otherwise."""
        t = await service.get(task_id, visible(caller))
        if not t.is_finished:
            raise TaskNotFinished(
                f"task {t.id} is {t.status.value}; its result is not ready yet",
                status=t.status.value,
            )
        return ResultView.model_validate(await result_body(t))

    @app.delete("/v1/tasks/{task_id}", response_model=TaskView, tags=["tasks"])
    def cancel_task(task_id: str, caller: Caller) -> TaskView:
        """Cancel: a queued task ends at once; a running one stops at its next batch."""
        return task_view(queue.cancel(task_id, tenant=visible(caller)))

    @app.get(
        "/v1/tasks/{task_id}/events",
        tags=["tasks"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def task_events(task_id: str, caller: Caller) -> StreamingResponse:
        """Server-sent events: one ``status`` event (a task object) now and at every change;
        the stream ends after the task ends."""
        task = await service.get(task_id, visible(caller))

        async def stream() -> AsyncIterator[str]:
            async with service.watch(task) as updates:
                current = await service.get(task.id)
                place = await service.queue_position(current)
                yield _sse("status", task_view(current, place).model_dump_json())
                quiet = 0.0
                while not current.is_finished:
                    # A queued task's place in its lane moves while the task itself does not
                    # change: look at it every POSITION_POLL_S and send it when it moved.
                    queued = current.status == TaskStatus.QUEUED
                    step = POSITION_POLL_S if queued else SSE_KEEPALIVE_S
                    try:
                        current = await asyncio.wait_for(updates.get(), step)
                    except TimeoutError:
                        quiet += step
                        moved = await service.queue_position(current) if queued else None
                        if moved is not None and moved != place:
                            place, quiet = moved, 0.0
                            yield _sse("status", task_view(current, place).model_dump_json())
                        elif quiet >= SSE_KEEPALIVE_S:
                            quiet = 0.0
                            yield ": keep-alive\n\n"
                        continue
                    quiet = 0.0
                    place = await service.queue_position(current)
                    yield _sse("status", task_view(current, place).model_dump_json())

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- models ------------------------------------------------------------------------------

    @app.post(
        "/v1/models/{name}/infer",
        tags=["models"],
        response_model=ResultView,
        responses={202: {"model": Submitted, "description": "not finished within wait"}},
        openapi_extra=_json_body(InferRequest),
    )
    async def infer(
        name: str,
        request: Request,
        caller: Caller,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = DEFAULT_WAIT_S,
    ) -> Any:
        """Submit and wait up to ``wait`` seconds: 200 with the outcome if the task ended, else
        202 with its id (poll it, or stream its events)."""
        # Answered by InferFastPath before FastAPI sees it; declared here for the OpenAPI
        # document, and for an app without the fast path.
        return await infer_response(caller, name, wait, await request.body())

    async def infer_response(caller: Principal, name: str, wait: float, raw: bytes) -> Response:
        # The body is parsed by pydantic-core straight from its bytes: FastAPI's body
        # parameter decodes the JSON in Python first and validates it field by field, a
        # fifth of this route's CPU at the API's ceiling.
        body = _validated(raw, InferRequest)
        sub, task = await service.run(spec(caller, name, body, body.input), wait)
        if not task.is_finished:
            out = submitted(sub).model_copy(update={"status": task.status.value})
            return JSONResponse(
                out.model_dump(mode="json"),
                status_code=202,
                headers={"Location": f"/v1/tasks/{task.id}"},
            )
        return JSONResponse(await result_body(task))

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    def list_models(caller: Caller) -> ModelList:
        """Deployed models: versions, workers, queue depth, input schema and a working example."""
        stats = queue.stats()
        out = []
        for m in ctx.models:
            depth: dict[str, int] = {}
            for row in stats.depth:
                if row.model == m.info.name:
                    key = f"{row.status.value}_{row.lane.value}"
                    depth[key] = depth.get(key, 0) + row.count
            workers = None
            if ctx.workers is not None:
                ready, total = ctx.workers(m.info.name)
                workers = WorkerCounts(ready=ready, total=total)
            out.append(
                ModelView(
                    name=m.info.name,
                    version=m.info.version,
                    description=m.info.description,
                    batching=BatchingView(
                        max_batch_size=m.batching.max_batch_size,
                        max_queue_delay_ms=m.batching.max_queue_delay_ms,
                    ),
                    workers=workers,
                    queue=depth,
                    input_schema=m.info.input_schema,
                    example_input=m.info.example_input,
                )
            )
        return ModelList(models=out)

    # -- queue -------------------------------------------------------------------------------

    @app.get("/v1/queue", response_model=QueueView, tags=["queue"])
    def queue_now(caller: Caller) -> QueueView:
        """Live tasks by model, lane and state, local workers by model, and the tasks this
        server's workers have ended so far: what ``gpufleet watch`` shows."""
        workers = None
        if ctx.workers is not None:
            workers = {}
            for m in ctx.models:
                ready, total = ctx.workers(m.info.name)
                workers[m.info.name] = WorkerCounts(ready=ready, total=total)
        return QueueView(
            depth=depth_views(queue.stats()), workers=workers, finished=metrics.finished_by_model()
        )

    # -- health and metrics ------------------------------------------------------------------

    @app.get("/livez", tags=["health"])
    def livez() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/healthz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    def healthz() -> Any:
        """Ready: the database answers and every deployed model has a ready worker."""
        checks: dict[str, str] = {}
        ok = True
        try:
            queue.stats()
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"unavailable: {type(e).__name__}"
            ok = False
        if ctx.workers is not None:
            for m in ctx.models:
                ready, total = ctx.workers(m.info.name)
                refused = ctx.refused(m.info.name) if ctx.refused is not None else 0
                checks[f"workers:{m.info.name}"] = f"{ready}/{total} ready" + (
                    f", {refused} refused to load it (not restarted; the reason is in the "
                    "serve log)"
                    if refused
                    else ""
                )
                ok = ok and ready > 0
        body = Health(status="ok" if ok else "unavailable", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    depth_registry = CollectorRegistry()
    depth_registry.register(_DepthCollector(queue))

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus() -> Response:
        """Prometheus text format: requests, tasks, latencies by stage, queue depth."""
        return Response(metrics.exposition(depth_registry), media_type="text/plain; version=0.0.4")

    # Outermost of our middleware: infer calls skip FastAPI's routing and the layers above.
    app.add_middleware(
        InferFastPath,
        handler=infer_response,
        authenticate=header_authenticator(ctx.keys, insecure=ctx.insecure_no_auth),
        parse_wait=wait_parser(MAX_WAIT_S, DEFAULT_WAIT_S),
        max_bytes=ctx.max_body_bytes,
    )
    return app


B = TypeVar("B", bound=BaseModel)


async def _parse_body(request: Request, model: type[B]) -> B:
    """``model`` from the request's JSON body, with FastAPI's 422 ``invalid_input`` shape for
    a body that does not fit it."""
    return _validated(await request.body(), model)


def _validated(raw: bytes, model: type[B]) -> B:
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]
        raise RequestValidationError(errors, body=raw) from None


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses ``model`` itself (``_parse_body``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


class _CountRequests:
    """Requests by method, route and status, for /metrics. Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` (``@app.middleware``) costs a task and a memory stream per request,
    a tenth of the API's CPU at its ceiling."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(scope["method"], path, str(status)).inc()


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


class _DepthCollector(Collector):
    """Queue depth read from the database at scrape time (the database is the truth; every
    API replica reports the same)."""

    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "gpufleet_queue_depth", "Live tasks by model, lane and state.",
            labels=["model", "lane", "status"],
        )  # fmt: skip
        oldest = GaugeMetricFamily(
            "gpufleet_queue_oldest_seconds", "Age of the oldest live task by model, lane, state.",
            labels=["model", "lane", "status"],
        )  # fmt: skip
        try:
            stats = self.queue.stats()
        except Exception as e:
            log.warning("queue depth unavailable for /metrics: %s", e)
            return
        for row in stats.depth:
            labels = [row.model, row.lane.value, row.status.value]
            depth.add_metric(labels, row.count)
            if row.oldest_age_s is not None:
                oldest.add_metric(labels, row.oldest_age_s)
        yield depth
        yield oldest


SWAGGER_UI = Path(__file__).parent / "static" / "swagger-ui"


def _offline_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from files shipped in the package (``static/swagger-ui``,
    swagger-ui-dist, Apache-2.0). FastAPI's default loads it from a CDN, which left the page
    blank on a machine without internet access, as GPU nodes often are."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs/static", StaticFiles(directory=SWAGGER_UI), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
        )
