"""gpufleet: run big models on a few expensive GPUs for many users."""

from typing import TYPE_CHECKING

from gpufleet.errors import (
    AgentLost,
    ApiError,
    Conflict,
    DatabaseNotFound,
    DatabaseUnused,
    Forbidden,
    GpufleetError,
    IdempotencyConflict,
    IncompatibleGpu,
    InsufficientGpu,
    IntegrityError,
    InvalidInput,
    LeaseLost,
    MpsUnavailable,
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

if TYPE_CHECKING:
    from gpufleet.client import AsyncClient, Client
    from gpufleet.models import ItemError, Model, ModelRunner
    from gpufleet.models.manifest import ModelManifest

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Imported when first asked for, so that ``import gpufleet`` (and with it every CLI call)
    # stays light: the clients import httpx and pydantic, the manifest PyYAML. None of them
    # imports the server (gpufleet.wire holds what the client shares with the API).
    if name in ("Client", "AsyncClient"):
        from gpufleet import client

        return getattr(client, name)
    if name == "ModelManifest":
        from gpufleet.models.manifest import ModelManifest

        return ModelManifest
    if name in ("Model", "ModelRunner", "ItemError"):
        from gpufleet import models

        return getattr(models, name)
    raise AttributeError(f"module 'gpufleet' has no attribute {name!r}")


__all__ = [
    "AgentLost",
    "ApiError",
    "AsyncClient",
    "Client",
    "Conflict",
    "DatabaseNotFound",
    "DatabaseUnused",
    "Forbidden",
    "GpufleetError",
    "IdempotencyConflict",
    "IncompatibleGpu",
    "InsufficientGpu",
    "IntegrityError",
    "InvalidInput",
    "ItemError",
    "LeaseLost",
    "Model",
    "ModelManifest",
    "ModelRunner",
    "MpsUnavailable",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "StorageFull",
    "StreamStalled",
    "TaskCancelled",
    "TaskFailed",
    "TaskFinished",
    "TaskNotFinished",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "__version__",
]
