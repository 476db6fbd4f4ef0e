"""``QueueAgent``: a worker's claims and result commits, run in a child process of its own.

Why a process: a model whose ``predict`` is Python-bound (kernel launches one by one, per-item
pre- and post-processing) holds the GIL while it runs, and in the worker's own interpreter the
SQL of the next claim and of the last batch's results (SQLAlchemy, row decoding, the results'
JSON) took the GIL from it. On the lent H200 with ``builtin:digits`` at 256 clients the worker
process was 98% busy: predict 70%, results commit 16%, claim 8%, each slowing the other. Here
that work runs in another interpreter; the worker only unpickles the claimed tasks and pickles
the outputs, a few hundred microseconds a batch, and ``predict`` keeps the GIL to itself.

What the worker may rely on is unchanged: ``claim`` and ``complete_many`` run the queue's own
code (``WorkerOps``), with its transactions and durability, and return or raise what it does.
Everything else (heartbeats, failures, cancellations, releases) stays on the worker's own
connection: it is rare, and ``release`` must work even when the agent is gone.

Protocol: two duplex pipes, one for claims and one for completions, each served by one
thread in the agent, so a claim never queues behind a durable commit (on PostgreSQL they run
at once; SQLite serialises them in the database anyway). A request is ``(op, args, kwargs)``;
the reply ``("ok", value)`` or ``("error", exception)``.

Lifetime: the worker starts the agent before its model loads (the agent's start-up overlaps
the load) and closes it after the completer's last commit. The agent dies with the worker
(``PR_SET_PDEATHSIG``, the kernel's signal to a child when its parent exits): a worker killed
during a claim leaves no claim committed after its death, which the supervisor's recovery of
the worker's tasks would miss. If the agent dies first, the next claim or commit raises
``AgentLost``: the worker releases what it holds on its own connection and exits
(``EXIT_AGENT_LOST``), and the supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from gpufleet.errors import AgentLost

if TYPE_CHECKING:
    from gpufleet.queue import Completion, Task
    from gpufleet.queue.claim import WorkerOps

log = logging.getLogger(__name__)

OPS = frozenset({"claim", "complete_many"})
_PR_SET_PDEATHSIG = 1


AUTO_MIN_CPUS = 4  # queue_agent=auto: the CPUs a worker needs before an agent pays


def wanted(setting: str, cpus: int | None = None) -> bool:
    """Whether a worker runs a queue agent, by the ``queue_agent`` setting: ``on``, ``off``,
    or ``auto`` (when the worker may use at least ``AUTO_MIN_CPUS`` CPUs: on fewer, the extra
    process takes CPU from the API and the model, and on the 2-core VM it cost a tenth of the
    throughput)."""
    if setting != "auto":
        return setting == "on"
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cpus or 1) >= AUTO_MIN_CPUS


def settings_queue() -> WorkerOps:
    """The queue the settings name (``GPUFLEET_*`` from the environment the agent inherits)."""
    from gpufleet.queue import TaskQueue
    from gpufleet.settings import Settings

    return TaskQueue.from_settings(Settings())


class QueueAgent:
    """The client side, in the worker: ``claim`` and ``complete_many`` as ``WorkerOps`` has
    them, answered by the agent process. Safe to call from several threads."""

    def __init__(
        self, factory: Callable[[], WorkerOps], *, lease_s: float, name: str = "queue-agent"
    ) -> None:
        """Start the agent; ``factory`` (picklable: a module-level function or a partial of
        one) builds its queue in the child. ``lease_s`` is the queue's lease, as
        ``WorkerOps.lease_s`` (the completer's retry period)."""
        self.lease_s = lease_s
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA
        self._claims, claims_end = ctx.Pipe()
        self._completions, completions_end = ctx.Pipe()
        self._locks = {id(c): threading.Lock() for c in (self._claims, self._completions)}
        self._proc = ctx.Process(
            target=serve,
            args=(factory, claims_end, completions_end, os.getpid()),
            name=name,
            daemon=True,
        )
        self._proc.start()
        claims_end.close()
        completions_end.close()
        self._ready = False
        self._lost: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the agent has opened its queue; raises what opening it raised, or
        ``AgentLost`` if it exited or did not answer within ``timeout``."""
        with self._locks[id(self._claims)]:  # one reader of the one "ready" message
            if self._ready:
                return
            try:
                if not self._claims.poll(timeout):
                    self._lost = f"the queue agent did not start within {timeout:.0f}s"
                    raise AgentLost(self._lost)
                status, value = self._claims.recv()
            except (EOFError, OSError):
                raise self._gone() from None
            if status == "error":
                self._lost = f"the queue agent could not open the queue: {value}"
                raise value
            self._ready = True

    def claim(
        self,
        model: str,
        version: str,
        worker_id: str,
        *,
        lanes: Iterable[str] = ("interactive", "batch"),
        max_n: int = 1,
        lease_s: float | None = None,
    ) -> list[Task]:
        kwargs = {"lanes": tuple(lanes), "max_n": max_n, "lease_s": lease_s}
        tasks: list[Task] = self._call(self._claims, "claim", (model, version, worker_id), kwargs)
        return tasks

    def complete_many(self, worker_id: str, results: Sequence[tuple[str, Any]]) -> Completion:
        report: Completion = self._call(
            self._completions, "complete_many", (worker_id, list(results)), {}
        )
        return report

    def close(self, timeout: float = 5.0) -> None:
        """Stop the agent (it ends when its pipes close) and wait for it to exit."""
        for conn in (self._claims, self._completions):
            with self._locks[id(conn)]:
                conn.close()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)

    def _call(
        self, conn: Connection, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._lost is not None:
            raise AgentLost(self._lost)
        if not self._ready:
            self.wait_ready()
        with self._locks[id(conn)]:
            try:
                conn.send((op, args, kwargs))
                status, value = conn.recv()
            except (EOFError, OSError):
                raise self._gone() from None
        if status == "error":
            raise value
        return value

    def _gone(self) -> AgentLost:
        self._proc.join(1.0)
        code = self._proc.exitcode
        how = "is not answering" if code is None else f"exited with code {code}"
        self._lost = f"the queue agent (pid {self._proc.pid}) {how}"
        return AgentLost(self._lost)


# -- the agent process -------------------------------------------------------------------------


def serve(
    factory: Callable[[], WorkerOps], claims: Connection, completions: Connection, parent: int
) -> None:
    """The agent's main: open the queue, then answer both pipes until the worker (pid
    ``parent``) closes them."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the worker drains
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and closes us after its last commit
    logging.basicConfig(
        level=os.environ.get("GPUFLEET_LOG_LEVEL", "INFO"),
        format="%(asctime)s queue-agent %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        queue = factory()
    except BaseException as e:  # the worker raises it from wait_ready
        with contextlib.suppress(OSError):
            claims.send(("error", _sendable(e)))
        return
    claims.send(("ready", None))
    threads = [
        threading.Thread(target=_answer, args=(queue, conn), name=name, daemon=True)
        for conn, name in ((claims, "claims"), (completions, "completions"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with contextlib.suppress(Exception):
        queue.close()


def _answer(queue: WorkerOps, conn: Connection) -> None:
    while True:
        try:
            op, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe, or is gone
        try:
            if op not in OPS:
                raise ValueError(f"the queue agent does not do {op!r}")
            reply: tuple[str, Any] = ("ok", getattr(queue, op)(*args, **kwargs))
        except BaseException as e:
            reply = ("error", _sendable(e))
        try:
            conn.send(reply)
        except (OSError, pickle.PicklingError):
            return


def _sendable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes, this process)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the worker exits, however it exits (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the worker died before prctl took effect
        os._exit(0)
