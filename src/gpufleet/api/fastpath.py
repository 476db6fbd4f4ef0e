"""``InferFastPath``: ``POST /v1/models/{name}/infer`` answered straight from ASGI.

``infer`` is the route synchronous clients call many times a second, and through FastAPI each
call paid for its router, the dependency solver, request and response objects and five
middleware layers: more CPU than the route's own work at the API's ceiling. This middleware
takes that one method and path before any of them, and does what they did for it: the body
limit (413 while the body streams in), the API key, the ``wait`` query parameter (422 in
FastAPI's words), the error envelope of ``api.errors`` and the request counter for /metrics.

The FastAPI route stays declared, for the OpenAPI document and for an app without this
middleware; both call the same handler (``InferHandler``), so they answer alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gpufleet.api.auth import Principal
from gpufleet.api.errors import (
    BodyTooLarge,
    gpufleet_error_response,
    internal_error_response,
    read_body,
    too_large_response,
    validation_error_response,
)
from gpufleet.errors import GpufleetError
from gpufleet.monitor import metrics

ROUTE = "/v1/models/{name}/infer"
_PREFIX, _SUFFIX = "/v1/models/", "/infer"

# (caller, model name, wait seconds, raw body) -> the response
InferHandler = Callable[[Principal, str, float, bytes], Awaitable[Response]]


def wait_parser(max_wait_s: float, default: float) -> Callable[[bytes], float]:
    """``wait`` from a query string, checked as FastAPI checks ``Query(ge=0, le=max)``."""
    adapter: TypeAdapter[float] = TypeAdapter(Annotated[float, Field(ge=0, le=max_wait_s)])

    def parse(query: bytes) -> float:
        raw = None
        if query:
            for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
                if key == "wait":
                    raw = value  # the last one, as FastAPI takes it
        if raw is None:
            return default
        try:
            return adapter.validate_python(raw)
        except ValidationError as e:
            errors = [{**err, "loc": ("query", "wait")} for err in e.errors()]
            raise RequestValidationError(errors) from None

    return parse


class InferFastPath:
    def __init__(
        self, app: ASGIApp, *, handler: InferHandler,
        authenticate: Callable[[str], Awaitable[Principal]],
        parse_wait: Callable[[bytes], float], max_bytes: int,
    ) -> None:  # fmt: skip
        self.app = app
        self.authenticate = authenticate
        self.handler = handler
        self.parse_wait = parse_wait
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = _model_name(scope) if scope["type"] == "http" else None
        if name is None:
            await self.app(scope, receive, send)
            return
        response = await self._respond(scope, receive, name)
        if response is None:  # the client went away before its body was in
            return
        metrics.HTTP_REQUESTS.labels("POST", ROUTE, str(response.status_code)).inc()
        await response(scope, receive, send)

    async def _respond(self, scope: Scope, receive: Receive, name: str) -> Response | None:
        try:
            body = await read_body(scope, receive, self.max_bytes)
            if body is None:
                return None
            # In FastAPI's order: the key (a dependency), then the query, then the body.
            caller = await self.authenticate(_header(scope, b"authorization"))
            wait = self.parse_wait(scope.get("query_string", b""))
            return await self.handler(caller, name, wait, body)
        except BodyTooLarge:
            return too_large_response(self.max_bytes)
        except GpufleetError as e:
            return gpufleet_error_response(e, "POST", scope["path"])
        except RequestValidationError as e:
            return validation_error_response(e)
        except Exception:
            return internal_error_response("POST", scope["path"])


def _model_name(scope: Scope) -> str | None:
    """The ``{name}`` of a ``POST /v1/models/{name}/infer``, else None (as Starlette matches
    it: one non-empty path segment, under the app's root path)."""
    if scope["method"] != "POST":
        return None
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    name = path[len(_PREFIX) : -len(_SUFFIX)]
    return name if name and "/" not in name else None


def _header(scope: Scope, key: bytes) -> str:
    for name, value in scope.get("headers", []):
        if name == key:
            return bytes(value).decode("latin-1")
    return ""
