"""gpufleet: run big models on a few expensive GPUs for many users."""

from typing import TYPE_CHECKING

from gpufleet.errors import (
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
    TaskFinished,
    TaskNotFinished,
    Unauthorized,
    Unavailable,
)

if TYPE_CHECKING:
    from gpufleet.client import AsyncClient, Client

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The clients import httpx and the API schemas: only when asked for, so that
    # ``import gpufleet`` stays light.
    if name in ("Client", "AsyncClient"):
        from gpufleet import client

        return getattr(client, name)
    raise AttributeError(f"module 'gpufleet' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "Forbidden",
    "GpufleetError",
    "IdempotencyConflict",
    "InvalidInput",
    "LeaseLost",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "StorageFull",
    "TaskFinished",
    "TaskNotFinished",
    "Unauthorized",
    "Unavailable",
    "__version__",
]
