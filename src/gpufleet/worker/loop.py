"""The worker loop: claim → dynamic batch → predict → complete, heartbeating while it runs.

One ``Worker`` serves one model version on one device. It pulls: it claims only when it can
run a batch at once, so the least busy worker takes the next task (the queue is the balancer).

Dynamic batching: a claim takes up to ``max_batch_size`` tasks; when the batch is not full and
more work is arriving (``worker.batching``: never for a request alone), the worker waits up to
``max_queue_delay_ms`` for more (woken by the queue's wake-ups, not polling) and claims again,
then runs whatever it has.

Failures stay as small as possible:
- a runner's ``ItemError`` fails that one task (retryable or not, as the runner says);
- an exception from ``predict`` retries the batch's items one by one, once, and fails
  (``model_error``) only those that raise again;
- CUDA out-of-memory halves the batch and retries the halves; a single input that still does not
  fit goes back to the queue (``out_of_memory``, retryable);
- an output JSON cannot hold fails that task (``invalid_output``);
- a known CUDA failure is explained in the task's error (``gpu.cuda_errors``: what, why, the
  fix); one that loses the CUDA context (an illegal address, a device-side assert, an MPS
  server gone) sends the batch back to the queue, an attempt counted, and ends the loop
  (``context_lost``): the process must be restarted. Tasks not yet run are released uncounted.
  A task on its second attempt or later runs in a batch of its own, so an input that kills the
  context fails alone and its former batch-mates succeed.

While work is deep (the last claim came back full), or several tasks came and predict is
long enough to hide a claim, the GPU does not wait for the database: the next batch is claimed
while this one runs, as late as still has it in hand when predict ends (so an interactive task
that arrives meanwhile makes that batch), and results commit in the background
(``Completer``). A lone task's results are committed before the next claim, in this thread:
its client is waiting. Interactive tasks claimed among batch-lane work run first, in a
predict of their own, and their results commit at once in this thread, ahead of anything
pending (``Completer.commit_now``); the batch-lane rest runs after them. A wait for more work
never lasts longer than a batch runs (``worker.batching``), so a model faster than the
platform never waits.

The claims and commits that overlap ``predict`` (the claim ahead, the background results
commit) may go through a queue agent (``ops``, ``worker.agent``): the queue's own code in a
child process, so that a Python-bound ``predict`` keeps the GIL. Those made while nothing runs
(a lone request's claim and results) stay in this process: one pipe round trip less each, on
the path a waiting client pays. If the agent exits, the loop ends (``agent_lost``), releasing
what it holds on its own connection.

Heartbeats run on their own thread and report cancel requests and lost leases: a task
cancelled while queued in this worker's batch is dropped before ``predict``, and one
cancelled during ``predict`` ends ``cancelled`` when its result arrives.

Stopping (``stop`` set, e.g. SIGTERM): the worker stops claiming, finishes the batch in hand,
writes its results and returns. ``release_held`` gives back whatever it still holds when its
grace period runs out.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from gpufleet.errors import AgentLost, GpufleetError, InvalidInput, LeaseLost, TaskFinished
from gpufleet.gpu.compat import Finding
from gpufleet.gpu.cuda_errors import context_lost, explain
from gpufleet.models.runtime import ItemError, ModelRunner, is_out_of_memory, release_cuda_cache
from gpufleet.monitor import metrics
from gpufleet.queue import Completer, Completion, Lane, Task, TaskError, TaskQueue, TaskStatus
from gpufleet.queue.completer import ResultSink
from gpufleet.worker.batching import BatchWindow, moving_average
from gpufleet.worker.crash import explained_error, model_traceback, short_error
from gpufleet.worker.limits import WorkerLimits

log = logging.getLogger(__name__)

PIPELINE_MIN_S = 0.002  # a predict shorter than two claims and this gains nothing by overlap
_Results = tuple[list[Task], list[tuple[str, Any]]]  # a batch's tasks, and (id, output) pairs


class ClaimOps(ResultSink, Protocol):
    """Claims and result commits: the queue itself, or a ``QueueAgent``."""

    def claim(
        self,
        model: str,
        version: str,
        worker_id: str,
        *,
        lanes: Iterable[str] = ...,
        max_n: int = 1,
        lease_s: float | None = None,
    ) -> list[Task]: ...


@dataclass
class WorkerConfig:
    model: str
    version: str
    worker_id: str
    device: str = "cpu"
    lanes: tuple[str, ...] = (Lane.INTERACTIVE.value, Lane.BATCH.value)
    max_batch_size: int | None = None  # default: the runner's
    max_queue_delay_ms: float | None = None  # default: the runner's
    idle_poll_s: float = 1.0  # the safety-net poll behind wake-ups
    heartbeat_s: float | None = None  # default: a third of the queue's lease
    limits: WorkerLimits = field(default_factory=WorkerLimits)  # its share of the GPU


@dataclass
class WorkerStats:
    batches: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        queue: TaskQueue,
        runner: ModelRunner,
        config: WorkerConfig,
        *,
        on_ready: Callable[[], None] | None = None,
        ops: ClaimOps | None = None,
    ) -> None:
        self.queue = queue
        self.ops: ClaimOps = ops if ops is not None else queue  # those that overlap predict
        self.runner = runner
        self.config = config
        self.on_ready = on_ready
        self.max_batch = config.max_batch_size or runner.batching.max_batch_size
        delay_ms = config.max_queue_delay_ms
        if delay_ms is None:
            delay_ms = runner.batching.max_queue_delay_ms
        self.max_delay_s = delay_ms / 1000.0
        self.window = BatchWindow(self.max_batch, self.max_delay_s)
        self.heartbeat_s = config.heartbeat_s or queue.lease_s / 3
        self.stats = WorkerStats()
        self._held: dict[str, Task] = {}  # claimed, result not yet committed
        self._cancel: set[str] = set()  # held tasks whose cancellation was requested
        self._lock = threading.Lock()
        self._completer: Completer | None = None
        self._claim_s: float | None = None  # moving average of a claim's round trip
        # Set when a CUDA failure left the context unusable: the loop ends, the process exits.
        self.context_lost: Finding | None = None
        self.agent_lost: AgentLost | None = None  # the queue agent exited: the same

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> WorkerStats:
        """Load, warm up, then serve until ``stop`` is set. Returns when its results are
        durable."""
        cfg = self.config
        self.runner.load(cfg.device)
        self.runner.warmup()
        # Everything alive now (the model, its framework, the modules) goes to the permanent
        # generation: the collections that predict's allocations trigger while serving no
        # longer scan it. On the lent H200, digits at 256 clients: predict 13.8-14.2 ms a
        # batch of 32 without, 11.2-12.3 ms with (the bare loop: 9.6), 1,656-1,989 items/s
        # -> 2,080-2,276 (bench/README.md).
        gc.collect()
        gc.freeze()
        log.info(
            "worker %s ready: %s@%s on %s (batch %d, delay %.0f ms)",
            cfg.worker_id,
            cfg.model,
            cfg.version,
            cfg.device,
            self.max_batch,
            self.max_delay_s * 1000,
        )
        if self.on_ready is not None:
            self.on_ready()
        beat_stop = threading.Event()
        beats = threading.Thread(
            target=self._heartbeats, args=(beat_stop,), name="heartbeat", daemon=True
        )
        beats.start()
        self._completer = Completer(self.ops, cfg.worker_id, inline_sink=self.queue)
        claims = ThreadPoolExecutor(1, thread_name_prefix="claim-ahead")
        ahead: Future[list[Task]] | None = None
        try:
            # Two paces. Pipelined (_pipelined: deep work, or several tasks and a predict
            # that hides a claim) the GPU comes first: the next batch is claimed while this
            # one runs (as late as still has it in hand when predict ends, see _claim_ahead)
            # and the results commit on the completer's thread, both overlapping predict.
            # Otherwise latency comes first: this thread commits the results itself, then
            # claims. On the completer's thread the commit would wait for the GIL at every
            # step while predict launches kernels (up to 5 ms a switch).
            #
            # After a batch whose claim came back short, the queue had nothing more: the loop
            # waits for a wake-up (one that came meanwhile is kept, and returns at once) instead
            # of claiming again. That empty claim was a write transaction per request at one
            # client, holding SQLite's write lock as the next request's submit committed.
            results: _Results | None = None
            drained = False
            while not self._stopping(stop):
                if results is not None:
                    self._hand_on(results, inline=ahead is None)
                    results = None
                try:
                    if ahead is not None:
                        batch = ahead.result()
                    else:
                        batch = [] if drained else self._gather(stop)
                except AgentLost as e:
                    self._lose_agent(e)
                    break
                except GpufleetError as e:  # an outage: keep the model loaded, try again
                    log.warning("claim failed: %s; retrying", e)
                    batch = []
                    stop.wait(1.0)
                ahead = None
                drained = False
                if batch:
                    pipelined = self._pipelined(len(batch))
                    drained = not pipelined and len(batch) < self.max_batch
                    urgent, rest = _split_lanes(batch)
                    if urgent and rest:
                        # Interactive tasks claimed among batch-lane work run first, in a
                        # predict of their own, and their results commit at once: their
                        # clients wait, and a batch of 32 takes longer than one of 2. The
                        # claim ahead is timed from the rest's start, so that the request
                        # an answered client sends next still makes the batch after it.
                        first = self._run_batch(urgent, timed=False)
                        if first is not None:
                            self._hand_on(first, now=True)
                        batch = rest
                    if pipelined:
                        ahead = claims.submit(self._claim_ahead, time.monotonic(), stop)
                    results = self._run_batch(batch)
                    continue
                try:
                    self.queue.wait_for_work(cfg.model, cfg.version, cfg.idle_poll_s, cfg.lanes)
                except GpufleetError as e:
                    log.warning("waiting for work failed: %s; retrying", e)
                    stop.wait(1.0)
            if results is not None and self.agent_lost is None:
                self._hand_on(results)
        finally:
            if ahead is not None:  # its tasks are held: release_held gives them back
                with contextlib.suppress(GpufleetError):
                    ahead.result()
            claims.shutdown()
            self._completer.close(timeout=self.queue.lease_s)
            beat_stop.set()
            beats.join(5)
            self.release_held()
            if self.agent_lost is not None:
                # A claim the agent committed but never answered leaves tasks leased to this
                # worker that it does not know of: back to the queue now, not at lease expiry.
                with contextlib.suppress(GpufleetError):
                    self.queue.recover_worker(cfg.worker_id, "its queue agent exited")
            gc.unfreeze()
        return self.stats

    def _stopping(self, stop: threading.Event) -> bool:
        return stop.is_set() or self.context_lost is not None or self.agent_lost is not None

    def _lose_agent(self, error: AgentLost) -> None:
        if self.agent_lost is None:
            self.agent_lost = error
            log.error("%s; this worker releases its tasks and stops, to be restarted", error)

    def _claim(self, n: int, ops: ClaimOps | None = None) -> list[Task]:
        """Claim up to ``n`` tasks through ``ops`` (this process's queue by default)."""
        cfg = self.config
        started = time.monotonic()
        via = ops if ops is not None else self.queue
        tasks = via.claim(cfg.model, cfg.version, cfg.worker_id, lanes=cfg.lanes, max_n=n)
        self._claim_s = moving_average(self._claim_s, time.monotonic() - started)
        with self._lock:
            for t in tasks:
                self._held[t.id] = t
        return tasks

    def _pipelined(self, n: int) -> bool:
        """Whether the next batch is claimed while this one of ``n`` tasks runs (and this one's
        results commit in the background): when work is deep (the claim came back full), or
        when several tasks came and predict is long enough to hide a claim. Then batches run
        back to back, each taking what arrived while the last one ran; a lone request's batch
        is not pipelined, so its results commit at once, in this thread."""
        run_s = self.window.run_s
        if run_s is None:  # nothing has run yet: how long this one takes is unknown
            return False
        if n >= self.max_batch:
            return True
        return n > 1 and run_s > 2 * (self._claim_s or 0.0) + PIPELINE_MIN_S

    def _claim_ahead(self, started: float, stop: threading.Event) -> list[Task]:
        """The next batch, claimed while the one that ``started`` runs, as late as still has
        it in hand when that one ends (by the moving averages of a batch's run and a claim's
        round trip): a task that arrives meanwhile, an interactive one behind a batch
        backlog, still makes the next batch rather than the one after."""
        lead = 2 * (self._claim_s or 0.0)
        delay = started + (self.window.run_s or 0.0) - lead - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return []  # stopping: the batch in hand is the last
        return self._claim(self.max_batch, self.ops)  # while predict runs: through the agent

    def _gather(self, stop: threading.Event) -> list[Task]:
        batch = self._claim(self.max_batch)
        if not self.window.should_wait(len(batch)):
            return batch
        claimed = len(batch)
        enough = self.window.wave_size()
        if claimed >= enough:  # the wave is in already: nothing to wait for
            return batch
        deadline = time.monotonic() + self.window.wait_s
        while len(batch) < enough and not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.queue.notifier.wait(self.config.model, left)
            batch += self._claim(self.max_batch - len(batch))
        self.window.waited(len(batch) - claimed)
        return batch

    def _run_batch(self, batch: list[Task], *, timed: bool = True) -> _Results | None:
        """Run ``batch``; failures are recorded here, results are returned to hand on.
        ``timed``: its predict counts in the batch window's averages (not the interactive
        part of a claim run apart: it would make a full batch look shorter than it runs)."""
        with self._lock:
            cancelled = {t.id for t in batch if t.id in self._cancel}
        for task in batch:
            if task.id in cancelled:
                self._acknowledge_cancel(task)
        live = [t for t in batch if t.id not in cancelled]
        if not live:
            return None
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(live))
        metrics.BATCH_SIZE.labels(self.config.model).observe(len(live))
        now = datetime.now(UTC)
        for t in live:
            if t.attempts == 1:  # the first claim: time in the queue, as the user saw it
                wait = (now - t.created_at).total_seconds()
                metrics.TASK_SECONDS.labels(t.model, t.lane.value, "queue_wait").observe(wait)
        outputs = self._predict(live, timed=timed)
        done: list[tuple[str, Any]] = []
        for task, out in zip(live, outputs, strict=True):
            if out is _UNRUN:  # held; released uncounted when the loop ends
                continue
            if isinstance(out, ItemError):
                self._fail(task, TaskError(out.code, out.message), retryable=out.retryable)
            else:
                done.append((task.id, out))
        return (live, done) if done else None

    def _hand_on(self, results: _Results, *, inline: bool = False, now: bool = False) -> None:
        """Results to the completer, which commits them in the background (``inline``: here
        and now, when it has nothing else pending; ``now``: here and now, ahead of whatever is
        pending)."""
        live, done = results
        assert self._completer is not None
        if now:
            future = self._completer.commit_now(done)
            future.add_done_callback(lambda f: self._completed(live, done, f))
            return
        future = self._completer.submit(done, inline=inline)
        future.add_done_callback(lambda f: self._completed(live, done, f))

    def _predict(self, batch: list[Task], *, timed: bool = True) -> list[Any]:
        """Outputs for ``batch``, one per task: a value, an ItemError, or ``_UNRUN`` (the
        context was lost before it ran: it stays held, and is released uncounted). Never
        raises for a model's failure; OOM halves the batch, other errors retry items singly
        once; retried tasks run alone."""
        if self.context_lost is not None:
            return [_UNRUN] * len(batch)
        if len(batch) > 1 and any(t.attempts > 1 for t in batch):
            return [out for t in batch for out in self._predict([t])]
        try:
            started = time.perf_counter()
            outputs = self.runner.predict([t.input for t in batch])
            elapsed = time.perf_counter() - started
            if timed:
                self.window.ran(elapsed, len(batch))
            if not isinstance(outputs, list) or len(outputs) != len(batch):
                got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
                raise TypeError(f"predict returned {got} outputs for {len(batch)} inputs")
        except Exception as e:
            finding = explain(str(e))
            if context_lost(finding):
                return self._lose_context(batch, e, finding)
            if is_out_of_memory(e):
                release_cuda_cache(self.config.device)
                if len(batch) == 1:
                    log.warning("task %s does not fit in device memory alone", batch[0].id)
                    return [self._out_of_memory(e)]
                half = len(batch) // 2
                log.warning("out of memory at batch %d; retrying as %d + %d", len(batch), half,
                            len(batch) - half)  # fmt: skip
                return self._predict(batch[:half]) + self._predict(batch[half:])
            if len(batch) == 1:
                return [self._single(batch[0], e)]
            log.warning("predict failed for a batch of %d; retrying one by one\n%s",
                        len(batch), model_traceback(e))  # fmt: skip
            return [self._single(t, None) for t in batch]
        for t in batch:
            metrics.TASK_SECONDS.labels(t.model, t.lane.value, "inference").observe(elapsed)
        return outputs

    def _single(self, task: Task, error: BaseException | None) -> Any:
        """One input alone: its output, or ``model_error`` if predict raises (again)."""
        if self.context_lost is not None:
            return _UNRUN
        if error is None:
            try:
                outputs = self.runner.predict([task.input])
                if isinstance(outputs, list) and len(outputs) == 1:
                    return outputs[0]
                error = TypeError(f"predict returned {outputs!r:.80} for one input")
            except Exception as e:
                finding = explain(str(e))
                if context_lost(finding):
                    return self._lose_context([task], e, finding)[0]
                if is_out_of_memory(e):
                    release_cuda_cache(self.config.device)
                    return self._out_of_memory(e)
                error = e
        log.warning("task %s failed in predict\n%s", task.id, model_traceback(error))
        return ItemError("model_error", explained_error(error), retryable=False)

    def _lose_context(
        self, batch: list[Task], error: BaseException, finding: Finding | None
    ) -> list[Any]:
        """The CUDA context is gone: nothing more can run in this process. The batch goes back
        to the queue (an attempt counted, so an input that always does this ends failed)."""
        if self.context_lost is None:
            self.context_lost = finding
            log.error("CUDA context lost (%s); this worker stops and is restarted",
                      short_error(error))  # fmt: skip
        return [
            ItemError("cuda_context_lost", explained_error(error), retryable=True) for _ in batch
        ]

    def _out_of_memory(self, error: BaseException) -> ItemError:
        message = self.config.limits.out_of_memory_message(error)
        return ItemError("out_of_memory", message[:500], retryable=True)

    # -- outcomes ----------------------------------------------------------------------------

    def _completed(
        self, batch: list[Task], done: list[tuple[str, Any]], future: Future[Completion]
    ) -> None:
        """Runs on the completer's thread once a batch's results are committed (or not)."""
        error = future.exception()
        if isinstance(error, InvalidInput):  # an output JSON cannot hold: find which
            report = Completion(())
            for tid, out in done:
                try:
                    self.queue.complete(tid, self.config.worker_id, out)
                    report = Completion((*report.accepted, tid), report.rejected)
                except InvalidInput as e:
                    task = next(t for t in batch if t.id == tid)
                    self._fail(task, TaskError("invalid_output", e.message), retryable=False)
                except TaskFinished as e:
                    report.rejected[tid] = TaskStatus(e.details["status"])
                except GpufleetError as e:  # its lease runs out and it is retried
                    log.error("result of task %s not recorded: %s", tid, e)
                    self._forget([tid])
        elif isinstance(error, AgentLost):  # still held: release_held gives them back
            self._lose_agent(error)
            return
        elif error is not None:
            # Unavailable past the retry period: the leases run out and the tasks are retried.
            log.error("results of %d tasks were not recorded: %s", len(done), error)
            self._forget([tid for tid, _ in done])
            return
        else:
            report = future.result()
        finished = datetime.now(UTC)
        by_id = {t.id: t for t in batch}
        for tid in report.accepted:
            task = by_id[tid]
            with self._lock:
                was_cancelled = tid in self._cancel
            status = "cancelled" if was_cancelled else "succeeded"
            if was_cancelled:
                self.stats.cancelled += 1
            else:
                self.stats.succeeded += 1
            metrics.TASKS_FINISHED.labels(task.model, task.lane.value, status).inc()
            total = (finished - task.created_at).total_seconds()
            metrics.TASK_SECONDS.labels(task.model, task.lane.value, "total").observe(total)
        self._forget([tid for tid, _ in done])

    def _fail(self, task: Task, error: TaskError, *, retryable: bool) -> None:
        try:
            final = self.queue.fail(task.id, self.config.worker_id, error, retryable=retryable)
        except (LeaseLost, TaskFinished) as e:
            log.info("task %s: %s", task.id, e)
        except GpufleetError as e:  # the lease runs out and the task is retried
            log.error("could not record the failure of task %s: %s", task.id, e)
        else:
            if final.is_finished:
                self.stats.failed += final.status == TaskStatus.FAILED
                metrics.TASKS_FINISHED.labels(task.model, task.lane.value, final.status).inc()
        self._forget([task.id])

    def _acknowledge_cancel(self, task: Task) -> None:
        try:
            self.queue.acknowledge_cancel(task.id, self.config.worker_id)
            self.stats.cancelled += 1
            metrics.TASKS_FINISHED.labels(task.model, task.lane.value, "cancelled").inc()
        except GpufleetError as e:
            log.info("task %s: %s", task.id, e)
        self._forget([task.id])

    def _forget(self, ids: list[str]) -> None:
        with self._lock:
            for tid in ids:
                self._held.pop(tid, None)
                self._cancel.discard(tid)

    # -- leases ------------------------------------------------------------------------------

    def _heartbeats(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception:  # never let leases lapse because of one bad beat
                log.exception("heartbeat failed; trying again")

    def heartbeat(self) -> None:
        with self._lock:
            ids = list(self._held)
        if not ids:
            return
        try:
            beat = self.queue.heartbeat(self.config.worker_id, ids)
        except GpufleetError as e:  # an outage: the next beat tries again
            log.warning("heartbeat failed: %s", e)
            return
        with self._lock:
            self._cancel |= beat.cancel_requested
        if beat.lost:
            log.warning("lost the lease of %d tasks; they run elsewhere", len(beat.lost))

    def release_held(self) -> list[str]:
        """Give back every task still held (unstarted, or its result unwritten)."""
        with self._lock:
            ids = list(self._held)
        if not ids:
            return []
        try:
            released = self.queue.release(self.config.worker_id, ids)
        except GpufleetError as e:  # the leases run out instead
            log.error("could not release %d tasks: %s", len(ids), e)
            return []
        self._forget(ids)
        if released:
            log.info("released %d tasks back to the queue", len(released))
        return released


# An output slot for a task that never ran: the CUDA context was lost before its turn.
_UNRUN: Any = object()


def _split_lanes(batch: list[Task]) -> tuple[list[Task], list[Task]]:
    """A claim's interactive tasks and its batch-lane tasks, each in claim order."""
    urgent = [t for t in batch if t.lane == Lane.INTERACTIVE]
    if not urgent or len(urgent) == len(batch):
        return [], batch
    return urgent, [t for t in batch if t.lane != Lane.INTERACTIVE]
