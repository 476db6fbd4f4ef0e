"""``TaskService``: the one service every HTTP protocol calls to submit tasks and wait for them.

The native API, and the protocol sub-applications to come, hold no queue internals: they turn
their requests into ``TaskSpec``s and call this. It owns the process's ``SubmitBatcher``
(concurrent submits share one durable commit) and ``TaskWatcher`` (one thread reading the
tasks that ended for everybody waiting here), and it never blocks an event loop: submits wait
on the batcher's future, waits on the watcher's wake-ups, and only reads go to a thread.

Each input is checked against its model's ``input_schema`` here (``input_checks``, from
``models.input_check``), so every protocol refuses a bad input at once, 422 naming the field.

What a caller may rely on: ``submit`` returns once the task is durable (committed with a disk
flush: it survives a crash of the process, of the database and of the host), and ``run``
returns the task as it was when it ended, or as it stands when ``wait_s`` ran out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from gpufleet.errors import Conflict, GpufleetError, InvalidInput, NotFound, QuotaExceeded
from gpufleet.models.input_check import InputCheck
from gpufleet.monitor import metrics
from gpufleet.queue.batcher import SubmitBatcher
from gpufleet.queue.manager import TaskQueue
from gpufleet.queue.tasks import QueuePlace, Submission, Task, TaskSpec, TaskStatus
from gpufleet.queue.validation import PreparedTask
from gpufleet.queue.watch import TaskWatcher

MAX_BULK = 1000


class TaskService:
    def __init__(
        self,
        queue: TaskQueue,
        *,
        watch_poll_s: float = 0.5,
        input_checks: Mapping[str, InputCheck | None] | None = None,
    ) -> None:
        self.queue = queue
        self.input_checks = dict(input_checks or {})
        self.watcher = TaskWatcher(queue, poll_s=watch_poll_s)
        self.batcher = SubmitBatcher(queue)

    def start(self) -> None:
        self.watcher.start()

    def close(self) -> None:
        self.watcher.stop()
        self.batcher.close()

    async def submit(self, spec: TaskSpec) -> Submission:
        """Queue one task; returns once it is durable."""
        self._check(spec)
        sub = await asyncio.wrap_future(self.batcher.submit_future(spec))
        _count([sub])
        return sub

    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[Submission | GpufleetError]:
        """Queue up to ``MAX_BULK`` tasks in one durable commit; one outcome per spec, in
        order: its ``Submission``, or the error that refused it alone (a bad input, a reused
        idempotency key, the tenant's quota). An outage raises for all."""
        if len(specs) > MAX_BULK:
            raise InvalidInput(
                f"a bulk submit takes at most {MAX_BULK} tasks, got {len(specs)}; split it",
                field="tasks",
                limit=MAX_BULK,
            )
        out = await asyncio.to_thread(self._submit_many, specs)
        _count([s for s in out if isinstance(s, Submission)])
        return out

    def _submit_many(self, specs: Sequence[TaskSpec]) -> list[Submission | GpufleetError]:
        out: list[Submission | GpufleetError | None] = [None] * len(specs)
        good: list[tuple[int, PreparedTask]] = []
        for i, spec in enumerate(specs):
            try:
                self._check(spec)
                good.append((i, self.queue.prepare(spec)))
            except GpufleetError as e:
                out[i] = e
        if good:
            try:
                subs = self.queue.submit_prepared([p for _, p in good])
                for (i, _), sub in zip(good, subs, strict=True):
                    out[i] = sub
            except (Conflict, QuotaExceeded, NotFound, InvalidInput):
                # One item refused inside the transaction: each alone gets its own outcome.
                for i, p in good:
                    try:
                        out[i] = self.queue.submit_prepared([p])[0]
                    except (Conflict, QuotaExceeded, NotFound, InvalidInput) as e:
                        out[i] = e
        return [o for o in out if o is not None]

    def _check(self, spec: TaskSpec) -> None:
        """``InvalidInput`` naming the field when ``spec``'s input breaks its model's
        ``input_schema``."""
        if (check := self.input_checks.get(spec.model)) is not None:
            check(spec.input)

    async def run(self, spec: TaskSpec, wait_s: float) -> tuple[Submission, Task]:
        """Submit, then wait up to ``wait_s`` seconds for the task to end."""
        sub = await self.submit(spec)
        return sub, await self.watcher.wait(sub.task, wait_s)

    async def wait(self, task: Task, timeout: float) -> Task:
        return await self.watcher.wait(task, timeout)

    def watch(self, task: Task) -> AbstractAsyncContextManager[asyncio.Queue[Task]]:
        """Every change of ``task`` (for event streams)."""
        return self.watcher.watch(task)

    async def get(self, task_id: str, tenant: str | None = None) -> Task:
        return await asyncio.to_thread(self.queue.get, task_id, tenant)

    async def queue_position(self, task: Task) -> QueuePlace | None:
        """``TaskQueue.queue_position``, off the event loop (a queued task only: the others
        have none, and need no thread to say so)."""
        if task.status != TaskStatus.QUEUED:
            return None
        return await asyncio.to_thread(self.queue.queue_position, task)

    async def result(self, task: Task) -> Any:
        """A succeeded task's result (from the blob store when it is large)."""
        if task.result_ref is None:
            return task.result
        return await asyncio.to_thread(self.queue.load_result, task)


def _count(subs: Sequence[Submission]) -> None:
    for sub in subs:
        if sub.created:
            metrics.TASKS_SUBMITTED.labels(sub.task.model, sub.task.lane.value).inc()
