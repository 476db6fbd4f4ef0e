"""``Completer``: a worker's results committed in the background, with group commit.

A durable commit waits for the disk (several milliseconds on a VM), which a worker should not
spend idle: it hands a finished batch to the completer and goes on to claim and run the next.
The completer's thread commits batches in order; batches that arrive while a commit is in
flight go together in the next one, so one disk flush covers many batches when the worker is
faster than the disk, and each batch still commits within one flush when it is not.

A batch's outcome arrives on the ``Future`` that ``submit`` returns: its ``Completion``, or the
error that ``complete_many`` raised for that batch alone (a batch that names an unknown task
does not take the others of its group down with it). While the database is unreachable the
completer retries with backoff for up to ``retry_for_s`` (by default one lease period: after
that the tasks are handed on anyway); the results wait in memory, and the worker is slowed down
by ``max_pending`` rather than piling up results without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from gpufleet.errors import GpufleetError, Unavailable
from gpufleet.queue.tasks import Completion

log = logging.getLogger(__name__)

_Batch = tuple[list[tuple[str, Any]], "Future[Completion]"]


class ResultSink(Protocol):
    """Where results commit: the queue itself (``WorkerOps``), or the worker's queue agent
    (``worker.agent``), which runs the queue's own ``complete_many`` in another process."""

    lease_s: float

    def complete_many(self, worker_id: str, results: Sequence[tuple[str, Any]]) -> Completion: ...


class Completer:
    def __init__(
        self,
        queue: ResultSink,
        worker_id: str,
        *,
        max_pending: int = 64,
        retry_for_s: float | None = None,
        inline_sink: ResultSink | None = None,
    ) -> None:
        self.queue = queue
        self.inline_sink = inline_sink or queue  # where inline commits go
        self.worker_id = worker_id
        self.max_pending = max_pending
        self.retry_for_s = queue.lease_s if retry_for_s is None else retry_for_s
        self._pending: deque[_Batch] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"completer-{worker_id}", daemon=True
        )
        self._thread.start()

    def submit(
        self, results: Sequence[tuple[str, Any]], *, inline: bool = False
    ) -> Future[Completion]:
        """Queue a batch's results for the next commit. Blocks while ``max_pending`` batches
        wait already (back-pressure on a worker faster than its database).

        ``inline``: when nothing else is pending, commit in the calling thread before
        returning, to ``inline_sink`` (a worker with no next batch to run: handing over to
        the completer's thread would only add a thread switch to its clients' latency)."""
        future: Future[Completion] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("completer is closed")
            if inline and not self._pending and not self._busy:
                self._busy = True
            else:
                inline = False
        if inline:
            try:
                self._commit([(list(results), future)], self.inline_sink)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            return future
        with self._cond:
            while len(self._pending) >= self.max_pending:
                self._cond.wait()
            self._pending.append((list(results), future))
            self._cond.notify_all()
        return future

    def commit_now(self, results: Sequence[tuple[str, Any]]) -> Future[Completion]:
        """Commit ``results`` in the calling thread at once, to ``inline_sink``, ahead of what
        is pending (the results of tasks whose clients wait while batch work is deep). The
        tasks must not be in any pending batch; the future is done when this returns."""
        future: Future[Completion] = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("completer is closed")
        self._commit([(list(results), future)], self.inline_sink)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every batch submitted so far is committed (or has failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Commit what is pending, then stop the thread. True if everything was written."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return flushed

    def __enter__(self) -> Completer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + (1 if self._busy else 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                group = list(self._pending)
                self._pending.clear()
                self._busy = True
                self._cond.notify_all()  # room for submitters blocked on max_pending
            try:
                self._commit(group, self.queue)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _commit(self, group: list[_Batch], sink: ResultSink) -> None:
        merged = [item for results, _ in group for item in results]
        try:
            report = self._with_retry(merged, sink)
        except GpufleetError as e:
            if len(group) == 1 or isinstance(e, Unavailable):
                _fail(group, e)
                return
            for batch in group:  # find the batch at fault; the others commit
                self._commit([batch], sink)
            return
        except BaseException as e:  # a bug or a driver error: every waiter must hear of it
            log.exception("completing %d results failed", len(merged))
            _fail(group, e)
            return
        accepted = set(report.accepted)
        for results, future in group:
            ids = [tid for tid, _ in results]
            future.set_result(
                Completion(
                    tuple(tid for tid in ids if tid in accepted),
                    {tid: report.rejected[tid] for tid in ids if tid in report.rejected},
                )
            )

    def _with_retry(self, merged: list[tuple[str, Any]], sink: ResultSink) -> Completion:
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.05
        while True:
            try:
                return sink.complete_many(self.worker_id, merged)
            except Unavailable as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unavailable, retrying results in %.2fs: %s", delay, e)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)


def _fail(group: list[_Batch], error: BaseException) -> None:
    for _, future in group:
        future.set_exception(error)
