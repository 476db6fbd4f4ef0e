"""Who is calling: ``Authorization: Bearer KEY`` → a ``Principal`` (tenant, admin).

Keys are checked by ``KeyStore.verify`` (hashed at rest, constant-time comparison). Without a
key store the server refuses to start, unless ``--insecure-no-auth`` was given: then every
caller is the admin of tenant ``default``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gpufleet.api.keys import Principal
from gpufleet.errors import Unauthorized

__all__ = ["Principal", "authenticator", "header_authenticator"]

ANONYMOUS = Principal(tenant="default", admin=True, key_id="insecure-no-auth")


def authenticator(keys: Any, *, insecure: bool) -> Callable[[Request], Awaitable[Principal]]:
    """``await authenticate(request)``: the caller's ``Principal``, or ``Unauthorized``."""
    check = header_authenticator(keys, insecure=insecure)

    async def principal(request: Request) -> Principal:
        return await check(request.headers.get("authorization", ""))

    return principal


def header_authenticator(keys: Any, *, insecure: bool) -> Callable[[str], Awaitable[Principal]]:
    """``await check(authorization_header)``: the same, from the header's value (the ASGI
    fast path has no ``Request``)."""

    async def principal(header: str) -> Principal:
        if insecure:
            return ANONYMOUS
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized(
                "send an API key as 'Authorization: Bearer KEY' (gpufleet keys create)"
            )
        # A key seen in the last few seconds is answered on the event loop; only a cache miss
        # costs a thread and a database read.
        found: Principal | None = keys.cached(key.strip())
        if found is None:
            found = await run_in_threadpool(keys.verify, key.strip())
        if found is None:
            raise Unauthorized("the API key is not valid (unknown, malformed or revoked)")
        return found

    return principal
