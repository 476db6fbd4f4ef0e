"""Every error the API returns has one shape: ``{"error": {"code", "message", ...}}``.

gpufleet errors keep their stable code and HTTP status; request validation errors are 422
``invalid_input`` listing each field; unknown routes and methods keep their 404 / 405 with a
code; anything unexpected is a 500 ``internal`` whose details stay in the server log. Also the
request body size limit, enforced while the body streams in (a lying or absent Content-Length
does not get past it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet.errors import GpufleetError, QuotaExceeded, Unavailable, size_text

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if extra:
        body["details"] = extra
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def gpufleet_error_response(exc: GpufleetError, method: str, path: str) -> JSONResponse:
    """A gpufleet error as its stable code and HTTP status (``Retry-After`` where it says)."""
    headers: dict[str, str] = {}
    if isinstance(exc, QuotaExceeded | Unavailable):
        headers["Retry-After"] = str(int(exc.details.get("retry_after_s", 5)))
    if exc.http_status >= 500:
        log.warning("%s %s: %s", method, path, exc)
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status, headers=headers)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """422 ``invalid_input`` naming the first field, listing every one."""
    fields = [_field_error(err) for err in exc.errors()]
    first = fields[0] if fields else {"field": "body", "message": "invalid request"}
    message = f"{first['field']}: {first['message']}"
    if len(fields) > 1:
        message += f" (and {len(fields) - 1} more)"
    return error_response(422, "invalid_input", message, fields=fields)


def internal_error_response(method: str, path: str) -> JSONResponse:
    """500 ``internal``; the traceback goes to the server log only (call within ``except``)."""
    log.exception("unhandled error in %s %s", method, path)
    return error_response(500, "internal", "internal error; the server log has details")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GpufleetError)
    async def gpufleet_error(request: Request, exc: GpufleetError) -> JSONResponse:
        return gpufleet_error_response(exc, request.method, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else code
        return error_response(exc.status_code, code, detail, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request.method, request.url.path)


class BodyTooLarge(Exception):
    """The request body went over the limit while it streamed in."""


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes | None:
    """The whole request body, or ``None`` when the client went away first. Raises
    ``BodyTooLarge`` as soon as a declared Content-Length or the bytes received pass
    ``max_bytes`` (a lying or absent Content-Length does not get past it)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                too_big = int(value) > max_bytes
            except ValueError:
                too_big = False
            if too_big:
                raise BodyTooLarge
    body: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > max_bytes:
            raise BodyTooLarge
        body.append(chunk)
        if not message.get("more_body", False):
            return b"".join(body)


def too_large_response(max_bytes: int) -> JSONResponse:
    return error_response(
        413,
        "payload_too_large",
        f"request body is over the limit of {size_text(max_bytes)} (an input may "
        "be up to GPUFLEET_MAX_INPUT_BYTES as JSON, plus 1 MiB for the rest)",
        limit=max_bytes,
    )


class BodySizeLimit:
    """413 ``payload_too_large`` for a request body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Read the body before the app sees it (FastAPI reads JSON bodies whole anyway), so a
        # body over the limit is refused before any of it is parsed, Content-Length or not.
        try:
            body = await read_body(scope, receive, self.max_bytes)
        except BodyTooLarge:
            await too_large_response(self.max_bytes)(scope, receive, send)
            return
        message: Message = (
            {"type": "http.disconnect"}  # the client went away: let the app see it
            if body is None
            else {"type": "http.request", "body": body, "more_body": False}
        )
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await self.app(scope, replay, send)


def _field_error(err: Any) -> dict[str, str]:
    """One request validation error as ``{field, message}``. A body that is not JSON at all
    says so, with the parser's reason and where (FastAPI's own reads "body.34: JSON decode
    error")."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        reason = str((err.get("ctx") or {}).get("error", "")) or str(err.get("msg", ""))
        where = f" (at character {loc[1]})" if len(loc) > 1 and isinstance(loc[1], int) else ""
        return {"field": "body", "message": f"the body is not valid JSON: {reason}{where}"}
    return {"field": ".".join(str(p) for p in loc), "message": str(err.get("msg", ""))}
