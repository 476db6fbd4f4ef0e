"""The ``ModelRunner`` protocol: what a worker needs from a model, and nothing more.

A worker process loads one runner on one device, calls ``warmup`` once, then ``predict`` on
batches of inputs (decoded JSON values) it claimed from the queue. ``predict`` returns one
output per input, in order: a JSON-serialisable value, or an ``ItemError`` for an input that
fails alone (bad prompt, content refused) while the rest of the batch succeeds. An exception
raised by ``predict`` concerns the whole batch: the worker retries its items one by one once,
then fails the ones that still raise. A CUDA out-of-memory error halves the batch instead.

Runners declare their batching limits; the worker gathers up to ``max_batch_size`` inputs,
waiting at most ``max_queue_delay_ms`` for more when the batch is not full (Triton's dynamic
batcher, with the same two knobs).

``input_schema`` / ``example_input`` describe what one input looks like: ``GET /v1/models``
publishes both, and the example works as-is.

A model's own code need not implement all of this: ``gpufleet.Model`` (``base.py``) is the
class to subclass, and the loader fills ``info`` and ``batching`` from ``model.yaml`` and
gives a class without ``load`` / ``warmup`` no-op ones. This protocol is what the platform
types against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 1
    max_queue_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max_batch_size must be 1-1024, got {self.max_batch_size}")
        if not 0 <= self.max_queue_delay_ms <= 60_000:
            raise ValueError(f"max_queue_delay_ms must be 0-60000, got {self.max_queue_delay_ms}")


@dataclass(frozen=True)
class ItemError:
    """One input's failure. ``retryable`` errors go back to the queue (with backoff, while
    attempts remain); the others fail the task at once with ``code`` and ``message``."""

    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What the platform shows of a runner: name and version as tasks name them."""

    name: str
    version: str
    description: str = ""
    input_schema: dict[str, Any] = field(default_factory=dict)
    example_input: Any = None


@runtime_checkable
class ModelRunner(Protocol):
    info: ModelInfo
    batching: Batching

    def load(self, device: str) -> None:
        """Load weights onto ``device``: "cpu", or "cuda:N"."""

    def warmup(self) -> None:
        """Run once after ``load``, before the first claim (compile kernels, fill caches)."""

    def predict(self, inputs: list[Any]) -> list[Any]:
        """One output per input, in order: a JSON value or an ``ItemError``."""


def unload(runner: ModelRunner) -> None:
    """Call the runner's optional ``unload()`` (free device memory before exit)."""
    fn = getattr(runner, "unload", None)
    if callable(fn):
        fn()


def release_cuda_cache(device: str | None) -> None:
    """Give the CUDA caching allocator's free blocks back to the driver (after an unload or
    an out-of-memory error); nothing on other devices, and torch is imported only for CUDA."""
    if device and device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, recognised without importing torch."""
    name = type(error).__name__
    return name == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )
