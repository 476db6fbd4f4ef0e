"""The durable task queue: task states and every transition between them.

It stores through ``gpufleet.store`` and never calls a model or serves HTTP.
"""

from gpufleet.queue.completer import Completer
from gpufleet.queue.maintenance import LeaseReaper
from gpufleet.queue.manager import TaskQueue, utcnow
from gpufleet.queue.tasks import (
    Completion,
    DepthRow,
    Heartbeat,
    Lane,
    QueuePlace,
    QueueStats,
    Recovery,
    Submission,
    Task,
    TaskError,
    TaskPage,
    TaskSpec,
    TaskStatus,
)
from gpufleet.queue.validation import Limits

__all__ = [
    "Completer",
    "Completion",
    "DepthRow",
    "Heartbeat",
    "Lane",
    "LeaseReaper",
    "Limits",
    "QueuePlace",
    "QueueStats",
    "Recovery",
    "Submission",
    "Task",
    "TaskError",
    "TaskPage",
    "TaskQueue",
    "TaskSpec",
    "TaskStatus",
    "utcnow",
]
