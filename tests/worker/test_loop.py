"""The worker loop, in-process on both databases: dynamic batching, per-item failures, the
single retry after a batch error, out-of-memory halving, cancellation and draining."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from gpufleet.models import Batching, ItemError, ModelInfo
from gpufleet.queue import TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore
from gpufleet.worker import Worker, WorkerConfig
from gpufleet.worker.limits import WorkerLimits


class Doubler:
    """A real (tiny) model: doubles numbers. Inputs steer it to misbehave on purpose:
    ``"bad"`` is an item error, ``"boom"`` raises for the whole batch, and batches larger than
    ``oom_above`` raise a CUDA-style out-of-memory error."""

    def __init__(self, max_batch: int = 4, delay_ms: float = 0.0, oom_above: int = 0) -> None:
        self.info = ModelInfo("double", "1")
        self.batching = Batching(max_batch, delay_ms)
        self.oom_above = oom_above
        self.batches: list[list[Any]] = []
        self.gate: threading.Event | None = None  # when set, predict waits for it
        self.entered = threading.Event()
        self.loaded_on: str | None = None

    def load(self, device: str) -> None:
        self.loaded_on = device

    def warmup(self) -> None:
        pass

    def predict(self, inputs: list[Any]) -> list[Any]:
        self.batches.append(list(inputs))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.oom_above and len(inputs) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "boom" in inputs:
            raise ValueError("boom in this batch")
        return [ItemError("bad_input", "no", retryable=False) if x == "bad" else x * 2
                for x in inputs]  # fmt: skip


@pytest.fixture
def q(engine: Engine, blob_dir: Path) -> Iterator[TaskQueue]:
    queue = TaskQueue(engine, LocalBlobStore(blob_dir), lease_s=30)
    yield queue
    queue.close()


def _submit(q: TaskQueue, inputs: list[Any]) -> list[str]:
    return [s.task.id for s in q.submit_many([TaskSpec("double", "1", x) for x in inputs])]


class Running:
    """A worker on a thread, stopped (drained) on exit."""

    def __init__(self, q: TaskQueue, model: Doubler, **config: Any) -> None:
        self.ready = threading.Event()
        cfg = WorkerConfig("double", "1", "w1", **{"idle_poll_s": 0.2, **config})
        self.worker = Worker(q, model, cfg, on_ready=self.ready.set)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,))

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.ready.wait(10)
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive()


def _wait_finished(q: TaskQueue, ids: list[str], timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = q.get_many(ids)
        if all(t.is_finished for t in tasks.values()):
            return tasks
        time.sleep(0.02)
    raise AssertionError(f"not finished: {[t.status for t in q.get_many(ids).values()]}")


def test_tasks_run_in_batches_up_to_the_limit(q: TaskQueue) -> None:
    ids = _submit(q, list(range(10)))
    model = Doubler(max_batch=4)
    with Running(q, model) as worker:
        tasks = _wait_finished(q, ids)
    assert model.loaded_on == "cpu"
    assert [len(b) for b in model.batches] == [4, 4, 2]
    for i, tid in enumerate(ids):
        assert tasks[tid].status == TaskStatus.SUCCEEDED
        assert q.load_result(tasks[tid]) == i * 2
    assert worker.stats.succeeded == 10


class Frozen(Doubler):
    """Records whether the objects alive before serving were out of the collector's way."""

    frozen: list[int]

    def predict(self, inputs: list[Any]) -> list[Any]:
        self.frozen = [*getattr(self, "frozen", []), gc.get_freeze_count()]
        return super().predict(inputs)


def test_what_was_loaded_is_frozen_for_the_collector_while_serving(q: TaskQueue) -> None:
    """After warmup, what is alive (the model, its framework) moves to the collector's
    permanent generation, so collections while serving do not scan it; unfrozen at the end."""
    ids = _submit(q, [1, 2])
    model = Frozen()
    with Running(q, model):
        _wait_finished(q, ids)
    assert model.frozen and all(n > 0 for n in model.frozen)
    assert gc.get_freeze_count() == 0


def test_tasks_arriving_together_wait_up_to_the_queue_delay_for_more(q: TaskQueue) -> None:
    model = Doubler(max_batch=8, delay_ms=3000)
    with Running(q, model):
        first = _submit(q, [1, 2])  # arriving together: work is flowing, a wait may pay
        time.sleep(0.1)  # well within the 3 s the worker waits for a fuller batch
        second = _submit(q, [3])
        _wait_finished(q, first + second)
    assert model.batches == [[1, 2, 3]]


def test_a_lone_task_starts_at_once(q: TaskQueue) -> None:
    """Nothing else is queued, so waiting for a fuller batch cannot help: with a 60 s window
    the task still ends within the 10 s that _wait_finished allows."""
    model = Doubler(max_batch=8, delay_ms=60_000)
    with Running(q, model):
        ids = _submit(q, [1])
        tasks = _wait_finished(q, ids)
    assert tasks[ids[0]].status == TaskStatus.SUCCEEDED
    assert model.batches == [[1]]


def test_after_a_short_batch_the_worker_waits_for_a_wake_up_not_another_claim(
    q: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that came back short emptied the queue: the worker waits for a wake-up
    rather than claim again at once (that empty claim was a write transaction per request)."""
    claims: list[int] = []
    claim = q.claim

    def counting(*args: Any, **kwargs: Any) -> list[Any]:
        got = claim(*args, **kwargs)
        claims.append(len(got))
        return got

    monkeypatch.setattr(q, "claim", counting)
    model = Doubler(max_batch=4)
    running = Running(q, model, idle_poll_s=60.0)  # no safety-net poll during the test
    with running:
        _wait_finished(q, _submit(q, [0]))  # the worker is waiting for wake-ups now
        time.sleep(0.2)
        before = len(claims)
        ids = _submit(q, [1, 2])
        _wait_finished(q, ids)
        time.sleep(0.3)
        assert claims[before:] == [2]
        more = _submit(q, [3])  # and a wake-up still finds new work at once
        _wait_finished(q, more, timeout=10)
        running.stop.set()
        _submit(q, [4])  # a wake-up, so that it sees the stop without waiting out the poll


def test_a_wave_runs_as_soon_as_it_is_in(q: TaskQueue) -> None:
    """Closed-loop clients answered together send again together: right after a batch of 2,
    a wait for more ends when 2 have come, not when the 60 s window does (the test would
    time out)."""
    model = Doubler(max_batch=8, delay_ms=60_000)
    with Running(q, model) as worker:
        _wait_finished(q, _submit(q, [0]))  # alone: at once; and a batch's run time is known
        _wait_finished(q, _submit(q, [1, 2]))  # predict is faster than a wait could pay
        worker.window.run_s = 60.0  # as if predict took a minute: waits may last the window
        ids = _submit(q, [3])
        ids += _submit(q, [4])
        tasks = _wait_finished(q, ids)
    assert all(t.status == TaskStatus.SUCCEEDED for t in tasks.values())
    assert model.batches[-1] == [3, 4]


class Slow(Doubler):
    """A Doubler whose every batch takes ``run_s``."""

    def __init__(self, run_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_s = run_s

    def predict(self, inputs: list[Any]) -> list[Any]:
        out = super().predict(inputs)
        time.sleep(self.run_s)
        return out


def _backlog(q: TaskQueue, n: int) -> list[str]:
    specs = [TaskSpec("double", "1", 100 + i, lane="batch") for i in range(n)]
    return [s.task.id for s in q.submit_many(specs)]


def _wait_batches(model: Doubler, n: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while len(model.batches) < n:
        assert time.monotonic() < deadline, f"{len(model.batches)} batches, not {n}"
        time.sleep(0.005)
    return len(model.batches)


def test_under_a_deep_queue_an_interactive_task_makes_the_next_batch(q: TaskQueue) -> None:
    """While work is deep the next batch is claimed during the run of this one, so the GPU
    does not wait for the database, but only near its end: an interactive task submitted
    while a batch-lane backlog runs is in the batch right after the one running."""
    _backlog(q, 20)
    model = Slow(1.0, max_batch=2)
    with Running(q, model):
        running = _wait_batches(model, 2)  # its run time is known from the first
        [urgent] = _submit(q, [1])
        _wait_finished(q, [urgent])
    assert model.batches[running] == [1]  # the next to start after the one running, alone
    assert all(1 not in b for b in model.batches[:running])


def test_an_interactive_task_claimed_with_batch_lane_work_runs_and_commits_first(
    q: TaskQueue,
) -> None:
    """An interactive task claimed among batch-lane tasks runs in a predict of its own, before
    them, and its result is committed before theirs: its client waits, the batch lane's do
    not, and a full batch would take longer than it alone."""
    ids = _backlog(q, 20)
    model = Slow(0.3, max_batch=4)
    with Running(q, model):
        running = _wait_batches(model, 2)  # deep, with the run time known: claims ahead
        [urgent] = _submit(q, [1])
        _wait_finished(q, [urgent])
        _wait_batches(model, running + 3)  # its claim-mates' batch has run, and one more
    at = model.batches.index([1])
    mates = model.batches[at + 1]  # the rest of its claim: the batch lane's, after it
    assert 0 < len(mates) < 4 and 1 not in mates
    tasks = {t.input: t for t in q.get_many([*ids, urgent]).values()}
    assert all(tasks[x].status == TaskStatus.SUCCEEDED for x in mates)
    assert all(tasks[1].finished_at < tasks[x].finished_at for x in mates)  # type: ignore[operator]
    assert all(tasks[x].started_at == tasks[1].started_at for x in mates)  # one claim


def test_a_client_answered_under_a_backlog_sends_again_into_the_batch_after_the_next(
    q: TaskQueue,
) -> None:
    """A closed-loop interactive client under a batch-lane backlog: answered after its task
    ran alone, it sends again while its claim-mates run, and that request is in the claim
    made at the end of their batch, not the one after (the claim ahead is timed from the
    batch-lane rest's start, not from the interactive task's)."""
    _backlog(q, 40)
    model = Slow(0.3, max_batch=4)
    with Running(q, model):
        _wait_batches(model, 2)  # deep, with the run time known: claims ahead
        [one] = _submit(q, [1])
        _wait_finished(q, [one])
        [two] = _submit(q, [2])
        _wait_finished(q, [two])
    at_one, at_two = model.batches.index([1]), model.batches.index([2])
    assert at_two == at_one + 2  # [1], its claim-mates, then [2] from the next claim


def test_with_a_slow_model_a_batch_of_several_is_followed_back_to_back(q: TaskQueue) -> None:
    """When predict is long enough to hide a claim, the next batch is claimed during this
    one's run even when it is not full: its tasks start before this batch's results commit."""
    model = Slow(0.5, max_batch=8)
    with Running(q, model):
        _wait_finished(q, _submit(q, [1]))  # its run time is known from here on
        first = _submit(q, [2, 3])
        _wait_batches(model, 2)
        second = _submit(q, [4, 5])
        tasks = _wait_finished(q, first + second)
    assert model.batches == [[1], [2, 3], [4, 5]]
    started = [tasks[i].started_at for i in second]
    finished = [tasks[i].finished_at for i in first]
    assert None not in started and None not in finished
    assert max(started) < min(finished)  # type: ignore[type-var]


def test_stopping_under_a_deep_queue_gives_back_what_it_claimed_ahead(q: TaskQueue) -> None:
    ids = _backlog(q, 12)
    model = Slow(0.3, max_batch=2)
    running = Running(q, model)
    with running:
        _wait_batches(model, 3)  # deep, with the run time known: claims ahead
        running.stop.set()
    tasks = q.get_many(ids)
    ran = {x for b in model.batches for x in b}
    for t in tasks.values():
        if t.input in ran:
            assert t.status == TaskStatus.SUCCEEDED
        else:
            assert t.status == TaskStatus.QUEUED and t.lease_owner is None
            assert t.attempts == 0
    assert len(ran) < len(ids)


def test_an_item_error_fails_that_task_alone(q: TaskQueue) -> None:
    ids = _submit(q, [1, "bad", 3])
    with Running(q, Doubler()):
        tasks = _wait_finished(q, ids)
    assert [tasks[i].status for i in ids] == ["succeeded", "failed", "succeeded"]
    bad = tasks[ids[1]]
    assert bad.error is not None and bad.error.code == "bad_input"
    assert bad.attempts == 1  # not retryable: no second attempt


def test_a_batch_error_retries_items_singly_and_fails_only_the_culprit(q: TaskQueue) -> None:
    ids = _submit(q, [1, "boom", 3])
    model = Doubler()
    with Running(q, model):
        tasks = _wait_finished(q, ids)
    assert model.batches == [[1, "boom", 3], [1], ["boom"], [3]]
    assert [tasks[i].status for i in ids] == ["succeeded", "failed", "succeeded"]
    err = tasks[ids[1]].error
    assert err is not None and err.code == "model_error" and "boom" in err.message


def test_a_models_exception_is_logged_with_its_traceback(
    q: TaskQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """The log shows where in the model it failed (its frames, not the worker's); the task
    gets the one-line message."""
    ids = _submit(q, [1, "boom", 3])
    with caplog.at_level(logging.WARNING, logger="gpufleet.worker.loop"), Running(q, Doubler()):
        tasks = _wait_finished(q, ids)
    err = tasks[ids[1]].error
    assert err is not None and err.message == "ValueError: boom in this batch"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback (most recent call last):" in logged
    assert 'test_loop.py", line' in logged and "in predict" in logged
    assert 'raise ValueError("boom in this batch")' in logged
    assert "worker/loop.py" not in logged  # the model's frames only


def test_out_of_memory_halves_the_batch(q: TaskQueue) -> None:
    ids = _submit(q, list(range(8)))
    model = Doubler(max_batch=8, oom_above=2)
    with Running(q, model):
        tasks = _wait_finished(q, ids)
    assert all(t.status == TaskStatus.SUCCEEDED for t in tasks.values())
    assert [len(b) for b in model.batches] == [8, 4, 2, 2, 4, 2, 2]


def test_cancelling_a_running_task_stops_it(q: TaskQueue) -> None:
    model = Doubler(max_batch=1)
    model.gate = threading.Event()
    [first, second] = _submit(q, [1, 2])
    with Running(q, model, heartbeat_s=0.05) as worker:
        assert model.entered.wait(10)  # the first task is in predict
        q.cancel(first)
        q.cancel(second)  # queued: ends at once
        time.sleep(0.2)  # a heartbeat carries the request to the worker
        model.gate.set()
        tasks = _wait_finished(q, [first, second])
    assert tasks[first].status == TaskStatus.CANCELLED
    assert tasks[first].result is None
    assert tasks[second].status == TaskStatus.CANCELLED
    assert worker.stats.cancelled == 1


def test_stopping_finishes_the_batch_in_hand(q: TaskQueue) -> None:
    model = Doubler(max_batch=2)
    model.gate = threading.Event()
    ids = _submit(q, [1, 2, 3, 4])
    running = Running(q, model)
    with running:
        assert model.entered.wait(10)
        running.stop.set()  # drain while the first batch runs
        model.gate.set()
    tasks = q.get_many(ids)
    assert [tasks[i].status for i in ids] == ["succeeded", "succeeded", "queued", "queued"]
    assert all(t.lease_owner is None for t in tasks.values())


def test_out_of_memory_under_a_gpu_share_says_which_limit(q: TaskQueue) -> None:
    [tid] = [s.task.id for s in q.submit_many([TaskSpec("double", "1", 1, max_attempts=1)])]
    model = Doubler(max_batch=1, oom_above=0)
    model.oom_above = -1  # every batch is too big: the one input does not fit alone
    limits = WorkerLimits("fraction", memory_mib=2048, compute_percent=50)
    with Running(q, model, limits=limits):
        task = _wait_finished(q, [tid])[tid]
    assert task.status == TaskStatus.FAILED and task.error is not None
    assert task.error.code == "out_of_memory"
    assert task.error.message.startswith(
        "the input does not fit in this worker's share of the GPU, 2.0 GB "
        "(resources.gpu.memory_gb, mode fraction): CUDA out of memory"
    )


class Faulty(Doubler):
    """Raises what torch raises after a kernel faults: the CUDA context is gone."""

    def predict(self, inputs: list[Any]) -> list[Any]:
        self.batches.append(list(inputs))
        if "fault" in inputs:
            raise RuntimeError(
                "CUDA error: an illegal memory access was encountered\n"
                "CUDA kernel errors might be asynchronously reported at some other API call"
            )
        if "arch" in inputs:
            raise RuntimeError(
                "CUDA error: no kernel image is available for execution on the device"
            )
        return [x for x in inputs]


def _run_until_context_lost(q: TaskQueue, model: Faulty, name: str) -> Worker:
    worker = Worker(q, model, WorkerConfig("double", "1", name, idle_poll_s=0.2))
    thread = threading.Thread(target=worker.run, args=(threading.Event(),))
    thread.start()
    thread.join(20)  # ends by itself once the context is lost: no stop needed
    assert not thread.is_alive()
    return worker


def test_a_lost_cuda_context_fails_only_the_input_that_caused_it(q: TaskQueue) -> None:
    [fault] = [s.task.id for s in q.submit_many([TaskSpec("double", "1", "fault",
                                                          max_attempts=2)])]  # fmt: skip
    ids = _submit(q, ["a", "b"])
    # 1. The batch kills the context: all three go back, an attempt counted; the loop ends.
    model = Faulty(max_batch=3)
    worker = _run_until_context_lost(q, model, "w1")
    assert worker.context_lost is not None
    assert worker.context_lost.check == "cuda.illegal_address"
    assert model.batches == [["fault", "a", "b"]]  # nothing more ran in the broken process
    tasks = q.get_many([fault, *ids])
    assert all(t.status == TaskStatus.QUEUED and t.attempts == 1 for t in tasks.values())
    assert all(t.error is not None and t.error.code == "cuda_context_lost" for t in tasks.values())
    # 2. The restarted worker runs these retried tasks one at a time: the culprit fails alone
    #    (out of attempts); the others, not yet run, are released without an attempt counted.
    model = Faulty(max_batch=3)
    _run_until_context_lost(q, model, "w2")
    assert model.batches == [["fault"]]
    assert q.get(fault).status == TaskStatus.FAILED
    assert [q.get(i).attempts for i in ids] == [1, 1]
    # 3. Its former batch-mates then succeed.
    with Running(q, Faulty(max_batch=3)):
        done = _wait_finished(q, ids)
    assert all(t.status == TaskStatus.SUCCEEDED for t in done.values())


def test_a_known_cuda_error_is_explained_in_the_task(q: TaskQueue) -> None:
    [tid] = _submit(q, ["arch"])
    with Running(q, Faulty(max_batch=1)):
        task = _wait_finished(q, [tid])[tid]
    assert task.status == TaskStatus.FAILED and task.error is not None
    assert task.error.code == "model_error"
    msg = task.error.message
    assert msg.startswith("RuntimeError: CUDA error: no kernel image is available")
    assert "[cuda.no_kernel_image]" in msg and "Fix: rebuild with TORCH_CUDA_ARCH_LIST" in msg
