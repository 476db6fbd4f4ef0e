"""``SubmitBatcher``: concurrent submits share one durable commit (group commit).

Every accepted task must survive a power cut, so each submit waits for a disk flush (about
7 ms on the VMs we measure on). SQLite has no group commit of its own and takes one writer at
a time, so an API serving many clients at once would accept about 140 tasks a second however
many threads it has. The batcher's thread takes every submit that arrived while the previous
commit was flushing and writes them in one transaction: callers still return only once their
task is durable, and under load one flush covers dozens of them.

A submit that fails (an idempotency conflict, a tenant over quota, a bad input) must not fail
the others of its group: such a group is retried one submit at a time, so each caller gets
its own outcome. An outage fails the whole group at once (retrying it one by one would hold
every caller for as many lock timeouts as the group has submits).
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING

from gpufleet.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from gpufleet.queue.tasks import Submission, TaskSpec
from gpufleet.queue.validation import PreparedTask
from gpufleet.store.engine import write_turn

if TYPE_CHECKING:
    from gpufleet.queue.submission import SubmissionOps

_Item = tuple[PreparedTask, "Future[Submission]"]


class SubmitBatcher:
    def __init__(self, queue: SubmissionOps, *, max_group: int = 256) -> None:
        self.queue = queue
        self.max_group = max_group
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="submit-batcher", daemon=True)
        self._thread.start()

    def submit(self, spec: TaskSpec) -> Submission:
        """Submit and wait until the task is durable, as ``TaskQueue.submit`` does."""
        return self.submit_future(spec).result()

    def submit_future(self, spec: TaskSpec) -> Future[Submission]:
        """Submit; the future resolves once the task is durable (for callers on an event loop,
        which must not block on the commit). A spec that fails its checks raises here, in the
        caller, and never joins a group."""
        prepared = self.queue.prepare(spec)
        future: Future[Submission] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("submit batcher is closed")
            self._pending.append((prepared, future))
            self._cond.notify()
        return future

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
            # The writer's turn first, then the group: with other processes writing, what
            # arrived while this one waited for its turn goes in the same commit, so groups
            # grow with contention instead of each waiting its turn.
            with write_turn(self.queue.engine):
                with self._cond:
                    n = min(self.max_group, len(self._pending))
                    group = [self._pending.popleft() for _ in range(n)]
                self._commit(group)

    def _commit(self, group: list[_Item]) -> None:
        try:
            results = self.queue.submit_prepared([p for p, _ in group])
        except (InvalidInput, Conflict, NotFound, QuotaExceeded) as e:
            if len(group) == 1:
                group[0][1].set_exception(e)
                return
            for item in group:  # one caller's bad request: each gets its own outcome
                self._commit([item])
            return
        except BaseException as e:  # an outage or a bug: the same for all, at once
            for _, future in group:
                future.set_exception(e)
            return
        for (_, future), result in zip(group, results, strict=True):
            future.set_result(result)
