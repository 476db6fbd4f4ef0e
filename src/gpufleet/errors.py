"""gpufleet's exceptions. Each carries a stable ``code`` and the HTTP status the API answers with.

GpufleetError                         code             HTTP
├── InvalidInput                      invalid_input    422
│   └── PayloadTooLarge               payload_too_large 413
├── NotFound                          not_found        404
│   └── DatabaseNotFound (CLI)        database_not_found
├── Conflict                          conflict         409
│   ├── DatabaseUnused (CLI)          database_unused
│   ├── IdempotencyConflict           idempotency_conflict
│   ├── TaskFinished                  task_finished
│   ├── TaskNotFinished               task_not_finished
│   └── LeaseLost                     lease_lost
├── Unauthorized                      unauthorized     401
├── Forbidden                         forbidden        403
├── QuotaExceeded                     quota_exceeded   429
├── IntegrityError                    integrity_error  500 (a stored file's digest is wrong)
├── IncompatibleGpu                   incompatible_gpu 422 (model needs another GPU or CUDA)
├── InsufficientGpu                   insufficient_gpu 409 (not enough GPU, memory or compute)
├── AgentLost (worker)                agent_lost       503 (a worker's queue agent exited)
├── ApiError (client)                 api_error        502 (or the server's code and status)
├── TaskFailed (client: run)          task_failed      409
├── TaskCancelled (client: run)       task_cancelled   409
├── WaitTimeout (client: wait, run)   wait_timeout     504
└── Unavailable                       unavailable      503
    ├── MpsUnavailable                mps_unavailable
    ├── StorageFull                   storage_full     507
    └── StreamStalled (client)        stream_stalled

The API maps any of these to ``{"error": {"code": ..., "message": ...}}`` in one place, and the
CLI prints ``code: message``. Codes never change once released; add a subclass for a new one.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GpufleetError(Exception):
    """Base class. ``details`` holds machine-readable extras (field names, limits, ids)."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidInput(GpufleetError):
    """A value given by the caller is malformed or out of range; ``field`` names it."""

    code = "invalid_input"
    http_status = 422


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"
    http_status = 413


class NotFound(GpufleetError):
    """The thing does not exist, or belongs to another tenant (the two look the same)."""

    code = "not_found"
    http_status = 404


class DatabaseNotFound(NotFound):
    """The CLI found no gpufleet database where the settings point (no file there, or no
    gpufleet tables in it); the message names the place and how to point elsewhere."""

    code = "database_not_found"


class Conflict(GpufleetError):
    code = "conflict"
    http_status = 409


class DatabaseUnused(Conflict):
    """``keys create`` on a database no server has used (no keys, no tasks): likely not the
    server's. It goes ahead only when told to (``--init``)."""

    code = "database_unused"


class IdempotencyConflict(Conflict):
    """The idempotency key was used before with a different request."""

    code = "idempotency_conflict"


class TaskFinished(Conflict):
    """The task already ended (succeeded, failed or cancelled); it cannot change again."""

    code = "task_finished"


class TaskNotFinished(Conflict):
    """The task's result was asked for while it is still queued or running."""

    code = "task_not_finished"


class LeaseLost(Conflict):
    """The worker no longer holds the task's lease (it expired and the task moved on)."""

    code = "lease_lost"


class Unauthorized(GpufleetError):
    """No API key, or one that is unknown, malformed or revoked (which of these is not said)."""

    code = "unauthorized"
    http_status = 401


class Forbidden(GpufleetError):
    """A valid key that may not do this (an admin-only operation)."""

    code = "forbidden"
    http_status = 403


class QuotaExceeded(GpufleetError):
    code = "quota_exceeded"
    http_status = 429


class IntegrityError(GpufleetError):
    """A stored artifact's bytes do not match their recorded digest: refused, never served."""

    code = "integrity_error"
    http_status = 500


class IncompatibleGpu(GpufleetError):
    """A model cannot run on this device (compute capability, CUDA version, precision); the
    message names what was found, what is needed, and the remedy."""

    code = "incompatible_gpu"
    http_status = 422


class InsufficientGpu(GpufleetError):
    """The GPUs here cannot hold what the models ask for (whole GPUs, memory, compute share);
    the message names the GPU and the shortfall."""

    code = "insufficient_gpu"
    http_status = 409


class Unavailable(GpufleetError):
    """A dependency (database, blob store) cannot take the request now; retry later."""

    code = "unavailable"
    http_status = 503


class AgentLost(GpufleetError):
    """A worker's queue agent (``worker.agent``) exited: the worker gives its tasks back and
    stops, to be restarted. Not an ``Unavailable``: retrying through a dead agent cannot help."""

    code = "agent_lost"
    http_status = 503


class MpsUnavailable(Unavailable):
    """An MPS control daemon could not start (binary missing, no permission, GPU refused)."""

    code = "mps_unavailable"


class StorageFull(Unavailable):
    """The database or blob storage is out of space; new work is refused, nothing is lost."""

    code = "storage_full"
    http_status = 507


# Raised by gpufleet.Client (the client side of the API).


class ApiError(GpufleetError):
    """An error response whose code this client does not know (a newer server, a proxy)."""

    code = "api_error"
    http_status = 502

    def __init__(self, message: str, /, *, code: str = "api_error", **details: Any) -> None:
        super().__init__(message, **details)
        # ``code`` and ``http_status`` are class attributes for the known errors; here they are
        # the server's (``details["http_status"]``), so they live on the instance.
        status = details.get("http_status", type(self).http_status)
        self.__dict__.update(code=code, http_status=int(status))


class TaskFailed(GpufleetError):
    """``run``: the task ended ``failed``; ``details`` has its id and its error."""

    code = "task_failed"
    http_status = 409


class TaskCancelled(GpufleetError):
    """``run``: the task was cancelled before it produced a result."""

    code = "task_cancelled"
    http_status = 409


class WaitTimeout(GpufleetError, TimeoutError):
    """``wait`` / ``run``: the task did not end within the timeout (it goes on running)."""

    code = "wait_timeout"
    http_status = 504


class StreamStalled(Unavailable):
    """An event stream that went quiet for longer than the keep-alives allow."""

    code = "stream_stalled"


def size_text(n: int) -> str:
    """``16 MiB (16,777,216 bytes)``: a limit as people set it, and exactly."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            shown = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            return f"{shown} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"
