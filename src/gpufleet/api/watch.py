"""``TaskWatcher``: the API process's one watcher of the tasks its clients wait on.

``POST /v1/models/{name}/infer?wait=S`` and ``GET /v1/tasks/{id}/events`` wait for tasks to
change. Rather than every waiting client polling the database, one thread waits for the
queue's "a task ended" wake-ups (``FINISHED``: NOTIFY on PostgreSQL, datagrams on SQLite)
and then reads every watched task in one query, handing each change to its waiters' event
loops. A short safety poll (``poll_s``) also catches what wake-ups do not carry (a task
starting to run, a wake-up lost in an outage); it is one query for all waiters together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from gpufleet.errors import GpufleetError
from gpufleet.queue import Task, TaskQueue
from gpufleet.queue.notify import FINISHED

log = logging.getLogger(__name__)

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[Task]"]


class TaskWatcher:
    def __init__(self, queue: TaskQueue, *, poll_s: float = 0.5) -> None:
        self.queue = queue
        self.poll_s = poll_s
        self._waiters: dict[str, list[_Waiter]] = {}
        self._seen: dict[str, tuple[str, bool]] = {}  # task id -> (status, cancel_requested)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="task-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @contextlib.asynccontextmanager
    async def watch(self, task: Task) -> AsyncIterator[asyncio.Queue[Task]]:
        """Changes of ``task`` (already read by the caller) arrive on the yielded queue."""
        updates: asyncio.Queue[Task] = asyncio.Queue()
        waiter = (asyncio.get_running_loop(), updates)
        with self._lock:
            self._waiters.setdefault(task.id, []).append(waiter)
            self._seen.setdefault(task.id, (task.status.value, task.cancel_requested))
        try:
            yield updates
        finally:
            with self._lock:
                left = [w for w in self._waiters.get(task.id, []) if w is not waiter]
                if left:
                    self._waiters[task.id] = left
                else:
                    self._waiters.pop(task.id, None)
                    self._seen.pop(task.id, None)

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self._waiters)

    def _run(self) -> None:
        self.queue.notifier.wait(FINISHED, 0)  # subscribe before the first look
        while not self._stop.is_set():
            try:
                self.queue.notifier.wait(FINISHED, self.poll_s)
                self._look()
            except GpufleetError as e:  # an outage: waiters keep waiting, we keep trying
                log.warning("task watcher: %s", e)
                self._stop.wait(self.poll_s)
            except Exception:
                log.exception("task watcher failed; retrying")
                self._stop.wait(self.poll_s)

    def _look(self) -> None:
        with self._lock:
            ids = list(self._waiters)
        if not ids:
            return
        tasks = self.queue.get_many(ids)
        with self._lock:
            for tid, task in tasks.items():
                if tid not in self._waiters:  # its last waiter left meanwhile
                    continue
                state = (task.status.value, task.cancel_requested)
                if self._seen.get(tid) == state:
                    continue
                self._seen[tid] = state
                for loop, updates in self._waiters.get(tid, []):
                    with contextlib.suppress(RuntimeError):  # that client's loop has closed
                        loop.call_soon_threadsafe(updates.put_nowait, task)
