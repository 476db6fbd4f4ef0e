"""gpufleet: run big models on a few expensive GPUs for many users."""

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

__version__ = "0.1.0"

__all__ = [
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
