"""Python clients of the HTTP API: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak the same ``/v1`` routes and return the API's own pydantic bodies. An error response
raises the ``gpufleet.errors`` class of its code (``ApiError`` for a code this client does not
know); a server that cannot be reached raises ``Unavailable`` naming the URL. Waiting follows
the task's server-sent events rather than polling. The API key is sent, never logged or shown.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel


def _import_httpx() -> None:
    """httpx's ``__init__`` imports its command-line tool (``httpx._main``: Rich, Click,
    Pygments) whenever those are installed, which they are beside gpufleet: two thirds of
    httpx's import time, for a tool this process never runs. Refusing that one import makes
    httpx fall back to its stub ``httpx.main``; the marker is removed at once, so a later
    ``import httpx._main`` still works."""
    if "httpx" in sys.modules:
        return
    sys.modules["httpx._main"] = None  # type: ignore[assignment]
    try:
        import httpx  # noqa: F401
    finally:
        if sys.modules.get("httpx._main", False) is None:
            del sys.modules["httpx._main"]


_import_httpx()

import httpx  # noqa: E402

from gpufleet import __version__  # noqa: E402
from gpufleet.errors import (  # noqa: E402
    ApiError,
    Conflict,
    Forbidden,
    GpufleetError,
    IdempotencyConflict,
    InvalidInput,
    LeaseLost,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    StorageFull,
    StreamStalled,
    TaskCancelled,
    TaskFailed,
    TaskFinished,
    TaskNotFinished,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from gpufleet.wire import (  # noqa: E402
    BulkItem,
    BulkSubmitted,
    Health,
    ModelList,
    QueueView,
    ResultView,
    Submitted,
    TaskList,
    TaskView,
)

__all__ = ["ApiError", "AsyncClient", "Client", "TaskCancelled", "TaskFailed", "WaitTimeout"]

DEFAULT_URL = "http://127.0.0.1:8080"
# The server sends a keep-alive every 15 s on an idle event stream: three missed ones mean the
# connection is dead, and waiting reconnects.
STREAM_READ_TIMEOUT_S = 45.0
FINISHED = frozenset({"succeeded", "failed", "cancelled"})


_ERRORS: dict[str, type[GpufleetError]] = {
    cls.code: cls
    for cls in (
        InvalidInput, PayloadTooLarge, NotFound, Conflict, IdempotencyConflict, TaskFinished,
        TaskNotFinished, LeaseLost, Unauthorized, Forbidden, QuotaExceeded, Unavailable,
        StorageFull,
    )
}  # fmt: skip
# For an error response without our JSON body (a proxy's page, say).
_BY_STATUS: dict[int, type[GpufleetError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    422: InvalidInput, 429: QuotaExceeded, 502: Unavailable, 503: Unavailable,
    504: Unavailable, 507: StorageFull,
}  # fmt: skip

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def error_from_response(response: httpx.Response) -> GpufleetError:
    """The exception an error response stands for. ``details`` holds the error object's other
    fields (the server's ``details`` merged in), ``http_status``, and ``retry_after_s``."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        text = response.text.strip()[:200] or response.reason_phrase
        error = {"code": f"http_{status}", "message": f"HTTP {status} from the server: {text}"}
    code = str(error["code"])
    message = str(error.get("message", code))
    details = {k: v for k, v in error.items() if k not in ("code", "message", "details")}
    if isinstance(error.get("details"), dict):
        details.update(error["details"])
    details["http_status"] = status
    retry_after = response.headers.get("retry-after", "")
    if retry_after.isdigit():
        details["retry_after_s"] = int(retry_after)
    cls = _ERRORS.get(code) or (_BY_STATUS.get(status) if code.startswith("http_") else None)
    if cls is None:
        return ApiError(message, code=code, **details)
    return cls(message, **details)


def _check(response: httpx.Response, model: type[M]) -> M:
    if response.is_error:
        raise error_from_response(response)
    return model.model_validate_json(response.content)


def _unavailable(url: str, exc: httpx.TransportError) -> Unavailable:
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Unavailable(f"cannot connect to the gpufleet API at {url}: {reason}", url=url)
    if isinstance(exc, httpx.TimeoutException):
        return Unavailable(f"no answer from the gpufleet API at {url} in time: {reason}", url=url)
    return Unavailable(f"request to the gpufleet API at {url} failed: {reason}", url=url)


def _options(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


BULK_CHUNK = 1000  # tasks per bulk request: the API's limit
_TASK_KEYS = frozenset(
    {"model", "input", "lane", "priority", "idempotency_key", "webhook_url", "version",
     "max_attempts"}
)  # fmt: skip


def _chunks(items: Iterable[T], n: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _bulk_task(task: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(task, Mapping) or "model" not in task or "input" not in task:
        raise InvalidInput(f"each task needs 'model' and 'input', got {task!r:.80}", field="tasks")
    unknown = set(task) - _TASK_KEYS
    if unknown:
        raise InvalidInput(
            f"unknown task field {sorted(unknown)[0]!r}; known: {', '.join(sorted(_TASK_KEYS))}",
            field="tasks",
        )
    return {k: v for k, v in task.items() if v is not None}


def _reindex(items: list[BulkItem], offset: int) -> list[BulkItem]:
    return [it.model_copy(update={"index": it.index + offset}) for it in items]


def _outcome(view: ResultView) -> Any:
    """``run``: the result value, or the task's failure as an exception."""
    if view.status == "succeeded":
        return view.result
    error = view.error.model_dump() if view.error else None
    if view.status == "cancelled":
        raise TaskCancelled(f"task {view.id} was cancelled", task_id=view.id, error=error)
    what = f"{view.error.code}: {view.error.message}" if view.error else "no error recorded"
    raise TaskFailed(f"task {view.id} failed: {what}", task_id=view.id, error=error)


class _SseParser:
    """Server-sent events, line by line: a ``status`` event's data is a task. Comments (the
    server's keep-alives) come out as ``None`` so a waiter can look at its clock."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[bool, TaskView | None]:
        """(something arrived, the task it completed if any)."""
        if line.startswith(":"):
            return True, None
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self.event = value
            elif name == "data":
                self.data.append(value)
            return False, None
        event, data = self.event, "\n".join(self.data)
        self.event, self.data = "message", []
        if event == "status" and data:
            return True, TaskView.model_validate_json(data)
        return False, None


class _Base:
    def __init__(self, url: str | None, timeout: float) -> None:
        self.url = (url or os.environ.get("GPUFLEET_URL") or DEFAULT_URL).rstrip("/")
        self.timeout = timeout

    @staticmethod
    def _headers(key: str | None) -> dict[str, str]:
        """Request headers; the key lives only in the HTTP client's, never on ``self``."""
        key = key if key is not None else os.environ.get("GPUFLEET_API_KEY")
        headers = {"User-Agent": f"gpufleet-client/{__version__}"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(url={self.url!r})"

    @staticmethod
    def _submit_body(model: str, input: Any, **options: Any) -> dict[str, Any]:
        return {"model": model, "input": input, **_options(**options)}

    @staticmethod
    def _task(task_id: str, tail: str = "") -> str:
        return f"/v1/tasks/{quote(task_id, safe='')}{tail}"

    def _stream_timeout(self, read: float) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=max(read, 0.05))


class Client(_Base):
    """``with Client() as c: c.run("echo", {"text": "hi"})``. URL and key default to the
    environment (``GPUFLEET_URL``, ``GPUFLEET_API_KEY``)."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0):
        super().__init__(url, timeout)
        self._http = httpx.Client(base_url=self.url, headers=self._headers(key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise _unavailable(self.url, e) from e

    def submit(
        self,
        model: str,
        input: Any,
        *,
        lane: str = "interactive",
        priority: int = 0,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        version: str | None = None,
        max_attempts: int | None = None,
    ) -> Submitted:
        body = self._submit_body(
            model, input, lane=lane, priority=priority, idempotency_key=idempotency_key,
            webhook_url=webhook_url, version=version, max_attempts=max_attempts,
        )  # fmt: skip
        return _check(self._send("POST", "/v1/tasks", json=body), Submitted)

    def submit_many(self, tasks: Iterable[Mapping[str, Any]]) -> list[BulkItem]:
        """Queue many tasks, ``BULK_CHUNK`` to a request, each request one durable commit.
        Each task is a mapping with ``model`` and ``input`` and any of ``submit``'s options.
        One ``BulkItem`` per task, in order: its id, or the ``error`` that refused it alone
        (``index`` counts from the first task given)."""
        out: list[BulkItem] = []
        for chunk in _chunks(tasks, BULK_CHUNK):
            body = {"tasks": [_bulk_task(t) for t in chunk]}
            page = _check(self._send("POST", "/v1/tasks/batch", json=body), BulkSubmitted)
            out.extend(_reindex(page.tasks, len(out)))
        return out

    def get_many(self, task_ids: Sequence[str]) -> list[TaskView]:
        """The tasks among ``task_ids`` that exist (and are yours), in one request per 1,000."""
        out: list[TaskView] = []
        for i in range(0, len(task_ids), BULK_CHUNK):
            body = {"ids": list(task_ids[i : i + BULK_CHUNK])}
            out.extend(_check(self._send("POST", "/v1/tasks/lookup", json=body), TaskList).tasks)
        return out

    def get(self, task_id: str) -> TaskView:
        return _check(self._send("GET", self._task(task_id)), TaskView)

    def result(self, task_id: str) -> ResultView:
        return _check(self._send("GET", self._task(task_id, "/result")), ResultView)

    def cancel(self, task_id: str) -> TaskView:
        return _check(self._send("DELETE", self._task(task_id)), TaskView)

    def tasks(
        self,
        status: str | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskList:
        params = _options(status=status, model=model, limit=limit, cursor=cursor)
        return _check(self._send("GET", "/v1/tasks", params=params), TaskList)

    def iter_tasks(
        self, status: str | None = None, model: str | None = None, page_size: int = 100
    ) -> Iterator[TaskView]:
        """Every matching task, newest first, fetching pages as it goes."""
        cursor: str | None = None
        while True:
            page = self.tasks(status=status, model=model, limit=page_size, cursor=cursor)
            yield from page.tasks
            if not page.next_cursor or not page.tasks:
                return
            cursor = page.next_cursor

    def events(self, task_id: str) -> Iterator[TaskView]:
        """The task now, then at every change; ends after it ends."""
        for view in self._events(task_id, STREAM_READ_TIMEOUT_S):
            if view is not None:
                yield view

    def _events(self, task_id: str, read_timeout: float) -> Generator[TaskView | None]:
        parser = _SseParser()
        path, timeout = self._task(task_id, "/events"), self._stream_timeout(read_timeout)
        try:
            with self._http.stream("GET", path, timeout=timeout) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                for line in response.iter_lines():
                    arrived, view = parser.feed(line)
                    if arrived:
                        yield view
        except httpx.ReadTimeout as e:
            raise StreamStalled(f"the event stream of {task_id} at {self.url} went quiet") from e
        except httpx.TransportError as e:
            raise _unavailable(self.url, e) from e

    def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        on_update: Callable[[TaskView], None] | None = None,
    ) -> ResultView:
        """Follow the task's events until it ends (``WaitTimeout`` after ``timeout`` seconds),
        then fetch its outcome. ``on_update`` sees each state the stream reports."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            read = STREAM_READ_TIMEOUT_S if deadline is None else deadline - time.monotonic()
            read = min(read, STREAM_READ_TIMEOUT_S)
            if read <= 0:
                raise self._timed_out(task_id, timeout)
            try:
                with contextlib.closing(self._events(task_id, read)) as stream:
                    for view in stream:
                        if view is not None:
                            if on_update is not None:
                                on_update(view)
                            if view.status in FINISHED:
                                return self.result(task_id)
                        left = math.inf if deadline is None else deadline - time.monotonic()
                        # The read timeout is the time that was left when the stream opened:
                        # reopen it with a shorter one, so a quiet stream cannot carry us past
                        # the deadline (each opening repeats the current state first).
                        if left + 1.0 < read:
                            break
            except StreamStalled:
                pass  # a dead connection: reconnect
            time.sleep(0.05)  # a stream cut short (server restarting): do not spin

    def _timed_out(self, task_id: str, timeout: float | None) -> WaitTimeout:
        status = self.get(task_id).status
        return WaitTimeout(
            f"task {task_id} is still {status} after {timeout:g} s; it goes on: "
            f"wait again or cancel it", task_id=task_id, status=status,
        )  # fmt: skip

    def infer(
        self, model: str, input: Any, *, wait: float = 30.0, **options: Any
    ) -> ResultView | Submitted:
        """Submit and let the server wait up to ``wait`` s: the outcome, or ``Submitted``."""
        response = self._send(
            "POST", f"/v1/models/{quote(model, safe='')}/infer", params={"wait": wait},
            json={"input": input, **_options(**options)},
            timeout=httpx.Timeout(self.timeout, read=wait + self.timeout),
        )  # fmt: skip
        if response.status_code == 202:
            return _check(response, Submitted)
        return _check(response, ResultView)

    def run(self, model: str, input: Any, timeout: float | None = None, **options: Any) -> Any:
        """Submit, wait, and return the result value; ``TaskFailed`` / ``TaskCancelled`` /
        ``WaitTimeout`` otherwise."""
        task = self.submit(model, input, **options)
        return _outcome(self.wait(task.id, timeout))

    def models(self) -> ModelList:
        return _check(self._send("GET", "/v1/models"), ModelList)

    def queue(self) -> QueueView:
        """Live tasks by model, lane and state; workers; tasks finished so far."""
        return _check(self._send("GET", "/v1/queue"), QueueView)

    def health(self) -> Health:
        """Readiness; a 503 answer is a ``Health`` too (``status="unavailable"``)."""
        response = self._send("GET", "/healthz")
        if response.status_code == 503:
            return Health.model_validate_json(response.content)
        return _check(response, Health)


class AsyncClient(_Base):
    """``async with AsyncClient() as c: await c.run("echo", {"text": "hi"})``: ``Client``'s
    methods, awaited; ``events`` and ``iter_tasks`` are async iterators."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 30.0):
        super().__init__(url, timeout)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers(key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise _unavailable(self.url, e) from e

    async def submit(
        self,
        model: str,
        input: Any,
        *,
        lane: str = "interactive",
        priority: int = 0,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        version: str | None = None,
        max_attempts: int | None = None,
    ) -> Submitted:
        body = self._submit_body(
            model, input, lane=lane, priority=priority, idempotency_key=idempotency_key,
            webhook_url=webhook_url, version=version, max_attempts=max_attempts,
        )  # fmt: skip
        return _check(await self._send("POST", "/v1/tasks", json=body), Submitted)

    async def submit_many(self, tasks: Iterable[Mapping[str, Any]]) -> list[BulkItem]:
        """``Client.submit_many``."""
        out: list[BulkItem] = []
        for chunk in _chunks(tasks, BULK_CHUNK):
            body = {"tasks": [_bulk_task(t) for t in chunk]}
            page = _check(await self._send("POST", "/v1/tasks/batch", json=body), BulkSubmitted)
            out.extend(_reindex(page.tasks, len(out)))
        return out

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskView]:
        """``Client.get_many``."""
        out: list[TaskView] = []
        for i in range(0, len(task_ids), BULK_CHUNK):
            body = {"ids": list(task_ids[i : i + BULK_CHUNK])}
            page = _check(await self._send("POST", "/v1/tasks/lookup", json=body), TaskList)
            out.extend(page.tasks)
        return out

    async def get(self, task_id: str) -> TaskView:
        return _check(await self._send("GET", self._task(task_id)), TaskView)

    async def result(self, task_id: str) -> ResultView:
        return _check(await self._send("GET", self._task(task_id, "/result")), ResultView)

    async def cancel(self, task_id: str) -> TaskView:
        return _check(await self._send("DELETE", self._task(task_id)), TaskView)

    async def tasks(
        self,
        status: str | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskList:
        params = _options(status=status, model=model, limit=limit, cursor=cursor)
        return _check(await self._send("GET", "/v1/tasks", params=params), TaskList)

    async def iter_tasks(
        self, status: str | None = None, model: str | None = None, page_size: int = 100
    ) -> AsyncIterator[TaskView]:
        cursor: str | None = None
        while True:
            page = await self.tasks(status=status, model=model, limit=page_size, cursor=cursor)
            for view in page.tasks:
                yield view
            if not page.next_cursor or not page.tasks:
                return
            cursor = page.next_cursor

    async def events(self, task_id: str) -> AsyncIterator[TaskView]:
        """The task now, then at every change; ends after it ends."""
        parser = _SseParser()
        path = self._task(task_id, "/events")
        try:
            timeout = self._stream_timeout(STREAM_READ_TIMEOUT_S)
            async with self._http.stream("GET", path, timeout=timeout) as response:
                if response.is_error:
                    await response.aread()
                    raise error_from_response(response)
                async for line in response.aiter_lines():
                    _, view = parser.feed(line)
                    if view is not None:
                        yield view
        except httpx.ReadTimeout as e:
            raise StreamStalled(f"the event stream of {task_id} at {self.url} went quiet") from e
        except httpx.TransportError as e:
            raise _unavailable(self.url, e) from e

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        on_update: Callable[[TaskView], None] | None = None,
    ) -> ResultView:
        """Follow the task's events until it ends (``WaitTimeout`` after ``timeout`` seconds),
        then fetch its outcome."""
        import asyncio  # here, not at the top: a blocking client's import need not pay for it

        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async for view in self.events(task_id):
                            if on_update is not None:
                                on_update(view)
                            if view.status in FINISHED:
                                return await self.result(task_id)
                    except StreamStalled:
                        pass  # a dead connection: reconnect (the first event repeats the state)
                    await asyncio.sleep(0.05)  # a stream cut short (server restarting)
        except TimeoutError:
            status = (await self.get(task_id)).status
            raise WaitTimeout(
                f"task {task_id} is still {status} after {timeout:g} s; it goes on: "
                f"wait again or cancel it", task_id=task_id, status=status,
            ) from None  # fmt: skip

    async def infer(
        self, model: str, input: Any, *, wait: float = 30.0, **options: Any
    ) -> ResultView | Submitted:
        response = await self._send(
            "POST", f"/v1/models/{quote(model, safe='')}/infer", params={"wait": wait},
            json={"input": input, **_options(**options)},
            timeout=httpx.Timeout(self.timeout, read=wait + self.timeout),
        )  # fmt: skip
        if response.status_code == 202:
            return _check(response, Submitted)
        return _check(response, ResultView)

    async def run(
        self, model: str, input: Any, timeout: float | None = None, **options: Any
    ) -> Any:
        task = await self.submit(model, input, **options)
        return _outcome(await self.wait(task.id, timeout))

    async def models(self) -> ModelList:
        return _check(await self._send("GET", "/v1/models"), ModelList)

    async def queue(self) -> QueueView:
        return _check(await self._send("GET", "/v1/queue"), QueueView)

    async def health(self) -> Health:
        response = await self._send("GET", "/healthz")
        if response.status_code == 503:
            return Health.model_validate_json(response.content)
        return _check(response, Health)
