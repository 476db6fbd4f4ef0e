"""``TaskWatcher``: one process's watcher of the tasks its clients wait on.

``infer?wait=S`` and the event streams wait for tasks to change. Rather than each waiting client
polling the database, one thread takes the queue's "these tasks ended" wake-ups
(``Notifier.wait_finished``: the ids ride on NOTIFY on PostgreSQL, on datagrams on SQLite) and
reads, in one query, only the ended tasks that somebody here waits on, handing each to its
waiters' event loops. So with several API processes each reads only its own waiters' tasks.

What wake-ups do not carry (a task starting to run, a wake-up lost in an outage or dropped by a
full socket) a safety look catches every ``poll_s``: one query of the watched tasks' states
(id, status, cancel flag: no inputs or results), then full rows of those that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable

from gpufleet.errors import GpufleetError
from gpufleet.queue.manager import TaskQueue
from gpufleet.queue.tasks import Task

log = logging.getLogger(__name__)

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[Task]"]
_State = tuple[str, bool]  # (status, cancel_requested)
RECENT = 8192  # ended ids remembered, for a waiter that registers just after its task ended


class TaskWatcher:
    def __init__(self, queue: TaskQueue, *, poll_s: float = 0.5) -> None:
        self.queue = queue
        self.poll_s = poll_s
        self._waiters: dict[str, list[_Waiter]] = {}
        self._seen: dict[str, _State] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0  # rows read for waiters (the benchmark and tests look at it)

    def start(self) -> None:
        self.queue.notifier.wait_finished(0)  # subscribe before anybody waits
        self._thread = threading.Thread(target=self._run, name="task-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @contextlib.asynccontextmanager
    async def watch(self, task: Task) -> AsyncIterator[asyncio.Queue[Task]]:
        """Changes of ``task`` (as the caller last read it) arrive on the yielded queue."""
        updates: asyncio.Queue[Task] = asyncio.Queue()
        waiter = (asyncio.get_running_loop(), updates)
        with self._lock:
            self._waiters.setdefault(task.id, []).append(waiter)
            self._seen.setdefault(task.id, (task.status.value, task.cancel_requested))
            # Its wake-up came before we registered: nobody will say it again.
            missed = task.id in self._recent and not task.is_finished
        try:
            if missed:
                found = await asyncio.to_thread(self.queue.get_many, [task.id])
                if task.id in found:
                    updates.put_nowait(found[task.id])
            yield updates
        finally:
            with self._lock:
                left = [w for w in self._waiters.get(task.id, []) if w is not waiter]
                if left:
                    self._waiters[task.id] = left
                else:
                    self._waiters.pop(task.id, None)
                    self._seen.pop(task.id, None)

    async def wait(self, task: Task, timeout: float) -> Task:
        """``task`` once it has ended, or as it stands after ``timeout`` seconds."""
        if task.is_finished or timeout <= 0:
            return task
        deadline = time.monotonic() + timeout
        async with self.watch(task) as updates:
            while not task.is_finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    task = await asyncio.wait_for(updates.get(), left)
                except TimeoutError:
                    break
        return task

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self._waiters)

    def _run(self) -> None:
        last_look = time.monotonic()
        while not self._stop.is_set():
            try:
                ended, unknown = self.queue.notifier.wait_finished(self.poll_s)
                with self._lock:
                    for tid in ended:
                        self._recent[tid] = None
                    while len(self._recent) > RECENT:
                        self._recent.popitem(last=False)
                    wanted = [tid for tid in ended if tid in self._waiters]
                if wanted:
                    self._deliver(self.queue.get_many(wanted).values())
                if unknown or time.monotonic() - last_look >= self.poll_s:
                    last_look = time.monotonic()
                    self._look()
            except GpufleetError as e:  # an outage: waiters keep waiting, we keep trying
                log.warning("task watcher: %s", e)
                self._stop.wait(self.poll_s)
            except Exception:
                log.exception("task watcher failed; retrying")
                self._stop.wait(self.poll_s)

    def _look(self) -> None:
        """The safety look: every watched task's state, then the rows of those that moved."""
        with self._lock:
            ids = list(self._waiters)
        if not ids:
            return
        states = self.queue.task_states(ids)
        with self._lock:
            moved = [tid for tid, st in states.items() if self._seen.get(tid, st) != st]
        if moved:
            self._deliver(self.queue.get_many(moved).values())

    def _deliver(self, tasks: Iterable[Task]) -> None:
        with self._lock:
            for task in tasks:
                self.reads += 1
                if task.id not in self._waiters:  # its last waiter left meanwhile
                    continue
                state = (task.status.value, task.cancel_requested)
                if self._seen.get(task.id) == state:
                    continue
                self._seen[task.id] = state
                for loop, updates in self._waiters.get(task.id, []):
                    with contextlib.suppress(RuntimeError):  # that client's loop has closed
                        loop.call_soon_threadsafe(updates.put_nowait, task)
