"""``TaskWatcher``: one process's watcher of the tasks its clients wait on.

``infer?wait=S`` and the event streams wait for tasks to change. Rather than each waiting client
polling the database, one thread takes the queue's "these tasks ended" wake-ups
(``Notifier.wait_finished``: the ids ride on NOTIFY on PostgreSQL, on datagrams on SQLite) and
hands each ended task that somebody here waits on to its waiters' event loops. A small result
rides on the wake-up itself, so a waiter for the outcome alone (``wait``: ``infer``) is answered
with no read at all; the others are read in one query. So with several API processes each
reads only its own waiters' tasks.

What wake-ups do not carry (a task starting to run, a wake-up lost in an outage or dropped by a
full socket) a safety look catches every ``poll_s``: one query of the watched tasks' states
(id, status, cancel flag: no inputs or results), then full rows of those that changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from typing import Any

from gpufleet.errors import GpufleetError
from gpufleet.queue.manager import TaskQueue, utcnow
from gpufleet.queue.tasks import Task, TaskStatus

log = logging.getLogger(__name__)

# (its loop, its queue, whether it needs the whole task rather than the outcome alone)
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[Task]", bool]
_Outcome = tuple[str, Any]  # (status, result) as a finished wake-up carries it
_State = tuple[str, bool]  # (status, cancel_requested)
RECENT = 8192  # ended ids remembered, for a waiter that registers just after its task ended


class TaskWatcher:
    def __init__(self, queue: TaskQueue, *, poll_s: float = 0.5) -> None:
        self.queue = queue
        self.poll_s = poll_s
        self._waiters: dict[str, list[_Waiter]] = {}
        self._seen: dict[str, _State] = {}
        self._base: dict[str, Task] = {}  # each watched task as its first waiter read it
        self._recent: OrderedDict[str, _Outcome | None] = OrderedDict()
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
        self.queue.notifier.interrupt_finished()
        if self._thread is not None:
            self._thread.join(5)

    @contextlib.asynccontextmanager
    async def watch(self, task: Task, *, full: bool = True) -> AsyncIterator[asyncio.Queue[Task]]:
        """Changes of ``task`` (as the caller last read it) arrive on the yielded queue.
        ``full=False``: the caller needs only the outcome (status, result, error) of the
        ended task; the other fields may be as the caller read them."""
        updates: asyncio.Queue[Task] = asyncio.Queue()
        waiter = (asyncio.get_running_loop(), updates, full)
        early: Task | None = None
        missed = False
        with self._lock:
            self._waiters.setdefault(task.id, []).append(waiter)
            self._seen.setdefault(task.id, (task.status.value, task.cancel_requested))
            self._base.setdefault(task.id, task)
            # Its wake-up came before we registered: nobody will say it again.
            if task.id in self._recent and not task.is_finished:
                outcome = self._recent[task.id]
                if outcome is not None and not full:
                    early = _ended(task, outcome)
                else:
                    missed = True
        try:
            if early is not None:
                updates.put_nowait(early)
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
                    self._base.pop(task.id, None)

    async def wait(self, task: Task, timeout: float) -> Task:
        """``task`` once it has ended, or as it stands after ``timeout`` seconds."""
        if task.is_finished or timeout <= 0:
            return task
        deadline = time.monotonic() + timeout
        async with self.watch(task, full=False) as updates:
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
                ended = self.queue.notifier.wait_finished(self.poll_s)
                if self._stop.is_set():
                    return
                wanted: list[str] = []  # some waiter needs the whole task
                outcome_only: list[Task] = []  # only the outcome: no input read back
                with self._lock:
                    for tid in ended.ids:
                        self._recent[tid] = ended.outcomes.get(tid)
                    while len(self._recent) > RECENT:
                        self._recent.popitem(last=False)
                    for tid in ended.ids:
                        waiters = self._waiters.get(tid)
                        if not waiters:
                            continue
                        outcome = ended.outcomes.get(tid)
                        if any(full for _, _, full in waiters):
                            wanted.append(tid)
                        elif outcome is None:  # a large result: read it, not the input
                            outcome_only.append(self._base[tid])
                        else:  # answered from the wake-up: no read
                            self._deliver_locked([_ended(self._base[tid], outcome)])
                self._read(wanted, outcome_only)
                if ended.unknown or time.monotonic() - last_look >= self.poll_s:
                    last_look = time.monotonic()
                    self._look()
            except GpufleetError as e:  # an outage: waiters keep waiting, we keep trying
                log.warning("task watcher: %s", e)
                self._stop.wait(self.poll_s)
            except Exception:
                log.exception("task watcher failed; retrying")
                self._stop.wait(self.poll_s)

    def _look(self) -> None:
        """The safety look: every watched task's state, then what its waiters need of those
        that moved: the row, or for waiters of the outcome alone the outcome once the task
        has ended (a task that only started running is no news to them: nothing is read)."""
        with self._lock:
            ids = list(self._waiters)
        if not ids:
            return
        states = self.queue.task_states(ids)
        wanted: list[str] = []
        outcome_only: list[Task] = []
        with self._lock:
            for tid, st in states.items():
                waiters = self._waiters.get(tid)
                if not waiters or self._seen.get(tid, st) == st:
                    continue
                if any(full for _, _, full in waiters):
                    wanted.append(tid)
                elif TaskStatus(st[0]).is_finished:
                    outcome_only.append(self._base[tid])
                else:
                    self._seen[tid] = st
        self._read(wanted, outcome_only)

    def _read(self, wanted: list[str], outcome_only: list[Task]) -> None:
        """Deliver the rows of ``wanted`` and the outcomes of ``outcome_only``, read now."""
        if wanted:
            self._deliver(self.queue.get_many(wanted).values())
        if outcome_only:
            self._deliver(self.queue.outcomes(outcome_only).values())

    def _deliver(self, tasks: Iterable[Task]) -> None:
        with self._lock:
            read = list(tasks)
            self.reads += len(read)
            self._deliver_locked(read)

    def _deliver_locked(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            if task.id not in self._waiters:  # its last waiter left meanwhile
                continue
            state = (task.status.value, task.cancel_requested)
            if self._seen.get(task.id) == state:
                continue
            self._seen[task.id] = state
            for loop, updates, _ in self._waiters.get(task.id, []):
                with contextlib.suppress(RuntimeError):  # that client's loop has closed
                    loop.call_soon_threadsafe(updates.put_nowait, task)


def _ended(task: Task, outcome: _Outcome) -> Task:
    """``task`` as a finished wake-up says it ended (its outcome; the rest as last read)."""
    status, result = outcome
    return dataclasses.replace(
        task,
        status=TaskStatus(status),
        result=result,
        result_ref=None,
        error=None,
        finished_at=utcnow(),
        lease_owner=None,
        lease_expires_at=None,
    )
